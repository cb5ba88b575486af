"""The Refiner-ViT model (a ViT whose attention maps are refined), its weights filter and timm registrations.

Zhou et al., "Refiner: Refining Self-attention for Vision Transformers", arXiv 2106.03714.

Image to logits:

    image (B, 3, S, S)
      -> ConvStem: 7×7/2 conv, two 3×3 convs (BN, ReLU), then a (p/2)×(p/2) projection with
         stride p/2: a (S/p)×(S/p) grid of C-wide tokens, flattened row-major    # (B, L, C)
      -> prepend the class token, add learned position embeddings              # (B, N, C), N = L + 1
      -> blocks, alternating an attention block (computes A = softmax(q·kᵀ·s) [+ s·A_prev]) and a
         refining block (applies s·BN(DLA(A_prev)) to its own V); each hands its map to the next
      -> LayerNorm, class token -> head                                        # (B, classes)
         [+ 0.5 · max over patch tokens of aux_head(token), with the token-labeling head]

The numerics equal the authors' code: their blocks compute x + 2·f(LN(0.5·x)); LN(0.5·x, ε) is
LN(x, 4ε), so blocks here use ε = 4e-6 and the factor 2 lives in the converted weights
(see :mod:`refiner.convert`). The MLP branch carries a per-channel layer scale (init 1e-5).

Sections, in timm's order: the model; the weights filter; the registrations. The stem and the block are
in :mod:`.blocks`, the authors' key renames in :mod:`.official_keys`, the variants' shapes (one table,
which :mod:`refiner.convert` also reads) and pretrained configs in :mod:`.variants`.
"""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import forget_recipe
from .blocks import ConvStem, RefinerBlock, check_image_input
from .official_keys import is_official_state_dict, official_to_refiner
from .variants import ARCHITECTURES, RELEASED, default_cfgs  # noqa: F401  (default_cfgs: timm finds them here)

try:
    from timm.models._input import update_model_input_size  # timm's record of a resized model (timm >= 1.0.2x)
except ImportError:
    update_model_input_size = None

__all__ = ['RefinerViT', 'RefinerBlock', 'ConvStem', 'check_image_input', 'checkpoint_filter_fn', 'ARCHITECTURES',
           'RELEASED']


# ------------------------------------------------------------------------------------------- model

