"""Files a run writes and reads back: training states and weights with metadata (reading any
weight source back is :mod:`refiner.pretrained`).

Every write is atomic (:mod:`refiner.fileio`): a failure never leaves a partial file behind.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .convert import CheckpointError, load_tensors_file, save_safetensors
from .fileio import atomic_write

__all__ = ['save_state', 'load_state', 'save_weights', 'RunFiles']

PathLike = Union[str, os.PathLike]


class RunFiles:
    """The files of a run directory."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / 'config.yaml'
        self.metrics = self.root / 'metrics.jsonl'
        self.summary = self.root / 'summary.json'
        self.state = self.root / 'checkpoint.pt'  # everything needed to resume
        self.weights = self.root / 'model.safetensors'
        self.ema_weights = self.root / 'model_ema.safetensors'

    def is_run(self) -> bool:
        return self.config.is_file() and (self.state.is_file() or self.weights.is_file())


def save_state(state: Dict[str, Any], path: PathLike) -> Path:
    """A training state (tensors and plain containers only, so it loads with weights_only=True)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: PathLike) -> Dict[str, Any]:
    state = load_tensors_file(Path(path))
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} is not a refiner training state')
    return state


def save_weights(model: torch.nn.Module, path: PathLike, model_name: str, model_args: Dict[str, Any],
                 extra: Optional[Dict[str, Any]] = None) -> Path:
    """Weights as safetensors, with what is needed to rebuild the model in the metadata."""
    meta = {'format': 'refiner', 'model_name': model_name, 'model_args': json.dumps(model_args)}
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    return save_safetensors(model.state_dict(), path, metadata=meta)
