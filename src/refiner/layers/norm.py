"""BatchNorm that counts every batch once, also under activation checkpointing."""
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

__all__ = ['BatchNorm2d', 'recomputing']


@torch.jit.unused
def recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when a checkpointed forward is being recomputed."""
    return torch._C._current_graph_task_id() != -1


@register_notrace_module  # decides at run time, not at trace time
class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics see each training batch once.

    Activation checkpointing (the refine module's recomputation, ``set_grad_checkpointing``) runs a
    forward twice; a plain BatchNorm would fold the same batch into its running estimates twice.
    This one normalises the recomputation with the batch statistics, as the first pass did, and
    leaves the running estimates alone. Its state dict is that of ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = 0.0  # a momentum of 0 leaves the running estimates as they are
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            first_pass = torch.jit.is_scripting() or torch.compiler.is_compiling() or not recomputing()
            if first_pass:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
                else:
                    momentum = self.momentum
        use_batch_stats = self.training or self.running_mean is None
        # the same call in both passes, so that checkpointing sees the same saved tensors
        return F.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch_stats, momentum, self.eps)
