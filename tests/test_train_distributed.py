"""Distributed training: the sampler splits each global batch between ranks, and two processes train
as one at the same global batch."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import refiner  # noqa: F401  (registers the models)
from refiner.data import EpochSampler


def test_sampler_ranks_split_each_global_batch():
    """Per-rank sharding: at every step the two ranks' batches are disjoint and together are the
    one-process batch of the same global size, so a 2-process run sees the 1-process epoch."""
    for n, shuffle, drop_last in ((103, True, True), (103, False, False), (96, True, False)):
        one = EpochSampler(n, 16, seed=5, shuffle=shuffle, drop_last=drop_last)
        ranks = [EpochSampler(n, 8, seed=5, shuffle=shuffle, drop_last=drop_last, rank=r, world_size=2)
                 for r in range(2)]
        for s in (one, *ranks):
            s.set_epoch(3)
        full, parts = list(one), [list(r) for r in ranks]
        assert one.batches_per_epoch() == ranks[0].batches_per_epoch() == ranks[1].batches_per_epoch()
        for k in range(one.batches_per_epoch()):
            a, b = set(parts[0][8 * k:8 * k + 8]), set(parts[1][8 * k:8 * k + 8])
            if drop_last:
                assert not a & b
            assert a | b == set(full[16 * k:16 * k + 16]), (n, k)
        if drop_last:
            assert len(parts[0]) == len(parts[1]) == len(full) // 2


ENV = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}


RUNNER = '''
import builtins, json, os, sys, tempfile
rank, log, argv = os.environ.get('RANK', '0'), sys.argv[1], sys.argv[2:]
writes = []


def spy(module, name):
    real = getattr(module, name)

    def f(*args, **kwargs):
        writes.append([name, str(kwargs.get('dir') or (args[-1] if args else ''))])  # the folder or the target
        return real(*args, **kwargs)
    setattr(module, name, f)


for module, name in ((tempfile, 'mkstemp'), (tempfile, 'NamedTemporaryFile'), (os, 'replace'), (os, 'rename')):
    spy(module, name)
real_open = builtins.open


def opened(file, mode='r', *args, **kwargs):
    if any(c in mode for c in 'wax+'):
        writes.append(['open', str(file)])
    return real_open(file, mode, *args, **kwargs)


builtins.open = opened
from refiner.cli import main
try:
    rc = main(argv)
finally:
    with real_open(f'{log}.{rank}.json', 'w') as f:
        json.dump(writes, f)
sys.exit(rc)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path, capsys):
    """torchrun with 2 gloo processes at batch 8 each trains the same model as one process at batch
    16 (a BatchNorm-free ViT, no stochastic depth): the same batches, averaged gradients, the
    learning rate of the global batch. Only rank 0 writes files."""
    args = ['--model', 'vit_tiny_patch16_224', '--epochs', '1', '--train-fraction', '0.2', '--no-progress',
            '--set', 'model_args={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}', '--set', 'drop_path=0',
            '--set', 'warmup_epochs=0']
    runner = tmp_path / 'runner.py'
    runner.write_text(RUNNER)
    two = tmp_path / 'two'
    res = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
         str(runner), str(tmp_path / 'writes'), 'train', '--out', str(two), '--batch-size', '8', *args],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    from refiner.cli import main
    one = tmp_path / 'one'
    assert main(['train', '--out', str(one), '--batch-size', '16', *args]) == 0
    printed = capsys.readouterr().out

    lr = [float(m) for m in re.findall(r'learning rate ([0-9.e-]+) = ', printed + res.stdout)]
    assert lr == pytest.approx([1.6e-2 * 16 / 512] * 2, rel=1e-3), lr  # the default recipe's, global batch 16
    assert 'batch 8 x 2' in res.stdout and 'batch 16 x 1' in printed
    s1, s2 = (json.loads((d / 'summary.json').read_text()) for d in (one, two))
    assert s1['steps'] == s2['steps'] == 16 and s2['world_size'] == 2
    for name in ('model.safetensors', 'model_ema.safetensors'):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys()
        for k in a:
            x, y = a[k], b[k]
            if k.endswith('attn.qkv.bias'):  # not the key bias: its gradient is zero in exact arithmetic
                x, y = torch.cat([x[:32], x[64:]]), torch.cat([y[:32], y[64:]])  # (softmax is invariant to
                # it), so AdamW amplifies rounding noise there
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=lambda m, k=k, name=name: f'{name} {k}: {m}')
    assert s1['top1'] == pytest.approx(s2['top1'], abs=0.5)

    writes = {r: json.loads((tmp_path / f'writes.{r}.json').read_text()) for r in ('0', '1')}
    inside = {r: [w for w in ws if str(two) in w[1]] for r, ws in writes.items()}
    assert inside['1'] == [], inside['1']
    written = {Path(w[1]).name for w in inside['0'] if w[0] == 'replace'}
    assert written == {'config.yaml', 'checkpoint.pt', 'metrics.jsonl', 'model.safetensors', 'model_ema.safetensors',
                       'summary.json'}, written