class RefinerViT(nn.Module):
    """Refiner-ViT, with the interface of timm's ``VisionTransformer``.

    Args:
        img_size: training input size; other sizes (multiples of the patch) also run, with the
            position embeddings resampled.
        patch_size: total stride of the conv stem (even).
        in_chans: input channels.
        num_classes: classes of the head (0: no head, ``forward`` returns pooled features).
        global_pool: ``'token'`` (class token), ``'avg'``, ``'max'``, ``'avgmax'`` or ``''``.
        embed_dim: token width C.
        depth: number of blocks.
        num_heads: H.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias on q, k, v.
        refine_blocks: per block, True for a refining block (reuses the previous block's map);
            default alternates attention and refining blocks, as the released models do.
        refine_mode: form of the refinement, see :class:`DistributedLocalAttention`; one for all
            blocks, or one per block (entries of non-refining blocks are ignored).
        expansion_ratio: attention expansion r (H' = r·H).
        refine_kernel_size: k of the distributed local attention.
        refine_layout: token layout of the local convolution: ``'raster'`` (the released models),
            ``'spatial_keys'`` or ``'spatial'`` (over the 2-D token grid), see
            :class:`DistributedLocalAttention`.
        init_values: MLP layer-scale init (None: no layer scale).
        block_norm_eps: LayerNorm eps in the blocks (4e-6 reproduces the authors' LN(0.5·x, 1e-6)).
        attn_handover: attention blocks add s·(the previous block's map), as the released models do;
            refining blocks always receive the previous map.
        aux_head: add the token-labeling head (a classifier on every patch token).
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            depth: int = 16,
            num_heads: int = 12,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            refine_blocks: Optional[Sequence[bool]] = None,
            refine_mode: str = 'inverted_residual',
            expansion_ratio: int = 3,
            refine_kernel_size: int = 3,
            refine_layout: str = 'raster',
            init_values: Optional[float] = 1e-5,
            block_norm_eps: float = 4e-6,
            attn_handover: bool = True,
            aux_head: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ) -> None:
        super().__init__()
        if global_pool not in ('', 'token', 'avg', 'max', 'avgmax'):
            raise ValueError(f"global_pool must be '', 'token', 'avg', 'max' or 'avgmax', got {global_pool!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f'img_size {img_size} must be a multiple of patch_size {patch_size}')
        if refine_blocks is None:
            refine_blocks = [i % 2 == 1 for i in range(depth)]
        refine_blocks = [bool(r) for r in refine_blocks]
        modes = [refine_mode] * depth if isinstance(refine_mode, str) else list(refine_mode)
        if len(modes) != depth:
            raise ValueError(f'refine_mode has {len(modes)} entries for depth {depth}')
        if len(refine_blocks) != depth:
            raise ValueError(f'refine_blocks has {len(refine_blocks)} entries for depth {depth}')
        if depth and refine_blocks[0]:
            raise ValueError('the first block cannot refine: no block before it hands over an attention map')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.refine_blocks = refine_blocks
        self.attn_handover = attn_handover
        self.grad_checkpointing = False

        self.patch_embed = ConvStem(patch_size, in_chans, embed_dim)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear in depth
        self.blocks = nn.ModuleList([
            RefinerBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, reuse_attn=refine_blocks[i],
                refine_mode=modes[i], expansion_ratio=expansion_ratio, refine_kernel_size=refine_kernel_size,
                refine_layout=refine_layout,
                init_values=init_values, norm_eps=block_norm_eps, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i])
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if aux_head and num_classes > 0 else None
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('', 'token', 'avg', 'max', 'avgmax'):
                raise ValueError(f"global_pool must be '', 'token', 'avg', 'max' or 'avgmax', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else None

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample the stored position embeddings to a new default input size."""
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        p = self.patch_embed.patch_size
        if img_size[0] % p or img_size[1] % p:
            raise ValueError(f'img_size {img_size} must be a multiple of the patch size {p}')
        new_grid = (img_size[0] // p, img_size[1] // p)
        with torch.no_grad():
            pos = resample_abs_pos_embed(self.pos_embed, list(new_grid), list(self.grid_size), num_prefix_tokens=1)
        self.pos_embed = nn.Parameter(pos)
        self.grid_size = new_grid
        if update_model_input_size is not None:  # what timm's save_for_hf records to rebuild the model
            update_model_input_size(self, img_size)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, h, w, C) token grid -> (B, 1 + h·w, C) with class token and position embeddings
        B, h, w, C = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, [h, w], [self.grid_size[0], self.grid_size[1]], num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, h * w, C)], dim=1)
        return self.pos_drop(x + pos_embed)

    def _run_blocks(
            self, x: torch.Tensor, grid_size: Tuple[int, int], take_indices: Optional[List[int]] = None,
            max_index: int = -1, keep_maps: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """Blocks in turn on tokens x (B, N, C) of an h×w ``grid_size``, each handing its attention map
        to the next. Returns the tokens, the
        outputs of the blocks in ``take_indices`` and, with ``keep_maps``, the maps the blocks handed
        on (else none: in training, a map that no block keeps for backward is freed once handed on)."""
        intermediates: List[torch.Tensor] = []
        maps: List[torch.Tensor] = []
        attn: Optional[torch.Tensor] = None
        for i, blk in enumerate(self.blocks):
            if max_index < 0 or i <= max_index:  # (TorchScript allows no break here)
                prev = attn if self.attn_handover or self.refine_blocks[i] else None
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, a = checkpoint(blk, x, prev, grid_size, use_reentrant=False)
                    forget_recipe(a)  # the next block's checkpoint keeps the map as its input
                else:
                    x, a = blk(x, prev, grid_size)
                attn = a
                if keep_maps:
                    maps.append(a)
                if take_indices is not None and i in take_indices:
                    intermediates.append(x)
        return x, intermediates, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embed(x)  # (B, h, w, C)
        x, _, _ = self._run_blocks(self._pos_embed(grid), (grid.shape[1], grid.shape[2]))  # (B, N, C)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of chosen blocks, as timm's VisionTransformer gives them.

        Args:
            indices: last n blocks if an int, the listed blocks if a list, all if None.
            return_prefix_tokens: also return the class token of each intermediate.
            norm: apply the final norm to the intermediates.
            stop_early: stop after the last wanted block.
            output_fmt: ``'NCHW'`` (B, C, h, w) token grids or ``'NLC'`` (B, h·w, C).
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        grid = self.patch_embed(x)  # (B, h, w, C)
        x, intermediates, _ = self._run_blocks(self._pos_embed(grid), (grid.shape[1], grid.shape[2]), take_indices,
                                               max_index if stop_early else -1)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            p = self.patch_embed.patch_size
            h, w = height // p, width // p
            intermediates = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == 'token':
            return x[:, 0]
        tokens = x[:, self.num_prefix_tokens:]
        if self.global_pool == 'avg':
            return tokens.mean(dim=1)
        if self.global_pool == 'max':
            return tokens.amax(dim=1)
        if self.global_pool == 'avgmax':
            return 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        feats = self.head_drop(self.pool(x))
        if pre_logits:
            return feats
        logits = self.head(feats)
        if self.aux_head is not None:
            # token labeling: add half of each class's strongest patch-token score
            logits = logits + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).amax(dim=1)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_train(
            self,
            x: torch.Tensor,
            mix_box: Optional[Tuple[int, int, int, int]] = None,
            return_attn: bool = False,
    ) -> Dict[str, Any]:
        """One pass for training losses that need more than the logits.

        Args:
            x: images (B, C, H, W).
            mix_box: MixToken box ``(top, left, bottom, right)`` on the token grid: its tokens are
                swapped with those of the batch-flipped images right after the stem, and swapped
                back in the per-token outputs.
            return_attn: also return the attention map each block handed on (for the
                attention-similarity regulariser).

        Returns a dict with ``logits`` (B, classes) from the class token, ``aux_logits``
        (B, h·w, classes) when the model has the token-labeling head, and ``attn`` (list of
        (B, H, N, N)) when asked.
        """
        grid = self.patch_embed(x)  # (B, h, w, C)
        if mix_box is not None:
            top, left, bottom, right = mix_box
            grid = grid.clone()
            grid[:, top:bottom, left:right] = grid.flip(0)[:, top:bottom, left:right]
        x, _, maps = self._run_blocks(self._pos_embed(grid), (grid.shape[1], grid.shape[2]), keep_maps=return_attn)
        x = self.norm(x)
        out: Dict[str, Any] = {'logits': self.head(self.head_drop(self.pool(x)))}
        if self.aux_head is not None:
            aux = self.aux_head(x[:, self.num_prefix_tokens:])  # (B, h·w, classes)
            if mix_box is not None:
                B, h, w, _ = grid.shape
                aux = aux.view(B, h, w, -1).clone()
                aux[:, top:bottom, left:right] = aux.flip(0)[:, top:bottom, left:right]
                aux = aux.view(B, h * w, -1)
            out['aux_logits'] = aux
        if return_attn:
            out['attn'] = maps
        return out

    @torch.jit.ignore
    def reparameterize(self) -> 'RefinerViT':
        """Fold BatchNorms, layer scales and the ×s of refining blocks into weights, in place, for
        inference (same outputs up to rounding). ``timm.utils.reparameterize_model`` does the same."""
        from timm.utils import reparameterize_model
        return reparameterize_model(self, inplace=True)



