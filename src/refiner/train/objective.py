"""The training objective: what a step calls, MixToken's box, and the loss terms (public, as timm's ``task/``).

A step calls :class:`TrainForward` (which DDP wraps): the Refiner's ``forward_train``, or plain logits.
:func:`training_loss` sums the class token's soft cross-entropy, token labeling's dense term and the
attention-similarity regulariser, each against hand-computed values in ``tests/test_train_objective.py``.
"""
import math
from typing import Any, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import nn

from ..config import TrainConfig

__all__ = ['TrainForward', 'mix_token_box', 'soft_ce', 'attn_cos_reg', 'training_loss']


class TrainForward(nn.Module):
    """What a training step calls (and DDP wraps): the Refiner's forward_train, or plain logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mix_box: Optional[Tuple[int, int, int, int]], want_attn: bool) -> Dict[str, Any]:
        if hasattr(self.model, 'forward_train'):
            return self.model.forward_train(x, mix_box=mix_box, return_attn=want_attn)
        return {'logits': self.model(x)}


def mix_token_box(h: int, w: int) -> Optional[Tuple[Tuple[int, int, int, int], float]]:
    """A CutMix box on the h×w token grid with area ratio from λ ~ Beta(1, 1); returns (box, λ')
    where λ' is the share of the image's own tokens."""
    lam = np.random.beta(1.0, 1.0)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = np.random.randint(h), np.random.randint(w)
    top, bottom = int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h))
    left, right = int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w))
    area = (bottom - top) * (right - left)
    if area == 0:
        return None
    return (top, left, bottom, right), 1.0 - area / (h * w)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def attn_cos_reg(maps: List[torch.Tensor], pairs: int) -> torch.Tensor:
    """Mean cosine similarity over the head axis between consecutive handed-on maps (first n pairs)."""
    n = min(pairs, len(maps) - 1)
    return sum(F.cosine_similarity(maps[i].float(), maps[i + 1].float(), dim=1).mean() for i in range(n)) / n


def training_loss(step_module: nn.Module, images: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
                  num_classes: int, mixup: Optional[Mixup], autocast: ContextManager[Any],
                  patch_size: Optional[int]) -> torch.Tensor:
    """One step's loss: the class token's soft cross-entropy against the (smoothed, Mixup-mixed) target,
    mixed again by the image's own-token share under MixToken; + ``dense_weight`` x every token's against its
    image's target (token labeling); + ``attn_cos_reg`` x the attention-similarity term. ``patch_size``:
    the model's, for MixToken's box on the token grid."""
    if mixup is not None:
        images, soft = mixup(images, targets)
    else:
        soft = mixup_target(targets, num_classes, lam=1.0, smoothing=cfg.smoothing)
    mix_box, own = None, 1.0
    if cfg.mix_token:
        box = mix_token_box(images.shape[-2] // patch_size, images.shape[-1] // patch_size)
        if box is not None:
            mix_box, own = box
    with autocast:
        out = step_module(images, mix_box, cfg.attn_cos_reg > 0)
    cls_target = soft if mix_box is None else own * soft + (1 - own) * soft.flip(0)
    loss = soft_ce(out['logits'], cls_target)
    if 'aux_logits' in out:  # token labeling: every token's target is its image's label
        aux = out['aux_logits'].float()
        loss = loss + cfg.dense_weight * torch.sum(-soft[:, None] * F.log_softmax(aux, -1), -1).mean()
    if cfg.attn_cos_reg > 0:
        loss = loss + cfg.attn_cos_reg * attn_cos_reg(out['attn'], cfg.attn_cos_pairs)
    return loss
