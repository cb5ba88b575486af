"""Refined multi-head self-attention, with attention maps handed from block to block.

Refiner-ViT (the authors' released code) alternates two kinds of blocks:

- an *attention block* computes A = softmax(q·kᵀ·s), s = d^-1/2, adds s·A_prev when the previous
  block handed a map over, aggregates its V with A and hands A on;
- a *refining block* computes no queries or keys: it takes the map A_prev handed over, refines it,
  R = s·BN(DLA(A_prev)), aggregates its own V with R, and hands A_prev on unchanged (so the next
  attention block adds the unrefined map).

``RefinedAttention`` is either kind (``reuse_attn``). An attention block may also refine its own
map before using it (``refine`` given, ``reuse_attn=False``): that is how the paper's "ViT/DeiT +
refiner" works, and how :func:`refiner.refine_vit` retrofits a timm ViT.
"""
from typing import List, Optional, Tuple

import torch
from timm.layers import register_notrace_module
from torch import nn

from .. import functional as RF
from ..kernels import (
    BatchNormState,
    attention_handover,
    kernels_apply,
    recomputing,
    refine_aggregate_eval,
    refine_aggregate_train,
    use_kernels,
)
from ..kernels.dispatch import dropout_active, statistics_training
from ..kernels.fused_weights import cached_fusion, dispatch_variant, forget_fusion
from .dla import DistributedLocalAttention
from .norm import BatchNorm2d, batchnorm_affine

__all__ = ['RefinedAttention']

# devices whose maps take the fused Triton refinement (tests add 'cpu' under Triton's interpreter)
FUSED_DEVICES = ('cuda',)


