"""Attention maps of every block, the stages of their refinement, and how diverse they are.

Refiner (Zhou et al. 2021, arXiv 2106.03714) refines the H attention maps of a block by
*attention expansion* (1×1 conv, H → r·H maps), *distributed local attention* (a k×k depthwise
conv over each N×N map) and *attention reduction* (1×1 conv back to H maps). Its claim is that
this keeps the maps diverse: across heads of one block, and across blocks, where a deep ViT's maps
become alike ("attention collapse", DeepViT, Zhou et al. 2021, arXiv 2103.11886).

Supported models: anything with ``model.blocks[i].attn`` being

- this project's :class:`refiner.layers.RefinedAttention` (Refiner-ViT attention and refining
  blocks, and ViTs retrofitted by :func:`refiner.refine_vit`);
- timm's ``Attention`` (``vit_*``, ``deit_*``): it never materialises its map (fused SDPA), so the
  map is recomputed from the block's ``qkv`` projection on the block's input.

Maps are (B, H, N, N): rows are queries, columns keys, N = P prefix tokens (the class token) then
the h×w patch tokens in row-major order.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn

from .. import functional as RF
from ..layers import RefinedAttention
from ..retrofit import RefinedTimmAttention
from .features import AnalysisError, _model_name

__all__ = [
    'NoAttentionError', 'attention_blocks', 'attention_maps', 'refine_stages', 'head_similarity',
    'cross_block_similarity', 'AttentionDiversity',
]


class NoAttentionError(AnalysisError):
    """The model has no self-attention blocks this analysis can read."""


def attention_blocks(model: nn.Module) -> List[nn.Module]:
    """The attention modules ``model.blocks[i].attn``; raises :class:`NoAttentionError` otherwise."""
    blocks = getattr(model, 'blocks', None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise NoAttentionError(f'model {_model_name(model)} has no transformer blocks (model.blocks[i].attn); '
                               f'attention maps need a ViT, DeiT or Refiner-ViT')
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, 'attn', None)
        if not isinstance(attn, (RefinedAttention, TimmAttention)):
            raise NoAttentionError(f'block {i} of model {_model_name(model)} has attention {type(attn).__name__}; '
                                   f'expected timm Attention or refiner RefinedAttention')
        mods.append(attn)
    return mods


def block_kind(attn: nn.Module) -> str:
    """'refining' (reuses the handed-over map), 'attention+refine' (refines its own map) or 'attention'."""
    if isinstance(attn, RefinedAttention):
        if attn.reuse_attn:
            return 'refining'
        if attn.refine is not None:
            return 'attention+refine'
    return 'attention'


def _softmax_map(attn: nn.Module, x: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
    """A = softmax(q·kᵀ·s) [+ s·prev] recomputed from a timm Attention's qkv projection on its input x (B, N, C)."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return RF.attention_map(q, k, prev, attn.scale)  # (B, H, N, N)


def refine_stages(attn: RefinedAttention, prev: torch.Tensor,
                  grid_size: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
    """The stages of refining ``prev`` (B, H, N, N) with ``attn.refine`` (eval mode, no gradients;
    ``grid_size``: the token grid, for a spatial refinement).

    Returns ``before`` (the input map), the stages of
    :meth:`refiner.layers.DistributedLocalAttention.stages` (``expanded``, ``local``, ``reduced``:
    the very computation of the module's forward) and ``refined`` (= ``attn.refined_map(prev)``,
    the map that aggregates V).
    """
    dla = attn.refine
    if dla is None:
        raise AnalysisError('this attention module does not refine its maps (refine is None)')
    with torch.no_grad():
        return {'before': prev, **dla.stages(prev, grid_size), 'refined': attn.refined_map(prev, grid_size)}


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, stages: bool = True) -> List[Dict[str, Any]]:
    """Run ``model`` on ``images`` (eval mode) and return, per block, a dict with

    - ``kind``: 'attention', 'refining' or 'attention+refine';
    - ``attn`` (B, H, N, N): the map that aggregates V — softmax(q·kᵀ·s) [+ s·A_prev] for an
      attention block, the refined map for a block that refines;
    - for blocks that refine and ``stages``: ``before`` (the unrefined map: the handed-over map
      of a refining block, the block's own map otherwise), ``expanded``, ``local``, ``reduced``
      (see :func:`refine_stages`).
    """
    mods = attention_blocks(model)
    captured: Dict[int, tuple] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs['x']
            prev, grid = None, None
            if isinstance(module, RefinedAttention) and not isinstance(module, RefinedTimmAttention):
                # forward(x, prev_attn, grid_size)
                prev = args[1] if len(args) > 1 else kwargs.get('prev_attn')
                grid = args[2] if len(args) > 2 else kwargs.get('grid_size')
            captured[i] = (x, prev, grid, output)
        return hook

    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(mods)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    results: List[Dict[str, Any]] = []
    for i, attn in enumerate(mods):
        if i not in captured:
            raise AnalysisError(f'block {i} of model {_model_name(model)} did not run in the forward pass')
        x, prev, grid, output = captured[i]
        kind = block_kind(attn)
        entry: Dict[str, Any] = {'block': i, 'kind': kind}
        if kind == 'refining':
            before = prev
        elif isinstance(attn, RefinedAttention) and isinstance(output, tuple):
            before = output[1]  # the map this attention block computed (and hands on)
        else:
            before = _softmax_map(attn, x, prev)
        if kind == 'attention':
            entry['attn'] = before
        else:
            st = refine_stages(attn, before, grid)
            entry['attn'] = st.pop('refined')
            if stages:
                entry.update(st)
        results.append(entry)
    return results


