"""``refiner ablate``: ablations of the Refiner, each arm trained under the same budget.

An *arm* is a name and a set of config overrides (any :class:`~refiner.config.TrainConfig` key;
``model_args`` entries merge into the base's ``model_args`` rather than replacing them, and a
dotted key such as ``model_args.expansion_ratio`` sets one entry). Arms come from a study file
(``--study NAME``: a YAML file shipped in ``refiner/studies/``, or a path), from the command line
(``--arm NAME:key=value,key=value``, values parsed as YAML) and from the built-in arms
(``--models``):

- ``refiner``: the base config itself;
- ``vit``: a plain timm ViT matched to the base Refiner's shape (same width, depth, heads, MLP
  ratio and token grid; a linear patch embedding instead of the convolutional stem, no
  refinement). Its ``model_args`` replace the base's (they describe another model);
- ``convstem_vit``: the base Refiner with every block a plain attention block and no attention
  handover (its stem, no refinement), to separate the stem's effect from the refinement's.

An arm named after a built-in arm, or with ``builtin: NAME`` among its overrides, starts from that
built-in arm; its other overrides apply on top.

The config of a run, lowest precedence first: the recipe (``--config``; ``default`` on the
digits), the study's ``base``, the study's ``epochs``, ``--set``, ``--epochs``, ``--data``, then
the arm's overrides (an arm is what the study varies). The budget is matched: every run sees as
many training images as the arm's full-data run (epochs scale with 1/fraction, and the batch
shrinks to fit the smallest fractions).

Every run is an ordinary run directory ``<out>/<arm>-f<fraction>-s<seed>``: finished runs (those
with a summary.json) are reused and interrupted ones resumed, so an ablation killed at any moment
(SIGKILL included) continues where it stopped when run again: a run from its last checkpoint (from
the beginning before its first, and straight to its results after its last), the results below
rebuilt from the runs' files, and what the killed process left half-written removed. Several
invocations may share an output folder (a study started twice, or split by ``--fractions``): a run
is trained under its lock (``.ablate.lock`` in its directory; the results under ``<out>/``'s),
and an invocation leaves the runs another one holds to it, trains the rest, then waits for those
and trains any whose holder stopped before finishing them. The system releases a lock when its
process ends, however it ends, so a kill leaves none behind. Each run directory also records the
arm (``ablation_arm.json``: its overrides and the config it trains with). An arm whose definition
changed under the same name is *refused*, never silently reused nor retrained: before anything
trains, every existing run directory of the plan is compared with the config the arm gives now
(against ``ablation_arm.json``, or the run's ``config.yaml`` for runs made before that record
existed), and the first that differs stops the ablation with an error that names the directory and
the keys that differ. A study may gain arms (their runs are new directories) without touching the
runs of the others.

Studies that share an arm train it once (``reuse``, ``--reuse``): a run that a run in another
ablation's output folder trains exactly as (:func:`_trains_as`: the same config, the model's
arguments resolved, the same seed and fraction) is copied from there, or, while another invocation
trains that run, left until the rest are trained and then waited for and copied.

Results (``<out>/``): ablation.md (the table: per arm its parameters, forward FLOPs per image,
training images/s and the held-out top-1, mean ± std over seeds, for every fraction, with the
difference from the reference arm and whether it lies within the seed spread), ablation.json
(every per-seed value too) and ablation.png (top-1 against the number of training images).
"""
import dataclasses
import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from .bench import count_flops
from .checkpoint import RunFiles
from .config import (
    DEFAULT_MODEL,
    ConfigError,
    TrainConfig,
    apply_overrides,
    complete_saved_config,
    default_recipe,
    load_recipe,
)
from .data import build_datasets
from .fileio import atomic_write, atomic_write_text, exclusive_lock, remove_temporaries

__all__ = ['run_ablation', 'BUILTIN_ARMS', 'Arm', 'Study', 'AblationError', 'load_study', 'list_studies',
           'parse_arm', 'arm_configs', 'count_flops', 'DEFAULT_FRACTIONS', 'DEFAULT_SEEDS']