@register_notrace_module  # a leaf for torch.fx: its kernels branch on run-time state
class RefinedAttention(nn.Module):
    """Multi-head self-attention whose attention map can be refined and handed to the next block.

    Args:
        dim: token width C.
        num_heads: H; each head has d = C/H channels.
        qkv_bias: bias on the q, k, v projection.
        reuse_attn: a refining block: no q, k; it refines and applies the map handed over.
        refine: the module that refines the (B, H, N, N) map (a :class:`DistributedLocalAttention`),
            or None. A refining block needs one.
        refine_norm: apply BatchNorm over heads after refining (the authors' ``adapt_bn``).
        qk_norm: normalise q and k per head (as timm's Attention).
        attn_drop: dropout on the map that aggregates V.
        proj_drop: dropout after the output projection.

    ``forward(x, prev_attn, grid_size)`` returns ``(out, attn_to_hand_on)``; ``grid_size``, the (h, w)
    token grid, is what a spatial refinement needs (see :class:`DistributedLocalAttention`).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            reuse_attn: bool = False,
            refine: Optional[DistributedLocalAttention] = None,
            refine_norm: bool = False,
            qk_norm: bool = False,
            norm_layer: type = nn.LayerNorm,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if reuse_attn and refine is None:
            raise ValueError('a refining block (reuse_attn=True) needs a refine module')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.reuse_attn = reuse_attn
        # a refining block projects V only; an attention block projects q, k and v
        self.qkv = nn.Linear(dim, dim if reuse_attn else 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm and not reuse_attn else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm and not reuse_attn else nn.Identity()
        self.refine = refine
        self.refine_norm = BatchNorm2d(num_heads) if refine_norm else nn.Identity()
        # ×s on the refined map of a refining block; folded into refine by reparameterize()
        self.refine_scale = self.scale if reuse_attn else 1.0
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_kernels = use_kernels()  # refiner.kernels in eager mode (False: the reference code)

    def forward(self, x: torch.Tensor, prev_attn: Optional[torch.Tensor] = None,
                grid_size: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        if self.reuse_attn:
            if prev_attn is None:
                raise ValueError('a refining block needs the attention map of a previous block')
            v = self.qkv(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
            attn = prev_attn  # handed on unchanged
            out = self._aggregate_refined(prev_attn, v, grid_size)
        else:
            q, k, v = self.project_qkv(x)
            if self.refine is None:
                aggregated, attn = self._attend(q, k, v, prev_attn)
                assert aggregated is not None
                out = aggregated
            else:
                _, attn = self._attend(q, k, None, prev_attn)
                out = self._aggregate_refined(attn, v, grid_size)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, H, N, d) -> (B, N, C)
        out = self.proj_drop(self.proj(out))
        return out, attn

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of an attention block, (B, H, N, d) each, q and k normalised when qk_norm."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], prev_attn: Optional[torch.Tensor]
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """A = softmax(q·kᵀ·s) [+ s·A_prev]; returns (dropout(A) @ v or None, A)."""
        if not torch.jit.is_scripting() and self._attention_kernel_applies(q, prev_attn):
            return self._attend_kernel(q, k, v, prev_attn)
        attn = RF.attention_map(q, k, prev_attn, self.scale)  # (B, H, N, N)
        out = self.attn_drop(attn) @ v if v is not None else None
        return out, attn

    def refined_map(self, attn: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The map that aggregates V: scale · norm(refine(attn)), (B, H, N, N)."""
        assert self.refine is not None
        refined = self.refine_norm(self.refine(attn, grid_size))
        if self.refine_scale != 1.0:
            refined = refined * self.refine_scale
        return refined

    def _aggregate_refined(self, attn: torch.Tensor, v: torch.Tensor,
                           grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._kernels_apply(attn, v):
            out = self._aggregate_refined_kernel(attn, v, grid_size)
            if out is not None:
                return out
        return self.attn_drop(self.refined_map(attn, grid_size)) @ v

    # the kernels of refiner.kernels: same results, less time and memory (eager only)

    @torch.jit.unused
    def _kernels_apply(self, a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
        # not the module's own flag: Monte-Carlo dropout puts an eval model's dropout back in train
        return self.use_kernels and not dropout_active(self.attn_drop) and kernels_apply(a, b)

    @torch.jit.unused
    def _attention_kernel_applies(self, q: torch.Tensor, prev: Optional[torch.Tensor]) -> bool:
        # under autocast on a GPU, autocast's own mixed precision beats a float32 kernel; on a CPU
        # the cache-blocked kernel wins either way
        return self._kernels_apply(q, prev) and not (q.is_cuda and torch.is_autocast_enabled('cuda'))

    @torch.jit.unused
    def _attend_kernel(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
                       prev_attn: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        return attention_handover(q, k, v, prev_attn, self.scale)

    @torch.jit.unused
    def _aggregate_refined_kernel(self, attn: torch.Tensor, v: torch.Tensor,
                                  grid_size: Optional[Tuple[int, int]]) -> Optional[torch.Tensor]:
        """The refinement kernel's result, or None where this configuration has none."""
        refine, norm = self.refine, self.refine_norm
        assert refine is not None
        if torch.is_grad_enabled() and (attn.requires_grad or v.requires_grad or refine.training):
            forget_fusion(self)  # weights may change from here on
            norms = self._training_kernel_norms()
            if norms is None:
                return None
            update = not recomputing()  # a checkpointed block's recomputation counts no batch twice
            if update:
                for m in norms:
                    m.num_batches_tracked.add_(1)
            states = [BatchNormState(m.weight, m.bias, m.running_mean, m.running_var, m.momentum, m.eps) for m in norms]
            assert refine.expand is not None and refine.local is not None and refine.reduce is not None
            grid = None if refine.refine_layout == 'raster' else refine.resolve_grid(attn.shape[-1], grid_size)
            return refine_aggregate_train(attn, v, refine.expand.weight, refine.local.weight, refine.reduce.weight,
                                          states, self.refine_scale, update, grid, refine.num_prefix_tokens)
        halo = refine.query_halo
        if statistics_training(refine, norm) or halo is None:
            # a BatchNorm in training (recalibration under no_grad: batch statistics, running estimates
            # to update) is the reference code's; a query-grid kernel couples all rows
            forget_fusion(self)  # a mode change: fold again when back in eval
            return None
        variant = dispatch_variant(refine)
        if attn.device.type in FUSED_DEVICES and variant is not None:
            from ..kernels import triton_refinement as fused  # imports triton
            # where scripts/gpu_cost.py's estimate says the fused kernel beats the eager chain it replaces
            if fused.triton_available() and fused.fused_preferred(variant, attn):
                # one kernel; neither the expanded nor the refined maps reach GPU memory
                weights = cached_fusion(self, refine, norm, self._refined_affine, fused.dot_dtype(attn, v),
                                        (self.refine_scale,))
                return fused.refine_aggregate_fused(attn, v, weights)
        grid = None if refine.refine_layout == 'raster' else refine.resolve_grid(attn.shape[-1], grid_size)
        return refine_aggregate_eval(attn, v, lambda a: norm(refine(a, grid)), halo, refine.expanded_heads,
                                     self.refine_scale)

    @torch.jit.unused
    def _training_kernel_norms(self) -> Optional[List[nn.BatchNorm2d]]:
        """The BatchNorms the training kernel takes over (expansion, local, reduction [, post norm]),
        or None unless this is the authors' inverted residual (raster or over the keys' grid), unfolded, in
        training mode."""
        refine, norm = self.refine, self.refine_norm
        assert refine is not None
        norms = [refine.expand_norm, refine.local_norm, refine.reduce_norm] + ([] if isinstance(norm, nn.Identity)
                                                                                else [norm])
        fits = (refine.mode == 'inverted_residual' and refine.refine_layout in ('raster', 'spatial_keys')
                and not refine.reparameterized
                and refine.training
                and refine.residual_scale is None and refine.activated
                and all(c is not None and c.bias is None for c in (refine.expand, refine.local, refine.reduce))
                and all(_is_training_batchnorm(m) for m in norms))
        return norms if fits else None

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the refine norm and the ×s of a refining block into the refine module (running statistics,
        in either mode, as timm's re-parameterizable models fold)."""
        if self.refine is None:
            return
        if isinstance(self.refine_norm, nn.BatchNorm2d) or self.refine_scale != 1.0:
            self.refine.reparameterize(*self._refined_affine())
        self.refine_norm = nn.Identity()
        self.refine_scale = 1.0

    def _refined_affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The refine norm (eval) and the ×s after the refinement as one per-head affine: scale, shift (H,) each."""
        scale, shift = batchnorm_affine(self.refine_norm, self.num_heads, self.proj.weight)
        return scale * self.refine_scale, shift * self.refine_scale


def _is_training_batchnorm(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and m.training and m.track_running_stats and m.affine
            and m.momentum is not None and m.running_mean is not None)
