"""The one switch for every fast path, read when a module is constructed (as timm's ``use_fused_attn``).

The kernels compute what the reference code of :mod:`refiner.layers` and :mod:`refiner.models`
computes, in less time and memory. They are on by default; switch them off

- for every model built afterwards: ``refiner.kernels.set_kernels(False)``, or the environment
  variable ``REFINER_KERNELS=0``;
- for one model already built: ``refiner.kernels.set_kernels(False, model)``.

With them off a model runs its plain reference code (autograd, nothing recomputed), which is what
the tests compare the kernels against.
"""
import os
from typing import Optional

from torch import nn

__all__ = ['set_kernels', 'use_kernels']

_ENABLED = os.environ.get('REFINER_KERNELS', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def use_kernels() -> bool:
    """Whether modules constructed now take the kernels (their ``use_kernels`` attribute)."""
    return _ENABLED


def set_kernels(enable: bool, model: Optional[nn.Module] = None) -> None:
    """Switch the kernels on or off: in every module of ``model`` that has them, or, without a
    model, as the default for modules constructed from now on."""
    global _ENABLED
    if model is None:
        _ENABLED = bool(enable)
        return
    for m in model.modules():
        if hasattr(m, 'use_kernels'):
            m.use_kernels = bool(enable)
