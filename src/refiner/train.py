"""``refiner train``: the paper's (DeiT-style) recipe on timm's pipeline, one process or many (torchrun).

Reproducibility and exact resume: every random draw is a function of counters, not of hidden
state. The sampler's order is drawn from (seed, epoch); each sample's augmentation from (seed,
epoch, index), whichever worker loads it; Mixup, MixToken, stochastic depth and dropout in the
main process from (seed, step, rank), re-seeded before every step. A checkpoint therefore holds
the model, EMA, optimizer, scheduler and loss-scaler states plus the counters (epoch, batch within
the epoch, step), and a run killed at any moment and resumed from its last checkpoint replays the
same batches with the same randomness: on CPU its final weights are bit-identical to an
uninterrupted run's.

Fine-tuning (``finetune: SRC``): the model starts from any weight source :mod:`refiner.pretrained`
reads; the run first evaluates those weights and records them as epoch 0. ``refine`` retrofits a
timm ViT (``refine_vit``) before training; ``linear_probe`` trains the classifier alone;
``layer_decay`` decays the learning rate layer by layer (timm's ``param_groups_layer_decay``);
``zero_head`` starts a re-initialised head at zero; from a refiner run, ``augment_from_source``
and ``lr_from_source`` take its augmentation and a multiple of its learning rate.

Files (``--out DIR``): config.yaml (the resolved config: the model as built, so that a resume
needs no source), metrics.jsonl (one line per finished epoch), checkpoint.pt (the training
state, written atomically at every epoch end and every ``checkpoint_every`` steps),
model.safetensors and model_ema.safetensors (final weights), summary.json (when the run ends,
last: a run without it has not finished, and a resume of a run stopped after its last checkpoint
writes the weights and summary from that checkpoint). Only rank 0 writes.
"""
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import RunFiles, load_state, save_state, save_weights
from .config import AUGMENTATION_KEYS, DEFAULT_MODEL, TrainConfig, complete_saved_config, scaled_lr
from .data import (
    DataError,
    Datasets,
    EpochSampler,
    SeededTransformDataset,
    SkipLog,
    build_datasets,
    collate_skipping,
    eval_transform,
    safe_posterize,
)
from .defaults import EMA_REPORT_MAX_START_SHARE, RunSize, derive, ema_start_share
from .devices import all_reduce, resolve_device
from .errors import RefinerError
from .evaluate import evaluate
from .fileio import atomic_write_text
from .pretrained import (
    Source,
    check_model_name,
    classifier_names,
    create_model,
    load_pretrained_weights,
    read_source,
    resolve_data_config,
)

__all__ = ['train', 'TrainingError']

_STATE_FORMAT = 'refiner-train-state'  # checkpoint.pt's 'format'


