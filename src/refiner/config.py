"""Training configuration: one dataclass, recipes as YAML files in the package, command-line overrides.

Every key can be set in a recipe (``--config NAME_OR_PATH``), by a plain flag for the common ones
(``--epochs 30``) or by ``--set key=value`` for any key (values parsed as YAML).
"""
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from .data_specs import parse_data_spec
from .defaults import DERIVABLE
from .errors import RefinerError

__all__ = ['TrainConfig', 'AUGMENTATION_KEYS', 'load_recipe', 'list_recipes', 'apply_overrides', 'ConfigError',
           'DEFAULT_MODEL', 'lr_scale_rule', 'scaled_lr', 'complete_saved_config', 'default_recipe', 'train_config',
           'read_shipped_or_file', 'shipped_names']

DEFAULT_MODEL = 'refiner_vit_s'  # what a run trains when neither the config nor finetune weights name a model


# what a fine-tune takes from its source run under augment_from_source: how its images were augmented and resized
AUGMENTATION_KEYS = ('scale', 'ratio', 'hflip', 'aa', 'reprob', 'remode', 'train_interpolation', 'interpolation')


class ConfigError(RefinerError, ValueError):
    """A recipe or an override that is not valid."""


@dataclass
class TrainConfig:
    # data
    data: Optional[str] = None  # None: the digits; digits_clutter; fashion_mnist[:DIR]; a folder; a timm spec
    train_fraction: float = 1.0  # a stratified fraction of the training split (data-efficiency studies)
    classes: Optional[List[str]] = None  # keep only these classes (relabelled 0..k-1 in this order)
    img_size: Optional[int] = None  # default: the dataset's (digits: 16) or the model's
    workers: int = 0
    mean: Optional[List[float]] = None  # default: the model's pretrained config
    std: Optional[List[float]] = None
    crop_pct: Optional[float] = None  # evaluation crop (default: the model's)
    interpolation: str = 'bicubic'  # eval resize; training uses timm's 'random' when train_interpolation is
    train_interpolation: str = 'random'
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    aa: Optional[str] = 'rand-m9-mstd0.5-inc1'  # RandAugment
    reprob: float = 0.25  # random erasing
    remode: str = 'pixel'
    augment_from_source: bool = False  # fine-tuning from a refiner run: its AUGMENTATION_KEYS replace these
    # model
    model: Optional[str] = None  # None: the architecture finetune's source names, else DEFAULT_MODEL
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model keyword arguments
    finetune: Optional[str] = None  # start from these weights (see refiner.pretrained for the sources)
    refine: Optional[Any] = None  # refine_vit a timm ViT first: 'all', the last n blocks, or a list of blocks
    zero_head: bool = False  # fine-tuning: a re-initialised classifier head starts at zero (BiT), not random
    linear_probe: bool = False  # train only the classifier; the rest (BatchNorm statistics too) stays frozen
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm's param_groups_layer_decay), e.g. 0.65
    drop_path: float = 0.1
    token_labeling: bool = False  # add the token-labeling head; dense loss on every patch token
    mix_token: bool = False  # MixToken (needs token_labeling)
    dense_weight: float = 0.5
    attn_cos_reg: float = 0.0  # the authors' attention-similarity regulariser weight (0.1 in their S/M recipes)
    attn_cos_pairs: int = 12
    # optimisation
    epochs: int = 310  # in total, cooldown_epochs included
    cooldown_epochs: int = 10  # the last epochs, at min_lr
    min_steps: int = 0  # raise epochs to reach at least this many optimizer steps (small datasets)
    batch_size: int = 64  # per process
    opt: str = 'adamw'
    lr: float = 5e-4  # for a global batch of lr_base_size; scaled to the run's global batch by lr_base_scale
    lr_base_size: int = 512
    lr_from_source: float = 0.0  # fine-tuning from a refiner run: lr (and lr_base_size) = this x the source's
    lr_base_scale: Optional[str] = None  # 'linear', 'sqrt', or None: timm's rule (see lr_scale_rule)
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: Optional[float] = None
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    ema: bool = True
    ema_decay: float = 0.99996
    ema_warmup: bool = False
    amp: str = 'none'  # 'none', 'bf16' (CPU and CUDA), 'fp16' (CUDA, with loss scaling)
    # run
    seed: int = 0
    device: str = 'auto'
    out: Optional[str] = None
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: only at epoch ends)
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    checkpoint_epochs: int = 1  # checkpoint at the end of every N-th epoch (and always after the last)
    description: str = ''
    # keys whose values the run derives from its size when it starts (refiner.defaults: a user's dataset
    # trained without a recipe); config.yaml records the derived values, so a resume derives nothing
    derive_keys: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f'epochs must be >= 1, got {self.epochs}')
        if self.batch_size < 1:
            raise ConfigError(f'batch_size must be >= 1, got {self.batch_size}')
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f'img_size must be a positive number of pixels, got {self.img_size}')
        if self.workers < 0:
            raise ConfigError(f'workers must be >= 0, got {self.workers}')
        if self.checkpoint_every < 0:
            raise ConfigError(f'checkpoint_every must be >= 0 (0: only at epoch ends), got {self.checkpoint_every}')
        if self.amp not in ('none', 'bf16', 'fp16'):
            raise ConfigError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0 and self.batch_size % 2:
            raise ConfigError(
                f'Mixup/CutMix pair each image with another: batch_size must be even, got {self.batch_size}')
        if self.mix_token and not self.token_labeling:
            raise ConfigError('mix_token needs token_labeling (the per-token head)')
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f'train_fraction must be in (0, 1], got {self.train_fraction}')
        if self.checkpoint_epochs < 1:
            raise ConfigError(f'checkpoint_epochs must be >= 1, got {self.checkpoint_epochs}')
        if self.eval_every < 1:
            raise ConfigError(f'eval_every must be >= 1, got {self.eval_every}')
        if self.lr <= 0:
            raise ConfigError(f'lr must be positive, got {self.lr}')
        if self.lr_base_scale not in (None, 'linear', 'sqrt'):
            raise ConfigError(f"lr_base_scale must be 'linear' or 'sqrt' (or unset: timm's rule), "
                              f"got {self.lr_base_scale!r}")
        unknown = sorted(set(self.derive_keys) - set(DERIVABLE))
        if unknown:
            raise ConfigError(f'derive_keys: {unknown} cannot be derived; derivable keys: {", ".join(DERIVABLE)}')
        if self.min_steps < 0:
            raise ConfigError(f'min_steps must be >= 0, got {self.min_steps}')
        if self.cooldown_epochs < 0:
            raise ConfigError(f'cooldown_epochs must be >= 0, got {self.cooldown_epochs}')
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f'layer_decay must be in (0, 1], got {self.layer_decay}')
        if self.linear_probe and self.layer_decay is not None:
            raise ConfigError('linear_probe trains only the classifier: layer_decay does not apply')
        if self.linear_probe and self.refine is not None:
            raise ConfigError('linear_probe freezes everything but the classifier: a new refinement would stay the '
                              'identity; drop refine or linear_probe')


