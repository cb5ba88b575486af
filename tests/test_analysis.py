"""The over-smoothing analysis: CKA estimators, per-block features, attention maps and their refinement
stages, diversity metrics, figures, and the three commands end to end on tiny models and data."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import refiner  # noqa: F401  (registers refiner_vit_*)
from refiner.analysis import (
    AnalysisError,
    AttentionDiversity,
    MinibatchCKA,
    NoAttentionError,
    NoIntermediatesError,
    attention_maps,
    block_features,
    cross_block_similarity,
    curve_at,
    head_similarity,
    hsic_unbiased,
    iterate_features,
    linear_cka,
    normalised_curve,
    plot_attention_grid,
)
from refiner.analysis import commands as cmd
from refiner.data import DataError

TINY_REFINER = '{patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2}'
TINY_VIT = 'vit_tiny_patch16_224{embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}'


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tiny_refiner(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', img_size=16, embed_dim=32, depth=4, num_heads=2,
                              num_classes=10, **kw).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so that refinement changes the map
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10).eval()


# --------------------------------------------------------------------------------------------- CKA

def _cka_gram_reference(X: np.ndarray, Y: np.ndarray) -> float:
    """⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) with an explicit centring matrix."""
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    return float(np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L)))


def _cka_loop_reference(X: np.ndarray, Y: np.ndarray) -> float:
    """The feature form ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F), written with plain loops."""
    n = len(X)
    Xc = [[X[i][a] - sum(X[k][a] for k in range(n)) / n for a in range(X.shape[1])] for i in range(n)]
    Yc = [[Y[i][b] - sum(Y[k][b] for k in range(n)) / n for b in range(Y.shape[1])] for i in range(n)]

    def frob2(A, B, da, db):  # ‖AᵀB‖²_F
        total = 0.0
        for a in range(da):
            for b in range(db):
                total += sum(A[i][a] * B[i][b] for i in range(n)) ** 2
        return total

    d1, d2 = X.shape[1], Y.shape[1]
    return frob2(Yc, Xc, d2, d1) / math.sqrt(frob2(Xc, Xc, d1, d1) * frob2(Yc, Yc, d2, d2))


@pytest.mark.parametrize('n,d1,d2', [(30, 4, 3), (6, 20, 15)])  # the feature form, then the Gram form
def test_linear_cka_matches_independent_formulas(n, d1, d2):
    rng = _rng(n)
    X = rng.normal(size=(n, d1))
    Y = X @ rng.normal(size=(d1, d2)) + 0.5 * rng.normal(size=(n, d2))
    value = linear_cka(X, Y)
    assert value == pytest.approx(_cka_gram_reference(X, Y), abs=1e-12)
    assert value == pytest.approx(_cka_loop_reference(X, Y), abs=1e-12)
    assert 0.0 < value < 1.0
    # torch input of any float dtype gives the same (computed in float64)
    assert linear_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y)) == pytest.approx(value, abs=1e-6)


def test_linear_cka_invariances():
    rng = _rng(1)
    X, Y = rng.normal(size=(40, 8)), rng.normal(size=(40, 6))
    Y[:, :3] += X[:, :3]
    base = linear_cka(X, Y)
    Q1, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    Q2, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(X @ Q1, Y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X, Y @ Q2) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X + 5.0, Y - 2.0) == pytest.approx(base, abs=1e-10)  # column centring
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    A = np.diag(np.linspace(0.1, 10, 8)) @ rng.normal(size=(8, 8))  # invertible, not orthogonal
    assert abs(linear_cka(X @ A, Y) - base) > 1e-3


def test_linear_cka_errors():
    X = np.ones((5, 3)) + np.arange(5)[:, None]
    with pytest.raises(ValueError, match='same number of rows'):
        linear_cka(X, X[:4])
    with pytest.raises(ValueError, match='at least 2 examples'):
        linear_cka(X[:1], X[:1])
    with pytest.raises(ValueError, match='2-D array'):
        linear_cka(np.arange(5.0), X)
    with pytest.raises(ValueError, match='constant features'):
        linear_cka(X, np.full((5, 2), 0.1))


def test_hsic_unbiased_formula():
    rng = _rng(2)
    n = 9
    X, Y = rng.normal(size=(n, 3)), rng.normal(size=(n, 4))
    K, L = X @ X.T, Y @ Y.T
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    ref = (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
           - 2.0 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))
    assert hsic_unbiased(K, L) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match='at least 4'):
        hsic_unbiased(K[:3, :3], L[:3, :3])


def test_minibatch_cka_converges_to_full_data_cka():
    rng = _rng(3)
    n, batch = 4096, 256
    x = rng.normal(size=(n, 12))
    layers = [x, np.tanh(x @ rng.normal(size=(12, 10))) + 0.3 * rng.normal(size=(n, 10)),
              np.maximum(x[:, :6], 0) + 0.5 * rng.normal(size=(n, 6))]
    acc = MinibatchCKA()
    for i in range(0, n, batch):
        acc.update([torch.tensor(f[i:i + batch], dtype=torch.float32) for f in layers])
    m = acc.compute()
    assert m.shape == (3, 3) and acc.num_batches == n // batch and acc.num_examples == n
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    for a in range(3):
        for b in range(3):
            assert abs(m[a, b] - linear_cka(layers[a], layers[b])) < 0.03


def test_minibatch_cka_cross_and_errors():
    rng = _rng(4)
    feats = [torch.tensor(rng.normal(size=(16, d))) for d in (5, 7, 3)]
    same, cross = MinibatchCKA(), MinibatchCKA()
    same.update(feats)
    cross.update_cross(feats, feats[:2])
    np.testing.assert_allclose(cross.compute(), same.compute()[:, :2], atol=1e-12)
    with pytest.raises(ValueError, match='at least 4 examples'):
        MinibatchCKA().update([f[:3] for f in feats])
    with pytest.raises(ValueError, match='3×3 layers'):
        same.update(feats[:2])
    with pytest.raises(ValueError, match='new instance'):
        same.update_cross(feats, feats)
    with pytest.raises(ValueError, match='no minibatches'):
        MinibatchCKA().compute()
    const = MinibatchCKA()
    const.update([feats[0], torch.ones(16, 4)])
    with pytest.raises(ValueError, match='constant features'):
        const.compute()


def test_normalised_curve_and_depth_reading():
    curve = [0.4, 0.55, 0.85, 1.0]
    norm = normalised_curve(curve)
    assert norm[0] == pytest.approx(0.0) and norm[-1] == pytest.approx(1.0)
    assert norm[1] == pytest.approx(0.25)
    assert curve_at(norm, 0.5) == pytest.approx((0.25 + 0.75) / 2)
    assert all(math.isnan(v) for v in normalised_curve([1.0, 1.0]))


# ---------------------------------------------------------------------------------------- features

def test_block_features_refiner_token_major_class_token_first():
    model = _tiny_refiner()
    x = torch.randn(3, 3, 16, 16)
    feats = block_features(model, x)
    assert len(feats) == 4 and all(f.shape == (3, 17 * 32) for f in feats)
    # the last block's output, normalised, is forward_features: (B, N, C) with the class token first
    last = model.norm(feats[-1].view(3, 17, 32))
    torch.testing.assert_close(last, model.forward_features(x))


def test_block_features_timm_vit_and_resnet():
    vit = _tiny_vit()
    feats = block_features(vit, torch.randn(2, 3, 16, 16))
    assert [tuple(f.shape) for f in feats] == [(2, 17 * 32)] * 2
    resnet = timm.create_model('resnet18', num_classes=10).eval()
    feats = block_features(resnet, torch.randn(2, 3, 32, 32))
    assert len(feats) == 5  # stem + 4 stages, each C·H·W
    assert feats[-1].shape == (2, 512 * 1 * 1) and feats[1].shape == (2, 64 * 8 * 8)


def test_block_features_needs_forward_intermediates():
    with pytest.raises(NoIntermediatesError, match=r'has no forward_intermediates\(\); CKA needs per-block outputs'):
        block_features(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), torch.randn(2, 3, 4, 4))
    assert issubclass(NoIntermediatesError, ValueError)


def test_iterate_features_skips_unreadable_batches():
    vit = _tiny_vit()
    batches = [(torch.randn(4, 3, 16, 16), torch.zeros(4), []), (None, None, ['bad.png']),
               (torch.randn(5, 3, 16, 16), torch.zeros(5), [])]
    out = list(iterate_features(vit, batches, 'cpu', progress=False))
    assert [f[0].shape[0] for f in out] == [4, 5]


# ---------------------------------------------------------------------------------- attention maps

def _maps_and_attn_io(model, x, index):
    """attention_maps(model, x), and the input and output of block ``index``'s attention in a plain forward."""
    io = {}

    def hook(module, args, output):
        io['x'], io['out'] = args[0], output

    handle = model.blocks[index].attn.register_forward_hook(hook)
    maps = attention_maps(model, x)
    model(x)
    handle.remove()
    return maps, io


