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

The 1×1 convolutions run as matrix products over the head axis, and the expanded maps live
channels-last, (B, N, N, H') in memory, where oneDNN's depthwise convolution is fast; input and
output stay head-major, (B, H, N, N), as the products with V want them. In training the expanded
maps are recomputed during backward instead of being stored (``recompute``), which is where the
original implementation spends most of its memory. ``fold()`` folds the BatchNorms (and an affine
that follows the module) into the convolutions for inference; the ``linear`` form collapses into
a single k×k convolution.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused import eager_mode
from .norm import BatchNorm2d

__all__ = ['DistributedLocalAttention', 'REFINE_MODES']

REFINE_MODES = ('inverted_residual', 'linear', 'conv')


def _expand(attn: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """1×1 convolution across heads, (B, H, N, M) -> (B, H', N, M) stored channels-last."""
    B, H, N, M = attn.shape
    x = attn.flatten(2).transpose(1, 2)  # (B, N·M, H), a view
    t = F.linear(x, weight.flatten(1), bias)  # (B, N·M, H')
    return t.view(B, N, M, -1).permute(0, 3, 1, 2)  # (B, H', N, M), channels-last strides


def _reduce(t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """1×1 convolution across heads of a channels-last map, (B, H', N, M) -> (B, H, N, M) head-major."""
    B, E, N, M = t.shape
    x = t.permute(0, 2, 3, 1).reshape(B, N * M, E).transpose(1, 2)  # (B, H', N·M), views when t is channels-last
    w = weight.flatten(1).expand(B, -1, -1)  # (B, H, H')
    out = torch.bmm(w, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w, x)  # (B, H, N·M)
    return out.view(B, -1, N, M)


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
        recompute: in training, recompute the expanded maps during backward instead of storing them.

    Shape: (B, H, N, M) -> (B, H, N, M).
    """

    def __init__(
            self,
            num_heads: int,
            expansion_ratio: int = 3,
            refine_kernel_size: int = 3,
            mode: str = 'inverted_residual',
            residual: bool = True,
            zero_init_last: bool = False,
            recompute: bool = True,
    ) -> None:
        super().__init__()
        if mode not in REFINE_MODES:
            raise ValueError(f'refine mode must be one of {REFINE_MODES}, got {mode!r}')
        if refine_kernel_size < 1 or refine_kernel_size % 2 == 0:
            raise ValueError(f'refine_kernel_size must be a positive odd number, got {refine_kernel_size}')
        if expansion_ratio < 1:
            raise ValueError(f'expansion_ratio must be >= 1, got {expansion_ratio}')
        if zero_init_last and not (residual or mode == 'inverted_residual'):
            raise ValueError('zero_init_last needs a residual, else the module starts as zero')
        self.num_heads = num_heads
        self.mode = mode
        self.residual = residual or mode == 'inverted_residual'
        self.recompute = recompute
        self.kernel_size = refine_kernel_size
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
        with_norm = mode == 'inverted_residual'
        self.expand_norm = BatchNorm2d(E) if with_norm else nn.Identity()
        self.local_norm = BatchNorm2d(E) if with_norm else nn.Identity()
        self.reduce_norm = BatchNorm2d(H) if with_norm else nn.Identity()
        self.act = nn.ReLU6(inplace=True) if with_norm else nn.Identity()
        # per-head factor on the residual; only set by fold() when an affine is folded in
        self.register_buffer('residual_scale', None)
        self.fused = False  # set by fold(): norms folded, ready for inference
        if zero_init_last:
            self.zero_init_last()

    def zero_init_last(self) -> None:
        """Zero the last layer so that, with the residual, the module starts as the identity."""
        last = self.reduce_norm if isinstance(self.reduce_norm, nn.BatchNorm2d) else (self.conv or self.reduce)
        nn.init.zeros_(last.weight)

    def _refine(self, attn: torch.Tensor) -> torch.Tensor:
        # attn: (B, H, N, M)
        if self.conv is not None:
            out = self.conv(attn.contiguous(memory_format=torch.channels_last)).contiguous()
        else:
            assert self.expand is not None and self.local is not None and self.reduce is not None
            t = _expand(attn, self.expand.weight, self.expand.bias)  # (B, H', N, M), channels-last
            t = self.act(self.expand_norm(t))
            t = self.act(self.local_norm(self.local(t)))  # depthwise k×k, stays channels-last
            out = self.reduce_norm(_reduce(t, self.reduce.weight, self.reduce.bias))  # (B, H, N, M)
        if self.residual:  # in place: out is a fresh tensor that no backward needs
            if self.residual_scale is not None:
                out = out.addcmul_(attn, self.residual_scale.view(1, -1, 1, 1))
            else:
                out = out.add_(attn)
        return out

    @torch.jit.unused
    def _forward_recompute(self, attn: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._refine, attn, use_reentrant=False)

    @torch.jit.unused
    def _recompute_applies(self, attn: torch.Tensor) -> bool:
        # under torch.compile / export the compiler plans recomputation itself
        return self.recompute and self.training and torch.is_grad_enabled() and eager_mode(attn)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._recompute_applies(attn):
            return self._forward_recompute(attn)
        return self._refine(attn)

    def reparameterize(self) -> None:
        """Fold the BatchNorms into the convolutions for inference (timm's ``reparameterize_model``
        calls this); the ``linear`` form becomes one k×k convolution. Outputs are unchanged."""
        if not self.fused:
            self.fold()

    @torch.no_grad()
    def fold(self, out_scale: Optional[torch.Tensor] = None, out_shift: Optional[torch.Tensor] = None) -> None:
        """Fold the BatchNorms, and a per-head affine ``out_scale·y + out_shift`` applied to this
        module's output, into the convolutions (eval mode; outputs unchanged up to rounding)."""
        if self.training:
            raise RuntimeError('folding uses running statistics: call model.eval() first')
        self.fused = True
        H = self.num_heads
        ref = (self.conv or self.expand).weight
        scale = torch.ones(H, dtype=ref.dtype, device=ref.device) if out_scale is None else out_scale.to(ref)
        shift = torch.zeros(H, dtype=ref.dtype, device=ref.device) if out_shift is None else out_shift.to(ref)
        if self.mode == 'linear':
            # W_R · DW · W_A  ==  one dense k×k conv: K[o, i] = sum_e W_R[o, e] · w_e · W_A[e, i]
            assert self.expand is not None and self.local is not None and self.reduce is not None
            w_a, w_r = self.expand.weight.flatten(1), self.reduce.weight.flatten(1)  # (E, H), (H, E)
            kernel = torch.einsum('oe,ekl,ei->oikl', w_r, self.local.weight[:, 0], w_a)
            k = self.kernel_size
            conv = nn.Conv2d(H, H, k, padding=k // 2, bias=False).to(ref)
            conv.weight.copy_(kernel)
            self.conv, self.expand, self.local, self.reduce = conv, None, None, None
            self.mode = 'conv'
        if self.conv is not None:
            # fold the affine (and the residual, as the kernel's centre tap) into the one convolution
            weight = self.conv.weight * scale.view(-1, 1, 1, 1)
            bias = shift if self.conv.bias is None else self.conv.bias * scale + shift
            if self.residual:
                c = self.kernel_size // 2
                weight[:, :, c, c] += torch.diag(scale if self.residual_scale is None else scale * self.residual_scale)
                self.residual = False
            self.conv = _conv_like(self.conv, weight, bias)
            return
        assert self.expand is not None and self.local is not None and self.reduce is not None
        self.expand = _conv_like(self.expand, *_fold_norm(self.expand, self.expand_norm))
        self.local = _conv_like(self.local, *_fold_norm(self.local, self.local_norm))
        w, b = _fold_norm(self.reduce, self.reduce_norm)
        self.reduce = _conv_like(self.reduce, w * scale.view(-1, 1, 1, 1), b * scale + shift)
        self.expand_norm, self.local_norm, self.reduce_norm = nn.Identity(), nn.Identity(), nn.Identity()
        if self.residual:
            res = scale if self.residual_scale is None else scale * self.residual_scale
            if not torch.equal(res, torch.ones_like(res)):
                self.residual_scale = res.clone()

    def extra_repr(self) -> str:
        return f'mode={self.mode}, heads={self.num_heads}, expanded={self.expanded_heads}, k={self.kernel_size}'


def _fold_norm(conv: nn.Conv2d, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution (norm a BatchNorm2d in eval, or Identity)."""
    weight = conv.weight
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if not isinstance(norm, nn.BatchNorm2d):
        return weight, bias
    assert norm.running_var is not None and norm.running_mean is not None
    gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    g = gamma / torch.sqrt(norm.running_var + norm.eps)
    return weight * g.view(-1, 1, 1, 1), (bias - norm.running_mean) * g + beta


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, groups=conv.groups,
        bias=True, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    assert out.bias is not None
    out.bias.data.copy_(bias)
    return out
