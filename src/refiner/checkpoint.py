"""Files a run writes and reads back: training states, weights with metadata, loading any model file.

Every write is atomic (:mod:`refiner.fileio`): a failure never leaves a partial file behind.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
from safetensors import safe_open

from .convert import CheckpointError, load_official, read_checkpoint, save_safetensors
from .fileio import atomic_write

__all__ = ['save_state', 'load_state', 'save_weights', 'load_model', 'RunFiles']

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
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path} is not a readable training state: {e}') from None


def save_weights(model: torch.nn.Module, path: PathLike, model_name: str, model_args: Dict[str, Any],
                 extra: Optional[Dict[str, Any]] = None) -> Path:
    """Weights as safetensors, with what is needed to rebuild the model in the metadata."""
    meta = {'format': 'refiner', 'model_name': model_name, 'model_args': json.dumps(model_args)}
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    return save_safetensors(model.state_dict(), path, metadata=meta)


def _metadata(path: Path) -> Dict[str, str]:
    with safe_open(str(path), 'pt') as f:
        return f.metadata() or {}


def load_model(path: PathLike, ema: bool = False, device: Union[str, torch.device] = 'cpu'
               ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A model in eval mode from a run directory, weights written by this project, or an original
    Refiner checkpoint. Returns (model, info): info has ``source`` and, when known, ``data_config``
    (mean, std, crop_pct, interpolation, input_size), ``classes`` and the run's ``config``."""
    path = Path(path)
    info: Dict[str, Any] = {'source': str(path)}
    if path.is_dir():
        run = RunFiles(path)
        weights = run.ema_weights if ema else run.weights
        if not weights.is_file():
            if run.config.is_file():
                raise CheckpointError(f'{path}: the run has not finished ({weights.name} missing); '
                                      f'resume it with refiner train --resume {path}')
            raise CheckpointError(f'{path}: not a run directory (no config.yaml / {weights.name})')
        import yaml
        info['config'] = yaml.safe_load(run.config.read_text())
        path = weights
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    if path.suffix == '.safetensors':
        meta = _metadata(path)
        if meta.get('format') != 'refiner':
            raise CheckpointError(f'{path}: safetensors without refiner metadata; create the model with '
                                  f'timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))')
        args = json.loads(meta['model_args'])
        model = timm.create_model(meta['model_name'], **args)
        state = read_checkpoint(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f'{path}: weights do not fit {meta["model_name"]}: missing {missing[:4]}, '
                                  f'unexpected {unexpected[:4]}')
        for key in ('data_config', 'classes'):
            if key in meta:
                info[key] = json.loads(meta[key])
        info['model_name'] = meta['model_name']
    else:
        model = load_official(path)
        info['model_name'] = 'refiner (original checkpoint)'
    return model.to(device).eval(), info
