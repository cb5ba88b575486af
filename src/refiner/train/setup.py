"""Setting a run up: the model from its source, the data, the optimizer and schedule, precision and regularisers.

Each function is one step :class:`~refiner.train.trainer.Trainer` takes when it is built, in its order
(the order of the random draws is part of the result). Fine-tuning (``finetune: SRC``): the model starts
from any weight source :mod:`refiner.pretrained` reads; ``refine`` retrofits a timm ViT (``refine_vit``)
before training; ``linear_probe`` trains the classifier alone; ``layer_decay`` decays the learning rate
layer by layer (timm's ``param_groups_layer_decay``); ``zero_head`` starts a re-initialised head at zero;
from a refiner run, ``augment_from_source`` and ``lr_from_source`` take its augmentation and a multiple of
its learning rate.
"""
import dataclasses
import math
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, List, Optional, Tuple

import timm
import torch
from timm.data import Mixup, create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from ..checkpoint import RunFiles
from ..config import AUGMENTATION_KEYS, DEFAULT_MODEL, TrainConfig
from ..data import (
    DataError,
    Datasets,
    EpochSampler,
    SeededTransformDataset,
    build_datasets,
    eval_transform,
    safe_posterize,
)
from ..defaults import RunSize, derive
from ..errors import RefinerError
from ..mirror import measure_mirror
from ..pretrained import (
    Source,
    check_model_name,
    classifier_names,
    create_model_and_args,
    load_pretrained_weights,
    resolve_data_config,
)
from .distributed import Dist
from .objective import TrainForward

__all__ = ['TrainingError', 'TASK_ARGS', 'resolve_model', 'from_source_run', 'create_task_model', 'check_can_start',
           'read_data', 'resolve_img_size', 'build_model', 'resolve_preprocessing', 'build_input_pipeline',
           'derive_defaults', 'epochs_for_min_steps', 'build_optimisation', 'build_regularisers', 'build_precision',
           'wrap_step_module']


class TrainingError(RefinerError, RuntimeError):
    """A run that cannot start or continue; the message says why."""


# ------------------------------------------------------------------------------ the model and its source

TASK_ARGS = ('num_classes', 'img_size', 'drop_path_rate', 'drop_rate', 'pretrained_cfg', 'aux_head')


def resolve_model(cfg: TrainConfig, source: Optional[Source]) -> TrainConfig:
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
            args = {**{k: v for k, v in source.model_args.items() if k not in TASK_ARGS}, **args}
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


def from_source_run(cfg: TrainConfig, source: Optional[Source]) -> Tuple[TrainConfig, List[str]]:
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


def create_task_model(cfg: TrainConfig, num_classes: int, img_size: int) -> Tuple[nn.Module, Dict[str, Any]]:
    args: Dict[str, Any] = dict(num_classes=num_classes, **cfg.model_args)
    if cfg.drop_path:
        args['drop_path_rate'] = cfg.drop_path
    if cfg.token_labeling:
        if not cfg.model.startswith('refiner_vit'):
            raise TrainingError('token_labeling needs a Refiner-ViT model (it adds the per-token head)')
        args['aux_head'] = True
    model, args = create_model_and_args(cfg.model, img_size, **args)  # a CNN's args lack img_size, patch_size
    if hasattr(model, 'refined_blocks'):
        args['refine_blocks'] = list(model.refined_blocks)  # 'all' or 'the last n' as block indices
    return model, args


# ------------------------------------------------------------------------------ the steps, in the Trainer's order

def check_can_start(cfg: TrainConfig, files: RunFiles, device: torch.device, resuming: bool) -> None:
    """Refuse, before any work, a run that cannot start: fp16 off CUDA, or a new run into another run's directory."""
    if cfg.amp == 'fp16' and device.type != 'cuda':
        raise TrainingError('amp fp16 needs CUDA (loss scaling); use --amp bf16 on a CPU')
    if files.root.exists() and not resuming and any(files.root.iterdir()):
        if (files.state.is_file() or files.summary.is_file()) and files.root.is_dir():
            raise TrainingError(f'--out {files.root} already holds a run; resume it with --resume {files.root} '
                                f'or choose another --out')


def read_data(cfg: TrainConfig) -> Datasets:
    """The run's training and held-out images (untransformed) and their classes."""
    data = build_datasets(cfg.data, cfg.train_fraction, cfg.seed, cfg.classes)
    if len(data.classes) < 2:
        raise DataError(f'{data.description}: at least two classes are needed')
    return data


def resolve_img_size(cfg: TrainConfig, data: Datasets, source: Optional[Source]) -> Tuple[int, str]:
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


