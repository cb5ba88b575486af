"""BatchNorm that counts every batch once under recomputation, and folding BatchNorms into
convolutions (re-parameterization for inference), written once for every module that needs it."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from ..kernels.recompute import recomputing

__all__ = ['BatchNorm2d', 'batchnorm_affine', 'conv_like', 'fold_batchnorm']


@register_notrace_module  # decides at run time, not at trace time
class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics see each training batch once.

    Activation checkpointing (the refine module's recomputation, ``set_grad_checkpointing``) runs a
    forward twice; a plain BatchNorm would fold the same batch into its running estimates twice.
    This one normalises the recomputation with the batch statistics, as the first pass did, and
    leaves the running estimates alone. Its state dict is that of ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = 0.0  # a momentum of 0 leaves the running estimates as they are
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            first_pass = torch.jit.is_scripting() or torch.compiler.is_compiling() or not recomputing()
            if first_pass:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
                else:
                    momentum = self.momentum
        use_batch_stats = self.training or self.running_mean is None
        # the same call in both passes, so that checkpointing sees the same saved tensors
        return F.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch_stats, momentum, self.eps)


def batchnorm_affine(norm: nn.Module, channels: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm as its eval-mode per-channel affine y = scale·x + shift, from its running statistics
    whatever its mode (an Identity: 1, 0), in ``like``'s dtype and device."""
    if not isinstance(norm, nn.BatchNorm2d):
        return like.new_ones(channels), like.new_zeros(channels)
    assert norm.running_var is not None and norm.running_mean is not None
    gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = gamma / torch.sqrt(norm.running_var + norm.eps)
    return scale.to(like), (beta - norm.running_mean * scale).to(like)


def fold_batchnorm(conv: nn.Conv2d, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution (norm a BatchNorm2d in eval, or Identity)."""
    weight = conv.weight
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    scale, shift = batchnorm_affine(norm, weight.shape[0], weight)
    return weight * scale.view(-1, 1, 1, 1), bias * scale + shift


def conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Conv2d:
    """A convolution shaped as ``conv`` (stride, padding, groups) with the given weight and bias."""
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        groups=conv.groups, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out
