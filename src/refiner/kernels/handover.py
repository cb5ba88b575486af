"""Attention block of Refiner-ViT: A = softmax(q·kᵀ·s) [+ s·A_prev], out = A @ v, with A handed on.

The reference is :meth:`refiner.layers.RefinedAttention._attend`. Here A is computed tile by tile
(:mod:`refiner.kernels.tiling`), and autograd keeps none of the intermediate maps: softmax(q·kᵀ·s)
is recomputed in backward instead of being stored.

Even the handed-over maps are kept only every other block. A map whose own input map is kept (or
that has none) carries a *recipe*, its block's q, k and that input map; its consumers save the
recipe instead of the map, and rebuild it in backward with the same kernel, bit for bit. In
Refiner-ViT that halves the maps kept for backward (8 × 256 MB at batch 16 and 384²).
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .. import functional as RF
from . import tiling
from .tiling import float32, result_dtype, without_autocast

__all__ = ['Recipe', 'attention_handover', 'forget_recipe', 'recipe_of']

Tensor = torch.Tensor


def attention_handover(q: Tensor, k: Tensor, v: Optional[Tensor], prev: Optional[Tensor], scale: float
                       ) -> Tuple[Optional[Tensor], Tensor]:
    """Returns ``(A @ v, A)`` with A = softmax(q·kᵀ·scale) + scale·prev (no hand-over when prev is
    None); q, k, v (B, H, N, d). With ``v=None`` only A is computed. Computes in float32 (or
    float64) and hands back :func:`~refiner.kernels.tiling.result_dtype` of q."""
    dtype = result_dtype(q)
    q, k, v, prev = float32(q, k, v, prev)
    with torch.autocast(q.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, prev)):
            # maps alternate between kept and recomputed along a chain of hand-overs
            recompute = prev is None or recipe_of(prev) is None
            if v is None:
                out, attn = None, _AttentionMap.apply(q, k, prev, scale)
            else:
                out, attn = _AttentionHandover.apply(q, k, v, prev, scale, recompute)
            if recompute and attn.dtype == dtype:  # a map rounded to half precision is kept, not rebuilt
                setattr(attn, _RECIPE, Recipe(q.detach(), k.detach(), None if prev is None else prev.detach(), scale,
                                               attn._version))
        else:
            with torch.no_grad():
                out, attn = _attention_forward(q, k, v, prev, scale)
    return (None if out is None else out.to(dtype)), attn.to(dtype)


_RECIPE = '_refiner_recipe'  # attribute of a handed-over map that its consumers may rebuild


class Recipe(NamedTuple):
    """How to rebuild a handed-over map A = softmax(q·kᵀ·scale) [+ scale·prev] in backward."""
    q: Tensor
    k: Tensor
    prev: Optional[Tensor]
    scale: float
    version: int  # A's version counter when it was made

    def rebuild(self) -> Tensor:
        return _attention_forward(self.q, self.k, None, self.prev, self.scale)[1]


def recipe_of(attn: Tensor) -> Optional[Recipe]:
    """The recipe that rebuilds a handed-over map, or None where the map must be kept."""
    recipe = getattr(attn, _RECIPE, None)
    # a map changed in place since it was made is no longer what its recipe rebuilds: keep it instead
    return recipe if recipe is not None and recipe.version == attn._version else None


def forget_recipe(attn: Tensor) -> None:
    """Drop the recipe of a handed-over map, for callers that keep the map anyway (a checkpointed
    block keeps its inputs); there the recipe would only hold its block's q and k."""
    if hasattr(attn, _RECIPE):
        delattr(attn, _RECIPE)


def _attention_forward(q: Tensor, k: Tensor, v: Optional[Tensor], prev: Optional[Tensor], scale: float
                       ) -> Tuple[Optional[Tensor], Tensor]:
    B, H, N, d = q.shape
    M = k.shape[2]
    attn = q.new_empty(B, H, N, M)
    out = q.new_empty(B, H, N, v.shape[3]) if v is not None else None
    for i, j, r0, r1 in tiling.tiles(q, H * M):
        rows = (slice(i, j), slice(None), slice(r0, r1))
        RF.attention_map(q[rows], k[i:j], None if prev is None else prev[rows], scale, out=attn[rows])
        if out is not None:
            torch.matmul(attn[rows], v[i:j], out=out[rows])
    return out, attn