def head_similarity(maps: torch.Tensor) -> Optional[torch.Tensor]:
    """Mean pairwise cosine similarity between the H heads' flattened N×N maps, per image: (B,).
    None when H < 2 (no pairs)."""
    B, H = maps.shape[:2]
    if H < 2:
        return None
    flat = F.normalize(maps.reshape(B, H, -1).double(), dim=-1, eps=1e-12)  # (B, H, N·N)
    gram = flat @ flat.transpose(1, 2)  # (B, H, H)
    off = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off / (H * (H - 1))


def cross_block_similarity(maps: torch.Tensor, prev_maps: torch.Tensor) -> torch.Tensor:
    """DeepViT's cross-layer similarity: cosine between the same head's attention rows (one per
    query) of two blocks, averaged over heads and queries, per image: (B,)."""
    a, b = maps.double(), prev_maps.double()
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12).mean(dim=(1, 2))  # (B, H, N) -> (B,)


class AttentionDiversity:
    """Accumulates per-block diversity metrics over batches of :func:`attention_maps` results.

    Per block: ``head_similarity`` (mean pairwise cosine between heads; lower = more diverse heads),
    ``cross_block_similarity`` (with the previous block's map, DeepViT; near 1 = attention
    collapse). For blocks that refine, also the same for the unrefined map (``*_before``) and the
    head similarity of the r·H expanded maps.
    """

    def __init__(self) -> None:
        self._sums: List[Dict[str, float]] = []
        self._kinds: List[str] = []
        self._heads: List[int] = []
        self.num_images = 0

    def update(self, blocks: List[Dict[str, Any]]) -> None:
        if self._kinds and len(blocks) != len(self._kinds):
            raise ValueError(f'expected maps of {len(self._kinds)} blocks as before, got {len(blocks)}')
        if not self._kinds:
            self._kinds = [b['kind'] for b in blocks]
            self._heads = [int(b['attn'].shape[1]) for b in blocks]
            self._sums = [{} for _ in blocks]
        B = int(blocks[0]['attn'].shape[0])

        def add(i: int, key: str, value: Optional[torch.Tensor]) -> None:
            if value is not None:
                self._sums[i][key] = self._sums[i].get(key, 0.0) + float(value.sum())

        for i, blk in enumerate(blocks):
            add(i, 'head_similarity', head_similarity(blk['attn']))
            prev = blocks[i - 1]['attn'] if i > 0 else None
            if prev is not None and prev.shape == blk['attn'].shape:
                add(i, 'cross_block_similarity', cross_block_similarity(blk['attn'], prev))
            if 'before' in blk:
                add(i, 'head_similarity_before', head_similarity(blk['before']))
                if prev is not None and prev.shape == blk['before'].shape:
                    add(i, 'cross_block_similarity_before', cross_block_similarity(blk['before'], prev))
            if 'expanded' in blk:
                add(i, 'head_similarity_expanded', head_similarity(blk['expanded']))
        self.num_images += B

    def compute(self) -> List[Dict[str, Any]]:
        """Per block: ``block``, ``kind``, ``num_heads`` and the metrics averaged over images (None
        where undefined: no previous block, a single head)."""
        if self.num_images == 0:
            raise ValueError('no images yet: call update() with the maps of at least one batch')
        keys = ('head_similarity', 'cross_block_similarity', 'head_similarity_before',
                'cross_block_similarity_before', 'head_similarity_expanded')
        out = []
        for i, (kind, heads, sums) in enumerate(zip(self._kinds, self._heads, self._sums)):
            row: Dict[str, Any] = {'block': i, 'kind': kind, 'num_heads': heads}
            for key in keys:
                if key.endswith(('_before', '_expanded')) and kind == 'attention':
                    continue
                row[key] = sums[key] / self.num_images if key in sums else None
            out.append(row)
        return out
