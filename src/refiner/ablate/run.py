"""Running an ablation: every planned run trained, continued or copied under its lock, then the results written.

Finished runs (those with a summary.json) are reused and interrupted ones resumed, so an ablation
killed at any moment (SIGKILL included) continues where it stopped when run again: a run from its
last checkpoint (from the beginning before its first, and straight to its results after its last),
the results rebuilt from the runs' files, and what the killed process left half-written removed.
Several invocations may share an output folder (a study started twice, or split by ``--fractions``):
a run is trained under its lock (``.ablate.lock`` in its directory; the results under ``<out>/``'s),
and an invocation leaves the runs another one holds to it, trains the rest, then waits for those
and trains any whose holder stopped before finishing them. The system releases a lock when its
process ends, however it ends, so a kill leaves none behind.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..config import TrainConfig
from ..fileio import atomic_write_text, exclusive_lock, remove_temporaries
from .plan import plan_runs, setup_ablation
from .report import build_report, plot_ablation
from .run_dirs import LOCK, RECORD, Equivalents, PlannedRun, check_existing, copy_run
from .studies import AblationError

__all__ = ['run_ablation']


def run_ablation(data: Optional[str] = None, fractions: Optional[Sequence[float]] = None,
                 seeds: Optional[Sequence[int]] = None, out: Optional[str] = None,
                 models: Optional[Sequence[str]] = None, config: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, progress: bool = True, *,
                 study: Optional[str] = None, arms: Optional[Sequence[Any]] = None,
                 epochs: Optional[int] = None, reuse: Optional[Sequence[str]] = None,
                 report_only: bool = False) -> Dict[str, Any]:
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
    studies that share an arm (each study's released-Refiner arm) train it once. ``report_only``: train
    nothing; the results of the runs finished so far (an interim report of a long study, which may be
    running meanwhile), each cell saying of how many seeds.
    """
    setup = setup_ablation(data, fractions, seeds, models, config, overrides, study, arms, epochs)
    st = setup.study
    root = Path(out or (f'runs/ablate/{st.name}' if st else 'runs/ablate'))
    runs, resolved = plan_runs(setup.base, setup.arms, setup.fractions, setup.seeds, root)
    for run in runs:
        check_existing(run)
    todo = [r for r in runs if not r.files.summary.is_file()]
    if report_only:
        finished = [r for r in runs if r.files.summary.is_file()]
        if not finished:
            raise AblationError(f'no run of this ablation has finished in {root} yet: nothing to report')
        if progress:
            print(f'{len(finished)} of {len(runs)} runs finished in {root}; reporting those, training nothing',
                  flush=True)
        return _write_report(finished, runs, resolved, setup, root)
    equivalents = Equivalents(reuse or [])
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

    return _write_report(runs, runs, resolved, setup, root)


def _write_report(finished: Sequence[PlannedRun], planned: Sequence[PlannedRun], resolved: Dict[str, Any],
                  setup: Any, root: Path) -> Dict[str, Any]:
    """ablation.json, .md and .png from the ``finished`` runs of the ``planned`` ones, under the folder's lock."""
    report = build_report(finished, resolved, setup.arms, setup.reference, setup.fractions, setup.seeds, setup.base,
                          setup.study, planned_runs=len(planned))
    report['out'] = str(root)
    with exclusive_lock(root / LOCK, wait=True):
        remove_temporaries(root)  # what a killed invocation was writing
        atomic_write_text(root / 'ablation.json', json.dumps(report, indent=2) + '\n')
        atomic_write_text(root / 'ablation.md', report['table'] + '\n')
        plot_ablation(report['top1'], setup.fractions, report['models'], root / 'ablation.png', report['data'])
    return report


def _train_run(run: PlannedRun, progress: bool, wait: bool, equivalents: Equivalents) -> bool:
    """Train the run, continue it, or copy its equivalent finished run, under its lock; False (without
    ``wait``) when another invocation holds it or is training its equivalent run."""
    from ..train import train

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
            copy_run(run, source)
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