def build_model(cfg: TrainConfig, classes: List[str], img_size: int, source: Optional[Source],
                 device: torch.device) -> Tuple[nn.Module, Dict[str, Any], Optional[str]]:
    """The model the run trains, on ``device``: a classifier over ``classes``, started from ``source``'s
    weights where given, and under ``linear_probe`` frozen but for its classifier heads. Returns (model,
    the model args config.yaml records, the line saying what was loaded or None)."""
    model, model_args = create_task_model(cfg, len(classes), img_size)
    if cfg.layer_decay is not None and not hasattr(model, 'group_matcher'):
        raise TrainingError(f'layer_decay: {cfg.model} has no group_matcher to tell its layers apart')
    loaded = load_pretrained_weights(model, source, cfg.model, classes, cfg.zero_head) if source is not None else None
    if cfg.linear_probe:  # only the classifier heads learn; _step keeps the rest in eval mode
        heads = tuple(f'{h}.' for h in classifier_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(heads))
    return model.to(device), model_args, loaded


def resolve_preprocessing(cfg: TrainConfig, model: nn.Module, source: Optional[Source],
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


def build_input_pipeline(cfg: TrainConfig, data: Datasets, data_config: Dict[str, Any], ddp: Dist,
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


def derive_defaults(cfg: TrainConfig, data: Datasets, img_size: int,
                     global_batch: int) -> Tuple[TrainConfig, str]:
    """The config with the values of its ``derive_keys`` derived from the run's size and, for ``hflip``, from
    whether its training images keep their class when mirrored (refiner.defaults, refiner.mirror); and the
    lines that say what was derived and why."""
    steps_per_epoch = max(data.num_train // global_batch, 1)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    mirror = measure_mirror(data.train) if 'hflip' in cfg.derive_keys else None
    size = RunSize(num_train=data.num_train, img_size=img_size, epochs=epochs, steps_per_epoch=steps_per_epoch,
                   mirror=mirror)
    values, lines = derive(size, cfg.derive_keys)
    head = (f'defaults derived from the run ({data.num_train:,} training images, {img_size} px, {size.steps:,} '
            f'optimizer steps; no recipe given): set any with its flag or --set KEY=VALUE, or --config deit for '
            f'DeiT\'s ImageNet values')
    return dataclasses.replace(cfg, **values), '\n'.join([head, *lines])


def epochs_for_min_steps(cfg: TrainConfig, steps_per_epoch: int) -> Tuple[TrainConfig, Optional[str]]:
    """The config with its epochs raised so that the run takes at least ``min_steps`` optimizer steps (a
    small dataset gives few steps per epoch; BiT sizes a fine-tune's schedule in steps), and a line
    saying so, else None."""
    if cfg.epochs * steps_per_epoch >= cfg.min_steps:
        return cfg, None
    epochs = math.ceil(cfg.min_steps / steps_per_epoch)
    return dataclasses.replace(cfg, epochs=epochs), (
        f'epochs: {epochs}, not {cfg.epochs}: min_steps {cfg.min_steps} optimizer steps at {steps_per_epoch} per '
        f'epoch (min_steps: 0 keeps the epochs)')


def build_optimisation(cfg: TrainConfig, model: nn.Module, lr: float,
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


def build_regularisers(cfg: TrainConfig, model: nn.Module,
                        num_classes: int) -> Tuple[Optional[Mixup], Optional[ModelEmaV3]]:
    """Mixup/CutMix (with label smoothing) and the weights' EMA, each None where the config turns it off."""
    mixup = None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    return mixup, ema


def build_precision(cfg: TrainConfig,
                     device: torch.device) -> Tuple[Optional[torch.amp.GradScaler], ContextManager[Any]]:
    """The loss scaler (fp16 only) and the autocast context the training forward runs in."""
    scaler = torch.amp.GradScaler('cuda') if cfg.amp == 'fp16' else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == 'bf16' else torch.float16)
                if cfg.amp != 'none' else nullcontext())
    return scaler, autocast


def wrap_step_module(cfg: TrainConfig, model: nn.Module, ddp: Dist, device: torch.device) -> nn.Module:
    """What a training step calls: the model's training forward, in DDP when there are several processes."""
    if cfg.attn_cos_reg > 0 and not hasattr(model, 'forward_train'):
        raise TrainingError('attn_cos_reg needs a Refiner-ViT model (it reads the handed-on attention maps)')
    step_module: nn.Module = TrainForward(model)
    if ddp.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == 'cuda' else None)
    return step_module