def lr_scale_rule(opt: str) -> str:
    """timm's rule for scaling a learning rate given for one batch size to another: by the square root
    of the ratio for adaptive optimizers (a name containing 'ada' or 'lamb': adamw, adam, nadam,
    adafactor, lamb, ...), linearly for the others (sgd, momentum, ...)."""
    name = opt.lower()
    return 'sqrt' if 'ada' in name or 'lamb' in name else 'linear'


def scaled_lr(cfg: TrainConfig, global_batch: int) -> Tuple[float, str, str]:
    """The learning rate a run uses at ``global_batch`` images per step: ``cfg.lr`` is given for
    ``cfg.lr_base_size`` images and scaled by ``cfg.lr_base_scale``, else by timm's rule. Returns (the
    learning rate, the rule applied, a line saying how it was derived)."""
    rule = cfg.lr_base_scale or lr_scale_rule(cfg.opt)
    ratio = f'{global_batch}/{cfg.lr_base_size}'
    lr = cfg.lr * (global_batch / cfg.lr_base_size) ** (0.5 if rule == 'sqrt' else 1.0)
    why = 'set by lr_base_scale' if cfg.lr_base_scale else f"timm's rule for {cfg.opt}; lr_base_scale overrides it"
    return lr, rule, (f'learning rate {lr:.3g} = lr {cfg.lr:.3g} (for a batch of {cfg.lr_base_size}) x '
                      f'{f"sqrt({ratio})" if rule == "sqrt" else ratio} (global batch {global_batch}): '
                      f'{rule} scaling ({why})')


