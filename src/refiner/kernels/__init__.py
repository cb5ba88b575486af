"""Fast paths of Refiner-ViT: the same results as the reference code, in less time and memory.

:mod:`refiner.layers` and :mod:`refiner.models` hold the readable reference of the method; each
operation here computes one piece of it on tensors and plain parameters, tile by tile, and
recomputes in backward what autograd would store. One switch (:mod:`refiner.kernels.switch`)
turns all of them on or off; the tests hold every one equal to the reference.

- :func:`attention_handover`: an attention block's A = softmax(q·kᵀ·s) [+ s·A_prev] and A @ v.
- :func:`refine_aggregate_train` / :func:`refine_aggregate_eval`: a refining block's refined map
  and its product with V.
- :func:`gelu_linear`: the MLP's fc2(gelu(h)), GELU recomputed in backward.
- :func:`recompute`: activation checkpointing (the refinement's and the conv stem's maps), with
  :func:`release_free_heap` before the stem's burst of recomputed maps.

- :mod:`refiner.kernels.triton_refinement`: on CUDA, with Triton installed, a refining block's
  inference (raster layout; the inverted residual and the linear forms) in one fused kernel that
  never writes the expanded or refined maps to GPU memory; imported only for CUDA maps. Its weights
  are folded and cached by :mod:`refiner.kernels.fused_weights`; :mod:`refiner.kernels.triton_compile`
  compiles it for a GPU target without one (``scripts/gpu_cost.py``).
- :mod:`refiner.kernels.dispatch`: no fast path while a dropout module is active or a BatchNorm
  trains, whatever the model's own mode (Monte-Carlo dropout, BatchNorm recalibration).

Everything else (other refinement forms in training, dropout on the maps, TorchScript,
torch.compile, torch.fx) takes the reference code.
"""
from .handover import attention_handover, forget_recipe
from .mlp_tail import gelu_linear
from .recompute import MMAP_THRESHOLD_MAX, recompute, recomputing, release_free_heap
from .refinement import BatchNormState, refine_aggregate_eval, refine_aggregate_train
from .switch import set_kernels, use_kernels
from .tiling import eager_mode, kernels_apply

__all__ = ['BatchNormState', 'MMAP_THRESHOLD_MAX', 'attention_handover', 'eager_mode', 'forget_recipe', 'gelu_linear',
           'kernels_apply', 'recompute', 'recomputing', 'refine_aggregate_eval', 'refine_aggregate_train',
           'release_free_heap', 'set_kernels', 'use_kernels']
