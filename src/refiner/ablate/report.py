"""The results of an ablation: per arm and fraction the mean ± std over seeds, the table and the plot.

Results (``<out>/``): ablation.md (the table: per arm its parameters, forward FLOPs per image,
training images/s and the held-out top-1, mean ± std over seeds, for every fraction, with the
difference from the reference arm and whether it lies within the seed spread), ablation.json
(every per-seed value too) and ablation.png (top-1 against the number of training images).
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..bench import count_flops
from ..checkpoint import RunFiles
from ..fileio import atomic_write
from ..spread import compare_to, format_stat, seed_stats
from .run_dirs import PlannedRun, read_record
from .studies import BUILTINS, Arm, Study

__all__ = ['build_report', 'plot_ablation']


def _run_flops(files: RunFiles) -> Optional[int]:
    """The forward FLOPs per image of a finished run's model, built from what its weights record."""
    from safetensors import safe_open

    from ..pretrained import ModelError, create_model
    try:
        with safe_open(str(files.weights), 'pt') as f:
            meta = f.metadata() or {}
        args = json.loads(meta['model_args'])
        size = json.loads(meta['data_config'])['input_size']
        model = create_model(meta['model_name'], **args)
    except (OSError, KeyError, ValueError, ModelError):
        return None
    return count_flops(model, int(size[-1]), int(size[0]))


def build_report(runs: List[PlannedRun], resolved: Dict[str, Dict[str, Any]], arms: Sequence[Arm], reference: str,
            fractions: Sequence[float], seeds: Sequence[int], base_dict: Dict[str, Any],
            st: Optional[Study], planned_runs: Optional[int] = None) -> Dict[str, Any]:
    """The results of ``runs`` (finished ones: all the plan's, or those of an interim report, where an arm
    or a fraction may have fewer seeds or none yet; ``planned_runs``: how many the plan holds)."""
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
            'reused_from': read_record(run.files.root).get('reused_from')})
    for name, entry in info.items():
        timed = [r for rs in entry['runs'].values() for r in rs if r['images_per_s'] and r['train_time_s']]
        seconds = sum(r['train_time_s'] for r in timed)
        # images over seconds, all the arm's runs together
        entry['train_images_per_s'] = (sum(r['images_per_s'] * r['train_time_s'] for r in timed) / seconds
                                       if seconds else None)
        entry['train_time_s'] = seconds
        entry['stats'] = {}
        for f in (f'{x:g}' for x in fractions):
            if not top1[name].get(f):
                entry['stats'][f] = None  # no finished run yet (an interim report)
                continue
            ref = None if name == reference or not top1[reference].get(f) else seed_stats(top1[reference][f])
            entry['stats'][f] = compare_to(seed_stats(top1[name][f]), ref)
    data = base_dict.get('data') or 'digits'
    report = {
        'study': st.name if st else None, 'description': st.description if st else '', 'data': data,
        'fractions': list(fractions), 'seeds': list(seeds), 'reference': reference, 'arms': [a.name for a in arms],
        'models': info, 'top1': {arm: by_fraction for arm, by_fraction in top1.items() if by_fraction},
        'finished_runs': len(runs), 'planned_runs': len(runs) if planned_runs is None else planned_runs,
    }
    report['table'] = _table(report)
    return report


def _table(report: Dict[str, Any]) -> str:
    info, fractions, ref = report['models'], report['fractions'], report['reference']
    flops = [m['flops'] for m in info.values() if m['flops']]
    scale, unit = (1e9, 'GFLOPs') if flops and max(flops) >= 1e9 else (1e6, 'MFLOPs')
    header = (f'| arm | params | {unit} | train img/s | train min | '
              + ' | '.join(f'{f:g} of train' for f in fractions) + ' |')
    lines = [header, '|' + ' --- |' * (len(fractions) + 5)]
    n = len(report['seeds'])
    for name in (a for a in report['arms'] if a in info):
        m = info[name]
        cells = [_cell(m['stats'][f'{f:g}'], n) for f in fractions]
        fl = f'{m["flops"] / scale:.2f}' if m['flops'] else 'n/a'
        ips = f'{m["train_images_per_s"]:.0f}' if m['train_images_per_s'] else 'n/a'
        minutes = f'{m["train_time_s"] / 60:.0f}' if m['train_time_s'] else 'n/a'
        # a built-in arm is its own shape (vit: 1M parameters, not timm's vit_tiny): say what it is
        what = f'{BUILTINS[m["builtin"]].description}, from {m["model"]}' if m.get('builtin') else m['model']
        lines.append(f'| {name} ({what}) | {m["params"] / 1e6:.3f}M | {fl} | {ips} | {minutes} | '
                     + ' | '.join(cells) + ' |')
    lines += ['', f'Held-out top-1 (%), mean ± std over {n} seed{"s" if n > 1 else ""}; in brackets the difference '
                  f'of means from the reference arm {ref}, "within spread" when it is smaller than the larger of the '
                  f'two standard deviations. {unit}: one image\'s forward pass; train img/s and train min (the '
                  f'wall time of training): all the arm\'s runs together.']
    if report['finished_runs'] < report['planned_runs']:
        missing = [a for a in report['arms'] if a not in info]
        lines += ['', f'Interim report: {report["finished_runs"]} of {report["planned_runs"]} runs finished'
                      + (f'; no run of {", ".join(missing)} yet' if missing else '') + '.']
    return '\n'.join(lines)


def _cell(stats: Optional[Dict[str, Any]], seeds: int) -> str:
    """A table cell: mean ± std (difference), and of how many seeds where an interim report has fewer."""
    if stats is None:
        return 'not finished'
    return format_stat(stats) + (f' [{stats["n"]} of {seeds} seeds]' if stats['n'] < seeds else '')


def plot_ablation(results: Dict[str, Dict[str, List[float]]], fractions: Sequence[float], info: Dict[str, Any],
                  path: Path, data: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model, by_fraction in results.items():  # an interim report: only the fractions with a finished run
        order = sorted((f for f in fractions if by_fraction.get(f'{f:g}')),
                       key=lambda f: info[model]['train_images'][f'{f:g}'])
        xs = [info[model]['train_images'][f'{f:g}'] for f in order]
        vals = [np.array(by_fraction[f'{f:g}']) for f in order]
        mean = np.array([v.mean() for v in vals])
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
        ax.plot(xs, mean, marker='o', label=f'{model} ({info[model]["params"] / 1e6:.2f}M params)')
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xscale('log')
    ax.set_xlabel('training images (log scale)')
    ax.set_ylabel('held-out top-1 (%), mean ± std over seeds')
    n_seeds = max(len(v) for r in results.values() for v in r.values())
    ax.set_title(f'Data efficiency on {data}\nsame recipe, same images seen, {n_seeds} seeds', fontsize=11)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right', fontsize='small')
    lo = min(min(min(v) for v in r.values()) for r in results.values())
    ax.set_ylim(max(0.0, math.floor(lo / 5) * 5 - 5), 100.5)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)
    return path
