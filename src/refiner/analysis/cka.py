"""Centred kernel alignment (CKA) between the representations of two layers.

Refiner (Zhou et al. 2021, arXiv 2106.03714) uses CKA to show *over-smoothing*: in a deep ViT the
features of intermediate blocks become similar to those of the last block early in depth, while a
CNN's features converge gradually. Two estimators:

- :func:`linear_cka`, linear CKA on all n examples at once (Kornblith et al. 2019):
  ``‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F)`` on column-centred X (n×d1) and Y (n×d2);
- :class:`MinibatchCKA`, the minibatch estimator of Nguyen, Raghu & Kornblith (2021, "Do wide and
  deep networks learn the same things?"): the unbiased HSIC estimator (Song et al. 2012) of each
  minibatch's linear kernels, summed over minibatches, so that features never have to be held in
  memory all at once.
"""
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['linear_cka', 'hsic_unbiased', 'MinibatchCKA', 'normalised_curve', 'curve_at']

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device='cpu', dtype=torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f'{name} must be a 2-D array of n examples × d features, got shape {tuple(arr.shape)}')
    if not np.isfinite(arr).all():
        raise ValueError(f'{name} holds NaN or infinite values; CKA needs finite features')
    return arr


def _centre(x: np.ndarray, name: str) -> np.ndarray:
    xc = x - x.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(xc)
    if norm == 0.0 or norm <= 1e-12 * max(np.linalg.norm(x), 1e-300):
        raise ValueError(f'{name} has constant features (every column is the same for all {len(x)} examples), '
                         f'so CKA is undefined; expected features that vary across examples')
    return xc


