"""Handing the host heap's free memory back to the operating system.

glibc keeps freed memory in its heap for reuse, but serves every request above its mmap threshold
(at most 32 MiB on 64-bit systems) with fresh pages from the kernel. A training step that frees
many activations and then allocates a burst of large buffers therefore needs the sum of both:
in Refiner-ViT that is the conv stem's backward, whose maps at half the input's resolution
arrive after the blocks' activations have been freed. ``malloc_trim(0)`` returns the free pages first.
"""
import ctypes
from typing import Callable, Optional

__all__ = ['MMAP_THRESHOLD_MAX', 'release_free_heap']

MMAP_THRESHOLD_MAX = 32 << 20  # bytes; glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems


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

