"""Distributed local attention (DLA): refining the H attention maps of a layer by convolution.

Refiner (Zhou et al. 2021, arXiv 2106.03714, §3) treats the H attention maps of one layer as an
H-channel N×N image (rows are queries, columns are keys, tokens in flattened order with the class
token at index 0) and refines it in three steps:

1. *attention expansion*: a linear map W_A ∈ R^{H'×H} across heads (a 1×1 convolution), H' = r·H;
2. *distributed local attention*: a k×k depthwise convolution over each of the H' maps, which
   amounts to aggregating V locally with a learned kernel, then globally with the attention;
3. *attention reduction*: a linear map W_R ∈ R^{H×H'} back to H maps, which then aggregate V.

Three forms (``mode``):

- ``'inverted_residual'``: the authors' released code, and what their checkpoints hold. BN + ReLU6
  after the expansion and after the local convolution, BN after the reduction, plus the input map
  (a MobileNetV2 inverted residual).
- ``'linear'``: the paper's equations, W_R · DWConv_k · W_A, all linear (optional residual).
- ``'conv'``: one dense k×k convolution across heads, H → H (optional residual).

Two token layouts of the local convolution (``refine_layout``):

- ``'raster'``: the released code's: the k×k window runs over the N×N map in flattened token
  order, so a key's neighbours are the previous and next tokens of the row-major grid (wrapping
  across row ends), the class token included, and vertical neighbours are out of reach.
- ``'spatial_keys'``: each query's map over the keys is an h×w image, convolved on the token grid
  (the authors' unused "spatial constraints" variant); queries are not mixed.
- ``'spatial'``: the same over the keys, then a depthwise k×k convolution over the query grid.

In the spatial layouts the class token is a 1×1 grid of its own (see
:func:`refiner.functional.grid_conv`): its row and column are weighted by the kernels' centre
taps, so it keeps no weights of its own and its map is not blurred into the patches'.

The 1×1 convolutions run as matrix products over the head axis, and the expanded maps live
channels-last, (B, N, N, H') in memory, where oneDNN's depthwise convolution is fast; input and
output stay head-major, (B, H, N, N), as the products with V want them. In training the expanded
maps are recomputed during backward instead of being stored (a kernel, :mod:`refiner.kernels`),
which is where the original implementation spends most of its memory. ``reparameterize()`` folds
the BatchNorms (and an affine that follows the module) into the convolutions for inference; the
``linear`` form collapses into a single k×k convolution.

The stages themselves are :mod:`refiner.functional`'s, which the kernels and the analysis call too.
"""
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from timm.layers import register_notrace_module
from torch import nn

from .. import functional as RF
from ..kernels import eager_mode, recompute, use_kernels
from .norm import BatchNorm2d, conv_like, fold_batchnorm

__all__ = ['DistributedLocalAttention', 'FoldedChain', 'REFINE_LAYOUTS', 'REFINE_MODES']

REFINE_MODES = ('inverted_residual', 'linear', 'conv')
REFINE_LAYOUTS = ('raster', 'spatial_keys', 'spatial')


class FoldedChain(NamedTuple):
    """The refinement as three biased convolutions and a residual: refined = W3·act(dw(act(W1·A + b1)) + b2)
    + b3 + residual·A, per head (the activation: ReLU6 in the inverted residual, none in the linear form)."""
    expand_weight: torch.Tensor  # (E, H, 1, 1)
    expand_bias: torch.Tensor  # (E,)
    local_weight: torch.Tensor  # (E, 1, k, k)
    local_bias: torch.Tensor  # (E,)
    reduce_weight: torch.Tensor  # (H, E, 1, 1)
    reduce_bias: torch.Tensor  # (H,)
    residual: torch.Tensor  # (H,), zeros without a residual


