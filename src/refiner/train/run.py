"""``train()``: a new run or a resumed one, from its config to its summary.

Files (``--out DIR``): config.yaml (the resolved config: the model as built, so that a resume
needs no source), metrics.jsonl (one line per finished epoch), checkpoint.pt (the training
state, written atomically at every epoch end and every ``checkpoint_every`` steps),
model.safetensors and model_ema.safetensors (final weights), summary.json (when the run ends,
last: a run without it has not finished, and a resume of a run stopped after its last checkpoint
writes the weights and summary from that checkpoint).
"""
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist
import yaml

from ..checkpoint import RunFiles
from ..config import TrainConfig, complete_saved_config
from ..pretrained import read_source
from .distributed import distributed, setup_distributed
from .setup import TrainingError, resolve_model
from .trainer import Trainer

__all__ = ['train']


def train(cfg: TrainConfig, out: Optional[str] = None, resume: Optional[str] = None,
          progress: bool = True) -> Dict[str, Any]:
    """Train (or resume) a run; returns the summary."""
    if resume is not None:
        files = RunFiles(resume)
        if not Path(resume).is_dir():
            raise TrainingError(f'--resume {resume}: no such directory')
        if not files.config.is_file():
            raise TrainingError(f'--resume {resume}: not a run directory (no config.yaml written by refiner train)')
        try:
            saved = complete_saved_config(yaml.safe_load(files.config.read_text()))
            keep = {'device': cfg.device, 'workers': cfg.workers}  # settings that do not change results
            cfg = TrainConfig(**{**saved, **keep})
        except Exception as e:
            raise TrainingError(f'--resume {resume}: config.yaml is not a refiner training config ({e})') from None
    cfg.validate()
    resuming = resume is not None and files.state.is_file()
    source = read_source(cfg.finetune) if cfg.finetune and not resuming else None  # a state holds the weights
    if resume is None:
        cfg = resolve_model(cfg, source)
        out = out or cfg.out or f'runs/{cfg.model}-{time.strftime("%Y%m%d-%H%M%S")}'
        files = RunFiles(out)
    ddp, device = setup_distributed(cfg.device)
    if resume is not None and not resuming and ddp.main:
        print(f'{resume}: no checkpoint was written yet; starting the run from the beginning', flush=True)
    try:
        return Trainer(cfg, files, ddp, device, resuming, progress, source).run()
    finally:
        if distributed():
            dist.destroy_process_group()
