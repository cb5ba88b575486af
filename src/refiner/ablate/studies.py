"""Ablation arms and studies: their specification, parsing and checks, and the built-in arms (one table).

An *arm* is a name and a set of config overrides (any :class:`~refiner.config.TrainConfig` key;
``model_args`` entries merge into the base's ``model_args`` rather than replacing them, and a
dotted key such as ``model_args.expansion_ratio`` sets one entry). Arms come from a study file
(``--study NAME``: a YAML file shipped in ``refiner/studies/``, or a path), from the command line
(``--arm NAME:key=value,key=value``, values parsed as YAML) and from the built-in arms
(``--models``, the table :data:`BUILTINS`):

- ``refiner``: the base config itself;
- ``vit``: a plain timm ViT matched to the base Refiner's shape (same width, depth, heads, MLP
  ratio and token grid; a linear patch embedding instead of the convolutional stem, no
  refinement). Its ``model_args`` replace the base's (they describe another model);
- ``convstem_vit``: the base Refiner with every block a plain attention block and no attention
  handover (its stem, no refinement), to separate the stem's effect from the refinement's.

An arm named after a built-in arm, or with ``builtin: NAME`` among its overrides, starts from that
built-in arm; its other overrides apply on top.
"""
import dataclasses
import re
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from ..config import DEFAULT_MODEL, ConfigError, TrainConfig, read_shipped_or_file, shipped_names, yaml_number

__all__ = ['Arm', 'Study', 'AblationError', 'BuiltinArm', 'BUILTINS', 'BUILTIN_ARMS', 'DEFAULT_FRACTIONS',
           'DEFAULT_SEEDS', 'SET_PER_RUN', 'parse_arm', 'make_arm', 'load_study', 'list_studies', 'merge_overrides',
           'normalize_overrides', 'builtin_overrides']

DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 1.0)
DEFAULT_SEEDS = (0, 1, 2)

_KNOWN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
SET_PER_RUN = ('train_fraction', 'seed', 'out')  # the ablation sets these for every run
_STUDY_KEYS = ('description', 'base', 'fractions', 'seeds', 'epochs', 'arms', 'reference')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+-]*$')


class AblationError(ConfigError):
    """A study, an arm or an output folder that the ablation cannot use; the message says why."""


@dataclasses.dataclass
class Arm:
    """One arm: a name, its config overrides, and the built-in arm it starts from (if any)."""
    name: str
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    builtin: Optional[str] = None


@dataclasses.dataclass
class Study:
    name: str
    description: str = ''
    base: Dict[str, Any] = dataclasses.field(default_factory=dict)
    fractions: Optional[List[float]] = None
    seeds: Optional[List[int]] = None
    epochs: Optional[int] = None
    arms: List[Arm] = dataclasses.field(default_factory=list)
    reference: Optional[str] = None


# ------------------------------------------------------------------------------ built-in arms

def _base_model(arm: str, base: TrainConfig):
    """The base config's model, built on the meta device, that a built-in arm is matched to."""
    import torch

    from ..pretrained import ModelError, create_model
    try:
        with torch.device('meta'):
            return create_model(base.model or DEFAULT_MODEL, img_size=base.img_size or 16, **base.model_args)
    except ModelError as e:
        raise AblationError(f'the base model (that arm {arm!r} is matched to): {e}') from None


def _refiner_arm(base: TrainConfig) -> Tuple[Dict[str, Any], bool]:
    return {}, False


def _vit_arm(base: TrainConfig) -> Tuple[Dict[str, Any], bool]:
    ref = _base_model('vit', base)
    shape = dict(embed_dim=ref.embed_dim, depth=len(ref.blocks), num_heads=ref.blocks[0].attn.num_heads,
                 mlp_ratio=ref.blocks[0].mlp.fc1.out_features / ref.embed_dim)
    args = dict(patch_size=ref.patch_embed.patch_size, qkv_bias=True, **shape)
    return dict(model='vit_tiny_patch16_224', model_args=args), True


def _convstem_vit_arm(base: TrainConfig) -> Tuple[Dict[str, Any], bool]:
    depth = len(_base_model('convstem_vit', base).blocks)
    return dict(model_args=dict(refine_blocks=[False] * depth, attn_handover=False)), False


@dataclasses.dataclass(frozen=True)
class BuiltinArm:
    """A built-in arm: what it is (``--models``' help) and its overrides, matched to the base config's
    model, with whether its ``model_args`` replace the base's (they describe another model)."""
    description: str
    overrides: Callable[[TrainConfig], Tuple[Dict[str, Any], bool]]


# the built-in arms, one row each: the CLI's --models choices and help read this table
BUILTINS: Dict[str, BuiltinArm] = {
    'refiner': BuiltinArm('the base Refiner', _refiner_arm),
    'vit': BuiltinArm('a plain ViT of matched shape', _vit_arm),
    'convstem_vit': BuiltinArm('the Refiner without refinement', _convstem_vit_arm),
}
BUILTIN_ARMS = tuple(BUILTINS)


def builtin_overrides(name: str, base: TrainConfig) -> Tuple[Dict[str, Any], bool]:
    """A built-in arm's overrides, matched to the base Refiner's shape; and whether its model_args
    replace the base's."""
    return BUILTINS[name].overrides(base)


# ------------------------------------------------------------------------------ arms and studies

