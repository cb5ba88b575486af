from pathlib import Path

import pytest
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