def linear_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA of X (n×d1) and Y (n×d2), rows the same n examples; computed in float64.

    ``CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` after centring each column. When n is small against
    the widths the equal Gram form ``⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖)`` (K = XXᵀ, L = YYᵀ,
    H = I − 11ᵀ/n) is used instead. Returns a value in [0, 1]; 1 when Y is an orthogonal
    transform of X up to scale.
    """
    x, y = _as_float64(X, 'X'), _as_float64(Y, 'Y')
    n, d1 = x.shape
    if y.shape[0] != n:
        raise ValueError(f'X and Y must describe the same examples (same number of rows), got {n} and {y.shape[0]}')
    if n < 2:
        raise ValueError(f'CKA needs at least 2 examples, got {n}')
    d2 = y.shape[1]
    x, y = _centre(x, 'X'), _centre(y, 'Y')
    if n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:
        # Gram form: the centred features give the centred kernels, HKH = Xc Xcᵀ
        k, lk = x @ x.T, y @ y.T  # (n, n)
        num = float(np.sum(k * lk))
        den = float(np.linalg.norm(k) * np.linalg.norm(lk))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)  # (d2, d1)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den


def _zero_diag_grams(features: Sequence[torch.Tensor], n: Optional[int] = None) -> torch.Tensor:
    """(L, n, n) float64 linear kernels of each layer's (n, d_l) features with zeroed diagonals."""
    grams = []
    for i, f in enumerate(features):
        if f.dim() < 2:
            raise ValueError(f'layer {i}: expected (batch, features), got shape {tuple(f.shape)}')
        f = f.detach().reshape(f.shape[0], -1).to(torch.float64)
        if n is not None and f.shape[0] != n:
            raise ValueError(f'layer {i} has {f.shape[0]} examples, the others {n}: '
                             f'every layer must see the same batch')
        n = f.shape[0]
        f = f - f.mean(dim=0, keepdim=True)  # HSIC_1 is unchanged by a shift; centring keeps the sums small
        k = f @ f.T  # (n, n)
        k.fill_diagonal_(0.0)
        grams.append(k)
    return torch.stack(grams)


def _hsic_matrix(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 of every pair of zero-diagonal kernels, (La, n, n) × (Lb, n, n) -> (La, Lb).

    HSIC_1(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
    """
    n = ka.shape[-1]
    trace = torch.einsum('aij,bij->ab', ka, kb)  # tr(K̃L̃) = Σ K̃∘L̃ (symmetric kernels)
    ra, rb = ka.sum(-1), kb.sum(-1)  # row sums K̃1, (L, n)
    sa, sb = ra.sum(-1), rb.sum(-1)  # 1ᵀK̃1, (L,)
    cross = ra @ rb.T  # 1ᵀK̃L̃1 = (K̃1)·(L̃1), (La, Lb)
    return (trace + torch.outer(sa, sb) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def hsic_unbiased(K: ArrayLike, L: ArrayLike) -> float:
    """The unbiased HSIC estimator HSIC_1 (Song et al. 2012) of two n×n kernel matrices (n ≥ 4)."""
    k = torch.as_tensor(np.asarray(K) if not isinstance(K, torch.Tensor) else K).to(torch.float64).clone()
    lk = torch.as_tensor(np.asarray(L) if not isinstance(L, torch.Tensor) else L).to(torch.float64).clone()
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape != lk.shape:
        raise ValueError(f'expected two square kernel matrices of the same size, '
                         f'got {tuple(k.shape)} and {tuple(lk.shape)}')
    if k.shape[0] < 4:
        raise ValueError(f'the unbiased HSIC estimator needs at least 4 examples, got {k.shape[0]}')
    k.fill_diagonal_(0.0)
    lk.fill_diagonal_(0.0)
    return float(_hsic_matrix(k[None], lk[None])[0, 0])


class MinibatchCKA:
    """Minibatch linear CKA between all pairs of layers (Nguyen, Raghu & Kornblith 2021).

    For minibatches i with linear kernels K_i (layer a) and L_i (layer b):
    ``CKA = Σ_i HSIC_1(K_i, L_i) / sqrt(Σ_i HSIC_1(K_i, K_i) · Σ_i HSIC_1(L_i, L_i))``.
    Only the sums are kept (a layers×layers matrix), never the features. Every minibatch needs
    at least 4 examples. Unlike the biased full-data estimate, this one converges to the
    population CKA without a bias that grows with the width.

    Use :meth:`update` with one model's per-layer features (a symmetric layers×layers result), or
    :meth:`update_cross` with two models' features on the same images (rows: model A's layers,
    columns: model B's layers); not both on one instance.
    """

    def __init__(self) -> None:
        self._xy: Optional[torch.Tensor] = None  # Σ HSIC_1(K_a, L_b), (La, Lb)
        self._xx: Optional[torch.Tensor] = None  # Σ HSIC_1(K_a, K_a), (La,)
        self._yy: Optional[torch.Tensor] = None  # Σ HSIC_1(L_b, L_b), (Lb,)
        self._cross: Optional[bool] = None
        self.num_batches = 0
        self.num_examples = 0

    def _check(self, n: int, cross: bool, shape: tuple) -> None:
        if n < 4:
            raise ValueError(f'a minibatch for the unbiased HSIC estimator needs at least 4 examples, got {n}')
        if self._cross is not None and self._cross != cross:
            raise ValueError('this MinibatchCKA was fed with update' + ('_cross' if self._cross else '')
                             + '(): use a new instance for the other kind of comparison')
        if self._xy is not None and tuple(self._xy.shape) != shape:
            raise ValueError(f'expected features of {self._xy.shape[0]}×{self._xy.shape[1]} layers as before, '
                             f'got {shape[0]}×{shape[1]}')

    def update(self, features: List[torch.Tensor]) -> None:
        """Add one minibatch: ``features[l]`` is layer l's (b, d_l) output for the same b images."""
        if len(features) == 0:
            raise ValueError('expected one feature tensor per layer, got an empty list')
        n = features[0].shape[0]
        self._check(n, False, (len(features), len(features)))
        grams = _zero_diag_grams(features)
        hsic = _hsic_matrix(grams, grams)  # (L, L)
        diag = hsic.diagonal().clone()
        self._accumulate(hsic, diag, diag, cross=False, n=n)

    def update_cross(self, feats_a: List[torch.Tensor], feats_b: List[torch.Tensor]) -> None:
        """Add one minibatch of two models' per-layer features on the same b images."""
        if len(feats_a) == 0 or len(feats_b) == 0:
            raise ValueError('expected one feature tensor per layer for each model, got an empty list')
        n = feats_a[0].shape[0]
        if feats_b[0].shape[0] != n:
            raise ValueError(f'the two models must see the same minibatch, got {n} and {feats_b[0].shape[0]} examples')
        self._check(n, True, (len(feats_a), len(feats_b)))
        ga, gb = _zero_diag_grams(feats_a), _zero_diag_grams(feats_b)
        self._accumulate(_hsic_matrix(ga, gb), _hsic_matrix(ga, ga).diagonal(), _hsic_matrix(gb, gb).diagonal(),
                         cross=True, n=n)

    def _accumulate(self, xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, cross: bool, n: int) -> None:
        if self._xy is None:
            self._xy, self._xx, self._yy = xy.clone(), xx.clone(), yy.clone()
        else:
            assert self._xx is not None and self._yy is not None
            self._xy += xy
            self._xx += xx
            self._yy += yy
        self._cross = cross
        self.num_batches += 1
        self.num_examples += n

    def compute(self) -> np.ndarray:
        """The (La, Lb) CKA matrix (float64) over all minibatches so far."""
        if self._xy is None or self._xx is None or self._yy is None:
            raise ValueError('no minibatches yet: call update() with at least one batch of features first')
        if (self._xx <= 0).any() or (self._yy <= 0).any():
            bad = [int(i) for i in torch.nonzero(self._xx <= 0).flatten()] or \
                [int(i) for i in torch.nonzero(self._yy <= 0).flatten()]
            raise ValueError(f'layers {bad[:5]} have (near) constant features over the {self.num_examples} examples '
                             f'(self-HSIC <= 0), so CKA is undefined; expected features that vary across examples')
        cka = self._xy / torch.sqrt(torch.outer(self._xx, self._yy))
        return cka.numpy()


DEPTHS = (0.25, 0.5, 0.75)  # relative depths at which normalised curves are reported


def depth_key(fraction: float) -> str:
    """The key of a relative depth in cka.json's ``normalised_at_depth``: '0.25', '0.50', '0.75'."""
    return f'{fraction:.2f}'


def normalised_curve(curve: Sequence[float]) -> List[float]:
    """The paper-style normalised CKA-with-the-last-block curve:
    ``(CKA(i, last) − CKA(first, last)) / (1 − CKA(first, last))``, 0 at the first block, 1 at the
    last; it shows how early intermediate features converge to the final ones. NaN everywhere when
    the first block already equals the last (CKA(first, last) = 1)."""
    c = [float(v) for v in curve]
    if len(c) < 2:
        raise ValueError(f'a CKA curve needs at least 2 blocks, got {len(c)}')
    span = 1.0 - c[0]
    if abs(span) < 1e-9:
        return [float('nan')] * len(c)
    return [(v - c[0]) / span for v in c]


def curve_at(curve: Sequence[float], fraction: float) -> float:
    """A per-block curve read at a relative depth in [0, 1] (block index / (L − 1)), linearly interpolated."""
    c = np.asarray(curve, dtype=np.float64)
    return float(np.interp(fraction, np.linspace(0.0, 1.0, len(c)), c))