def complete_saved_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A run's saved config (its config.yaml) with the values that older versions of refiner left
    implicit written out, so that it trains, resumes and compares as it was trained."""
    saved = dict(saved)
    if 'linear_probe' not in saved:  # written before epochs counted the cooldown epochs
        saved['epochs'] = saved.get('epochs', 300) + saved.get('cooldown_epochs', 0)
    saved.setdefault('lr_base_scale', 'linear')  # written when every learning rate was scaled linearly
    return saved


def _recipe_dir():
    return resources.files('refiner') / 'recipes'


def shipped_names(folder) -> List[str]:
    """The names of the YAML files shipped in a package folder (recipes, studies), sorted."""
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith('.yaml'))


def list_recipes() -> List[str]:
    return shipped_names(_recipe_dir())


def default_recipe(data: Optional[str]) -> Optional[str]:
    """The recipe a run on ``data`` starts from when none is given: the one named after a dataset
    refiner knows (``default`` for the digits, ``digits_clutter``, ``fashion_mnist`` with or without
    its ``:DIR``), none for a user's dataset (then :class:`TrainConfig`'s DeiT-style defaults apply)."""
    kind = parse_data_spec(data).kind
    return {'digits': 'default', 'digits_clutter': 'digits_clutter', 'fashion_mnist': 'fashion_mnist'}.get(kind)


def read_shipped_or_file(name_or_path: str, shipped, flag: str, kind: str) -> Tuple[str, str]:
    """The text and name of a YAML shipped in the folder ``shipped`` (a bare NAME), else of a YAML file
    (a path); recipes and studies. A shipped name wins over a file or folder of that name in the working
    directory (``./NAME`` is the file), so that a folder called ``fashion_mnist`` cannot hide the recipe."""
    path = Path(name_or_path)
    bundled = shipped / f'{name_or_path}.yaml'
    if path.suffix not in ('.yaml', '.yml') and path.name == name_or_path and bundled.is_file():
        return bundled.read_text(), name_or_path
    if path.is_file():
        try:
            return path.read_text(), path.stem
        except UnicodeDecodeError:
            raise ConfigError(f'{flag} {name_or_path}: not a YAML text file (a checkpoint? --finetune and '
                              f'--checkpoint take weights)') from None
    if path.suffix in ('.yaml', '.yml') or path.exists() or path.name != name_or_path:
        raise ConfigError(f'{flag} {name_or_path}: no such file')
    raise ConfigError(f'{flag} {name_or_path}: not a file and not a shipped {kind} '
                      f'(shipped: {", ".join(shipped_names(shipped))})')


def load_recipe(name_or_path: str, _seen: tuple = ()) -> Dict[str, Any]:
    """A recipe shipped with the package (by name) or a YAML file (by path). ``base: NAME`` in a
    recipe starts from that recipe's keys (so that a variant states only what it changes)."""
    text, _ = read_shipped_or_file(name_or_path, _recipe_dir(), '--config', 'recipe')
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'--config {name_or_path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(data, dict):
        raise ConfigError(f'recipe {name_or_path} is not a mapping of keys to values')
    if 'base' in data:
        base = str(data.pop('base'))
        if base in _seen or len(_seen) > 8:
            raise ConfigError(f'recipe {name_or_path}: base recipes form a loop ({" -> ".join(_seen + (base,))})')
        data = {**load_recipe(base, _seen + (str(name_or_path),)), **data}
    return data


_TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string', bool: 'true or false'}


