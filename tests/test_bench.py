"""refiner bench: a tiny configuration runs and reports."""
import json
import subprocess
import sys

import onnxruntime  # noqa: F401  (the export extra must be installed)

ENV_ARGS = dict(capture_output=True, text=True, timeout=600)


def _cli(*args):
    return subprocess.run([sys.executable, '-W', 'ignore', '-m', 'refiner', *map(str, args)], **ENV_ARGS)


def test_bench_tiny_configuration(tmp_path):
    """Both modes in float32 and bfloat16 side by side (timm's --model-dtype), each against the
    reference in the same precision."""
    out = tmp_path / 'bench.json'
    res = _cli('bench', '--model', 'refiner_vit_nano', '--img-size', '32', '--batch-size', '2', '--train',
               '--model-dtype', 'float32', 'bfloat16', '--reference', 'vit_tiny_patch16_224', '--rounds', '1',
               '--steps', '1', '--warmup', '1', '--json', out)
    assert res.returncode == 0, res.stderr
    assert '| refiner_vit_nano | infer (reparameterized) | bfloat16 |' in res.stdout and 'GEMM roofline' in res.stdout
    report = json.loads(out.read_text())
    rows = {(r['config']['model'], r['config']['mode'], r['config']['model_dtype']): r for r in report['rows']}
    assert set(rows) == {(m, mode, dtype) for m in ('refiner_vit_nano', 'vit_tiny_patch16_224')
                         for mode in ('infer', 'train') for dtype in ('float32', 'bfloat16')}
    assert set(report['gemm_gflops']) == {'float32', 'bfloat16'}
    for (model, _mode, _dtype), row in rows.items():
        assert 'error' not in row, row
        assert row['images_per_s'] > 0 and row['peak_mem_mb'] > 0 and row['gflops_per_image'] > 0
        assert 0 < row['roofline_fraction'] < 10
        if model == 'refiner_vit_nano':
            assert row['speed_ratio'] > 0 and row['mem_ratio'] > 0
    # reparameterized == not, to float32's rounding (bfloat16's: its own)
    assert rows[('refiner_vit_nano', 'infer', 'float32')]['reparameterized_max_rel_diff'] <= 1e-5
    assert rows[('refiner_vit_nano', 'infer', 'bfloat16')]['reparameterized_max_rel_diff'] <= 5e-2
    refused = _cli('bench', '--model', 'refiner_vit_nano', '--amp', 'bf16', '--model-dtype', 'bfloat16')
    assert refused.returncode == 2 and 'drop --amp or --model-dtype' in refused.stderr
