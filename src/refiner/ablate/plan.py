"""The plan of an ablation: its arms, fractions, seeds and base config, and each run's budget-matched config.

The config of a run, lowest precedence first: the recipe (``--config``; ``default`` on the
digits), the study's ``base``, the study's ``epochs``, ``--set``, ``--epochs``, ``--data``, then
the arm's overrides (an arm is what the study varies). The budget is matched: every run sees as
many training images as the arm's full-data run (epochs scale with 1/fraction, and the batch
shrinks to fit the smallest fractions).
"""
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..checkpoint import RunFiles
from ..config import ConfigError, TrainConfig, apply_overrides, default_recipe, load_recipe
from ..data import Datasets, build_datasets
from ..errors import RefinerError
from ..train.setup import create_task_model, resolve_img_size, resolve_model
from .run_dirs import PlannedRun, comparable
from .studies import (
    BUILTIN_ARMS,
    DEFAULT_FRACTIONS,
    DEFAULT_SEEDS,
    SET_PER_RUN,
    AblationError,
    Arm,
    Study,
    builtin_overrides,
    load_study,
    make_arm,
    merge_overrides,
    normalize_overrides,
    parse_arm,
)

__all__ = ['Setup', 'setup_ablation', 'arm_config', 'arm_configs', 'plan_runs']


@dataclasses.dataclass
class Setup:
    study: Optional[Study]
    arms: List[Arm]
    reference: str
    fractions: List[float]
    seeds: List[int]
    base: Dict[str, Any]  # the config every arm starts from, as a recipe's keys


def setup_ablation(data: Optional[str], fractions: Optional[Sequence[float]], seeds: Optional[Sequence[int]],
           models: Optional[Sequence[str]], config: Optional[str], overrides: Optional[Dict[str, Any]],
           study: Optional[str], arms: Optional[Sequence[Any]], epochs: Optional[int]) -> Setup:
    st = load_study(study) if study else None
    arm_list: List[Arm] = list(st.arms) if st else []
    extra = [Arm(m, {}, m) if m in BUILTIN_ARMS else make_arm(m, {}, '--models') for m in (models or [])]
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
    base = merge_overrides(recipe, st.base if st else {})
    if st and st.epochs:
        base['epochs'] = st.epochs
    user = normalize_overrides(overrides, '--set')
    for key in SET_PER_RUN:
        if key in user:
            flag = {'train_fraction': '--fractions', 'seed': '--seeds', 'out': '--out'}[key]
            raise AblationError(f'--set {key}: the ablation sets {key} for every run; use {flag}')
    if 'builtin' in user:
        raise AblationError('--set builtin: builtin names an arm; use --arm NAME:builtin=ARM')
    base = merge_overrides(base, user)
    if epochs:
        base['epochs'] = epochs
    base['data'] = data or base.get('data')
    try:
        apply_overrides(base, {})
    except ConfigError as e:
        raise AblationError(f'the base config: {e}') from None
    return Setup(st, arm_list, reference, fractions, seeds, base)


def _unique(values: Sequence[Any], kind) -> List[Any]:
    out, seen = [], set()
    for v in values:
        v = kind(v)
        key = f'{v:g}' if kind is float else v
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def arm_configs(data: Optional[str] = None, models: Optional[Sequence[str]] = None, config: Optional[str] = None,
                overrides: Optional[Dict[str, Any]] = None, *, study: Optional[str] = None,
                arms: Optional[Sequence[Any]] = None, epochs: Optional[int] = None) -> Dict[str, TrainConfig]:
    """Every arm's config (before the per-fraction budget), as :func:`run_ablation` would train
    it; nothing is trained or written."""
    setup = setup_ablation(data, None, None, models, config, overrides, study, arms, epochs)
    base = apply_overrides(setup.base, {})
    return {arm.name: arm_config(arm, setup.base, base)[0] for arm in setup.arms}


def arm_config(arm: Arm, base_dict: Dict[str, Any], base: TrainConfig) -> Tuple[TrainConfig, Dict[str, Any]]:
    """The arm's config and its overrides (a built-in arm's expanded)."""
    merged, overrides = base_dict, {}
    if arm.builtin:
        overrides, replace = builtin_overrides(arm.builtin, base)
        merged = merge_overrides(merged, overrides, replace_model_args=replace)
    merged = merge_overrides(merged, arm.overrides)
    overrides = merge_overrides(overrides, arm.overrides)
    try:
        return apply_overrides(merged, {}), overrides
    except ConfigError as e:
        raise AblationError(f'arm {arm.name!r}: {e}') from None


def _check_model_builds(arm: str, cfg: TrainConfig, full: Datasets) -> None:
    """Build the arm's model once, as its training run will, so that a bad arm fails before anything trains."""
    if cfg.finetune is not None:
        return  # the training run reads the architecture from the weights
    try:
        cfg = resolve_model(cfg, None)
        create_task_model(cfg, len(full.classes), resolve_img_size(cfg, full, None)[0])
    except RefinerError as e:
        raise AblationError(f'arm {arm!r}: {e}') from None


def plan_runs(base_dict: Dict[str, Any], arms: Sequence[Arm], fractions: Sequence[float], seeds: Sequence[int],
          root: Path) -> Tuple[List[PlannedRun], Dict[str, Dict[str, Any]]]:
    base = apply_overrides(base_dict, {})
    datasets: Dict[Any, Any] = {}

    def data(cfg: TrainConfig, fraction: float = 1.0, seed: int = 0):
        key = (cfg.data, tuple(cfg.classes) if cfg.classes else None, fraction, seed)
        if key not in datasets:
            datasets[key] = build_datasets(cfg.data, fraction, seed, cfg.classes)
        return datasets[key]

    runs: List[PlannedRun] = []
    resolved: Dict[str, Dict[str, Any]] = {}
    for arm in arms:
        cfg, overrides = arm_config(arm, base_dict, base)
        resolved[arm.name] = {'builtin': arm.builtin, 'overrides': comparable(overrides)}
        full = data(cfg)
        _check_model_builds(arm.name, cfg, full)
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
                          'config': comparable(run_cfg.to_dict())}
                runs.append(PlannedRun(arm.name, fraction, seed, run_cfg, files, record, n_train))
    return runs, resolved
