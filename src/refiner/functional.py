"""The computations of refined attention on plain tensors, each written once.

Refiner (Zhou et al. 2021, arXiv 2106.03714) computes an attention map and refines it in a chain
of named stages. The modules of :mod:`refiner.layers` (the readable reference), the fast paths of
:mod:`refiner.kernels` (which recompute the chain tile by tile in backward) and the analysis that
displays each stage (:mod:`refiner.analysis.attention_maps`) all call these functions, looked up
on this module at call time, so that a stage changed here changes all three.

- :func:`attention_map`: A = softmax(q·kᵀ·s) [+ s·A_prev], with the authors' hand-over.
- :func:`expand`: *attention expansion*, a 1×1 convolution across heads, H -> H' = r·H maps.
- :func:`local_conv`: *distributed local attention*, a k×k convolution over each N×N map, in the
  maps' flattened token order (the released form); :func:`grid_conv`: the same over the 2-D token
  grid of the keys or of the queries (spatial DLA).
- :func:`reduce`: *attention reduction*, a 1×1 convolution back to H maps.
- :func:`activation`: the ReLU6 of the authors' inverted residual, after expansion and local stage.

Maps are (B, H, N, M): rows are queries, columns keys. The expanded maps are kept channels-last
((B, N, M, H') in memory, where oneDNN's depthwise convolution is fast); input and output maps are
head-major, as the products with V want them.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['activation', 'attention_map', 'expand', 'grid_conv', 'local_conv', 'reduce']

Tensor = torch.Tensor


def attention_map(q: Tensor, k: Tensor, prev: Optional[Tensor], scale: float, out: Optional[Tensor] = None) -> Tensor:
    """A = softmax(q·kᵀ·scale) + scale·prev (no hand-over when prev is None), q (B, H, N, d), k (B, H, M, d).

    With ``out`` (a (B, H, N, M) tensor, possibly a slab of a larger map) A is written there,
    computing in place where it can (no autograd)."""
    logits = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, H, N, M)
    if out is None:
        attn = logits.softmax(dim=-1)
        return attn if prev is None else torch.add(attn, prev, alpha=scale)
    if prev is None and out.is_contiguous():
        return torch._softmax(logits, -1, False, out=out)  # straight into the map
    # in place, then one write of A (_softmax's out= ignores a slab's strides, pytorch#75923)
    p = torch._softmax(logits, -1, False, out=logits)
    return out.copy_(p) if prev is None else torch.add(p, prev, alpha=scale, out=out)


def expand(attn: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Attention expansion: (B, H, N, M) -> (B, H', N, M) stored channels-last; weight (H', H[, 1, 1])."""
    B, H, N, M = attn.shape
    x = attn.flatten(2).transpose(1, 2)  # (B, N·M, H), a view
    t = F.linear(x, weight.reshape(weight.shape[0], -1), bias)  # (B, N·M, H')
    return t.view(B, N, M, -1).permute(0, 3, 1, 2)  # (B, H', N, M), channels-last strides


def local_conv(t: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Distributed local attention: a k×k convolution over each (N, M) map, zero-padded, in the
    maps' flattened token order; depthwise when weight is (C, 1, k, k), dense across maps when
    (C, C, k, k). Keeps the input's memory format."""
    groups = t.shape[1] // weight.shape[1]
    return F.conv2d(t, weight, bias, padding=weight.shape[-1] // 2, groups=groups)


def grid_conv(t: Tensor, weight: Tensor, bias: Optional[Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int,
              dim: int = -1) -> Tensor:
    """Spatial distributed local attention: a k×k convolution of maps t (B, C, N, M) over the h×w
    token grid of their keys (``dim=-1``: each query's map over the keys, as an h×w image) or of
    their queries (``dim=-2``), zero-padded at the grid's borders; depthwise when weight is
    (C, 1, k, k), dense across maps when (C, C, k, k).

    Prefix tokens (the class token) are not on the grid: each is a 1×1 grid of its own, so its
    column (keys) or row (queries) is weighted by the kernel's centre tap alone. That keeps the
    stage one zero-padded convolution (linear, so BatchNorms fold into it) with no weights of its
    own for the class token, and the class token's map is neither mixed into nor out of the patches'.
    Returns (B, C', N, M), channels-last for ``dim=-1``."""
    B, C, N, M = t.shape
    h, w = grid_size
    P, k = num_prefix_tokens, weight.shape[-1]
    groups = C // weight.shape[1]
    x = t.permute(0, 2, 3, 1) if dim == -1 else t.permute(0, 3, 2, 1)  # (B, maps, tokens on the grid side, C)
    R, T = x.shape[1], x.shape[2]
    if T != P + h * w:
        raise ValueError(f'maps over {T} tokens do not fit a {h}x{w} token grid with {P} prefix tokens')
    patches = x[:, :, P:].reshape(B * R, h, w, C).permute(0, 3, 1, 2)  # (B·R, C, h, w), channels-last
    y = F.conv2d(patches, weight, bias, padding=k // 2, groups=groups)  # (B·R, C', h, w)
    out = t.new_empty(B, R, T, y.shape[1])
    out[:, :, P:] = y.permute(0, 2, 3, 1).reshape(B, R, h * w, -1)
    if P:
        centre = weight[:, :, k // 2, k // 2]  # (C', C / groups)
        prefix = x[:, :, :P] @ centre.t() if groups == 1 else x[:, :, :P] * centre.view(-1)  # (B, R, P, C')
        out[:, :, :P] = prefix if bias is None else prefix + bias
    return out.permute(0, 3, 1, 2) if dim == -1 else out.permute(0, 3, 2, 1)  # (B, C', N, M)


def reduce(t: Tensor, weight: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """Attention reduction of a channels-last map: (B, H', N, M) -> (B, H, N, M) head-major;
    weight (H, H'[, 1, 1]). With ``out`` (viewable as (B, H, N·M)) the result is written there."""
    B, E, N, M = t.shape
    x = t.permute(0, 2, 3, 1).reshape(B, N * M, E).transpose(1, 2)  # (B, H', N·M), views when t is channels-last
    w = weight.reshape(weight.shape[0], -1).expand(B, -1, -1)  # (B, H, H')
    if out is not None:
        target = out.view(B, -1, N * M)
        res = torch.bmm(w, x, out=target) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w, x, out=target)
    else:
        res = torch.bmm(w, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w, x)
    return res.view(B, -1, N, M)  # (B, H, N, M)


def activation(t: Tensor, inplace: bool = False) -> Tensor:
    """ReLU6, the activation of the authors' inverted residual."""
    return F.hardtanh(t, 0., 6., inplace=inplace)
