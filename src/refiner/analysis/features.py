"""Per-block features of a model, flattened to one vector per image, for CKA.

Supported: this project's Refiner-ViT (``refiner_vit_*``), timm's ``VisionTransformer``
(``vit_*``, ``deit_*``, also after :func:`refiner.refine_vit`) and timm ResNets, through timm's
``forward_intermediates()``. For a transformer, a block's output is its N = P + h·w tokens (the P
prefix tokens, i.e. the class token, then the patch tokens in row-major order), each C wide,
flattened token-major to an N·C vector. For a CNN, a stage's (C, H, W) output is flattened to
C·H·W.
"""
import inspect
from typing import Iterator, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import RefinerError

__all__ = ['AnalysisError', 'NoIntermediatesError', 'block_features', 'iterate_features']


class AnalysisError(RefinerError, ValueError):
    """An analysis request that cannot be carried out as given; the message says what was expected."""


class NoIntermediatesError(AnalysisError):
    """The model cannot give per-block outputs (no ``forward_intermediates()``)."""


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict) and cfg.get('architecture'):
        return str(cfg['architecture'])
    return type(model).__name__


@torch.no_grad()
def block_features(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Each block's output for a batch, one (B, D) tensor per block (eval mode, no gradients).

    Transformers (``forward_intermediates`` with ``return_prefix_tokens``): class token and patch
    tokens, ``cat([prefix (B, P, C), patches (B, h·w, C)], 1)`` flattened token-major to
    D = (P + h·w)·C. CNNs: each stage output (B, C, H, W) flattened to D = C·H·W.
    Raises :class:`NoIntermediatesError` for a model without ``forward_intermediates()``.
    """
    fn = getattr(model, 'forward_intermediates', None)
    if fn is None or not callable(fn):
        raise NoIntermediatesError(
            f'model {_model_name(model)} has no forward_intermediates(); CKA needs per-block outputs')
    params = inspect.signature(fn).parameters
    kwargs = dict(intermediates_only=True)
    transformer = 'return_prefix_tokens' in params
    if transformer:
        kwargs.update(return_prefix_tokens=True, output_fmt='NLC')
    was_training = model.training
    model.eval()
    try:
        outs = fn(images, **kwargs)
    except NotImplementedError as e:
        raise NoIntermediatesError(
            f'model {_model_name(model)} has no working forward_intermediates() ({e}); CKA needs per-block outputs'
        ) from None
    finally:
        model.train(was_training)
    feats = []
    for out in outs:
        if isinstance(out, (tuple, list)):  # (patch tokens (B, h·w, C), prefix tokens (B, P, C))
            patches, prefix = out
            out = torch.cat([prefix, patches], dim=1)  # (B, P + h·w, C), class token first
        feats.append(out.reshape(out.shape[0], -1))  # (B, N·C) token-major, or (B, C·H·W)
    if not feats:
        raise NoIntermediatesError(f'model {_model_name(model)} returned no intermediate outputs')
    return feats


def iterate_features(model: nn.Module, loader: DataLoader, device: Union[str, torch.device] = 'cpu',
                     progress: bool = True, desc: Optional[str] = None) -> Iterator[List[torch.Tensor]]:
    """Yield :func:`block_features` of each batch of ``loader`` (batches ``(images, targets, skipped)``
    from :func:`refiner.data.collate_skipping`, or ``(images, targets)``); batches whose images
    all failed to load are skipped."""
    from tqdm import tqdm

    model = model.to(device)
    for batch in tqdm(loader, desc=desc or 'features', disable=not progress, leave=False):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if images is None:
            continue
        yield block_features(model, images.to(device))
