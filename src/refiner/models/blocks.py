"""Refiner-ViT's stem and block: the convolutional patch embedding and the pre-norm block with refined attention.

:class:`ConvStem` turns an image into a grid of tokens; :class:`RefinerBlock` is one transformer block
whose attention is an attention block's or a refining block's (see :mod:`refiner.layers.attention`).
:mod:`refiner.models.refiner_vit` stacks them.
"""
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_function
from torch import nn

from ..kernels import (
    MMAP_THRESHOLD_MAX,
    eager_mode,
    gelu_linear,
    kernels_apply,
    recompute,
    release_free_heap,
    use_kernels,
)
from ..layers import BatchNorm2d, DistributedLocalAttention, RefinedAttention
from ..layers.norm import conv_like, fold_batchnorm

__all__ = ['ConvStem', 'RefinerBlock', 'check_image_input']


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, patch_size: int) -> None:
    """Raise a ValueError unless x is a (B, in_chans, H, W) batch with H and W multiples of the patch."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'expected a batch of images shaped (B, {in_chans}, H, W), got {list(x.shape)}')
    if x.shape[2] % patch_size != 0 or x.shape[3] % patch_size != 0:
        raise ValueError(
            f'image size {x.shape[2]}x{x.shape[3]} is not divisible by the patch size {patch_size}; '
            f'resize or crop to a multiple of {patch_size}')


class ConvStem(nn.Module):
    """The convolutional patch embedding of Refiner-ViT (after T2T-ViT): (B, C_in, S, S) -> (B, S/p, S/p, C).

    conv 7×7 stride 2 -> BN -> ReLU -> conv 3×3 -> BN -> ReLU -> conv 3×3 -> BN -> ReLU ->
    conv (p/2)×(p/2) stride p/2, so the total stride is the patch size p.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384, stem_dims=(32, 64, 128)):
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f'the conv stem needs an even patch size >= 2, got {patch_size}')
        self.patch_size = patch_size
        self.in_chans = in_chans
        c1, c2, c3 = stem_dims
        self.conv1 = nn.Conv2d(in_chans, c1, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(c1)  # counts each batch once under the recomputation below
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(c3)
        self.act = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(c3, embed_dim, patch_size // 2, stride=patch_size // 2)
        self.use_kernels = use_kernels()  # in training, recompute the stem's maps in backward (refiner.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, self.patch_size)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN / cuDNN convolutions are fastest NHWC
        if not torch.jit.is_scripting() and self._recompute(x):
            # at half the input's resolution the stem's maps outweigh the blocks' activations: keep
            # none of them and recompute them in backward (a few percent of the step)
            out = recompute(self._embed, x)
            if out.requires_grad and self._maps_outgrow_free_heap(x):
                # the recomputation comes right after the blocks' activations have been freed: hand
                # that memory back first, so that peak memory is not the sum of both
                out.register_hook(release_free_heap)
            return out
        return self._embed(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))  # (B, 32, S/2, S/2)
        x = self.act(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))  # (B, 128, S/2, S/2), before its ReLU
        # the (p/2)×(p/2)-stride-(p/2) projection as one matrix product over patches (much faster than
        # a strided convolution's backward on CPU); ReLU on the patch copy, so that one tensor is kept
        B, c3, H2, W2 = x.shape
        k = self.proj.kernel_size[0]
        h, w = H2 // k, W2 // k
        patches = x.permute(0, 2, 3, 1).reshape(B, h, k, w, k, c3).permute(0, 1, 3, 2, 4, 5).reshape(B, h, w, -1)
        weight = self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)  # (C, k·k·128)
        return F.linear(self.act(patches), weight, self.proj.bias)  # (B, S/p, S/p, C)

    @torch.jit.unused
    def _recompute(self, x: torch.Tensor) -> bool:
        return self.use_kernels and self.training and torch.is_grad_enabled() and eager_mode(x)

    @torch.jit.unused
    def _maps_outgrow_free_heap(self, x: torch.Tensor) -> bool:
        """Whether the stem's largest maps are served by fresh pages rather than the free heap."""
        B, _, S1, S2 = x.shape
        largest = B * self.conv3.out_channels * (S1 // 2) * (S2 // 2) * x.element_size()
        return x.device.type == 'cpu' and largest > MMAP_THRESHOLD_MAX

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorms into the convolutions (inference)."""
        for conv_name, bn_name in (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3')):
            conv, bn = getattr(self, conv_name), getattr(self, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(self, conv_name, conv_like(conv, *fold_batchnorm(conv, bn)))
                setattr(self, bn_name, nn.Identity())


class RefinerBlock(nn.Module):
    """Pre-norm transformer block with refined attention; ``forward(x, prev_attn) -> (x, attn)``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            reuse_attn: bool = False,
            refine_own_map: bool = False,
            refine_mode: Union[str, Sequence[str]] = 'inverted_residual',
            expansion_ratio: int = 3,
            refine_kernel_size: int = 3,
            refine_layout: str = 'raster',
            init_values: Optional[float] = 1e-5,
            norm_eps: float = 4e-6,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type = nn.GELU,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.norm1 = norm_layer(dim)
        refine_module = None
        if reuse_attn or refine_own_map:
            refine_module = DistributedLocalAttention(
                num_heads, expansion_ratio=expansion_ratio, refine_kernel_size=refine_kernel_size, mode=refine_mode,
                refine_layout=refine_layout)
        self.attn = RefinedAttention(
            dim, num_heads, qkv_bias=qkv_bias, reuse_attn=reuse_attn, refine=refine_module,
            refine_norm=reuse_attn, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.use_kernels = use_kernels()  # the lean MLP below (refiner.kernels)

    def forward(self, x: torch.Tensor, prev_attn: Optional[torch.Tensor] = None,
                grid_size: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x), prev_attn, grid_size)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self._mlp(self.norm2(x)))
        return x, attn

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """ls2(mlp(x)); in eager training, fc2(gelu(·)) with the layer scale folded into fc2's weights
        and GELU recomputed in backward (the same result in less memory)."""
        if not torch.jit.is_scripting() and self._lean_mlp_applies(x):
            return self._lean_mlp(x)
        return self.ls2(self.mlp(x))

    @torch.jit.unused
    def _lean_mlp_applies(self, x: torch.Tensor) -> bool:
        m = self.mlp
        return (self.use_kernels and self.training and torch.is_grad_enabled() and kernels_apply(x)
                and isinstance(m.act, nn.GELU) and m.act.approximate == 'none' and isinstance(m.norm, nn.Identity)
                and not any(isinstance(d, nn.Dropout) and d.p > 0 for d in (m.drop1, m.drop2)))

    @torch.jit.unused
    def _lean_mlp(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.mlp.fc2.weight, self.mlp.fc2.bias
        if isinstance(self.ls2, LayerScale):
            weight, bias = weight * self.ls2.gamma[:, None], bias * self.ls2.gamma
        return gelu_linear(self.mlp.fc1(x), weight, bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the MLP's layer scale into fc2 (inference)."""
        if isinstance(self.ls2, LayerScale):
            gamma = self.ls2.gamma
            self.mlp.fc2.weight.mul_(gamma.view(-1, 1))
            if self.mlp.fc2.bias is not None:
                self.mlp.fc2.bias.mul_(gamma)
            self.ls2 = nn.Identity()

