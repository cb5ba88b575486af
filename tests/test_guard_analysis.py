"""Guards on the over-smoothing analysis: minibatch CKA equals the unbiased HSIC formula written out
here, and ``refiner analyze cka`` / ``refiner analyze attention`` report numbers recomputed
independently (own preprocessing, hooks, softmax and metrics) on a tiny model."""
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import refiner  # noqa: F401  (registers the models)
from refiner.analysis import MinibatchCKA
from refiner.checkpoint import save_weights
from refiner.cli import main
from refiner.data import build_datasets


def _hsic1(K, L):
    """Song et al. (2012), eq. 5: the unbiased HSIC estimator of two n×n kernels, in float64."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def _cka_minibatch(batches_x, batches_y):
    """Nguyen et al. (2021): Σ HSIC1(K_i, L_i) / sqrt(Σ HSIC1(K_i, K_i) · Σ HSIC1(L_i, L_i)), linear kernels."""
    kl = kk = ll = 0.0
    for x, y in zip(batches_x, batches_y):
        K, L = x @ x.T, y @ y.T
        kl, kk, ll = kl + _hsic1(K, L), kk + _hsic1(K, K), ll + _hsic1(L, L)
    return kl / math.sqrt(kk * ll)


def test_minibatch_cka_is_the_unbiased_hsic_formula():
    """One batch, then two, within one model and across two: to 1e-12. A biased estimator (kernel
    diagonals kept) differs by about 0.02 here and fails."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(10, 7)) + 3.0 for _ in range(2)]  # uncentred features: HSIC1 needs no centring
    ys = [np.tanh(x[:, :5]) + 0.5 * rng.normal(size=(10, 5)) for x in xs]
    zs = [rng.normal(size=(10, 4)) for _ in range(2)]
    for k in (1, 2):
        acc = MinibatchCKA()
        for x, y, z in zip(xs[:k], ys[:k], zs[:k]):
            acc.update([torch.tensor(x), torch.tensor(y), torch.tensor(z)])
        m = acc.compute()
        feats = [xs[:k], ys[:k], zs[:k]]
        for a in range(3):
            for b in range(3):
                assert m[a, b] == pytest.approx(_cka_minibatch(feats[a], feats[b]), abs=1e-12), (k, a, b)
        cross = MinibatchCKA()
        for x, y, z in zip(xs[:k], ys[:k], zs[:k]):
            cross.update_cross([torch.tensor(x)], [torch.tensor(y), torch.tensor(z)])
        np.testing.assert_allclose(cross.compute(), [[_cka_minibatch(xs[:k], ys[:k]),
                                                      _cka_minibatch(xs[:k], zs[:k])]], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- the commands, recomputed

DATA_CONFIG = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny Refiner-ViT (attention, refining, attention, refining) with non-trivial BatchNorms,
    layer scales and weights, saved as a checkpoint the commands load."""
    torch.manual_seed(0)
    args = dict(img_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    model = timm.create_model('refiner_vit_nano', **args).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
        elif isinstance(m, timm.layers.LayerScale):
            m.gamma.data.uniform_(0.5, 1.5, generator=g)
        elif isinstance(m, nn.Linear):  # weights of trained size: blocks that change the tokens
            m.weight.data.mul_(8.0)
    path = save_weights(model, tmp_path_factory.mktemp('tiny') / 'model.safetensors', 'refiner_vit_nano', args,
                        extra={'data_config': DATA_CONFIG})
    return model, path


def _images(indices):
    """The digits' held-out images, preprocessed here: 8×8 grey -> RGB, bilinear to 16×16, (x - 0.5) / 0.5."""
    val = build_datasets('digits').val
    out = []
    for i in indices:
        img = Image.fromarray(val.images[i], 'L').convert('RGB').resize((16, 16), Image.BILINEAR)
        out.append((torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5)
    return torch.stack(out)


def _evenly_spaced(n, k):
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def _hooked(model, x):
    """Each block's output tokens and its attention's (input, handed-over map, output), from hooks."""
    outs, attn_io = [], []
    handles = [blk.register_forward_hook(lambda m, i, o: outs.append(o[0])) for blk in model.blocks]
    handles += [blk.attn.register_forward_hook(lambda m, i, o: attn_io.append((i[0], i[1] if len(i) > 1 else None, o)))
                for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs, attn_io


def test_cka_command_numbers_recomputed(tiny, tmp_path):
    """cka.json's matrix, curve with the last block and normalised curve, from block outputs taken
    with hooks (class token first, token-major) and the formula above, over the same minibatches."""
    model, path = tiny
    out = tmp_path / 'cka'
    assert main(['analyze', 'cka', '--checkpoint', str(path), '--max-images', '16', '--batch-size', '8',
                 '--out', str(out), '--no-progress']) == 0
    res = json.loads((out / 'cka.json').read_text())
    (entry,) = res['models'].values()
    idx = _evenly_spaced(450, 16)
    feats = [[], [], [], []]
    for batch in (idx[:8], idx[8:]):
        blocks, _ = _hooked(model, _images(batch))
        for layer, f in enumerate(blocks):
            feats[layer].append(f.reshape(len(batch), -1).double().numpy())
    expected = np.array([[_cka_minibatch(feats[a], feats[b]) for b in range(4)] for a in range(4)])
    np.testing.assert_allclose(np.array(entry['matrix']), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(entry['cka_with_last'], expected[:, -1], rtol=0, atol=1e-5)
    c = expected[:, -1]
    np.testing.assert_allclose(entry['normalised_cka_with_last'], (c - c[0]) / (1 - c[0]), rtol=0, atol=1e-4)
    assert entry['cka_first_last'] == pytest.approx(c[0], abs=1e-5)
    assert np.ptp(expected) > 0.02  # the blocks are distinguishable: a constant answer would fail


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0  # an all-zero map: similarity 0


def _head_sim(maps):
    """Mean over images and ordered head pairs h ≠ g of cos(map_h, map_g), maps (B, H, N, M)."""
    B, H = maps.shape[:2]
    flat = maps.reshape(B, H, -1).double().numpy()
    return np.mean([_cos(flat[i, h], flat[i, g]) for i in range(B) for h in range(H) for g in range(H) if h != g])


def _cross_sim(a, b):
    """DeepViT: mean over images, heads and queries of cos(a's row, b's row)."""
    a, b = a.double().numpy(), b.double().numpy()
    return np.mean([_cos(a[i, h, n], b[i, h, n]) for i in range(a.shape[0]) for h in range(a.shape[1])
                    for n in range(a.shape[2])])


def test_attention_command_numbers_recomputed(tiny, tmp_path):
    """attention.json's per-block head similarity, cross-block similarity, and the same before
    refinement and for the expanded maps, recomputed from maps built here: softmax(q·kᵀ·s) + s·prev
    from the block's own qkv, and the refining blocks' reference refinement of the handed-over map."""
    model, path = tiny
    out = tmp_path / 'att'
    assert main(['analyze', 'attention', '--checkpoint', str(path), '--max-images', '8', '--batch-size', '8',
                 '--out', str(out), '--no-progress']) == 0
    rows = next(iter(json.loads((out / 'attention.json').read_text())['models'].values()))['blocks']
    x = _images(_evenly_spaced(450, 8))
    _, attn_io = _hooked(model, x)
    maps, befores, expanded = [], [], []
    with torch.no_grad():
        for blk, (inp, prev, output) in zip(model.blocks, attn_io):
            a = blk.attn
            if a.reuse_attn:  # refining block: refines the handed-over map
                dla = a.refine
                maps.append(a.refined_map(prev))
                befores.append(prev)
                expanded.append(torch.nn.functional.relu6(dla.expand_norm(dla.expand(prev))))
            else:
                B, N, C = inp.shape
                q, k, _ = a.qkv(inp).view(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
                m = torch.softmax(q @ k.transpose(-2, -1) * a.scale, -1)
                if prev is not None:
                    m = m + a.scale * prev
                torch.testing.assert_close(m, output[1])  # the map the block handed on
                maps.append(m)
                befores.append(None)
                expanded.append(None)
    assert [r['kind'] for r in rows] == ['attention', 'refining', 'attention', 'refining']
    for i, r in enumerate(rows):
        assert r['head_similarity'] == pytest.approx(_head_sim(maps[i]), abs=1e-5), i
        if i == 0:
            assert r['cross_block_similarity'] is None
        else:
            assert r['cross_block_similarity'] == pytest.approx(_cross_sim(maps[i], maps[i - 1]), abs=1e-5), i
        if befores[i] is not None:
            assert r['head_similarity_before'] == pytest.approx(_head_sim(befores[i]), abs=1e-5), i
            assert r['cross_block_similarity_before'] == pytest.approx(_cross_sim(befores[i], maps[i - 1]),
                                                                       abs=1e-5), i
            assert r['head_similarity_expanded'] == pytest.approx(_head_sim(expanded[i]), abs=1e-5), i
    values = [r['head_similarity'] for r in rows]
    assert max(values) - min(values) > 0.05 and min(values) < 0.95  # not a constant, not all 1
