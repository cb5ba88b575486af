"""Where and in what precision a command runs: the device, chosen the same way everywhere
(``'auto'``: CUDA where there is one, else the CPU; ``'cpu'``; ``'cuda'``; ``'cuda:N'``), the model's
dtype as timm's ``--model-dtype`` names it, and sums across torchrun processes."""
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import RefinerError

__all__ = ['DeviceError', 'MODEL_DTYPES', 'all_reduce', 'model_dtype', 'resolve_device', 'resolve_model_dtype']

# timm's --model-dtype values (validate.py, train.py, benchmark.py): the weights are cast, no autocast
MODEL_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


class DeviceError(RefinerError, ValueError):
    """A device that cannot be used here; the message says which can."""


def resolve_device(name: str = 'auto') -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type not in ('cpu', 'cuda'):
        raise DeviceError(f"--device {name}: expected 'auto', 'cpu' or 'cuda[:N]'")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise DeviceError(f'--device {name}: no CUDA device is available; use --device cpu')
    return device


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes of a distributed run, in place (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def resolve_model_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The torch dtype of a ``--model-dtype`` value (None: leave the model as it is)."""
    if name is None:
        return None
    if name not in MODEL_DTYPES:
        raise DeviceError(f'--model-dtype {name}: expected one of {", ".join(MODEL_DTYPES)}')
    return MODEL_DTYPES[name]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters, which its inputs are cast to (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
