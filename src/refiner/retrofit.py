"""Retrofit refined attention into an existing timm ViT / DeiT ("DeiT + refiner" in the paper).

Each chosen block keeps its q, k, v and output projections; its attention map is refined by a
distributed-local-attention module before it aggregates V. The refinement starts as the identity
(its last BatchNorm is zero-initialised, around an identity residual), so the retrofitted model
computes exactly what the original did until it is trained.

``timm.create_model('refined_vit', base_model='deit_small_patch16_224', refine_blocks='all')`` builds
a retrofitted model by name, so that its weights reload (and a Hub folder of it loads) like any
timm model's.
"""
from typing import Any, Dict, Iterable, List, Optional, Union

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention
from timm.models import generate_default_cfgs, load_pretrained, register_model
from torch import nn

from .layers import DistributedLocalAttention, RefinedAttention

__all__ = ['RefinedTimmAttention', 'refine_vit', 'refined_vit']


class RefinedTimmAttention(RefinedAttention):
    """Refined attention with the interface of timm's ``Attention``: ``forward(x) -> x``.

    Its parameter names are those of timm's Attention (``qkv``, ``proj``, ``q_norm``, ``k_norm``),
    plus ``refine.*``, so the original checkpoint still loads (with ``strict=False``).
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,  # type: ignore[override]
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError('refined attention does not support attention masks or causal attention')
        B, N, C = x.shape
        q, k, v = self.project_qkv(x)  # (B, H, N, d) each
        _, attn = self._attend(q, k, None, None)  # (B, H, N, N)
        out = self._aggregate_refined(attn, v)  # refine(A) @ V
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


def _block_indices(blocks: Union[str, int, Iterable[int]], depth: int) -> List[int]:
    if blocks == 'all':
        return list(range(depth))
    if isinstance(blocks, int):
        if not 0 < blocks <= depth:
            raise ValueError(f'blocks={blocks}: expected 1..{depth} (the last n blocks)')
        return list(range(depth - blocks, depth))
    if isinstance(blocks, str):
        raise ValueError(f"blocks must be 'all', an int (last n blocks) or a list of indices, got {blocks!r}")
    out = set()
    for i in blocks:
        if not -depth <= i < depth:
            raise ValueError(f'block index {i} is out of range for a model with {depth} blocks')
        out.add(i % depth)
    if not out:
        raise ValueError('blocks is empty: name at least one block to refine')
    return sorted(out)


def refine_vit(
        model: nn.Module,
        blocks: Union[str, int, Iterable[int]] = 'all',
        refine_mode: str = 'inverted_residual',
        expansion_ratio: int = 3,
        refine_kernel_size: int = 3,
        refine_layout: str = 'raster',
) -> nn.Module:
    """Give chosen blocks of a timm ``VisionTransformer`` (vit_*, deit_*) refined attention, in place.

    Args:
        model: a timm ViT whose blocks hold a timm ``Attention`` as ``attn``.
        blocks: ``'all'``, the last n blocks (an int), or a list of block indices.
        refine_mode: form of the refinement (see :class:`refiner.layers.DistributedLocalAttention`).
        expansion_ratio: attention expansion r.
        refine_kernel_size: k of the distributed local attention.
        refine_layout: ``'raster'``, ``'spatial_keys'`` or ``'spatial'`` (over the model's token grid).

    Returns the same model; ``model.refined_blocks`` lists the blocks that changed, and
    ``model.pretrained_cfg['refiner']`` records the settings. Outputs are unchanged until trained.
    """
    if not hasattr(model, 'blocks') or not isinstance(model.blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f'refine_vit needs a timm VisionTransformer-like model (.blocks), got {type(model).__name__}')
    indices = _block_indices(blocks, len(model.blocks))
    # the token grid of the spatial layouts: the patch embedding's (other sizes: a square grid is inferred)
    patch_embed = getattr(model, 'patch_embed', None)
    grid_size = getattr(patch_embed, 'grid_size', None)
    grid_size = tuple(grid_size) if grid_size is not None and not getattr(patch_embed, 'dynamic_img_size', False) \
        else None
    prefix_tokens = int(getattr(model, 'num_prefix_tokens', 1))
    for i in indices:
        old = getattr(model.blocks[i], 'attn', None)
        if not isinstance(old, Attention):
            raise TypeError(f'block {i} has attention {type(old).__name__}; refine_vit converts timm.layers.Attention')
        if old.gate is not None or not isinstance(old.norm, nn.Identity) or old.attn_dim != old.proj.in_features:
            raise TypeError(f'block {i}: gated or scale-normed attention is not supported by refine_vit')
        dim = old.qkv.in_features
        if old.attn_dim != dim or old.proj.out_features != dim:
            raise TypeError(f'block {i}: attention width {old.attn_dim} differs from the token width {dim}')
        refine = DistributedLocalAttention(
            old.num_heads, expansion_ratio=expansion_ratio, refine_kernel_size=refine_kernel_size,
            mode=refine_mode, residual=True, zero_init_last=True, refine_layout=refine_layout,
            grid_size=grid_size, num_prefix_tokens=prefix_tokens)
        new = RefinedTimmAttention(
            dim, old.num_heads, qkv_bias=old.qkv.bias is not None, refine=refine,
            qk_norm=not isinstance(old.q_norm, nn.Identity), attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p)
        if new.proj.bias is None or old.proj.bias is None:
            raise TypeError(f'block {i}: attention without output-projection bias is not supported')
        new.qkv, new.proj, new.q_norm, new.k_norm = old.qkv, old.proj, old.q_norm, old.k_norm
        new.to(device=old.qkv.weight.device, dtype=old.qkv.weight.dtype)
        new.train(old.training)
        model.blocks[i].attn = new
    model.refined_blocks = indices
    settings = dict(blocks=indices, refine_mode=refine_mode, expansion_ratio=expansion_ratio,
                    refine_kernel_size=refine_kernel_size, refine_layout=refine_layout)
    if isinstance(getattr(model, 'pretrained_cfg', None), dict):
        model.pretrained_cfg = dict(model.pretrained_cfg, refiner=settings)
    return model


# the registered pretrained cfg of `refined_vit` (no weights): its default base model's, DeiT-S's, as
# timm's resolve_data_config and get_pretrained_cfg_value expect of every model; a model built from
# another base carries that base's cfg
_WEIGHT_LOCATIONS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename')  # pretrained_cfg keys

default_cfgs = generate_default_cfgs({'refined_vit': dict(
    num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875, interpolation='bicubic',
    fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='patch_embed.proj',
    classifier='head', license='apache-2.0')})


@register_model
def refined_vit(pretrained: bool = False, base_model: str = 'deit_small_patch16_224',
                refine_blocks: Union[str, int, List[int]] = 'all', refine_mode: str = 'inverted_residual',
                expansion_ratio: int = 3, refine_kernel_size: int = 3, refine_layout: str = 'raster',
                pretrained_cfg: Optional[Dict[str, Any]] = None,
                pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
                pretrained_model_args: Optional[Dict[str, Any]] = None,
                **kwargs: Any) -> nn.Module:
    """A timm ViT (``base_model``, created with ``kwargs``) whose ``refine_blocks`` have refined attention.

    With ``pretrained=True`` the weights come from ``pretrained_cfg`` (as
    ``timm.create_model('local-dir:DIR')`` passes it for a folder written by ``refiner export --format hf``).
    """
    if not timm.is_model(base_model) or base_model == 'refined_vit':
        raise ValueError(f'base_model {base_model!r}: expected a timm ViT model name such as deit_small_patch16_224')
    if pretrained_cfg and pretrained_cfg.get('num_classes') is not None:
        kwargs.setdefault('num_classes', pretrained_cfg['num_classes'])  # a model folder's (local-dir:), as timm's
    model = timm.create_model(base_model, **kwargs)
    refine_vit(model, refine_blocks, refine_mode=refine_mode, expansion_ratio=expansion_ratio,
               refine_kernel_size=refine_kernel_size, refine_layout=refine_layout)
    # the base's preprocessing, not where its weights are: they are not these (unrefined) weights
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _WEIGHT_LOCATIONS and k != 'refiner'}
    cfg.update(pretrained_cfg or {}, **(pretrained_cfg_overlay or {}))
    cfg['architecture'] = 'refined_vit'
    if pretrained and not any(cfg.get(k) for k in _WEIGHT_LOCATIONS):
        raise ValueError("refined_vit has no published weights: give pretrained_cfg_overlay=dict(file=...), or "
                         "load a folder written by refiner export --format hf with timm.create_model('local-dir:DIR')")
    model.pretrained_cfg = model.default_cfg = cfg
    # what create_model records to rebuild the model (timm's save_for_hf writes it as model_args)
    model._model_args = dict(getattr(model, '_model_args', {}), base_model=base_model,
                             refine_blocks=model.refined_blocks, refine_mode=refine_mode,
                             expansion_ratio=expansion_ratio, refine_kernel_size=refine_kernel_size,
                             refine_layout=refine_layout)
    if pretrained:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=kwargs.get('in_chans', 3),
                        cache_dir=cache_dir)
    return model
