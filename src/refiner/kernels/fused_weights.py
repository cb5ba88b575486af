"""The fused refinement's weights: a refine module folded once into what the Triton kernel reads, cached per module.

Two forms (:func:`fuse_module`):

- ``'activated'`` (the authors' inverted residual, as built or re-parameterized): the three
  convolutions with every BatchNorm, the refine norm and the ×s folded in
  (:meth:`~refiner.layers.DistributedLocalAttention.folded_chain`), zero-padded to the kernel's
  tile sizes: W1 (EP, HP), b1 (EP,), w2 (EP, k²), b2 (EP,), W3 (HP, EP), b3 (HP,), residual (HP,).
- ``'linear'`` (the paper's linear form, and the one dense k×k convolution it re-parameterizes
  into): expansion, taps and reduction are all linear, so they fold into k² H×H matrices
  T_t = W3·diag(w2[:, t])·W1, one per tap t of the k×k window, with the expansion's bias entering
  only where the tap reads inside the map (zero padding): per-tap biases c_t = W3·(w2[:, t]·b1),
  and one bias b = W3·b2 + b3. Then R = Σ_t T_t·shift_t(A) + Σ_t [tap inside]·c_t + b + residual·A:
  k² products of H×H instead of an expansion to r·H maps.

Folding costs a dozen small launches on a GPU; :func:`cached_fusion` does it once per module and
refolds only when a parameter or buffer changed (its storage or its in-place version counter), a
submodule was replaced (re-parameterization), the dtype of the products changed, or the module
ran in a training mode since (it calls :func:`forget_fusion` then). Writes through ``.data``
(``p.data.copy_(...)``) bump no version counter: after such an edit in eval mode, call
:func:`forget_fusion`; optimizers, ``load_state_dict`` and ``p.copy_`` under ``no_grad`` are seen.
"""
import weakref
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = ['FusedWeights', 'cached_fusion', 'dispatch_variant', 'forget_fusion', 'fusable_form', 'fuse_module',
           'pad_heads']

Tensor = torch.Tensor
EXPAND_CHUNK = 16  # expanded maps per matrix product in the kernel (tl.dot needs >= 16 rows)


class FusedWeights(NamedTuple):
    """What the fused kernel reads: ``form`` 'activated' (tensors w1, b1, w2, b2, w3, b3, residual)
    or 'linear' (tensors taps (k², HP, HP), tap_bias (k², HP), bias (HP,), residual (HP,)), padded
    to HP heads (a power of two >= 16) and EP expanded maps (a multiple of 16)."""
    form: str
    heads: int
    kernel_size: int
    dot_dtype: torch.dtype
    tensors: Tuple[Tensor, ...]


def pad_heads(n: int, least: int = 16) -> int:
    """The power of two >= max(n, least) that a tile dimension of n takes in the kernel."""
    return max(least, 1 << (int(n) - 1).bit_length())


def fusable_form(refine: nn.Module) -> Optional[str]:
    """The fused kernel's form for this refine module (raster layout), or None where it has none."""
    if getattr(refine, 'refine_layout', None) != 'raster' or refine.local_query is not None:
        return None
    if refine.conv is not None:
        return 'linear' if refine.conv.groups == 1 else None
    return 'activated' if refine.activated else 'linear'


def dispatch_variant(refine: nn.Module) -> Optional[str]:
    """What the eager chain this kernel would replace looks like, the key of the dispatch table
    (``triton_refinement.FUSED_PREFERRED``): 'activated' (BatchNorms unfolded), 'activated_reparameterized',
    'linear' (three stages) or 'conv' (one dense convolution); None where no fused kernel serves it."""
    form = fusable_form(refine)
    if form == 'activated':
        return 'activated_reparameterized' if refine.reparameterized else 'activated'
    if form == 'linear':
        return 'conv' if refine.conv is not None else 'linear'
    return None