BUILTIN_ARMS = ('refiner', 'vit', 'convstem_vit')
DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
RECORD = 'ablation_arm.json'  # in every run directory: the arm and the config it trains with
LOCK = '.ablate.lock'  # in every run directory and the output folder: held while one invocation writes there

_KNOWN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
_SET_PER_RUN = ('train_fraction', 'seed', 'out')  # the ablation sets these for every run
_IGNORED = ('device', 'workers', 'out', 'description')  # differences that do not change a run's results
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


# ------------------------------------------------------------------------------ arms and studies

def _merge(base: Dict[str, Any], overrides: Dict[str, Any], replace_model_args: bool = False) -> Dict[str, Any]:
    """``base`` updated by ``overrides``; ``model_args`` merge entry by entry unless replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if key == 'model_args' and not replace_model_args and isinstance(out.get('model_args'), dict):
            out['model_args'] = {**out['model_args'], **(value or {})}
        else:
            out[key] = value
    return out


_FLOAT = re.compile(r'^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$')


def _value(value: Any) -> Any:
    """YAML reads 1e-3 as a string (it wants 1.0e-3): take it as the number it means."""
    return float(value) if isinstance(value, str) and _FLOAT.match(value.strip()) else value


def _normalize(overrides: Any, where: str) -> Dict[str, Any]:
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
            out.setdefault('model_args', {})[rest] = _value(value)
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
            out['model_args'] = {**out.get('model_args', {}), **{k: _value(v) for k, v in (value or {}).items()}}
        else:
            out[key] = _value(value)
    return out


def _make_arm(name: Any, overrides: Any, where: str) -> Arm:
    """``where``: a study (``study NAME``) or a flag (``--arm``)."""
    name = str(name)
    at = f'{where} {name}' if where.startswith('--') else f'{where}, arm {name!r}'
    if not _NAME.match(name):
        raise AblationError(f'{at}: an arm name must be letters, digits and . _ + - (it names run folders)')
    overrides = _normalize(overrides, at)
    for key in _SET_PER_RUN:
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
    return _make_arm(name.strip(), overrides, '--arm')


def _study_dir():
    return resources.files('refiner') / 'studies'


def list_studies() -> List[Tuple[str, str]]:
    """The shipped studies: (name, description)."""
    out = []
    for p in sorted(_study_dir().iterdir(), key=lambda p: p.name):
        if p.name.endswith('.yaml'):
            data = yaml.safe_load(p.read_text()) or {}
            out.append((p.name[:-5], str(data.get('description', '')).strip()))
    return out


def load_study(name_or_path: str) -> Study:
    """A study shipped with the package (by name) or a YAML file (by path)."""
    path = Path(name_or_path)
    if path.suffix in ('.yaml', '.yml') or path.exists():
        if not path.is_file():
            raise AblationError(f'--study {name_or_path}: no such file')
        text, name = path.read_text(), path.stem
    else:
        res = _study_dir() / f'{name_or_path}.yaml'
        if not res.is_file():
            raise AblationError(f'--study {name_or_path}: not a file and not a shipped study '
                                f'(studies: {", ".join(n for n, _ in list_studies())})')
        text, name = res.read_text(), name_or_path
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
                  base=_normalize(data.get('base'), f'{where} base'),
                  fractions=_float_list(data.get('fractions'), f'{where} fractions'),
                  seeds=_int_list(data.get('seeds'), f'{where} seeds'),
                  epochs=data.get('epochs'),
                  arms=[_make_arm(n, o, where) for n, o in arms.items()],
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


def _builtin_overrides(name: str, base: TrainConfig) -> Tuple[Dict[str, Any], bool]:
    """A built-in arm's overrides, matched to the base Refiner's shape; and whether its model_args
    replace the base's."""
    if name == 'refiner':
        return {}, False
    from .pretrained import ModelError, create_model
    try:
        ref = create_model(base.model or DEFAULT_MODEL, img_size=base.img_size or 16, **base.model_args)
    except ModelError as e:
        raise AblationError(f'the base model (that arm {name!r} is matched to): {e}') from None
    depth = len(ref.blocks)
    if name == 'convstem_vit':
        return dict(model_args=dict(refine_blocks=[False] * depth, attn_handover=False)), False
    patch = ref.patch_embed.patch_size
    shape = dict(embed_dim=ref.embed_dim, depth=depth, num_heads=ref.blocks[0].attn.num_heads,
                 mlp_ratio=ref.blocks[0].mlp.fc1.out_features / ref.embed_dim)
    return dict(model='vit_tiny_patch16_224', model_args=dict(patch_size=patch, qkv_bias=True, **shape)), True


