"""The end of a transformer MLP, fc2(gelu(h)), saving h but not gelu(h) for backward.

The reference is timm's ``Mlp`` (``fc2(act(fc1(x)))``) with the layer scale after it; GELU's output
is as large as the MLP's hidden layer and cheap to recompute, so backward recomputes it.
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['gelu_linear']

Tensor = torch.Tensor


def gelu_linear(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` that saves h but not gelu(h) for backward."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _GeluLinear.apply(h, weight, bias)
    return F.linear(F.gelu(h), weight, bias)


class _GeluLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.device = h.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device)
        ctx.save_for_backward(h, weight, bias)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias = ctx.saved_tensors
        with torch.autocast(ctx.device, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            act = F.gelu(h)  # recomputed
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_w = (g2.t() @ act.reshape(-1, act.shape[-1])).to(weight.dtype)
            grad_act = g2 @ weight.to(g2.dtype)
        grad_b = g2.sum(0).to(bias.dtype) if bias is not None else None
        grad_h = torch.ops.aten.gelu_backward(grad_act.view(h.shape).to(h.dtype), h)
        return grad_h, grad_w, grad_b