class TrainingError(RefinerError, RuntimeError):
    """A run that cannot start or continue; the message says why."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str) -> Tuple[Dist, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank if world > 1 else device.index or 0)  # one GPU per process
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Dist(rank, world, local_rank), device


def _distributed() -> bool:
    """Whether torch.distributed holds a process group (a run over several processes)."""
    return dist.is_available() and dist.is_initialized()


def _seed_everything(*parts: int) -> None:
    """Seed python, numpy and torch from a tuple of counters."""
    s = hash(parts) & 0x7FFFFFFF
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# set by the new run, not taken from a source: its classes, input size, regularisation, token-labeling head
_TASK_ARGS = ('num_classes', 'img_size', 'drop_path_rate', 'drop_rate', 'pretrained_cfg', 'aux_head')


def _resolve_model(cfg: TrainConfig, source: Optional[Source]) -> TrainConfig:
    """The model a run builds, as config.yaml records it: the source's architecture where it names
    one (and ``cfg.model`` is unset or the same), then ``refine`` as the ``refined_vit`` wrapper."""
    name, args = cfg.model, dict(cfg.model_args)
    if name is None and source is None:
        name = DEFAULT_MODEL
    if source is not None:
        if name is None:
            if source.model_name is None:
                raise TrainingError(f'--finetune {source.path}: bare weights do not name their model; '
                                    f'give --model NAME')
            name = source.model_name
        if name == source.model_name:
            args = {**{k: v for k, v in source.model_args.items() if k not in _TASK_ARGS}, **args}
    check_model_name(name)  # before the data are read
    if cfg.refine is not None:
        if name == 'refined_vit':
            raise TrainingError(f'--refine: the model is already refined (blocks {args.get("refine_blocks")})')
        refine = cfg.refine
        if isinstance(refine, str) and refine != 'all':  # '0,2,4' from the command line
            try:
                refine = [int(b) for b in refine.split(',')]
            except ValueError:
                raise TrainingError(f"--refine {cfg.refine}: expected 'all', a number of last blocks or a "
                                    f"comma-separated list of block indices") from None
        args = {'base_model': name, 'refine_blocks': refine, **args}
        name = 'refined_vit'
    return dataclasses.replace(cfg, model=name, model_args=args, refine=None)


def _from_source_run(cfg: TrainConfig, source: Optional[Source]) -> Tuple[TrainConfig, List[str]]:
    """What a fine-tune takes from a refiner run source, whose config.yaml says how it was trained: under
    ``augment_from_source`` its augmentation and resizing (they suit its kind of images: DeiT's ImageNet
    defaults flip and crop 16-pixel digits beyond recognition); under ``lr_from_source`` a learning rate
    of that multiple of the source's (a model's good rate varies 30-fold: 5e-4 per 512 for refiner_s,
    1.6e-2 for the digits' nano). Returns the config and a line for each."""
    run = source.run_config if source is not None else None
    lines: List[str] = []
    if not run:
        return cfg, lines
    if cfg.augment_from_source:
        taken = {k: run[k] for k in AUGMENTATION_KEYS if k in run}
        cfg = dataclasses.replace(cfg, **taken)
        lines.append('augmentation as the source run was trained: ' + ', '.join(f'{k} {v}' for k, v in taken.items())
                     + " (augment_from_source: false for the recipe's)")
    if cfg.lr_from_source and 'lr' in run:
        size = run.get('lr_base_size', cfg.lr_base_size)
        cfg = dataclasses.replace(cfg, lr=cfg.lr_from_source * run['lr'], lr_base_size=size)
        lines.append(f"lr {cfg.lr:.3g} per {size} images: lr_from_source {cfg.lr_from_source:g} x the source run's "
                     f"{run['lr']:.3g} (--lr sets it instead)")
    return cfg, lines


def _create_model(cfg: TrainConfig, num_classes: int, img_size: int) -> Tuple[nn.Module, Dict[str, Any]]:
    args: Dict[str, Any] = dict(num_classes=num_classes, **cfg.model_args)
    if cfg.drop_path:
        args['drop_path_rate'] = cfg.drop_path
    if cfg.token_labeling:
        if not cfg.model.startswith('refiner_vit'):
            raise TrainingError('token_labeling needs a Refiner-ViT model (it adds the per-token head)')
        args['aux_head'] = True
    model = create_model(cfg.model, img_size=img_size, **args)
    if 'img_size' in inspect.signature(type(model).__init__).parameters:
        args['img_size'] = img_size
    if hasattr(model, 'refined_blocks'):
        args['refine_blocks'] = list(model.refined_blocks)  # 'all' or 'the last n' as block indices
    return model, args