# ------------------------------------------------------------------------------ planning

@dataclasses.dataclass
class _Run:
    arm: str
    fraction: float
    seed: int
    cfg: TrainConfig
    files: RunFiles
    record: Dict[str, Any]
    n_train: int

    @property
    def name(self) -> str:
        return self.files.root.name


def _comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in _IGNORED}))


def _differences(saved: Dict[str, Any], expected: Dict[str, Any], lenient: bool) -> List[str]:
    """Keys whose values differ, as 'key: the run has X, the arm gives Y'. ``lenient`` (a
    config.yaml): a value the arm leaves unset (None) may have been resolved by the run."""
    out, defaults = [], _comparable(TrainConfig().to_dict())
    for key in sorted(set(saved) | set(expected)):
        if key in _IGNORED:
            continue
        want, have = expected.get(key), saved.get(key)
        if (lenient and want is None) or (key not in saved and want == defaults.get(key)):
            continue  # resolved by the run; or a key added to TrainConfig since, at its default
        if isinstance(want, dict) and isinstance(have, dict):
            for sub in sorted(set(want) | set(have)):
                if want.get(sub) != have.get(sub):
                    out.append(f'{key}.{sub}: the run has {have.get(sub)!r}, the arm gives {want.get(sub)!r}')
        elif want != have:
            out.append(f'{key}: the run has {have!r}, the arm gives {want!r}')
    return out


def _check_existing(run: _Run) -> None:
    """Refuse a run directory that was trained (or started) with another definition of its arm."""
    record_path = run.files.root / RECORD
    if not (run.files.config.is_file() or run.files.summary.is_file()):
        return  # nothing trained there yet (a run that failed before it started)
    if record_path.is_file():
        try:
            saved, lenient = json.loads(record_path.read_text())['config'], False
        except (ValueError, KeyError, TypeError):
            raise AblationError(f'{record_path} is not an ablation record; remove that run directory') from None
    elif run.files.config.is_file():
        saved, lenient = yaml.safe_load(run.files.config.read_text()) or {}, True
    else:
        raise AblationError(f'{run.files.root} holds a summary.json but no config.yaml: not a run of this ablation; '
                            f'remove it or choose another --out')
    diffs = _differences(complete_saved_config(saved), run.record['config'], lenient)
    if diffs:
        more = f' and {len(diffs) - 3} more' if len(diffs) > 3 else ''
        raise AblationError(
            f'{run.files.root} was trained with another definition of arm {run.arm!r} ({"; ".join(diffs[:3])}{more}): '
            f'restore that definition, give the changed arm a new name, or choose another --out')


def _read_record(root: Path) -> Dict[str, Any]:
    """A run directory's ablation record ({} when it has none)."""
    try:
        record = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _trains_as(config: Dict[str, Any]) -> Dict[str, Any]:
    """What decides a run's results: its config less the settings that do not change them, with
    ``model_args`` replaced by every argument the model is built with, so that an arm giving a
    default explicitly (``expansion_ratio: 3``) trains as one that leaves it unset. A key added to
    :class:`~refiner.config.TrainConfig` after the run was recorded counts at its default."""
    from .pretrained import ModelError, model_arguments
    cfg = {**_comparable(TrainConfig().to_dict()), **complete_saved_config(_comparable(config))}
    try:
        cfg['model_args'] = model_arguments(cfg.get('model') or DEFAULT_MODEL, cfg.get('img_size'),
                                            **cfg.get('model_args', {}))
    except ModelError:
        pass  # a model that only its run can build (a retrofit, fine-tuning weights): compared as given
    return cfg