def _type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is Union:
        return ' or '.join(_type_name(a) for a in args) + ' (or null)'
    if typing.get_origin(kind) is list:
        return f'a list of {_type_name(args[0]).split(" ", 1)[1]}s' if args else 'a list'
    if typing.get_origin(kind) is dict:
        return 'a mapping of keys to values'
    return _TYPE_NAMES.get(kind, str(kind))


def _fits(value: Any, kind: Any) -> bool:
    """Whether a recipe or ``--set`` value has the type of its :class:`TrainConfig` field (an int is a float)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if kind is type(None):
        return value is None
    if origin is list:
        # YAML reads class names such as the digits' 0-9 as numbers: a list of names takes them too
        item = (lambda v: _fits(v, str) or _fits(v, int)) if args == (str,) else (lambda v: _fits(v, args[0]))
        return isinstance(value, list) and all(item(v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def apply_overrides(base: Dict[str, Any], overrides: Dict[str, Any]) -> TrainConfig:
    """A config from a recipe's keys and overrides; an unknown key, or a value of another type than its
    field's, is an error naming it."""
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise ConfigError(f'unknown config keys {unknown}; known keys: {", ".join(sorted(fields))}')
    for key, value in merged.items():
        if not _fits(value, fields[key]):
            raise ConfigError(f'{key} must be {_type_name(fields[key])}, got {value!r}')
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg


_EXPONENT_NUMBER = re.compile(r'^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$')


def yaml_number(value: Any) -> Any:
    """A YAML value with the numbers YAML 1.1 reads as strings (``1e-3``, an exponent without a dot)
    taken as the floats they mean, in lists and mappings too."""
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [yaml_number(v) for v in value]
    if isinstance(value, dict):
        return {k: yaml_number(v) for k, v in value.items()}
    return value


def parse_set(items: List[str]) -> Dict[str, Any]:
    """``key=value`` strings, values parsed as YAML (``--set ema=false --set scale=[0.5,1]``;
    ``--set lr=1e-3`` is the number)."""
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'--set {item!r}: expected key=value')
        try:
            out[key.strip()] = yaml_number(yaml.safe_load(value))
        except yaml.YAMLError as e:
            raise ConfigError(f'--set {item!r}: the value is not YAML ({str(e).splitlines()[0]})') from None
    return out


def train_config(config: Optional[str], flags: Dict[str, Any], sets: Dict[str, Any],
                 out: Optional[str] = None) -> Tuple[TrainConfig, Optional[str]]:
    """A new run's config from ``refiner train``'s recipe, flags and ``--set`` values, lowest precedence
    first: the recipe (``config``; else ``finetune`` under a finetune source; else the dataset's; else
    none: what is not given is derived from the run's size), the flags given (keys of
    :class:`TrainConfig`, None: not given), then ``sets``. The weights fix the architecture: under
    ``finetune`` the recipe's model and its arguments give way to the model the weights name, or to
    ``model``; a learning rate given wins over the recipe's ``lr_from_source``. Returns the config and a
    line saying which recipe a fine-tune starts from when none was named (else None)."""
    finetune = flags.get('finetune')
    data = sets['data'] if 'data' in sets else flags.get('data')  # --set data=... picks its recipe too
    recipe = config or ('finetune' if finetune else default_recipe(data))
    note = ('--finetune without --config: starting from the finetune recipe (--config NAME for another)'
            if finetune and not config else None)
    base = load_recipe(recipe) if recipe else {}
    if recipe is None:  # a user's dataset and no recipe: what is not given is derived from the run's size
        given = {key for key, value in flags.items() if value is not None} | set(sets)
        base = {**base, 'derive_keys': [k for k in DERIVABLE if k not in given]}
    refine = flags.get('refine')
    if isinstance(refine, str) and refine.isdigit():
        flags = {**flags, 'refine': int(refine)}  # the last N blocks
    if finetune and flags.get('model') != base.get('model'):
        base = {k: v for k, v in base.items() if k not in ('model', 'model_args')}
    if flags.get('lr') is not None or 'lr' in sets:
        base = {k: v for k, v in base.items() if k != 'lr_from_source'}
    return apply_overrides(base, {**flags, **sets, 'out': out}), note