class _TrainForward(nn.Module):
    """What a training step calls (and DDP wraps): the Refiner's forward_train, or plain logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mix_box: Optional[Tuple[int, int, int, int]], want_attn: bool) -> Dict[str, Any]:
        if hasattr(self.model, 'forward_train'):
            return self.model.forward_train(x, mix_box=mix_box, return_attn=want_attn)
        return {'logits': self.model(x)}


def _mix_token_box(h: int, w: int) -> Optional[Tuple[Tuple[int, int, int, int], float]]:
    """A CutMix box on the h×w token grid with area ratio from λ ~ Beta(1, 1); returns (box, λ')
    where λ' is the share of the image's own tokens."""
    lam = np.random.beta(1.0, 1.0)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = np.random.randint(h), np.random.randint(w)
    top, bottom = int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h))
    left, right = int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w))
    area = (bottom - top) * (right - left)
    if area == 0:
        return None
    return (top, left, bottom, right), 1.0 - area / (h * w)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _attn_cos_reg(maps: List[torch.Tensor], pairs: int) -> torch.Tensor:
    """Mean cosine similarity over the head axis between consecutive handed-on maps (first n pairs)."""
    n = min(pairs, len(maps) - 1)
    return sum(F.cosine_similarity(maps[i].float(), maps[i + 1].float(), dim=1).mean() for i in range(n)) / n


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _write_metrics(files: RunFiles, history: List[Dict[str, Any]]) -> None:
    atomic_write_text(files.metrics, ''.join(json.dumps(h) + '\n' for h in history))


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
        cfg = _resolve_model(cfg, source)
        out = out or cfg.out or f'runs/{cfg.model}-{time.strftime("%Y%m%d-%H%M%S")}'
        files = RunFiles(out)
    ddp, device = _setup_distributed(cfg.device)
    if resume is not None and not resuming and ddp.main:
        print(f'{resume}: no checkpoint was written yet; starting the run from the beginning', flush=True)
    try:
        return _Trainer(cfg, files, ddp, device, resuming, progress, source).run()
    finally:
        if _distributed():
            dist.destroy_process_group()


# -- setup: the steps _Trainer.__init__ takes, in its order ----------------------------------------
def _check_can_start(cfg: TrainConfig, files: RunFiles, device: torch.device, resuming: bool) -> None:
    """Refuse, before any work, a run that cannot start: fp16 off CUDA, or a new run into another run's directory."""
    if cfg.amp == 'fp16' and device.type != 'cuda':
        raise TrainingError('amp fp16 needs CUDA (loss scaling); use --amp bf16 on a CPU')
    if files.root.exists() and not resuming and any(files.root.iterdir()):
        if (files.state.is_file() or files.summary.is_file()) and files.root.is_dir():
            raise TrainingError(f'--out {files.root} already holds a run; resume it with --resume {files.root} '
                                f'or choose another --out')


def _read_data(cfg: TrainConfig) -> Datasets:
    """The run's training and held-out images (untransformed) and their classes."""
    data = build_datasets(cfg.data, cfg.train_fraction, cfg.seed, cfg.classes)
    if len(data.classes) < 2:
        raise DataError(f'{data.description}: at least two classes are needed')
    return data


def _resolve_img_size(cfg: TrainConfig, data: Datasets, source: Optional[Source]) -> Tuple[int, str]:
    """The input side: the config's, else the dataset's, else the model args', else the source's, else
    timm's default for the model, else 224. Returns (the side, where it came from)."""
    candidates = [(cfg.img_size, 'img_size of the recipe or --img-size'),
                  (data.default_img_size, "the dataset's default"),
                  (cfg.model_args.get('img_size'), "the model's img_size argument")]
    if source is not None:
        candidates += [(source.model_args.get('img_size') or (source.data_config or {}).get('input_size', [None])[-1],
                        "the source's: the size its weights were trained at")]
    img_size, why = next(((size, why) for size, why in candidates if size), (None, ''))
    if img_size is None:
        # a retrofit (refined_vit) takes its base model's input size
        base = cfg.model_args.get('base_model', cfg.model)
        default = timm.models.get_pretrained_cfg_value(base, 'input_size')
        img_size, why = (default[-1], f"timm's default for {base}") if default else (224, 'the default')
    return int(img_size[-1] if isinstance(img_size, (list, tuple)) else img_size), why  # (H, W) or (C, H, W): H == W


def _build_model(cfg: TrainConfig, classes: List[str], img_size: int, source: Optional[Source],
                 device: torch.device) -> Tuple[nn.Module, Dict[str, Any], Optional[str]]:
    """The model the run trains, on ``device``: a classifier over ``classes``, started from ``source``'s
    weights where given, and under ``linear_probe`` frozen but for its classifier heads. Returns (model,
    the model args config.yaml records, the line saying what was loaded or None)."""
    model, model_args = _create_model(cfg, len(classes), img_size)
    if cfg.layer_decay is not None and not hasattr(model, 'group_matcher'):
        raise TrainingError(f'layer_decay: {cfg.model} has no group_matcher to tell its layers apart')
    loaded = load_pretrained_weights(model, source, cfg.model, classes, cfg.zero_head) if source is not None else None
    if cfg.linear_probe:  # only the classifier heads learn; _step keeps the rest in eval mode
        heads = tuple(f'{h}.' for h in classifier_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(heads))
    return model.to(device), model_args, loaded


def _resolve_preprocessing(cfg: TrainConfig, model: nn.Module, source: Optional[Source],
                           img_size: int) -> Tuple[TrainConfig, Dict[str, Any]]:
    """The config with its input size and normalisation filled in (the recipe's, else what the source was
    trained with, else the model's own), so that config.yaml records them and a resume needs neither the
    source nor the defaults; and the eval data config the weights files carry."""
    known = resolve_data_config(model, source.data_config if source is not None else None)
    cfg = dataclasses.replace(cfg, img_size=img_size, mean=list(cfg.mean or known['mean']),
                              std=list(cfg.std or known['std']), crop_pct=cfg.crop_pct or known['crop_pct'])
    data_config = dict(input_size=[3, img_size, img_size], mean=list(cfg.mean), std=list(cfg.std),
                       crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    return cfg, data_config


def _build_input_pipeline(cfg: TrainConfig, data: Datasets, data_config: Dict[str, Any], ddp: Dist,
                          global_batch: int) -> Tuple[SeededTransformDataset, SeededTransformDataset,
                                                      EpochSampler, EpochSampler]:
    """The transformed training and held-out sets and their samplers, which give each rank its share of
    every global batch. Returns (train set, held-out set, train sampler, held-out sampler)."""
    train_tf = create_transform(
        cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
        color_jitter=0.0, auto_augment=cfg.aa, interpolation=cfg.train_interpolation, mean=tuple(cfg.mean),
        std=tuple(cfg.std), re_prob=cfg.reprob, re_mode=cfg.remode, re_count=1)
    safe_posterize(train_tf)
    val_tf = eval_transform(data_config)
    train_set = SeededTransformDataset(data.train, train_tf, cfg.seed)
    val_set = SeededTransformDataset(data.val, val_tf, cfg.seed)
    if data.num_train < global_batch:
        raise DataError(f'the batch ({cfg.batch_size} x {ddp.world_size} process(es) = {global_batch} images) is '
                        f'larger than the {data.num_train} training images: lower --batch-size')
    sampler = EpochSampler(data.num_train, cfg.batch_size, cfg.seed, shuffle=True, drop_last=True,
                           rank=ddp.rank, world_size=ddp.world_size)
    val_sampler = EpochSampler(data.num_val, cfg.batch_size, cfg.seed, shuffle=False, drop_last=False,
                               rank=ddp.rank, world_size=ddp.world_size)
    return train_set, val_set, sampler, val_sampler


def _derive_defaults(cfg: TrainConfig, data: Datasets, img_size: int,
                     global_batch: int) -> Tuple[TrainConfig, str]:
    """The config with the values of its ``derive_keys`` derived from the run's size (refiner.defaults),
    and the lines that say what was derived and why."""
    steps_per_epoch = max(data.num_train // global_batch, 1)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    size = RunSize(num_train=data.num_train, img_size=img_size, epochs=epochs, steps_per_epoch=steps_per_epoch)
    values, lines = derive(size, cfg.derive_keys)
    head = (f'defaults derived from the run ({data.num_train:,} training images, {img_size} px, {size.steps:,} '
            f'optimizer steps; no recipe given): set any with its flag or --set KEY=VALUE, or --config deit for '
            f'DeiT\'s ImageNet values')
    return dataclasses.replace(cfg, **values), '\n'.join([head, *lines])


def _epochs_for_min_steps(cfg: TrainConfig, steps_per_epoch: int) -> Tuple[TrainConfig, Optional[str]]:
    """The config with its epochs raised so that the run takes at least ``min_steps`` optimizer steps (a
    small dataset gives few steps per epoch; BiT sizes a fine-tune's schedule in steps), and a line
    saying so, else None."""
    if cfg.epochs * steps_per_epoch >= cfg.min_steps:
        return cfg, None
    epochs = math.ceil(cfg.min_steps / steps_per_epoch)
    return dataclasses.replace(cfg, epochs=epochs), (
        f'epochs: {epochs}, not {cfg.epochs}: min_steps {cfg.min_steps} optimizer steps at {steps_per_epoch} per '
        f'epoch (min_steps: 0 keeps the epochs)')


def _build_optimisation(cfg: TrainConfig, model: nn.Module, lr: float,
                        steps_per_epoch: int) -> Tuple[torch.optim.Optimizer, Scheduler, int]:
    """The DeiT recipe on timm's factories: the optimizer over the trainable parameters (frozen ones left
    out; grouped layer by layer by the model's group_matcher under layer_decay) and the cosine schedule,
    stepped every update. Returns (optimizer, scheduler, total epochs)."""
    optimizer = create_optimizer_v2(model, cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps,
                                    layer_decay=cfg.layer_decay)
    cooldown = min(cfg.cooldown_epochs, cfg.epochs - 1)  # epochs counts them: --epochs N runs N epochs
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=cfg.epochs - cooldown, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cooldown,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler, total_epochs


def _build_regularisers(cfg: TrainConfig, model: nn.Module,
                        num_classes: int) -> Tuple[Optional[Mixup], Optional[ModelEmaV3]]:
    """Mixup/CutMix (with label smoothing) and the weights' EMA, each None where the config turns it off."""
    mixup = None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    return mixup, ema


def _build_precision(cfg: TrainConfig,
                     device: torch.device) -> Tuple[Optional[torch.amp.GradScaler], ContextManager[Any]]:
    """The loss scaler (fp16 only) and the autocast context the training forward runs in."""
    scaler = torch.amp.GradScaler('cuda') if cfg.amp == 'fp16' else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == 'bf16' else torch.float16)
                if cfg.amp != 'none' else nullcontext())
    return scaler, autocast


def _wrap_step_module(cfg: TrainConfig, model: nn.Module, ddp: Dist, device: torch.device) -> nn.Module:
    """What a training step calls: the model's training forward, in DDP when there are several processes."""
    if cfg.attn_cos_reg > 0 and not hasattr(model, 'forward_train'):
        raise TrainingError('attn_cos_reg needs a Refiner-ViT model (it reads the handed-on attention maps)')
    step_module: nn.Module = _TrainForward(model)
    if ddp.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == 'cuda' else None)
    return step_module