class _Equivalents:
    """The runs of other ablations (their output folders, ``--reuse``) that train exactly as a run of
    this one: the same :func:`_trains_as`, which holds the seed and the fraction too. Looked up
    just before a run trains, so that a run another invocation started meanwhile is found."""

    def __init__(self, folders: Sequence[str]) -> None:
        for folder in folders:
            if not Path(folder).is_dir():
                raise AblationError(f'--reuse {folder}: no such folder')
        self.folders = [Path(f) for f in folders]
        self._keys: Dict[str, Dict[str, Any]] = {}

    def _trains_as(self, config: Dict[str, Any]) -> Dict[str, Any]:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._keys:
            self._keys[key] = _trains_as(config)
        return self._keys[key]

    def find(self, run: _Run) -> Optional[Path]:
        """The run directory that trains exactly as ``run``, a finished one first, if any."""
        if not self.folders:
            return None
        want = self._trains_as(run.record['config'])
        found = []
        for folder in self.folders:
            for root in sorted(p for p in folder.iterdir() if p.is_dir()):
                record = _read_record(root)
                if ('config' in record and root.resolve() != run.files.root.resolve()
                        and self._trains_as(record['config']) == want):
                    found.append(root)
        return min(found, key=lambda root: not (root / 'summary.json').is_file(), default=None)


def _copy_run(run: _Run, source: Path) -> None:
    """Make ``run`` a copy of the equivalent finished run ``source``: every file written atomically,
    the summary last, so that a copy killed midway is finished by the next invocation (by copying
    again, or by resuming from the copied final checkpoint)."""
    record = dict(run.record, reused_from=str(source))
    atomic_write_text(run.files.root / RECORD, json.dumps(record, indent=2) + '\n')
    names = [p.name for p in source.iterdir() if p.is_file() and p.name not in (RECORD, LOCK)
             and not p.name.startswith('.')]
    for name in sorted(names, key=lambda n: (n == run.files.summary.name, n)):  # the summary last
        atomic_write(run.files.root / name, lambda tmp, src=source / name: shutil.copyfile(src, tmp))


def _check_model_builds(arm: str, cfg: TrainConfig, num_classes: int, img_size: Optional[int]) -> None:
    """Build the arm's model once before anything trains, so that a bad arm fails in a second."""
    if cfg.refine is not None or cfg.finetune is not None:
        return  # the training run resolves these models (from the weights, or by retrofitting)
    from .pretrained import ModelError, create_model
    args = dict(cfg.model_args)
    args.setdefault('num_classes', num_classes)
    try:
        create_model(cfg.model or DEFAULT_MODEL, img_size=img_size, **args)
    except ModelError as e:
        raise AblationError(f'arm {arm!r}: {e}') from None


def _arm_config(arm: Arm, base_dict: Dict[str, Any], base: TrainConfig) -> Tuple[TrainConfig, Dict[str, Any]]:
    """The arm's config and its overrides (a built-in arm's expanded)."""
    merged, overrides = base_dict, {}
    if arm.builtin:
        overrides, replace = _builtin_overrides(arm.builtin, base)
        merged = _merge(merged, overrides, replace_model_args=replace)
    merged = _merge(merged, arm.overrides)
    overrides = _merge(overrides, arm.overrides)
    try:
        return apply_overrides(merged, {}), overrides
    except ConfigError as e:
        raise AblationError(f'arm {arm.name!r}: {e}') from None