# ----------------------------------------------------------------------------------- weights filter

def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RefinerViT) -> Dict[str, torch.Tensor]:
    """Accept this project's weights and the authors' original checkpoints; resample position
    embeddings to the model's grid."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if is_official_state_dict(state_dict):
        state_dict = official_to_refiner(state_dict)
    if 'aux_head.weight' in state_dict and model.aux_head is None:
        raise ValueError('these weights have a token-labeling head: create the model with aux_head=True')
    out = {}
    for k, v in state_dict.items():
        if k == 'pos_embed' and v.shape != model.pos_embed.shape:
            old = int(round((v.shape[1] - 1) ** 0.5))
            v = resample_abs_pos_embed(v, list(model.grid_size), [old, old], num_prefix_tokens=1)
        out[k] = v
    return out



def _create_refiner_vit(variant: str, pretrained: bool = False, **kwargs) -> RefinerViT:
    kwargs = dict(ARCHITECTURES[variant], **kwargs)  # the table's shape; the caller's arguments win
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        RefinerViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )



# ----------------------------------------------------------------------------------- registrations

@register_model
def refiner_vit_s(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-S: C 384, 16 blocks (8 attention + 8 refining), 12 heads; 25.0M parameters."""
    return _create_refiner_vit('refiner_vit_s', pretrained, **kwargs)


@register_model
def refiner_vit_m(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-M: C 420, 32 blocks (16 + 16), 12 heads; 55.0M parameters."""
    return _create_refiner_vit('refiner_vit_m', pretrained, **kwargs)


@register_model
def refiner_vit_l(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-L: C 512, 32 blocks (16 + 16), 16 heads; 80.6M parameters."""
    return _create_refiner_vit('refiner_vit_l', pretrained, **kwargs)


@register_model
def refiner_vit_ti(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-Ti (this project): C 192, 12 blocks (6 + 6), 6 heads."""
    return _create_refiner_vit('refiner_vit_ti', pretrained, **kwargs)


@register_model
def refiner_vit_nano(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-Nano (this project), for small images on a CPU: 32×32 input, patch 4, C 128,
    6 blocks (3 + 3), 4 heads."""
    return _create_refiner_vit('refiner_vit_nano', pretrained, **kwargs)
