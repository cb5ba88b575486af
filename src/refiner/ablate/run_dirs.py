"""Run directories of an ablation: the arm's record in each, refusing a changed arm, and equivalent runs copied.

Every run is an ordinary run directory ``<out>/<arm>-f<fraction>-s<seed>``; each also records the
arm (``ablation_arm.json``: its overrides and the config it trains with). An arm whose definition
changed under the same name is *refused*, never silently reused nor retrained: before anything
trains, every existing run directory of the plan is compared with the config the arm gives now
(against ``ablation_arm.json``, or the run's ``config.yaml`` for runs made before that record
existed), and the first that differs stops the ablation with an error that names the directory and
the keys that differ. A study may gain arms (their runs are new directories) without touching the
runs of the others.

Studies that share an arm train it once (``reuse``, ``--reuse``): a run that a run in another
ablation's output folder trains exactly as (:func:`trains_as`: the same config, the model's
arguments resolved, the same seed and fraction) is copied from there (:func:`copy_run`, the summary
last), or, while another invocation trains that run, left until the rest are trained and then
waited for and copied.
"""
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..checkpoint import RunFiles
from ..config import DEFAULT_MODEL, TrainConfig, complete_saved_config
from ..data_specs import dataset_key
from ..fileio import atomic_write, atomic_write_text
from .studies import AblationError

__all__ = ['RECORD', 'LOCK', 'PlannedRun', 'comparable', 'with_defaults', 'check_existing', 'read_record', 'trains_as',
           'Equivalents', 'copy_run']

RECORD = 'ablation_arm.json'  # in every run directory: the arm and the config it trains with
LOCK = '.ablate.lock'  # in every run directory and the output folder: held while one invocation writes there
_IGNORED = ('device', 'workers', 'out', 'description')  # differences that do not change a run's results


@dataclasses.dataclass
class PlannedRun:
    """One (arm, fraction, seed) run of the plan: its config, its directory and the record written there."""
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


def comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in _IGNORED}))


def with_defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    """A recorded config as it trains today: completed as a resume completes it, and a key added to
    :class:`~refiner.config.TrainConfig` after the run was recorded at its default (the one rule for both
    :func:`check_existing` and :func:`trains_as`)."""
    return {**comparable(TrainConfig().to_dict()), **complete_saved_config(comparable(config))}


def _differences(saved: Dict[str, Any], expected: Dict[str, Any], lenient: bool) -> List[str]:
    """Keys whose values differ, as 'key: the run has X, the arm gives Y'. ``lenient`` (a
    config.yaml): a value the arm leaves unset (None) may have been resolved by the run."""
    out = []
    for key in sorted(set(saved) | set(expected)):
        if key in _IGNORED:
            continue
        want, have = expected.get(key), saved.get(key)
        if lenient and want is None:
            continue  # resolved by the run
        if key == 'data' and dataset_key(want) == dataset_key(have):
            continue  # the same dataset, read from another folder
        if isinstance(want, dict) and isinstance(have, dict):
            for sub in sorted(set(want) | set(have)):
                if want.get(sub) != have.get(sub):
                    out.append(f'{key}.{sub}: the run has {have.get(sub)!r}, the arm gives {want.get(sub)!r}')
        elif want != have:
            out.append(f'{key}: the run has {have!r}, the arm gives {want!r}')
    return out


def check_existing(run: PlannedRun) -> None:
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
    diffs = _differences(with_defaults(saved), run.record['config'], lenient)
    if diffs:
        more = f' and {len(diffs) - 3} more' if len(diffs) > 3 else ''
        raise AblationError(
            f'{run.files.root} was trained with another definition of arm {run.arm!r} ({"; ".join(diffs[:3])}{more}): '
            f'restore that definition, give the changed arm a new name, or choose another --out')


def read_record(root: Path) -> Dict[str, Any]:
    """A run directory's ablation record ({} when it has none)."""
    try:
        record = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def trains_as(config: Dict[str, Any]) -> Dict[str, Any]:
    """What decides a run's results: its config less the settings that do not change them, with
    ``model_args`` replaced by every argument the model is built with, so that an arm giving a
    default explicitly (``expansion_ratio: 3``) trains as one that leaves it unset. A key added to
    :class:`~refiner.config.TrainConfig` after the run was recorded counts at its default (:func:`with_defaults`)."""
    from ..pretrained import ModelError, model_arguments
    cfg = with_defaults(config)
    cfg['data'] = list(dataset_key(cfg.get('data')))  # fashion_mnist:DIR trains as fashion_mnist
    try:
        cfg['model_args'] = model_arguments(cfg.get('model') or DEFAULT_MODEL, cfg.get('img_size'),
                                            **cfg.get('model_args', {}))
    except ModelError:
        pass  # a model that only its run can build (a retrofit, fine-tuning weights): compared as given
    return cfg


class Equivalents:
    """The runs of other ablations (their output folders, ``--reuse``) that train exactly as a run of
    this one: the same :func:`trains_as`, which holds the seed and the fraction too. Looked up
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
            self._keys[key] = trains_as(config)
        return self._keys[key]

    def find(self, run: PlannedRun) -> Optional[Path]:
        """The run directory that trains exactly as ``run``, a finished one first, if any."""
        if not self.folders:
            return None
        want = self._trains_as(run.record['config'])
        found = []
        for folder in self.folders:
            for root in sorted(p for p in folder.iterdir() if p.is_dir()):
                record = read_record(root)
                if ('config' in record and root.resolve() != run.files.root.resolve()
                        and self._trains_as(record['config']) == want):
                    found.append(root)
        return min(found, key=lambda root: not (root / 'summary.json').is_file(), default=None)


def copy_run(run: PlannedRun, source: Path) -> None:
    """Make ``run`` a copy of the equivalent finished run ``source``: every file written atomically,
    the summary last, so that a copy killed midway is finished by the next invocation (by copying
    again, or by resuming from the copied final checkpoint)."""
    record = dict(run.record, reused_from=str(source))
    atomic_write_text(run.files.root / RECORD, json.dumps(record, indent=2) + '\n')
    names = [p.name for p in source.iterdir() if p.is_file() and p.name not in (RECORD, LOCK)
             and not p.name.startswith('.')]
    for name in sorted(names, key=lambda n: (n == run.files.summary.name, n)):  # the summary last
        atomic_write(run.files.root / name, lambda tmp, src=source / name: shutil.copyfile(src, tmp))
