from pathlib import Path

import pytest
import timm
import torch

DATA = Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def official():
    """The two parity fixtures: outputs of the authors' original model (see tests/data/README.md)."""
    names = ('official_tiny', 'official_tiny_dense')
    return {name: torch.load(DATA / f'{name}.pt', weights_only=True) for name in names}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the parity measure."""
    return ((a - b).abs().max() / b.abs().max()).item()


def trained_scale(model):
    """Weights of trained size: BatchNorm statistics and affines, layer scales near 1 (not the 1e-5
    init, under which removing every MLP moves the logits by 1.5e-5 relative) and non-zero biases,
    so that a bug in any branch of the exported model shows in its outputs."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-.1, .1)
            m.running_var.uniform_(.5, 1.5)
            m.weight.data.uniform_(.5, 1.5)
            m.bias.data.uniform_(-.2, .2)
        elif isinstance(m, timm.layers.LayerScale):
            m.gamma.data.uniform_(.5, 1.5)
        elif isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_(0, .02)
    return model.eval()