def _padded(t: Tensor, shape, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(shape, dtype=dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


@torch.no_grad()
def fuse_module(refine: nn.Module, out_scale: Tensor, out_shift: Tensor, dot_dtype: torch.dtype) -> FusedWeights:
    """The kernel's weights for ``out_scale·refine(A) + out_shift`` (per head), products in ``dot_dtype``."""
    form = fusable_form(refine)
    if form is None:
        raise ValueError(f'no fused kernel for this refinement ({refine.extra_repr()})')
    H, k = refine.num_heads, refine.kernel_size
    HP, f32, f64 = pad_heads(H), torch.float32, torch.float64
    scale, shift = out_scale.to(f64), out_shift.to(f64)
    if refine.conv is not None:  # one dense k×k convolution H -> H (the linear form, re-parameterized)
        w = refine.conv.weight.to(f64) * scale.view(-1, 1, 1, 1)  # (H, H, k, k)
        taps = w.permute(2, 3, 0, 1).reshape(k * k, H, H)  # (k², H, H), tap t = (t // k, t % k)
        bias = shift if refine.conv.bias is None else refine.conv.bias.to(f64) * scale + shift
        tap_bias = taps.new_zeros(k * k, H)
        residual = _residual(refine, scale)
        return FusedWeights('linear', H, k, dot_dtype, (_padded(taps, (k * k, HP, HP), dot_dtype),
                                                        _padded(tap_bias, (k * k, HP), f32), _padded(bias, (HP,), f32),
                                                        _padded(residual, (HP,), f32)))
    chain = [t.to(f64) for t in refine.folded_chain(scale, shift)]
    w1, b1, w2, b2, w3, b3, residual = chain
    E = w1.shape[0]
    w1, w2, w3 = w1.reshape(E, H), w2.reshape(E, k * k), w3.reshape(H, E)
    if form == 'linear':
        taps = torch.einsum('he,et,ei->thi', w3, w2, w1)  # (k², H, H): W3·diag(w2[:, t])·W1
        tap_bias = (w3 @ (w2 * b1[:, None])).t()  # (k², H): W3·(w2[:, t]·b1)
        bias = w3 @ b2 + b3
        return FusedWeights('linear', H, k, dot_dtype, (_padded(taps, (k * k, HP, HP), dot_dtype),
                                                        _padded(tap_bias, (k * k, HP), f32), _padded(bias, (HP,), f32),
                                                        _padded(residual, (HP,), f32)))
    EP = -(-E // EXPAND_CHUNK) * EXPAND_CHUNK
    return FusedWeights('activated', H, k, dot_dtype, (
        _padded(w1, (EP, HP), dot_dtype), _padded(b1, (EP,), f32), _padded(w2, (EP, k * k), f32),
        _padded(b2, (EP,), f32), _padded(w3, (HP, EP), dot_dtype), _padded(b3, (HP,), f32),
        _padded(residual, (HP,), f32)))


def _residual(refine: nn.Module, scale: Tensor) -> Tensor:
    if not refine.residual:
        return torch.zeros_like(scale)
    return scale if refine.residual_scale is None else scale * refine.residual_scale.to(scale)


_CACHE: 'weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, FusedWeights]]' = weakref.WeakKeyDictionary()


def _state_key(*modules: nn.Module) -> Optional[tuple]:
    """What the folded weights depend on: every submodule's identity and mode, every parameter's and
    buffer's storage, in-place version, dtype and device. None where a tensor has no version counter
    (created under inference_mode): then nothing is cached."""
    key = []
    for module in modules:
        for m in module.modules():
            key.append((id(m), m.training))
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                try:
                    version = t._version
                except RuntimeError:
                    return None
                key.append((t.data_ptr(), version, t.dtype, t.device))
    return tuple(key)


def cached_fusion(owner: nn.Module, refine: nn.Module, norm: nn.Module, affine: Callable[[], Tuple[Tensor, Tensor]],
                  dot_dtype: torch.dtype, extra: tuple = ()) -> FusedWeights:
    """:func:`fuse_module` of ``refine`` with the per-head ``affine()`` (the refine norm and ×s), cached
    on ``owner`` (weakly: the cache is no state of the module) until ``refine``'s or ``norm``'s
    parameters, buffers, submodules or modes change, or ``dot_dtype`` or ``extra`` (settings such as
    the ×s) differ."""
    key = _state_key(refine, norm)
    if key is not None:
        key = key + (dot_dtype, refine.mode, refine.residual, extra)
        hit = _CACHE.get(owner)
        if hit is not None and hit[0] == key:
            return hit[1]
    fused = fuse_module(refine, *affine(), dot_dtype)
    if key is not None:
        _CACHE[owner] = (key, fused)
    return fused


def forget_fusion(owner: Optional[nn.Module] = None) -> None:
    """Drop the cached weights of ``owner`` (of every module when None)."""
    if owner is None:
        _CACHE.clear()
    else:
        _CACHE.pop(owner, None)
