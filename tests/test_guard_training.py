"""Guards on training: the loss terms against hand-computed values, MixToken's token mapping, that a
short run learns, DDP against one process, exact resume with the heavy augmentations and loader
workers, bf16 autocast, and ``refiner eval --ema`` / ``--split train``."""
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import refiner  # noqa: F401  (registers the models)
from refiner import train as train_module
from refiner.config import TrainConfig, apply_overrides, load_recipe
from refiner.data import EpochSampler
from refiner.train import _attn_cos_reg, _mix_token_box, _soft_ce, train

TINY_ARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}
ENV = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}


def _cfg(**overrides):
    return apply_overrides(load_recipe('default'), dict(dict(model_args=dict(TINY_ARGS)), **overrides))


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _ce(row, target):
    return -sum(t * ls for t, ls in zip(target, _log_softmax(row)))


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ------------------------------------------------------------------------------- the loss terms

def test_soft_ce_and_attention_regulariser_hand_values():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    expected = (_ce([1, 2, 3], [0, 0, 1]) + _ce([0.5, -1, 0], [0.2, 0.5, 0.3])) / 2
    assert _soft_ce(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # cosine over the head axis at every (image, query, key), averaged, over the first `pairs` pairs
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 2, 2) for _ in range(4)]

    def pair(a, b):
        vals = [_cos(a[i, :, n, m].tolist(), b[i, :, n, m].tolist()) for i in range(2) for n in range(2)
                for m in range(2)]
        return sum(vals) / len(vals)

    assert _attn_cos_reg(maps, 2).item() == pytest.approx((pair(maps[0], maps[1]) + pair(maps[1], maps[2])) / 2)
    assert _attn_cos_reg(maps, 12).item() == pytest.approx(sum(pair(maps[i], maps[i + 1]) for i in range(3)) / 3)


class _FakeStep:
    """Stands in for the model's forward_train: fixed outputs, records what it was called with."""

    def __init__(self, B, C, T, with_aux):
        g = torch.Generator().manual_seed(1)
        self.out = {'logits': torch.randn(B, C, generator=g),
                    'attn': [torch.rand(B, 2, 5, 5, generator=g) for _ in range(3)]}
        if with_aux:
            self.out['aux_logits'] = torch.randn(B, T, C, generator=g)
        self.calls = []

    def __call__(self, images, mix_box, want_attn):
        self.calls.append((images.shape, mix_box, want_attn))
        return self.out


@pytest.mark.parametrize('case', ['plain', 'token_labeling', 'mix_token', 'mixup_mix_token'])
def test_training_loss_equals_hand_computed_terms(monkeypatch, case):
    """_Trainer._loss: class-token CE against the (smoothed, Mixup-mixed) target, mixed again by the
    own-token share under MixToken; + dense_weight · mean CE of every token against its image's
    target; + attn_cos_reg · the attention-similarity term. A loss that drops any term, uses hard
    labels or the wrong MixToken share fails."""
    B, C, grid = 4, 3, (2, 3)  # 8×12 images, patch 4: a 2×3 token grid
    tl = case != 'plain'
    cfg = TrainConfig(model='refiner_vit_nano', token_labeling=tl, mix_token=case.endswith('mix_token'),
                      dense_weight=0.5, attn_cos_reg=0.1, attn_cos_pairs=12, smoothing=0.1, mixup=0.0, cutmix=0.0)
    step = _FakeStep(B, C, grid[0] * grid[1], with_aux=tl)
    targets = torch.tensor([0, 2, 1, 2])
    smooth = [[0.9 + 0.1 / C if c == t else 0.1 / C for c in range(C)] for t in targets.tolist()]
    mixup = None
    if case == 'mixup_mix_token':  # a stand-in for timm's Mixup: fixed mixed targets
        lam = 0.7
        mixed = [[lam * a + (1 - lam) * b for a, b in zip(smooth[i], smooth[B - 1 - i])] for i in range(B)]
        mixup = lambda images, t: (images, torch.tensor(mixed))  # noqa: E731
        soft = mixed
    else:
        soft = smooth
    boxes = []
    monkeypatch.setattr(train_module, '_mix_token_box', lambda h, w: boxes.append((h, w)) or ((0, 1, 1, 3), 4 / 6))
    trainer = types.SimpleNamespace(cfg=cfg, mixup=mixup, num_classes=C, step_module=step,
                                    autocast=contextlib.nullcontext(),
                                    model=types.SimpleNamespace(patch_embed=types.SimpleNamespace(patch_size=4)))
    loss = train_module._Trainer._loss(trainer, torch.zeros(B, 3, 8, 12), targets).item()

    own = 4 / 6 if cfg.mix_token else 1.0
    assert step.calls == [((B, 3, 8, 12), (0, 1, 1, 3) if cfg.mix_token else None, True)]
    assert boxes == ([grid] if cfg.mix_token else [])
    logits = step.out['logits'].tolist()
    cls_target = [[own * a + (1 - own) * b for a, b in zip(soft[i], soft[B - 1 - i])] for i in range(B)]
    expected = sum(_ce(logits[i], cls_target[i]) for i in range(B)) / B
    if tl:
        aux = step.out['aux_logits'].tolist()
        dense = [_ce(aux[i][t], soft[i]) for i in range(B) for t in range(grid[0] * grid[1])]
        expected += 0.5 * sum(dense) / len(dense)
    maps = step.out['attn']
    cos = [_cos(maps[k][i, :, n, m].tolist(), maps[k + 1][i, :, n, m].tolist())
           for k in range(2) for i in range(B) for n in range(5) for m in range(5)]
    expected += 0.1 * sum(cos) / len(cos)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_mix_token_box_share_is_the_share_of_own_tokens():
    """The class target is mixed by λ' = 1 - (box area)/(h·w), the tokens the image keeps: it must
    be exactly that for the box returned, not the Beta draw before clipping."""
    h, w = 4, 6
    areas = []
    for seed in range(400):
        np.random.seed(seed)
        res = _mix_token_box(h, w)
        if res is None:
            continue
        (top, left, bottom, right), own = res
        assert 0 <= top < bottom <= h and 0 <= left < right <= w
        area = (bottom - top) * (right - left)
        assert own == pytest.approx(1 - area / (h * w), abs=1e-12)
        areas.append(area / (h * w))
    assert len(areas) > 200 and len(set(areas)) > 5  # boxes of many sizes
    assert 0.1 < np.mean(areas) < 0.6  # cut area ratio from λ ~ Beta(1, 1), clipped at the borders


