"""Recomputation in backward instead of storage: activation checkpointing, and handing the freed
heap back to the operating system before a burst of recomputed maps.

glibc keeps freed memory in its heap for reuse, but serves every request above its mmap threshold
(at most 32 MiB on 64-bit systems) with fresh pages from the kernel. A training step that frees
many activations and then allocates a burst of large buffers therefore needs the sum of both:
in Refiner-ViT that is the conv stem's backward, whose maps at half the input's resolution
arrive after the blocks' activations have been freed. ``malloc_trim(0)`` returns the free pages first.
"""
import ctypes
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ['MMAP_THRESHOLD_MAX', 'recompute', 'recomputing', 'release_free_heap']

MMAP_THRESHOLD_MAX = 32 << 20  # bytes; glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems


@torch.jit.unused
def recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when a checkpointed forward is being recomputed."""
    return torch._C._current_graph_task_id() != -1


def recompute(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, keeping none of its intermediates for backward: they are recomputed there."""
    return checkpoint(fn, *args, use_reentrant=False)


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS and Windows
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None


_malloc_trim = _find_malloc_trim()


def release_free_heap(*_: object) -> None:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim(0)``; elsewhere
    nothing). Takes and ignores any arguments, so that it can serve as a gradient hook."""
    if _malloc_trim is not None:
        _malloc_trim(0)