def _plan(base_dict: Dict[str, Any], arms: Sequence[Arm], fractions: Sequence[float], seeds: Sequence[int],
          root: Path) -> Tuple[List[_Run], Dict[str, Dict[str, Any]]]:
    base = apply_overrides(base_dict, {})
    datasets: Dict[Any, Any] = {}

    def data(cfg: TrainConfig, fraction: float = 1.0, seed: int = 0):
        key = (cfg.data, tuple(cfg.classes) if cfg.classes else None, fraction, seed)
        if key not in datasets:
            datasets[key] = build_datasets(cfg.data, fraction, seed, cfg.classes)
        return datasets[key]

    runs: List[_Run] = []
    resolved: Dict[str, Dict[str, Any]] = {}
    for arm in arms:
        cfg, overrides = _arm_config(arm, base_dict, base)
        resolved[arm.name] = {'builtin': arm.builtin, 'overrides': _comparable(overrides)}
        full = data(cfg)
        img_size = cfg.img_size or full.default_img_size or cfg.model_args.get('img_size')
        _check_model_builds(arm.name, cfg, len(full.classes), img_size)
        per_epoch_full = (full.num_train // cfg.batch_size) * cfg.batch_size
        if per_epoch_full == 0:
            raise AblationError(f'arm {arm.name!r}: batch_size {cfg.batch_size} is larger than the '
                                f'{full.num_train} training images')
        for fraction in fractions:
            for seed in seeds:
                n_train = data(cfg, fraction, seed).num_train
                batch = cfg.batch_size if n_train >= cfg.batch_size else max(2, (n_train // 2) * 2)
                # the same number of training images as the full run: epochs scale with 1/fraction
                epochs = max(1, round(cfg.epochs * per_epoch_full / ((n_train // batch) * batch)))
                try:
                    run_cfg = apply_overrides(cfg.to_dict(), dict(
                        train_fraction=fraction, seed=seed, batch_size=batch, epochs=epochs,
                        warmup_epochs=cfg.warmup_epochs * epochs / cfg.epochs, eval_every=epochs,
                        checkpoint_epochs=max(1, epochs // 20)))
                except ConfigError as e:
                    raise AblationError(f'arm {arm.name!r}, fraction {fraction:g}: {e}') from None
                run_cfg = dataclasses.replace(run_cfg, out=None)
                files = RunFiles(root / f'{arm.name}-f{fraction:g}-s{seed}')
                record = {'arm': arm.name, **resolved[arm.name], 'fraction': fraction, 'seed': seed,
                          'config': _comparable(run_cfg.to_dict())}
                runs.append(_Run(arm.name, fraction, seed, run_cfg, files, record, n_train))
    return runs, resolved


# ------------------------------------------------------------------------------ measuring

def _run_flops(files: RunFiles) -> Optional[int]:
    """The forward FLOPs per image of a finished run's model, built from what its weights record."""
    from safetensors import safe_open

    from .pretrained import ModelError, create_model
    try:
        with safe_open(str(files.weights), 'pt') as f:
            meta = f.metadata() or {}
        args = json.loads(meta['model_args'])
        size = json.loads(meta['data_config'])['input_size']
        model = create_model(meta['model_name'], **args)
    except (OSError, KeyError, ValueError, ModelError):
        return None
    return count_flops(model, int(size[-1]), int(size[0]))


def _stats(values: List[float]) -> Dict[str, Any]:
    arr = np.array(values, dtype=float)
    return {'mean': float(arr.mean()), 'std': float(arr.std(ddof=1)) if len(arr) > 1 else None, 'n': len(arr)}


# ------------------------------------------------------------------------------ the ablation

@dataclasses.dataclass
class _Setup:
    study: Optional[Study]
    arms: List[Arm]
    reference: str
    fractions: List[float]
    seeds: List[int]
    base: Dict[str, Any]  # the config every arm starts from, as a recipe's keys


def _setup(data: Optional[str], fractions: Optional[Sequence[float]], seeds: Optional[Sequence[int]],
           models: Optional[Sequence[str]], config: Optional[str], overrides: Optional[Dict[str, Any]],
           study: Optional[str], arms: Optional[Sequence[Any]], epochs: Optional[int]) -> _Setup:
    st = load_study(study) if study else None
    arm_list: List[Arm] = list(st.arms) if st else []
    extra = [Arm(m, {}, m) if m in BUILTIN_ARMS else _make_arm(m, {}, '--models') for m in (models or [])]
    extra += [a if isinstance(a, Arm) else parse_arm(str(a)) for a in (arms or [])]
    for arm in extra:
        arm_list = [a for a in arm_list if a.name != arm.name] + [arm]
    if not arm_list:
        arm_list = [Arm(m, {}, m) for m in ('refiner', 'vit')]
    reference = st.reference if st and st.reference in [a.name for a in arm_list] else arm_list[0].name

    fractions = _unique(fractions if fractions is not None else (st.fractions if st and st.fractions else
                                                                 DEFAULT_FRACTIONS), float)
    seeds = _unique(seeds if seeds is not None else (st.seeds if st and st.seeds else DEFAULT_SEEDS), int)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise AblationError(f'fractions must lie in (0, 1], got {list(fractions)}')
    if not seeds:
        raise AblationError('give at least one seed')

    recipe_name = config or default_recipe(data or (st.base.get('data') if st else None))
    recipe = load_recipe(recipe_name) if recipe_name else {}
    base = _merge(recipe, st.base if st else {})
    if st and st.epochs:
        base['epochs'] = st.epochs
    user = _normalize(overrides, '--set')
    for key in _SET_PER_RUN:
        if key in user:
            flag = {'train_fraction': '--fractions', 'seed': '--seeds', 'out': '--out'}[key]
            raise AblationError(f'--set {key}: the ablation sets {key} for every run; use {flag}')
    if 'builtin' in user:
        raise AblationError('--set builtin: builtin names an arm; use --arm NAME:builtin=ARM')
    base = _merge(base, user)
    if epochs:
        base['epochs'] = epochs
    base['data'] = data or base.get('data')
    try:
        apply_overrides(base, {})
    except ConfigError as e:
        raise AblationError(f'the base config: {e}') from None
    return _Setup(st, arm_list, reference, fractions, seeds, base)


def arm_configs(data: Optional[str] = None, models: Optional[Sequence[str]] = None, config: Optional[str] = None,
                overrides: Optional[Dict[str, Any]] = None, *, study: Optional[str] = None,
                arms: Optional[Sequence[Any]] = None, epochs: Optional[int] = None) -> Dict[str, TrainConfig]:
    """Every arm's config (before the per-fraction budget), as :func:`run_ablation` would train
    it; nothing is trained or written."""
    setup = _setup(data, None, None, models, config, overrides, study, arms, epochs)
    base = apply_overrides(setup.base, {})
    return {arm.name: _arm_config(arm, setup.base, base)[0] for arm in setup.arms}


def run_ablation(data: Optional[str] = None, fractions: Optional[Sequence[float]] = None,
                 seeds: Optional[Sequence[int]] = None, out: Optional[str] = None,
                 models: Optional[Sequence[str]] = None, config: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, progress: bool = True, *,
                 study: Optional[str] = None, arms: Optional[Sequence[Any]] = None,
                 epochs: Optional[int] = None, reuse: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train every (arm, fraction, seed) run that has not finished yet; write ablation.json,
    ablation.md (the table) and ablation.png (top-1 against the number of training images).

    ``study``: a shipped study's name or a YAML file; ``arms``: :class:`Arm` objects or ``--arm``
    strings, added to the study's (an arm of the same name replaces the study's); ``models``:
    built-in arms, added likewise. Without any of the three: the ``refiner`` and ``vit`` arms.
    ``fractions``, ``seeds`` and ``epochs`` (the full-data run's epochs) default to the study's,
    then to (0.05, 0.1, 0.25, 1), (0, 1, 2) and the recipe's epochs. ``out`` defaults to
    ``runs/ablate/<study>`` for a study, else ``runs/ablate``. ``reuse``: output folders of other
    ablations; a run to train that one of their finished runs trains exactly as (same config once
    the model's arguments are resolved, same fraction and seed) is copied from it instead, so
    studies that share an arm (each study's released-Refiner arm) train it once.
    """
    setup = _setup(data, fractions, seeds, models, config, overrides, study, arms, epochs)
    st = setup.study
    root = Path(out or (f'runs/ablate/{st.name}' if st else 'runs/ablate'))
    runs, resolved = _plan(setup.base, setup.arms, setup.fractions, setup.seeds, root)
    for run in runs:
        _check_existing(run)
    todo = [r for r in runs if not r.files.summary.is_file()]
    equivalents = _Equivalents(reuse or [])
    if progress:
        print(f'{len(setup.arms)} arms x {len(setup.fractions)} fractions x {len(setup.seeds)} seeds: {len(runs)} '
              f'runs, {len(runs) - len(todo)} finished (reused), {len(todo)} to train or copy; results in {root}',
              flush=True)
    held = [run for run in todo if not _train_run(run, progress, False, equivalents)]
    # the runs another invocation was training, here or (an equivalent run) in a --reuse folder: wait for them,
    # holding no lock meanwhile, then copy or train any it left unfinished
    for run in held:
        if progress and not run.files.summary.is_file():
            print(f'--- {run.name}: another refiner ablate is training it; waiting for it', flush=True)
        source = equivalents.find(run)
        if source is not None:
            with exclusive_lock(source / LOCK, wait=True):
                pass
        _train_run(run, progress, True, equivalents)

    report = _report(runs, resolved, setup.arms, setup.reference, setup.fractions, setup.seeds, setup.base, st)
    report['out'] = str(root)
    with exclusive_lock(root / LOCK, wait=True):
        remove_temporaries(root)  # what a killed invocation was writing
        atomic_write_text(root / 'ablation.json', json.dumps(report, indent=2) + '\n')
        atomic_write_text(root / 'ablation.md', report['table'] + '\n')
        plot_ablation(report['top1'], setup.fractions, report['models'], root / 'ablation.png', report['data'])
    return report


def _train_run(run: _Run, progress: bool, wait: bool, equivalents: _Equivalents) -> bool:
    """Train the run, continue it, or copy its equivalent finished run, under its lock; False (without
    ``wait``) when another invocation holds it or is training its equivalent run."""
    from .train import train

    with exclusive_lock(run.files.root / LOCK, wait=wait) as mine:
        if not mine:
            return False
        if run.files.summary.is_file():  # finished by another invocation meanwhile
            return True
        remove_temporaries(run.files.root)  # what a killed invocation was writing
        source = equivalents.find(run)
        if source is not None and not (source / 'summary.json').is_file() and not wait:
            with exclusive_lock(source / LOCK) as free:
                if not free:
                    return False  # being trained there: come back for the copy
        if source is not None and (source / 'summary.json').is_file():
            if progress:
                print(f'--- {run.name}: trains exactly as {source}; copied from there', flush=True)
            _copy_run(run, source)
            return True
        if progress:
            print(f'--- {run.name}: {run.n_train} training images, batch {run.cfg.batch_size}, '
                  f'{run.cfg.epochs} epochs', flush=True)
        atomic_write_text(run.files.root / RECORD, json.dumps(run.record, indent=2) + '\n')
        cfg = run.cfg
        if run.files.config.is_file():  # started before: continue it (from its checkpoint, if one was written)
            train(TrainConfig(device=cfg.device, workers=cfg.workers), resume=str(run.files.root), progress=progress)
        else:
            train(cfg, out=str(run.files.root), progress=progress)
    return True


def _unique(values: Sequence[Any], kind) -> List[Any]:
    out, seen = [], set()
    for v in values:
        v = kind(v)
        key = f'{v:g}' if kind is float else v
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _report(runs: List[_Run], resolved: Dict[str, Dict[str, Any]], arms: Sequence[Arm], reference: str,
            fractions: Sequence[float], seeds: Sequence[int], base_dict: Dict[str, Any],
            st: Optional[Study]) -> Dict[str, Any]:
    top1: Dict[str, Dict[str, List[float]]] = {a.name: {} for a in arms}
    info: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        summary = json.loads(run.files.summary.read_text())
        f = f'{run.fraction:g}'
        top1[run.arm].setdefault(f, []).append(summary['top1'])
        entry = info.setdefault(run.arm, dict(model=summary['model'], params=summary['params'], flops=None,
                                              **resolved[run.arm], train_images={}, runs={}))
        if entry['flops'] is None:
            entry['flops'] = _run_flops(run.files)
        entry['train_images'][f] = summary['num_train']
        entry['runs'].setdefault(f, []).append({
            'seed': run.seed, 'run': str(run.files.root), 'top1': summary['top1'], 'top5': summary.get('top5'),
            'ema_top1': summary.get('ema_top1'), 'epochs': summary.get('epochs'), 'steps': summary.get('steps'),
            'batch_size': run.cfg.batch_size, 'num_train': summary['num_train'],
            'images_per_s': summary.get('images_per_s'), 'train_time_s': summary.get('train_time_s'),
            'reused_from': _read_record(run.files.root).get('reused_from')})
    for name, entry in info.items():
        timed = [r for rs in entry['runs'].values() for r in rs if r['images_per_s'] and r['train_time_s']]
        seconds = sum(r['train_time_s'] for r in timed)
        # images over seconds, all the arm's runs together
        entry['train_images_per_s'] = (sum(r['images_per_s'] * r['train_time_s'] for r in timed) / seconds
                                       if seconds else None)
        entry['train_time_s'] = seconds
        entry['stats'] = {}
        for f in (f'{x:g}' for x in fractions):
            s = _stats(top1[name][f])
            ref = _stats(top1[reference][f])
            s['diff'] = None if name == reference else s['mean'] - ref['mean']
            s['within_spread'] = None
            if name != reference and s['std'] is not None and ref['std'] is not None:
                s['within_spread'] = bool(abs(s['diff']) < max(s['std'], ref['std']))
            entry['stats'][f] = s
    data = base_dict.get('data') or 'digits'
    report = {
        'study': st.name if st else None, 'description': st.description if st else '', 'data': data,
        'fractions': list(fractions), 'seeds': list(seeds), 'reference': reference, 'arms': [a.name for a in arms],
        'models': info, 'top1': top1,
    }
    report['table'] = _table(report)
    return report


def _fmt_stat(s: Dict[str, Any]) -> str:
    text = f'{s["mean"]:.2f} ± {s["std"]:.2f}' if s['std'] is not None else f'{s["mean"]:.2f}'
    if s['diff'] is not None:
        text += f' ({s["diff"]:+.2f}{", within spread" if s["within_spread"] else ""})'
    return text


def _table(report: Dict[str, Any]) -> str:
    info, fractions, ref = report['models'], report['fractions'], report['reference']
    flops = [m['flops'] for m in info.values() if m['flops']]
    scale, unit = (1e9, 'GFLOPs') if flops and max(flops) >= 1e9 else (1e6, 'MFLOPs')
    header = (f'| arm | params | {unit} | train img/s | train min | '
              + ' | '.join(f'{f:g} of train' for f in fractions) + ' |')
    lines = [header, '|' + ' --- |' * (len(fractions) + 5)]
    for name in report['arms']:
        m = info[name]
        cells = [_fmt_stat(m['stats'][f'{f:g}']) for f in fractions]
        fl = f'{m["flops"] / scale:.2f}' if m['flops'] else 'n/a'
        ips = f'{m["train_images_per_s"]:.0f}' if m['train_images_per_s'] else 'n/a'
        minutes = f'{m["train_time_s"] / 60:.0f}' if m['train_time_s'] else 'n/a'
        lines.append(f'| {name} ({m["model"]}) | {m["params"] / 1e6:.3f}M | {fl} | {ips} | {minutes} | '
                     + ' | '.join(cells) + ' |')
    n = len(report['seeds'])
    lines += ['', f'Held-out top-1 (%), mean ± std over {n} seed{"s" if n > 1 else ""}; in brackets the difference '
                  f'of means from the reference arm {ref}, "within spread" when it is smaller than the larger of the '
                  f'two standard deviations. {unit}: one image\'s forward pass; train img/s and train min (the '
                  f'wall time of training): all the arm\'s runs together.']
    return '\n'.join(lines)


def plot_ablation(results: Dict[str, Dict[str, List[float]]], fractions: Sequence[float], info: Dict[str, Any],
                  path: Path, data: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model, by_fraction in results.items():
        order = sorted(fractions, key=lambda f: info[model]['train_images'][f'{f:g}'])
        xs = [info[model]['train_images'][f'{f:g}'] for f in order]
        vals = [np.array(by_fraction[f'{f:g}']) for f in order]
        mean = np.array([v.mean() for v in vals])
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
        ax.plot(xs, mean, marker='o', label=f'{model} ({info[model]["params"] / 1e6:.2f}M params)')
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xscale('log')
    ax.set_xlabel('training images (log scale)')
    ax.set_ylabel('held-out top-1 (%), mean ± std over seeds')
    n_seeds = len(next(iter(next(iter(results.values())).values())))
    ax.set_title(f'Data efficiency on {data}: same recipe, same images seen, {n_seeds} seeds')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right', fontsize='small')
    lo = min(min(min(v) for v in r.values()) for r in results.values())
    ax.set_ylim(max(0.0, math.floor(lo / 5) * 5 - 5), 100.5)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)
    return path