def test_forward_train_mix_token_mapping():
    """MixToken: tokens inside the box (top, left, bottom, right) come from the batch-flipped images
    right after the stem, and the per-token outputs are swapped back, so that every token's output
    at image i belongs to image i's own content. Checked on a non-square grid with an off-centre
    box against a loop written out in the test."""
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', img_size=(16, 24), embed_dim=32, depth=2, num_heads=2,
                              num_classes=3, aux_head=True).eval()  # eval: BatchNorm does not mix samples
    x = torch.randn(3, 3, 16, 24)
    top, left, bottom, right = box = (1, 2, 3, 5)  # on the 4×6 grid
    with torch.no_grad():
        out = model.forward_train(x, mix_box=box)
        grid = model.patch_embed(x)  # (B, 4, 6, C)
        B, h, w, _ = grid.shape
        mixed = grid.clone()
        for i in range(B):
            for r in range(top, bottom):
                for c in range(left, right):
                    mixed[i, r, c] = grid[B - 1 - i, r, c]
        t = model._pos_embed(mixed)
        prev = None
        for blk in model.blocks:
            t, prev = blk(t, prev)
        t = model.norm(t)
        torch.testing.assert_close(out['logits'], model.head(t[:, 0]))
        aux = model.aux_head(t[:, 1:])  # (B, h·w, classes), row-major tokens
        back = aux.clone()
        for i in range(B):
            for r in range(top, bottom):
                for c in range(left, right):
                    back[i, r * w + c] = aux[B - 1 - i, r * w + c]
        torch.testing.assert_close(out['aux_logits'], back)
        assert not torch.allclose(out['aux_logits'], aux)  # the swap back did something
        plain = model.forward_train(x)
        assert not torch.allclose(plain['logits'], out['logits'])


def test_attention_regulariser_pairs_of_a_refiner():
    """The maps a Refiner-ViT hands on: a refining block hands its input map on unchanged, so every
    (attention, refining) pair is the same tensor and contributes a constant 1 without gradient,
    as in the authors' code; the (refining, attention) pairs carry the gradient."""
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', img_size=16, embed_dim=32, depth=4, num_heads=2,
                              num_classes=3).train()
    maps = model.forward_train(torch.randn(2, 3, 16, 16), return_attn=True)['attn']
    assert maps[0] is maps[1] and maps[2] is maps[3]
    assert _attn_cos_reg(maps[:2], 1).item() == pytest.approx(1.0)
    reg = _attn_cos_reg(maps, 12)
    expected = (1.0 + _attn_cos_reg(maps[1:3], 1).item() + 1.0) / 3
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    reg.backward()
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ learning