def merge_overrides(base: Dict[str, Any], overrides: Dict[str, Any],
                    replace_model_args: bool = False) -> Dict[str, Any]:
    """``base`` updated by ``overrides``; ``model_args`` merge entry by entry unless replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if key == 'model_args' and not replace_model_args and isinstance(out.get('model_args'), dict):
            out['model_args'] = {**out['model_args'], **(value or {})}
        else:
            out[key] = value
    return out


def normalize_overrides(overrides: Any, where: str) -> Dict[str, Any]:
    """Overrides with dotted ``model_args.KEY`` entries folded into ``model_args``; every key checked."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise AblationError(f'{where}: expected a mapping of config keys to values, got {overrides!r}')
    out: Dict[str, Any] = {}
    for key, value in overrides.items():
        key = str(key)
        head, dot, rest = key.partition('.')
        if dot:
            if head != 'model_args' or not rest:
                raise AblationError(f'{where}: {key!r} is not a config key (only model_args.KEY may be dotted)')
            out.setdefault('model_args', {})[rest] = yaml_number(value)
            continue
        if key == 'builtin':
            if value not in BUILTIN_ARMS:
                raise AblationError(f'{where}: builtin {value!r} is not a built-in arm ({", ".join(BUILTIN_ARMS)})')
            out[key] = value
            continue
        if key not in _KNOWN_KEYS:
            raise AblationError(f'{where}: unknown config key {key!r}; known keys: {", ".join(sorted(_KNOWN_KEYS))}')
        if key == 'model_args':
            if value is not None and not isinstance(value, dict):
                raise AblationError(f'{where}: model_args must be a mapping, got {value!r}')
            out['model_args'] = {**out.get('model_args', {}), **{k: yaml_number(v) for k, v in (value or {}).items()}}
        else:
            out[key] = yaml_number(value)
    return out


def make_arm(name: Any, overrides: Any, where: str) -> Arm:
    """``where``: a study (``study NAME``) or a flag (``--arm``)."""
    name = str(name)
    at = f'{where} {name}' if where.startswith('--') else f'{where}, arm {name!r}'
    if not _NAME.match(name):
        raise AblationError(f'{at}: an arm name must be letters, digits and . _ + - (it names run folders)')
    overrides = normalize_overrides(overrides, at)
    for key in SET_PER_RUN:
        if key in overrides:
            raise AblationError(f'{at}: {key} is set by the ablation for every run; drop it')
    builtin = overrides.pop('builtin', name if name in BUILTIN_ARMS else None)
    return Arm(name, overrides, builtin)


def _split_top_level(text: str) -> List[str]:
    """Split at commas outside brackets, braces and quotes (``a=[1,2],b=3`` -> two items)."""
    parts, depth, quote, current = [], 0, None, ''
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch in '[{(':
            depth += 1
        elif ch in ']})':
            depth -= 1
        elif ch == ',' and depth == 0:
            parts.append(current)
            current = ''
            continue
        current += ch
    parts.append(current)
    return parts


def parse_arm(text: str) -> Arm:
    """``NAME`` or ``NAME:key=value,key=value`` (values parsed as YAML, ``model_args.KEY`` allowed)."""
    name, _, spec = text.partition(':')
    if not name.strip():
        raise AblationError(f'--arm {text!r}: expected NAME or NAME:key=value,key=value')
    overrides: Dict[str, Any] = {}
    for item in (_split_top_level(spec) if spec.strip() else []):
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise AblationError(f'--arm {text!r}: expected NAME:key=value,key=value, got {item!r}')
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise AblationError(f'--arm {text!r}: {value!r} is not a YAML value') from None
    return make_arm(name.strip(), overrides, '--arm')


def _study_dir():
    return resources.files('refiner') / 'studies'


def list_studies() -> List[Tuple[str, str]]:
    """The shipped studies: (name, description)."""
    out = []
    for name in shipped_names(_study_dir()):
        data = yaml.safe_load((_study_dir() / f'{name}.yaml').read_text()) or {}
        out.append((name, str(data.get('description', '')).strip()))
    return out


def load_study(name_or_path: str) -> Study:
    """A study shipped with the package (by name) or a YAML file (by path)."""
    try:
        text, name = read_shipped_or_file(name_or_path, _study_dir(), '--study', 'study')
    except ConfigError as e:
        raise AblationError(str(e)) from None
    where = f'study {name_or_path}'
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise AblationError(f'{where}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(data, dict):
        raise AblationError(f'{where}: expected a mapping with {", ".join(_STUDY_KEYS)}')
    unknown = sorted(set(map(str, data)) - set(_STUDY_KEYS))
    if unknown:
        raise AblationError(f'{where}: unknown keys {unknown}; a study holds {", ".join(_STUDY_KEYS)}')
    arms = data.get('arms')
    if not isinstance(arms, dict) or not arms:
        raise AblationError(f'{where}: expected arms: a mapping of arm names to config overrides')
    study = Study(name=name, description=str(data.get('description', '')).strip(),
                  base=normalize_overrides(data.get('base'), f'{where} base'),
                  fractions=_float_list(data.get('fractions'), f'{where} fractions'),
                  seeds=_int_list(data.get('seeds'), f'{where} seeds'),
                  epochs=data.get('epochs'),
                  arms=[make_arm(n, o, where) for n, o in arms.items()],
                  reference=None if data.get('reference') is None else str(data['reference']))
    if 'builtin' in study.base:
        raise AblationError(f'{where} base: builtin names an arm, not a base')
    if study.epochs is not None and (not isinstance(study.epochs, int) or study.epochs < 1):
        raise AblationError(f'{where}: epochs must be a positive integer, got {study.epochs!r}')
    if study.reference is not None and study.reference not in [a.name for a in study.arms]:
        raise AblationError(f'{where}: reference {study.reference!r} is not one of its arms')
    return study


def _float_list(value: Any, where: str) -> Optional[List[float]]:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise AblationError(f'{where}: expected a list of numbers, got {value!r}') from None


def _int_list(value: Any, where: str) -> Optional[List[int]]:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise AblationError(f'{where}: expected a list of integers, got {value!r}')
    return list(values)