@register_notrace_module  # fx treats it as a leaf: its training path holds a checkpoint
class DistributedLocalAttention(nn.Module):
    """Refines H attention maps: expansion to H' = r·H maps, k×k local convolution, reduction to H.

    Args:
        num_heads: H, the number of attention maps in and out.
        expansion_ratio: r = H'/H, the attention expansion (ignored by ``mode='conv'``).
        refine_kernel_size: k, the (odd) size of the local kernel over each N×N map.
        mode: ``'inverted_residual'`` (authors' code), ``'linear'`` (paper) or ``'conv'``.
        residual: add the input map to the output; the inverted residual always does.
        zero_init_last: initialise the last layer to zero so that the module starts as the identity
            (needs a residual); used when refining a pretrained transformer.
        refine_layout: ``'raster'`` (authors' code), ``'spatial_keys'`` or ``'spatial'``, see above.
        grid_size: the (h, w) token grid of the spatial layouts when ``forward`` is not given one
            (default: a square grid inferred from the map's size).
        num_prefix_tokens: tokens before the grid (the class token) in the spatial layouts.

    Shape: (B, H, N, M) -> (B, H, N, M); ``forward(attn, grid_size=None)``.
    """

    def __init__(
            self,
            num_heads: int,
            expansion_ratio: int = 3,
            refine_kernel_size: int = 3,
            mode: str = 'inverted_residual',
            residual: bool = True,
            zero_init_last: bool = False,
            refine_layout: str = 'raster',
            grid_size: Optional[Tuple[int, int]] = None,
            num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if mode not in REFINE_MODES:
            raise ValueError(f'refine mode must be one of {REFINE_MODES}, got {mode!r}')
        if refine_layout not in REFINE_LAYOUTS:
            raise ValueError(f'refine_layout must be one of {REFINE_LAYOUTS}, got {refine_layout!r}')
        if refine_kernel_size < 1 or refine_kernel_size % 2 == 0:
            raise ValueError(f'refine_kernel_size must be a positive odd number, got {refine_kernel_size}')
        if expansion_ratio < 1:
            raise ValueError(f'expansion_ratio must be >= 1, got {expansion_ratio}')
        if zero_init_last and not (residual or mode == 'inverted_residual'):
            raise ValueError('zero_init_last needs a residual, else the module starts as zero')
        self.num_heads = num_heads
        self.mode = mode
        self.residual = residual or mode == 'inverted_residual'
        self.kernel_size = refine_kernel_size
        self.refine_layout = refine_layout
        self.grid_size: Optional[Tuple[int, int]] = None if grid_size is None else (int(grid_size[0]),
                                                                                    int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        k, H = refine_kernel_size, num_heads
        E = self.expanded_heads = H if mode == 'conv' else H * expansion_ratio
        if mode == 'conv':
            self.conv = nn.Conv2d(H, H, k, padding=k // 2, bias=False)
            self.expand = self.local = self.reduce = None
        else:
            self.conv = None
            self.expand = nn.Conv2d(H, E, 1, bias=False)  # W_A
            self.local = nn.Conv2d(E, E, k, padding=k // 2, groups=E, bias=False)  # distributed local attention
            self.reduce = nn.Conv2d(E, H, 1, bias=False)  # W_R
        # spatial: the local stage's second convolution, over the query grid (depthwise)
        self.local_query = nn.Conv2d(E, E, k, padding=k // 2, groups=E, bias=False) if refine_layout == 'spatial' \
            else None
        with_norm = mode == 'inverted_residual'
        self.expand_norm = BatchNorm2d(E) if with_norm else nn.Identity()
        self.local_norm = BatchNorm2d(E) if with_norm else nn.Identity()
        self.reduce_norm = BatchNorm2d(H) if with_norm else nn.Identity()
        self.activated = with_norm  # ReLU6 (refiner.functional.activation) after expansion and local stage
        # per-head factor on the residual; only set by reparameterize() when an affine is folded in
        self.register_buffer('residual_scale', None)
        self.reparameterized = False  # norms folded into the convolutions, ready for inference
        # a kernel (refiner.kernels): in training, recompute the expanded maps in backward instead of storing them
        self.use_kernels = use_kernels()
        if zero_init_last:
            self.zero_init_last()

    def zero_init_last(self) -> None:
        """Zero the last layer so that, with the residual, the module starts as the identity."""
        if isinstance(self.reduce_norm, nn.BatchNorm2d):
            last = self.reduce_norm
        else:
            last = self.reduce if self.reduce is not None else (self.local_query or self.conv)
        nn.init.zeros_(last.weight)

    @property
    def query_halo(self) -> Optional[int]:
        """How many query rows on either side one output row reads (None: all of them)."""
        return {'raster': self.kernel_size // 2, 'spatial_keys': 0}.get(self.refine_layout)

    def resolve_grid(self, num_tokens: int, grid_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """The (h, w) token grid of maps over ``num_tokens`` tokens: the one given, the module's,
        or a square one; a ValueError when none fits."""
        P = self.num_prefix_tokens
        grid = grid_size if grid_size is not None else self.grid_size
        if grid is None:
            side = int(math.sqrt(float(max(num_tokens - P, 0))) + 0.5)
            grid = (side, side)
        if grid[0] * grid[1] + P != num_tokens:
            raise ValueError(
                f'spatial DLA ({self.refine_layout}): maps over {num_tokens} tokens do not fit a {grid[0]}x{grid[1]} '
                f'token grid with {P} prefix token(s); pass grid_size (h, w) for a grid that is not square')
        return int(grid[0]), int(grid[1])

    def _local(self, t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               grid: Optional[Tuple[int, int]]) -> torch.Tensor:
        """The local stage in this module's token layout (before its norm)."""
        if grid is None:
            return RF.local_conv(t, weight, bias)
        t = RF.grid_conv(t, weight, bias, grid, self.num_prefix_tokens, dim=-1)
        if self.local_query is not None:
            t = RF.grid_conv(t, self.local_query.weight, self.local_query.bias, grid, self.num_prefix_tokens, dim=-2)
        return t

    def _refine(self, attn: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None,
                stages: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The chain on attn (B, H, N, M); with ``stages`` given, each stage's output is recorded there."""
        grid = None if self.refine_layout == 'raster' else self.resolve_grid(attn.shape[-1], grid_size)
        if self.conv is not None:
            out = self._local(attn.contiguous(memory_format=torch.channels_last), self.conv.weight, self.conv.bias,
                              grid).contiguous()  # (B, H, N, M)
            if stages is not None:
                stages['local'] = out.clone()
        else:
            assert self.expand is not None and self.local is not None and self.reduce is not None
            t = RF.expand(attn, self.expand.weight, self.expand.bias)  # (B, H', N, M), channels-last
            t = self._act(self.expand_norm(t))
            if stages is not None:
                stages['expanded'] = t
            t = self._act(self.local_norm(self._local(t, self.local.weight, self.local.bias, grid)))
            if stages is not None:
                stages['local'] = t
            out = self.reduce_norm(RF.reduce(t, self.reduce.weight, self.reduce.bias))  # (B, H, N, M)
        if self.residual:  # in place: out is a fresh tensor that no backward needs
            if self.residual_scale is not None:
                out = out.addcmul_(attn, self.residual_scale.view(1, -1, 1, 1))
            else:
                out = out.add_(attn)
        if stages is not None:
            stages['reduced'] = out
        return out

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return RF.activation(t, inplace=True) if self.activated else t

    @torch.no_grad()
    def stages(self, attn: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
        """The output of every stage of refining attn (B, H, N, M), as the forward computes them:
        ``expanded`` (H' maps after expansion [+ norm + act]; absent in the one-conv form),
        ``local`` (after the k×k local convolution [+ norm + act]) and ``reduced`` (after the
        reduction [+ norm] + residual, the module's output)."""
        stages: Dict[str, torch.Tensor] = {}
        self._refine(attn, grid_size, stages)
        return stages

    @torch.jit.unused
    def _recompute_applies(self, attn: torch.Tensor) -> bool:
        # under torch.compile / export the compiler plans recomputation itself
        return self.use_kernels and self.training and torch.is_grad_enabled() and eager_mode(attn)

    def forward(self, attn: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._recompute_applies(attn):
            return recompute(self._refine, attn, grid_size)
        return self._refine(attn, grid_size)

    @torch.no_grad()
    def reparameterize(self, out_scale: Optional[torch.Tensor] = None,
                       out_shift: Optional[torch.Tensor] = None) -> None:
        """Fold the BatchNorms, and a per-head affine ``out_scale·y + out_shift`` applied to this
        module's output, into the convolutions, for inference (eval mode; outputs unchanged up to
        rounding); the ``linear`` form becomes one k×k convolution. timm's
        ``reparameterize_model`` calls this without an affine. BatchNorms fold with their running
        statistics in either mode (timm's ``benchmark.py --reparam`` folds before ``.eval()``)."""
        if self.reparameterized and out_scale is None and out_shift is None:
            return
        self.reparameterized = True
        H = self.num_heads
        ref = (self.conv or self.expand).weight
        scale = torch.ones(H, dtype=ref.dtype, device=ref.device) if out_scale is None else out_scale.to(ref)
        shift = torch.zeros(H, dtype=ref.dtype, device=ref.device) if out_shift is None else out_shift.to(ref)
        if self.mode == 'linear' and self.local_query is None:
            # W_R · DW · W_A  ==  one dense k×k conv (in either layout): K[o, i] = sum_e W_R[o, e] · w_e · W_A[e, i]
            assert self.expand is not None and self.local is not None and self.reduce is not None
            w_a, w_r = self.expand.weight.flatten(1), self.reduce.weight.flatten(1)  # (E, H), (H, E)
            kernel = torch.einsum('oe,ekl,ei->oikl', w_r, self.local.weight[:, 0], w_a)
            k = self.kernel_size
            conv = nn.Conv2d(H, H, k, padding=k // 2, bias=False).to(ref)
            conv.weight.copy_(kernel)
            self.conv, self.expand, self.local, self.reduce = conv, None, None, None
            self.mode = 'conv'
        if self.conv is not None and self.local_query is not None:
            # fold the affine into the last convolution, the one over the query grid; keep the residual
            w, b = fold_batchnorm(self.local_query, nn.Identity())
            self.local_query = conv_like(self.local_query, w * scale.view(-1, 1, 1, 1), b * scale + shift)
            self._scale_residual(scale)
            return
        if self.conv is not None:
            # fold the affine (and the residual, as the kernel's centre tap) into the one convolution
            weight = self.conv.weight * scale.view(-1, 1, 1, 1)
            bias = shift if self.conv.bias is None else self.conv.bias * scale + shift
            if self.residual:
                c = self.kernel_size // 2
                weight[:, :, c, c] += torch.diag(scale if self.residual_scale is None else scale * self.residual_scale)
                self.residual = False
            self.conv = conv_like(self.conv, weight, bias)
            return
        assert self.expand is not None and self.local is not None and self.reduce is not None
        if self.local_query is not None:  # the local stage's norm follows its second convolution
            self.local_query = conv_like(self.local_query, *fold_batchnorm(self.local_query, self.local_norm))
            self.local_norm = nn.Identity()
        folded = self.folded_chain(scale, shift)
        self.expand = conv_like(self.expand, folded.expand_weight, folded.expand_bias)
        self.local = conv_like(self.local, folded.local_weight, folded.local_bias)
        self.reduce = conv_like(self.reduce, folded.reduce_weight, folded.reduce_bias)
        self.expand_norm, self.local_norm, self.reduce_norm = nn.Identity(), nn.Identity(), nn.Identity()
        self._scale_residual(scale)

    @torch.no_grad()
    def folded_chain(self, out_scale: Optional[torch.Tensor] = None,
                     out_shift: Optional[torch.Tensor] = None) -> 'FoldedChain':
        """The expansion, local and reduction convolutions with their (eval) BatchNorms and a per-head
        affine ``out_scale·y + out_shift`` after the module folded in, without changing the module
        (what :meth:`reparameterize` installs; fused kernels take it). Forms with the three stages."""
        if self.expand is None or self.local is None or self.reduce is None:
            raise ValueError(f'the {self.mode!r} form has no expansion, local and reduction stages to fold')
        if self.local_query is not None and not isinstance(self.local_norm, nn.Identity):
            raise ValueError("the 'spatial' layout's local norm follows its query-grid convolution: reparameterize()")
        ref = self.expand.weight
        H = self.num_heads
        scale = ref.new_ones(H) if out_scale is None else out_scale.to(ref)
        shift = ref.new_zeros(H) if out_shift is None else out_shift.to(ref)
        w3, b3 = fold_batchnorm(self.reduce, self.reduce_norm)
        residual = ref.new_zeros(H) if not self.residual else (
            scale if self.residual_scale is None else scale * self.residual_scale)
        return FoldedChain(*fold_batchnorm(self.expand, self.expand_norm), *fold_batchnorm(self.local, self.local_norm),
                           w3 * scale.view(-1, 1, 1, 1), b3 * scale + shift, residual)

    def _scale_residual(self, scale: torch.Tensor) -> None:
        """The residual after an affine with this per-head scale was folded into the output."""
        if self.residual:
            res = scale if self.residual_scale is None else scale * self.residual_scale
            if not torch.equal(res, torch.ones_like(res)):
                self.residual_scale = res.clone()

    def extra_repr(self) -> str:
        return (f'mode={self.mode}, layout={self.refine_layout}, heads={self.num_heads}, '
                f'expanded={self.expanded_heads}, k={self.kernel_size}')