@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """A tiny Refiner-ViT (one attention, one refining block) trained for 5 short epochs on the digits."""
    out = tmp_path_factory.mktemp('learn') / 'run'
    cfg = _cfg(epochs=5, batch_size=32, warmup_epochs=0, lr=0.08, seed=0)
    summary = train(cfg, out=str(out), progress=False)
    return out, summary


def test_training_learns(trained_run):
    """Fixed seed, short budget: the training loss falls and held-out top-1 ends far above the 10%
    of chance (a run whose gradients are zeroed or whose updates are lost stays near 10%)."""
    out, summary = trained_run
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    losses = [h['train_loss'] for h in history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert summary['top1'] >= 80.0, summary
    assert summary['top1'] == history[-1]['top1']


def test_eval_ema_and_train_split(trained_run, tmp_path):
    """``refiner eval --ema`` evaluates the EMA weights (the run's EMA loss, not the model's), and
    ``--split train`` the whole training split (1347 digits, not the 450 held out)."""
    from refiner.cli import main
    out, summary = trained_run
    last = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert abs(last['ema_eval_loss'] - last['eval_loss']) > 1e-4  # the two are distinguishable
    results = {}
    for name, extra in (('val', []), ('ema', ['--ema']), ('train', ['--split', 'train'])):
        path = tmp_path / f'{name}.json'
        assert main(['eval', '--checkpoint', str(out), '--json', str(path), *extra]) == 0
        results[name] = json.loads(path.read_text())
    assert results['val']['n'] == results['ema']['n'] == 450 and results['train']['n'] == 1347
    assert results['val']['loss'] == pytest.approx(last['eval_loss'], rel=1e-5)
    assert results['ema']['loss'] == pytest.approx(last['ema_eval_loss'], rel=1e-5)
    assert results['ema']['top1'] == pytest.approx(summary['ema_top1'])
    assert results['train']['loss'] != pytest.approx(results['val']['loss'], rel=1e-3)


# ------------------------------------------------------------------------------------------ DDP

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


# ------------------------------------------------------------------------------ exact resume, bf16

def test_resume_with_mixup_randaugment_erasing_mixtoken_and_workers_is_bit_identical(tmp_path, monkeypatch):
    """A run with Mixup/CutMix, RandAugment, random erasing, flips and token labeling with MixToken,
    interrupted mid-epoch and resumed from its last checkpoint with 2 loader workers, ends with
    the weights of an uninterrupted run without workers, bit for bit."""
    heavy = dict(epochs=2, batch_size=16, train_fraction=0.1, checkpoint_every=3, aa='rand-m9-mstd0.5-inc1',
                 reprob=0.25, mixup=0.8, cutmix=1.0, hflip=0.5, token_labeling=True, mix_token=True, seed=4,
                 model_args=dict(TINY_ARGS, depth=2))
    ref = tmp_path / 'ref'
    train(_cfg(**heavy), out=str(ref), progress=False)

    original = train_module._Trainer._step

    def crash_at_step_7(self, images, targets):
        if self.global_step == 7:
            raise KeyboardInterrupt('simulated kill')
        return original(self, images, targets)

    killed = tmp_path / 'killed'
    monkeypatch.setattr(train_module._Trainer, '_step', crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(**heavy, workers=2), out=str(killed), progress=False)
    monkeypatch.undo()
    state = torch.load(killed / 'checkpoint.pt', weights_only=True)
    assert (state['global_step'], state['epoch'], state['batch_in_epoch']) == (6, 0, 6)  # resumes mid-epoch
    train(_cfg(workers=2), resume=str(killed), progress=False)
    for name in ('model.safetensors', 'model_ema.safetensors'):
        a, b = load_file(str(ref / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_bf16_autocast_end_to_end(tmp_path):
    """``--amp bf16`` on a CPU: a short run trains and evaluates under autocast (its results differ
    from float32 by bf16 rounding, not more)."""
    common = dict(epochs=1, batch_size=16, train_fraction=0.05, warmup_epochs=0, lr=0.08)
    runs = {amp: train(_cfg(amp=amp, **common), out=str(tmp_path / amp), progress=False) for amp in ('none', 'bf16')}
    hist = {amp: json.loads((tmp_path / amp / 'metrics.jsonl').read_text()) for amp in runs}
    assert runs['bf16']['steps'] == runs['none']['steps'] == 4
    assert math.isfinite(hist['bf16']['train_loss']) and math.isfinite(runs['bf16']['eval_loss'])
    assert hist['bf16']['train_loss'] == pytest.approx(hist['none']['train_loss'], rel=0.05)
    assert runs['bf16']['eval_loss'] == pytest.approx(runs['none']['eval_loss'], rel=0.05)
    a, b = (load_file(str(tmp_path / amp / 'model.safetensors')) for amp in ('none', 'bf16'))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast did run in bf16
