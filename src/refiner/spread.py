"""Mean ± std over seeds, the difference from a reference, and whether it lies within the seed spread.

One rule for every table that compares models trained with several seeds (``refiner ablate``,
``refiner analyze summary``): the standard deviation is the sample one (ddof 1, undefined for one
seed), and a difference of means counts as *within the spread* when it is smaller than the larger
of the two standard deviations; with one seed on either side nothing is said.
"""
from typing import Any, Dict, Optional, Sequence

import numpy as np

__all__ = ['seed_stats', 'compare_to', 'format_stat']


def seed_stats(values: Sequence[float]) -> Dict[str, Any]:
    """``{'mean', 'std', 'n'}`` of one measure over seeds; ``std`` is None for a single value."""
    xs = np.asarray(values, dtype=np.float64)
    if xs.size == 0:
        raise ValueError('seed_stats needs at least one value')
    return {'mean': float(xs.mean()), 'std': float(xs.std(ddof=1)) if xs.size > 1 else None, 'n': int(xs.size)}


def compare_to(stats: Dict[str, Any], reference: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``stats`` with ``diff`` (its mean minus the reference's) and ``within_spread`` added; both None
    for the reference itself (``reference`` None), ``within_spread`` None when either side has one seed."""
    out = dict(stats, diff=None, within_spread=None)
    if reference is None:
        return out
    out['diff'] = stats['mean'] - reference['mean']
    if stats['std'] is not None and reference['std'] is not None:
        # an equal mean is within even a zero spread (every seed of both at 100%)
        out['within_spread'] = bool(abs(out['diff']) < max(stats['std'], reference['std']) or out['diff'] == 0)
    return out


def format_stat(stats: Dict[str, Any], digits: int = 2) -> str:
    """'87.11 ± 0.51 (-4.61)' (outside the spread) / '(-0.30, within spread)' / '88.62 (+1.51, one seed)'
    (a difference with no spread to judge it by), as the tables print it."""
    text = f'{stats["mean"]:.{digits}f}'
    if stats['std'] is not None:
        text += f' ± {stats["std"]:.{digits}f}'
    if stats.get('diff') is not None:
        within = stats.get('within_spread')
        verdict = ', one seed' if within is None else ', within spread' if within else ''
        text += f' ({stats["diff"]:+.{digits}f}{verdict})'
    return text