class _Trainer:
    """One run: __init__ builds everything in a fixed order (the order of the random draws is part of
    the result), ``run`` trains to the end and writes the final files."""

    def __init__(self, cfg: TrainConfig, files: RunFiles, ddp: Dist, device: torch.device, resuming: bool,
                 progress: bool, source: Optional[Source] = None) -> None:
        self.files, self.ddp, self.device, self.progress = files, ddp, device, progress and ddp.main
        _check_can_start(cfg, files, device, resuming)
        _seed_everything(cfg.seed, -1)  # the model's initialisation (and any re-initialised head) draws from here
        cfg, self.from_source = _from_source_run(cfg, source)

        self.data = _read_data(cfg)
        self.num_classes = len(self.data.classes)
        img_size, size_from = _resolve_img_size(cfg, self.data, source)
        global_batch = cfg.batch_size * ddp.world_size  # images per optimizer step, all ranks together
        self.derived_note = None
        if cfg.derive_keys and not resuming:  # a resume trains with the values config.yaml recorded
            cfg, self.derived_note = _derive_defaults(cfg, self.data, img_size, global_batch)
        self.model, self.model_args, self.loaded = _build_model(cfg, self.data.classes, img_size, source, device)
        if self.loaded:  # a new task may need another size than the source's: say which one is used and why
            self.loaded += f'; input {img_size}x{img_size} px ({size_from}; --img-size N to change it)'
        cfg, self.data_config = _resolve_preprocessing(cfg, self.model, source, img_size)
        self.lr, rule, self.lr_note = scaled_lr(cfg, global_batch)
        cfg = dataclasses.replace(cfg, lr_base_scale=rule)  # a resume scales as this run did, whatever timm's rule
        self.train_set, self.val_set, self.sampler, self.val_sampler = _build_input_pipeline(
            cfg, self.data, self.data_config, ddp, global_batch)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        cfg, self.epochs_note = _epochs_for_min_steps(cfg, self.steps_per_epoch)
        self.cfg = cfg  # as config.yaml records it
        self.skips = SkipLog()

        self.optimizer, self.scheduler, self.total_epochs = _build_optimisation(cfg, self.model, self.lr,
                                                                                self.steps_per_epoch)
        self.mixup, self.ema = _build_regularisers(cfg, self.model, self.num_classes)
        self.scaler, self.autocast = _build_precision(cfg, device)
        self.step_module = _wrap_step_module(cfg, self.model, ddp, device)

        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0  # where the run stands; _load moves them on
        self.history: List[Dict[str, Any]] = []
        if resuming:
            self._load()
        elif ddp.main:
            files.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(files.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        return {
            'format': _STATE_FORMAT, 'version': 1,
            'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch, 'global_step': self.global_step,
            'model': self.model.state_dict(),
            'ema': self.ema.module.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'history': json.dumps(self.history),
            'skipped': sorted(self.skips.paths),
            'world_size': self.ddp.world_size,
        }

    def _save(self) -> None:
        if self.ddp.main:
            save_state(self._state(), self.files.state)

    def _load(self) -> None:
        state = load_state(self.files.state)
        if state.get('format') != _STATE_FORMAT:
            raise TrainingError(f'{self.files.state} is not a refiner training state')
        if state['world_size'] != self.ddp.world_size:
            raise TrainingError(f'the run was trained with {state["world_size"]} process(es); resume it with the same '
                                f'number (got {self.ddp.world_size}) to keep the batches identical')
        self.model.load_state_dict(state['model'])
        if self.ema is not None and state['ema'] is not None:
            self.ema.module.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state['scaler'] is not None:
            self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.batch_in_epoch = state['epoch'], state['batch_in_epoch']
        self.global_step = state['global_step']
        self.history = json.loads(state['history'])
        self.skips.add(state['skipped'])
        if self.ddp.main:
            _write_metrics(self.files, self.history)

    # -- loop -------------------------------------------------------------------------------
    def _loader(self, dataset: SeededTransformDataset, sampler: EpochSampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=collate_skipping, pin_memory=self.device.type == 'cuda', drop_last=False)

    def _loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.mixup is not None:
            images, soft = self.mixup(images, targets)
        else:
            soft = mixup_target(targets, self.num_classes, lam=1.0, smoothing=cfg.smoothing)
        mix_box, own = None, 1.0
        if cfg.mix_token:
            p = self.model.patch_embed.patch_size
            box = _mix_token_box(images.shape[-2] // p, images.shape[-1] // p)
            if box is not None:
                mix_box, own = box
        with self.autocast:
            out = self.step_module(images, mix_box, cfg.attn_cos_reg > 0)
        cls_target = soft if mix_box is None else own * soft + (1 - own) * soft.flip(0)
        loss = _soft_ce(out['logits'], cls_target)
        if 'aux_logits' in out:  # token labeling: every token's target is its image's label
            aux = out['aux_logits'].float()
            loss = loss + cfg.dense_weight * torch.sum(-soft[:, None] * F.log_softmax(aux, -1), -1).mean()
        if cfg.attn_cos_reg > 0:
            loss = loss + cfg.attn_cos_reg * _attn_cos_reg(out['attn'], cfg.attn_cos_pairs)
        return loss

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        cfg = self.cfg
        if images.shape[0] % 2 and self.mixup is not None:  # a skipped file left an odd batch
            images, targets = images[:-1], targets[:-1]
        _seed_everything(cfg.seed, self.global_step, self.ddp.rank)
        self.model.train(not cfg.linear_probe)  # a linear probe's backbone stays in eval mode (BatchNorm frozen)
        loss = self._loss(images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
        value = loss.item()  # the step's one synchronisation: the progress bar and the NaN check share it
        bad = not math.isfinite(value)
        if self.ddp.world_size > 1:  # every rank stops together
            bad = bool(all_reduce(torch.tensor([float(bad)], device=self.device)).item())
        if bad:
            raise TrainingError(
                f'the loss became {value} at step {self.global_step} (epoch {self.epoch + 1}); the run '
                f'stopped and kept its last good checkpoint in {self.files.state}. Lower --lr, enable clip_grad, '
                f'or check the data')
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return value

    def run(self) -> Dict[str, Any]:
        cfg, files = self.cfg, self.files
        if self.epoch >= self.total_epochs:
            if files.summary.is_file():
                raise TrainingError(f'{files.root}: this run already finished; its results are in {files.summary}')
            if self.ddp.main:  # stopped after its last checkpoint, before its results were all written
                print(f'{files.root}: training had finished; writing its results', flush=True)
            return self._finish()
        if self.ddp.main:
            print(f'{cfg.model} ({_num_params(self.model) / 1e6:.2f}M parameters) on {self.data.description}; '
                  f'{self.total_epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size} x '
                  f'{self.ddp.world_size}, {self.device}' + (f', resuming at epoch {self.epoch + 1} step '
                                                             f'{self.global_step}' if self.global_step else '')
                  + f'; run directory {files.root}', flush=True)
            for note in (self.derived_note, self.lr_note, self.epochs_note):
                if note:
                    print(note, flush=True)
            for line in [self.loaded] + self.from_source if self.loaded else []:
                print(line, flush=True)
            if cfg.cooldown_epochs >= cfg.epochs:
                print(f'cooldown: {cfg.epochs - 1} of the recipe\'s {cfg.cooldown_epochs} cooldown epochs fit '
                      f'in {cfg.epochs} epochs', flush=True)
        if self.loaded and not self.history:
            self._evaluate_start()
        total_steps = self.total_epochs * self.steps_per_epoch
        bar = tqdm(total=total_steps, initial=self.global_step, unit='step', disable=not self.progress,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
        start_wall = time.time()
        while self.epoch < self.total_epochs:
            self.train_set.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            loss_sum, seen, t0 = 0.0, 0, time.time()
            for images, targets, skipped in self._loader(self.train_set, self.sampler):
                self.skips.add(skipped)
                if images is None or images.shape[0] < 2:
                    continue
                loss = self._step(images, targets)
                self.batch_in_epoch += 1
                loss_sum += loss * images.shape[0]
                seen += images.shape[0]
                rate = seen * self.ddp.world_size / max(time.time() - t0, 1e-9)
                bar.set_description(f'epoch {self.epoch + 1}/{self.total_epochs}', refresh=False)
                lr = self.optimizer.param_groups[0]['lr']
                bar.set_postfix(loss=f'{loss:.3f}', img_s=f'{rate:.0f}', lr=f'{lr:.2e}', refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self._save()
            train_time = time.time() - t0
            sums = all_reduce(torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=self.device)).cpu()
            record = {'epoch': self.epoch + 1, 'train_loss': float(sums[0] / max(sums[1], 1)),
                      'lr': self.optimizer.param_groups[0]['lr'],
                      'images_per_s': float(sums[1]) / max(train_time, 1e-9), 'train_time_s': train_time}
            if (self.epoch + 1) % self.cfg.eval_every == 0 or self.epoch + 1 == self.total_epochs:
                record.update(self._evaluate())
            record['wall_time_s'] = time.time() - start_wall
            self.history.append(record)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.epoch % cfg.checkpoint_epochs == 0 or self.epoch == self.total_epochs:
                self._save()
            if self.ddp.main:
                _write_metrics(files, self.history)
                bar.write(f'epoch {record["epoch"]}: loss {record["train_loss"]:.4f}'
                          + (f', top-1 {record["top1"]:.2f}%' if 'top1' in record else '')
                          + self._ema_note(record)
                          + f', {record["images_per_s"]:.0f} img/s')
        bar.close()
        return self._finish()

    def _evaluate_start(self) -> None:
        """Epoch 0: the weights the run starts from, so that metrics.jsonl shows what training gained."""
        record = {'epoch': 0, **self._evaluate(), 'wall_time_s': 0.0}
        self.history.append(record)
        if self.ddp.main:
            _write_metrics(self.files, self.history)
            print(f'epoch 0 (the starting weights): top-1 {record["top1"]:.2f}%', flush=True)

    def _evaluate(self) -> Dict[str, Any]:
        loader = self._loader(self.val_set, self.val_sampler)
        res = evaluate(self.model, loader, self.device, self.num_classes, self.cfg.amp, self.skips)
        out = {'top1': res['top1'], 'top5': res['top5'], 'eval_loss': res['loss']}
        if self.ema is not None:
            share = ema_start_share(self.ema.get_decay, self.global_step)
            if share <= EMA_REPORT_MAX_START_SHARE:
                ema = evaluate(self.ema.module, loader, self.device, self.num_classes, self.cfg.amp, self.skips)
                out.update(ema_top1=ema['top1'], ema_top5=ema['top5'], ema_eval_loss=ema['loss'])
            else:  # mostly the weights it started from: its figure would say nothing about the run
                out['ema_start_share'] = share
        return out

    def _ema_note(self, record: Dict[str, Any]) -> str:
        """What the epoch line and the summary say of the EMA: its top-1, or why it has none."""
        if 'ema_top1' in record:
            return f' (EMA {record["ema_top1"]:.2f}%)'
        if 'ema_start_share' in record:
            return (f' (EMA not reported: {record["ema_start_share"]:.0%} of it is still its starting weights '
                    f'after {self.global_step} steps at ema_decay {self.cfg.ema_decay:g})')
        return ''

    def _finish(self) -> Dict[str, Any]:
        files, last = self.files, self.history[-1]
        skipped = _gather_paths(self.skips)
        train_time = sum(h.get('train_time_s', 0) for h in self.history)
        summary = {
            'model': self.cfg.model, 'params': _num_params(self.model),
            'top1': last['top1'], 'top5': last['top5'], 'eval_loss': last['eval_loss'],
            'epochs': self.epoch, 'steps': self.global_step,
            'images_per_s': sum(h.get('images_per_s', 0) * h.get('train_time_s', 0) for h in self.history)
            / max(train_time, 1e-9),
            'train_time_s': train_time,
            'skipped_files': len(skipped), 'skipped_paths': skipped[:100],
            'num_train': self.data.num_train, 'num_val': self.data.num_val, 'world_size': self.ddp.world_size,
        }
        if 'ema_top1' in last:
            summary.update(ema_top1=last['ema_top1'], ema_top5=last['ema_top5'])
        if self.history[0]['epoch'] == 0:
            summary.update(start_top1=self.history[0]['top1'], start_top5=self.history[0]['top5'])
        if self.ddp.main:
            extra = {'data_config': self.data_config, 'classes': self.data.classes}
            save_weights(self.model, files.weights, self.cfg.model, self.model_args, extra)
            if self.ema is not None:
                save_weights(self.ema.module, files.ema_weights, self.cfg.model, self.model_args, extra)
            atomic_write_text(files.summary, json.dumps(summary, indent=2) + '\n')
            line = f'done: top-1 {summary["top1"]:.2f}%, top-5 {summary["top5"]:.2f}%'
            note = self._ema_note(last)
            line += note.replace('(EMA ', '(EMA top-1 ', 1) if 'ema_top1' in last else note
            line += f' on {self.data.num_val} held-out images; {summary["images_per_s"]:.0f} img/s'
            if skipped:
                line += f'; {len(skipped)} unreadable file(s) skipped (listed in summary.json)'
            print(f'{line}\nresults: {files.root}/ (summary.json, metrics.jsonl, model.safetensors)', flush=True)
        return summary


def _gather_paths(skips: SkipLog) -> List[str]:
    paths = sorted(skips.paths)
    if _distributed():
        gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, paths)
        paths = sorted({p for part in gathered for p in (part or [])})
    return paths