def test_refiner_attention_maps_and_stages_reproduce_the_block():
    model = _tiny_refiner()
    maps, io = _maps_and_attn_io(model, torch.randn(2, 3, 16, 16), 1)
    assert [b['kind'] for b in maps] == ['attention', 'refining', 'attention', 'refining']
    blk, attn = maps[1], model.blocks[1].attn
    assert set(blk) >= {'attn', 'before', 'expanded', 'local', 'reduced'}
    assert blk['expanded'].shape == (2, 6, 17, 17) and blk['attn'].shape == (2, 2, 17, 17)
    torch.testing.assert_close(blk['before'], maps[0]['attn'])  # the handed-over map
    torch.testing.assert_close(attn.refine_norm(blk['reduced']) * attn.refine_scale, blk['attn'])
    # the refined map, applied to the block's own V, gives the block's attention output
    B, N, C = io['x'].shape
    v = attn.qkv(io['x']).view(B, N, 2, 16).transpose(1, 2)  # (B, H, N, d)
    out = attn.proj((blk['attn'] @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, io['out'][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(blk['attn'], blk['before'])


@pytest.mark.parametrize('mode', ['inverted_residual', 'linear'])
def test_refinement_stages_after_folding(mode):
    model = _tiny_refiner(refine_mode=mode)
    x = torch.randn(2, 3, 16, 16)
    before = attention_maps(model, x)
    model.reparameterize()  # norms and the ×s folded into the convolutions ('linear': one dense conv)
    after = attention_maps(model, x)
    torch.testing.assert_close(after[1]['attn'], before[1]['attn'], rtol=1e-4, atol=1e-5)
    assert ('expanded' in after[1]) == (mode == 'inverted_residual') and 'local' in after[1]


def test_timm_vit_attention_maps_reproduce_the_block():
    vit = _tiny_vit()
    maps, io = _maps_and_attn_io(vit, torch.randn(2, 3, 16, 16), 1)
    assert [b['kind'] for b in maps] == ['attention', 'attention'] and 'before' not in maps[1]
    A = maps[1]['attn']
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 2, 17))
    attn = vit.blocks[1].attn
    B, N, C = io['x'].shape
    v = attn.qkv(io['x']).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((A @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, io['out'], rtol=1e-4, atol=1e-5)


def test_retrofitted_vit_has_refinement_stages():
    vit = refiner.refine_vit(_tiny_vit(), blocks=[1])
    maps = attention_maps(vit, torch.randn(2, 3, 16, 16))
    assert [b['kind'] for b in maps] == ['attention', 'attention+refine']
    # zero-initialised refinement: the refined map equals the block's own softmax map
    torch.testing.assert_close(maps[1]['attn'], maps[1]['before'])
    torch.testing.assert_close(maps[1]['before'].sum(-1), torch.ones(2, 2, 17))


def test_diversity_metrics():
    a = torch.rand(3, 4, 5, 5).softmax(-1)
    same_heads = a[:, :1].expand(3, 4, 5, 5)
    torch.testing.assert_close(head_similarity(same_heads), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(cross_block_similarity(a, a), torch.ones(3, dtype=torch.float64))
    assert head_similarity(a[:, :1]) is None
    hs = head_similarity(torch.randn(3, 4, 5, 5))
    assert ((hs >= -1) & (hs <= 1)).all()
    acc = AttentionDiversity()
    acc.update(attention_maps(_tiny_refiner(), torch.randn(2, 3, 16, 16)))
    rows = acc.compute()
    assert rows[0]['cross_block_similarity'] is None and 'head_similarity_before' not in rows[0]
    assert rows[1]['cross_block_similarity_before'] == pytest.approx(1.0)  # reuses the previous map


def test_attention_maps_needs_attention_blocks():
    with pytest.raises(NoAttentionError, match='no transformer blocks'):
        attention_maps(timm.create_model('resnet18'), torch.randn(1, 3, 32, 32))


def test_attention_grid_diverging_for_negative_maps(tmp_path):
    maps = {'before refinement': torch.rand(2, 17, 17), 'refined': torch.randn(2, 17, 17)}
    path = plot_attention_grid(torch.rand(3, 16, 16), maps, 6, (4, 4), tmp_path / 'g.png', block=1)
    assert path.stat().st_size > 5000


# ---------------------------------------------------------------------------------------- commands

def _args(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def _cka_values(matrix):
    return [v for row in matrix for v in row]


def test_cka_command_end_to_end(tmp_path, capsys):
    out = tmp_path / 'cka'
    args = _args(cmd.add_analyze_args, [
        'cka', '--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
        '--compare', TINY_VIT, 'resnet18', '--max-images', '32', '--batch-size', '16', '--out', str(out),
        '--no-progress'])
    assert cmd.run_analyze(args) == 0
    res = json.loads((out / 'cka.json').read_text())
    assert res['num_images'] == 32 and res['num_batches'] == 2
    assert set(res['models']) == {'refiner_vit_nano', 'vit_tiny_patch16_224', 'resnet18'}
    assert [m['num_blocks'] for m in res['models'].values()] == [4, 2, 5]
    for m in res['models'].values():
        values = _cka_values(m['matrix']) + m['cka_with_last']
        assert all(v is not None and -1e-6 <= v <= 1 + 1e-6 for v in values)
        assert m['cka_with_last'][-1] == pytest.approx(1.0)
        assert m['cka_first_last'] == pytest.approx(m['cka_with_last'][0])
        assert set(m['normalised_at_depth']) == {'0.25', '0.50', '0.75'}
    for c in res['cross'].values():
        assert all(v is not None and -0.05 <= v <= 1 + 1e-6 for v in _cka_values(c['matrix']))
    for name in ('cka_curves.png', 'cka_curves_normalised.png', 'cka_heatmap_refiner_vit_nano.png',
                 'cka_heatmap_vit_tiny_patch16_224.png', 'cka_heatmap_resnet18.png'):
        assert (out / name).stat().st_size > 10_000, name
    printed = capsys.readouterr().out
    assert 'CKA(first, last)' in printed and '25/50/75% depth' in printed


def test_cka_command_from_a_checkpoint(tmp_path):
    from refiner.checkpoint import save_weights
    model = _tiny_refiner()
    dc = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')
    ckpt = save_weights(model, tmp_path / 'model.safetensors', 'refiner_vit_nano',
                        dict(img_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=10),
                        extra={'data_config': dc})
    out = tmp_path / 'cka'
    args = _args(cmd.add_cka_args, ['--checkpoint', str(ckpt), '--max-images', '8', '--batch-size', '4',
                                    '--out', str(out), '--no-progress'])
    assert cmd.run_cka(args) == 0
    res = json.loads((out / 'cka.json').read_text())
    (entry,) = res['models'].values()
    assert entry['input_size'] == [3, 16, 16] and entry['source'].startswith('checkpoint')


def test_attention_command_end_to_end(tmp_path, capsys):
    out = tmp_path / 'att'
    args = _args(cmd.add_analyze_args, [
        'attention', '--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
        '--compare', TINY_VIT, '--max-images', '32', '--batch-size', '16', '--out', str(out), '--no-progress'])
    assert cmd.run_analyze(args) == 0
    res = json.loads((out / 'attention.json').read_text())
    assert res['num_images'] == 32
    rows = res['models']['refiner_vit_nano']['blocks']
    assert [r['kind'] for r in rows] == ['attention', 'refining', 'attention', 'refining']
    for model in res['models'].values():
        for r in model['blocks']:
            for key, v in r.items():
                if 'similarity' in key and v is not None:
                    assert -1 - 1e-6 <= v <= 1 + 1e-6 and math.isfinite(v)
    assert rows[1]['head_similarity_before'] is not None and rows[1]['cross_block_similarity'] is not None
    assert (out / 'attention_diversity.png').stat().st_size > 10_000
    assert 'head-sim' in capsys.readouterr().out


def test_attention_command_rejects_a_cnn(tmp_path):
    args = _args(cmd.add_attention_args, ['--model', 'resnet18', '--max-images', '4', '--out', str(tmp_path)])
    with pytest.raises(NoAttentionError):
        cmd.run_attention(args)


def _image(tmp_path: Path) -> Path:
    from PIL import Image
    path = tmp_path / 'digit.png'
    Image.fromarray((_rng(5).random((24, 24, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_show_attention_end_to_end(tmp_path, capsys):
    img = _image(tmp_path)
    png = tmp_path / 'refiner.png'
    args = _args(cmd.add_show_attention_args, [str(img), '--model', 'refiner_vit_nano', '--img-size', '16',
                                               '--model-args', TINY_REFINER, '--query', '1,2', '--out', str(png)])
    assert cmd.run_show_attention(args) == 0
    assert png.stat().st_size > 20_000
    assert 'block 1 (refining), query (1, 2) on the 4×4 grid' in capsys.readouterr().out
    png = tmp_path / 'vit.png'
    args = _args(cmd.add_show_attention_args, [str(img), '--model', 'vit_tiny_patch16_224', '--img-size', '16',
                                               '--model-args', '{embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}',
                                               '--out', str(png)])
    assert cmd.run_show_attention(args) == 0
    assert png.stat().st_size > 10_000
    assert 'block 0 (attention), query (2, 2)' in capsys.readouterr().out


def test_show_attention_errors(tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(_rng(6).integers(0, 256, 300, dtype=np.uint8).tobytes())
    base = ['--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
            '--out', str(tmp_path / 'x.png')]
    with pytest.raises(DataError, match='cannot read image .*broken.png'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [str(bad)] + base))
    img = str(_image(tmp_path))
    with pytest.raises(cmd.QueryError, match=r'outside the 4×4 token grid'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--query', '4,0'] + base))
    with pytest.raises(cmd.QueryError, match='ROW,COL'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--query', 'middle'] + base))
    with pytest.raises(cmd.BlockIndexError, match='blocks 0 to 3'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--block', '7'] + base))
    with pytest.raises(cmd.UnknownModelError, match='not a timm model name'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--model', 'refiner_vit_nanoo']))
    for err in (cmd.QueryError, cmd.BlockIndexError, cmd.UnknownModelError, NoAttentionError, NoIntermediatesError):
        assert issubclass(err, AnalysisError) and issubclass(err, ValueError)


def test_parse_compare_and_model_args():
    assert cmd.parse_compare('resnet18') == ('resnet18', None, {})
    assert cmd.parse_compare('vit:runs/a') == ('vit', 'runs/a', {})
    assert cmd.parse_compare('vit_tiny_patch16_224{depth: 2, img_size: 16}') == (
        'vit_tiny_patch16_224', None, {'depth': 2, 'img_size': 16})
    with pytest.raises(AnalysisError, match='not both'):
        cmd.parse_compare('vit{depth: 2}:runs/a')
    with pytest.raises(AnalysisError, match='YAML mapping'):
        cmd.parse_model_args('[1, 2]')
    assert cmd.parse_query('cls') == (-1, -1) and cmd.parse_query(' 2, 3 ') == (2, 3)
