"""refiner bench runs and reports; ONNX and TorchScript exports round-trip."""
import json
import subprocess
import sys

import onnxruntime  # noqa: F401  (the export extra must be installed)
import pytest
import timm
import torch
from conftest import trained_scale

import refiner
from refiner.export import check_onnx, check_torchscript, export_onnx, export_torchscript, prepare

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


def _reference_outputs(model, batches=(1, 3)):
    """The eval model (not reparameterized)'s logits on fixed inputs, and how far they move without the MLPs."""
    import copy
    xs = [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in batches]
    no_mlp = copy.deepcopy(model)
    for blk in no_mlp.blocks:
        blk.mlp.fc2.weight.data.zero_()
        blk.mlp.fc2.bias.data.zero_()
    with torch.no_grad():
        ref = [model(x) for x in xs]
        sensitivity = min(_rel(n, r) for n, r in zip([no_mlp(x) for x in xs], ref))
    assert sensitivity > 1e-2, sensitivity  # an export that lost its MLPs would be far outside the tolerance
    return xs, ref


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize('reparameterize', [True, False])
def test_onnx_round_trip_dynamic_batch(tmp_path, reparameterize):
    import onnxruntime as ort
    original = trained_scale(timm.create_model('refiner_vit_nano', num_classes=7))
    xs, ref = _reference_outputs(original)
    model = prepare(original, reparameterize=reparameterize)
    path = export_onnx(model, str(tmp_path / 'm.onnx'), img_size=32, opset=18)
    errs = check_onnx(str(path), model, 32, batches=(1, 3, 5))
    assert max(errs.values()) <= 1e-4, errs
    # against the model before reparameterization too
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for x, r in zip(xs, ref):
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        assert _rel(out, r) <= 1e-4
    import onnx
    assert onnx.load(str(path)).opset_import[0].version >= 17


def test_torchscript_round_trip(tmp_path):
    original = trained_scale(timm.create_model('refiner_vit_nano', num_classes=7))
    xs, ref = _reference_outputs(original)
    model = prepare(original)
    path = export_torchscript(model, str(tmp_path / 'm.pt'))
    assert max(check_torchscript(str(path), model, 32).values()) <= 1e-5
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert max(_rel(loaded(x), r) for x, r in zip(xs, ref)) <= 1e-5


def test_export_cli_from_an_original_checkpoint(tmp_path):
    res = _cli('export', tmp_path / 'orig.onnx', '--checkpoint', 'tests/data/official_tiny.pt', '--format', 'onnx')
    assert res.returncode == 0, res.stderr
    assert 'max relative difference' in res.stdout
    fixture = torch.load('tests/data/official_tiny.pt', weights_only=True)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / 'orig.onnx'), providers=['CPUExecutionProvider'])
    out = sess.run(None, {sess.get_inputs()[0].name: fixture['input'].numpy()})[0]
    err = (torch.from_numpy(out) - fixture['logits']).abs().max() / fixture['logits'].abs().max()
    assert err <= 1e-4  # the exported file reproduces the authors' model


def test_export_errors(tmp_path):
    res = _cli('export', tmp_path / 'x.onnx', '--model', 'not_a_model', '--format', 'onnx')
    assert res.returncode == 1 and 'not a timm model name' in res.stderr and 'Traceback' not in res.stderr
    assert refiner  # imported for registration
