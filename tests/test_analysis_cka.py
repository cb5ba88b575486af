"""refiner.analysis.cka and .features: linear CKA and its minibatch estimator against formulas written
out here, and per-block features of Refiner-ViT, timm ViT and ResNet models."""
import math

import numpy as np
import pytest
import timm
import torch
from conftest import cka_minibatch as _cka_minibatch
from conftest import tiny_refiner as _tiny_refiner
from conftest import tiny_vit as _tiny_vit
from torch import nn

import refiner  # noqa: F401  (registers refiner_vit_*)  # noqa: F401  (registers the models)
from refiner.analysis import (
    MinibatchCKA,
    NoIntermediatesError,
    block_features,
    curve_at,
    hsic_unbiased,
    iterate_features,
    linear_cka,
    normalised_curve,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


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


def test_normalised_curve_and_depth_reading():
    curve = [0.4, 0.55, 0.85, 1.0]
    norm = normalised_curve(curve)
    assert norm[0] == pytest.approx(0.0) and norm[-1] == pytest.approx(1.0)
    assert norm[1] == pytest.approx(0.25)
    assert curve_at(norm, 0.5) == pytest.approx((0.25 + 0.75) / 2)
    assert all(math.isnan(v) for v in normalised_curve([1.0, 1.0]))


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
