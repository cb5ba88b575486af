"""Where a command runs: the device, chosen the same way everywhere (``'auto'``: CUDA where there
is one, else the CPU; ``'cpu'``; ``'cuda'``; ``'cuda:N'``), and sums across torchrun processes."""
import torch
import torch.distributed as dist

__all__ = ['DeviceError', 'resolve_device', 'all_reduce']


class DeviceError(ValueError):
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