def _attention_backward(q: Tensor, k: Tensor, v: Optional[Tensor], prev: Optional[Tensor], attn: Optional[Tensor],
                        has_prev: bool, scale: float, grad_out: Optional[Tensor], grad_attn: Optional[Tensor]):
    """Gradients of A = softmax(q·kᵀ·s) [+ s·prev] and A @ v. dL/dv reads A's rows from ``attn``, or
    where it was not kept, from the recomputed softmax and ``prev``; ``has_prev``: A had a prev."""
    B, H, N, d = q.shape
    M = k.shape[2]
    # dL/dk and dL/dv sum over row slabs: the first slab writes them (beta=0), later ones add
    grad_q, grad_k = torch.empty_like(q), k.new_empty(k.shape)
    grad_v = v.new_empty(v.shape) if v is not None and grad_out is not None else None
    grad_prev = q.new_empty(B, H, N, M) if has_prev else None
    for i, j, r0, r1 in tiling.tiles(q, 2 * H * M):
        b = j - i
        rows, R, beta = (slice(i, j), slice(None), slice(r0, r1)), r1 - r0, int(r0 > 0)
        qs = q[rows] * scale  # (b, H, R, d)
        p = RF.attention_map(q[rows], k[i:j], None, scale)  # softmax(q·kᵀ·s), recomputed, not stored
        if grad_v is not None:
            g_out = grad_out[rows].reshape(b * H, R, -1)
            v_c = v[i:j].reshape(b * H, M, -1)
            if grad_attn is not None:  # dL/dA: from the blocks A was handed to, and from A @ v
                g = torch.baddbmm(grad_attn[rows].reshape(b * H, R, M), g_out, v_c.transpose(1, 2))
            else:
                g = torch.bmm(g_out, v_c.transpose(1, 2))
            g = g.view(b, H, R, M)
            if attn is not None:
                a_rows = attn[rows]
            else:  # A's rows, rebuilt
                a_rows = p if prev is None else torch.add(p, prev[rows], alpha=scale)
            grad_v[i:j].view(b * H, M, -1).baddbmm_(a_rows.reshape(b * H, R, M).transpose(1, 2), g_out, beta=beta)
        else:
            g = grad_attn[rows] if grad_attn is not None else p.new_zeros(b, H, R, M)
        if grad_prev is not None:
            torch.mul(g, scale, out=grad_prev[rows])
        g = torch._softmax_backward_data(g, p, -1, p.dtype)  # dL/dlogits
        torch.matmul(g, k[i:j], out=grad_q[rows]).mul_(scale)
        grad_k[i:j].view(b * H, M, d).baddbmm_(g.view(b * H, R, M).transpose(1, 2), qs.reshape(b * H, R, d),
                                               beta=beta)
    return grad_q, grad_k, grad_v, grad_prev


class _AttentionHandover(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, prev, scale, recompute):
        out, attn = _attention_forward(q, k, v, prev, scale)
        ctx.scale, ctx.has_prev = scale, prev is not None
        # dL/dv needs A: kept where A is, else rebuilt from prev (a kept map) row by row
        ctx.save_for_backward(q, k, v, prev if recompute else None, None if recompute else attn)
        return out, attn

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, grad_attn):
        q, k, v, prev, attn = ctx.saved_tensors
        gq, gk, gv, gp = _attention_backward(q, k, v, prev, attn, ctx.has_prev, ctx.scale, grad_out, grad_attn)
        return gq, gk, gv, gp, None, None


class _AttentionMap(torch.autograd.Function):
    """A alone (its block aggregates a refined map): its backward needs neither A nor prev."""

    @staticmethod
    def forward(ctx, q, k, prev, scale):
        _, attn = _attention_forward(q, k, None, prev, scale)
        ctx.scale, ctx.has_prev = scale, prev is not None
        ctx.save_for_backward(q, k)
        return attn

    @staticmethod
    @without_autocast
    def backward(ctx, grad_attn):
        q, k = ctx.saved_tensors
        gq, gk, _, gp = _attention_backward(q, k, None, None, None, ctx.has_prev, ctx.scale, None, grad_attn)
        return gq, gk, gp, None
