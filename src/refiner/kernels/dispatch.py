"""When a module may take a fast path at all: no dropout active and no submodule that matters in training.

A kernel computes what the reference code computes in *one* mode. The module's own ``training``
flag is not enough to know that mode: a user may put the whole model in eval and then

- set the dropout modules back to train (Monte-Carlo dropout), expecting a different sample of the
  dropout masks at every call: a kernel that skips dropout would silently return the mean network;
- set the BatchNorms back to train under ``no_grad`` (BatchNorm recalibration after a change of data
  or of resolution), expecting the running statistics to update: a kernel that folds the running
  statistics would leave them as they are and normalise with stale ones.

So every dispatch asks about the submodules whose mode changes what they compute: dropout and
BatchNorm (a convolution or an Identity computes the same in either mode: re-parameterization
installs new ones in training mode inside an eval model, which must not turn the kernels off).
Where a rule here says no, the module runs its reference code, which does what the mode says.
"""
from typing import Optional

from torch import nn

__all__ = ['dropout_active', 'statistics_training']


def dropout_active(*modules: Optional[nn.Module]) -> bool:
    """Whether any dropout module (``nn.Dropout`` and its kin) inside these modules would drop
    something now: in training mode with p > 0."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
               for module in modules if module is not None for m in module.modules())


def statistics_training(*modules: Optional[nn.Module]) -> bool:
    """Whether any BatchNorm (or other norm with running statistics) inside these modules is in
    training mode: it normalises with batch statistics and updates its running ones."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.training
               for module in modules if module is not None for m in module.modules())
