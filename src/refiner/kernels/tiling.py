"""What every kernel shares: tiling a batch of maps to fit the cache, and when a kernel may run.

On a CPU, a pass over a batch of N×N attention maps streams through memory, while the same pass
over one sample's maps stays in cache and runs 3-4× faster. So every kernel walks the batch a few
samples at a time (``CHUNK_BYTES`` of temporaries) and never builds a whole-batch temporary map;
where one sample's maps outgrow that (large inputs), it walks the sample's query rows in slabs.
A *tile* is such a range of samples and rows.
"""
import functools
from typing import List, Optional, Tuple

import torch

__all__ = ['CHUNK_BYTES', 'DEFAULT_CHUNK_BYTES', 'chunks', 'eager_mode', 'float32', 'halo', 'kernels_apply',
           'result_dtype', 'spans', 'tiles', 'without_autocast']

# Work is split into chunks of whole samples whose largest temporary (for a refining block, its
# expanded maps, r·H·N²·4 bytes per sample) stays near CHUNK_BYTES. On a CPU that keeps each pass
# in cache: one Refiner-ViT-S sample at 224² (5.6 MB) measured fastest, against 2, 4 and 16; small
# models take many samples per chunk, so that per-operation overhead does not dominate. A GPU wants
# large launches; chunks there only bound the temporary memory.
CHUNK_BYTES = {'cpu': 6 << 20}
DEFAULT_CHUNK_BYTES = 1 << 30

Tensor = torch.Tensor


def spans(t: Tensor, n: int, per_item_elements: int) -> List[Tuple[int, int]]:
    """[start, end) ranges over n items, each with ``per_item_elements`` values of t's dtype in
    temporaries, that keep those temporaries near the chunk budget of t's device."""
    budget = CHUNK_BYTES.get(t.device.type, DEFAULT_CHUNK_BYTES)
    step = max(1, budget // max(per_item_elements * t.element_size(), 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def chunks(t: Tensor, per_sample_elements: Optional[int] = None) -> List[Tuple[int, int]]:
    """Sample ranges of a batch ``t`` whose per-sample temporaries hold ``per_sample_elements``
    values (default: one sample of t)."""
    return spans(t, t.shape[0], per_sample_elements or t[0].numel())


def tiles(t: Tensor, per_row_elements: int) -> List[Tuple[int, int, int, int]]:
    """``(i, j, r0, r1)``: samples i..j and query rows r0..r1 of maps t (B, H, N, ·) whose work
    holds ``per_row_elements`` values of temporaries per sample and row: chunks of whole samples,
    cut into slabs of rows only where one sample outgrows the budget (larger inputs)."""
    N = t.shape[2]
    return [(i, j, r0, r1) for i, j in chunks(t, per_row_elements * N)
            for r0, r1 in spans(t, N, (j - i) * per_row_elements)]


def halo(r0: int, r1: int, pad: int, n: int) -> Tuple[int, int]:
    """The rows a k×k convolution (k = 2·pad + 1) reads to produce rows r0..r1 of n."""
    return max(r0 - pad, 0), min(r1 + pad, n)


def without_autocast(backward):
    """Run a Function's backward in the float32 its forward computed in, even when ``backward()``
    is called inside an autocast region (whose casts would mix dtypes in the kernels)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next(g.device.type for g in grads if g is not None)
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return run


_is_fx_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


def eager_mode(*tensors: Optional[Tensor]) -> bool:
    """Not under TorchScript, tracing, torch.compile / torch.export or torch.fx (which take the modules'
    reference code)."""
    return (not torch.jit.is_scripting() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not _is_fx_tracing()
            and not any(isinstance(t, torch.fx.Proxy) for t in tensors))


def kernels_apply(*tensors: Optional[Tensor]) -> bool:
    """Whether the eager kernels can run: in eager mode, on floating-point inputs."""
    return eager_mode(*tensors) and all(t is None or t.is_floating_point() for t in tensors)


def float32(*tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    """The kernels compute in float32 or float64 (BatchNorm statistics need it): half-precision
    inputs are cast up (differentiably, so gradients reach half-precision parameters in their dtype)."""
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def result_dtype(t: Tensor) -> torch.dtype:
    """The dtype a kernel hands back for an input of t's dtype: the caller's own (a model cast to
    bf16 or fp16 gets its dtype back); under autocast, float32 for half-precision inputs, the
    precision the kernel computed in, as autocast's own float32 ops do."""
    if t.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(t.device.type):
        return torch.float32
    return t.dtype
