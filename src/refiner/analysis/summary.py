"""Over-smoothing over seeds: several ``refiner analyze`` results of the same models, mean ± std per model.

One trained model per architecture says little about over-smoothing: the normalised CKA curves of two
seeds of one architecture can differ by more than those of two architectures. So
``refiner analyze summary`` reads the cka.json and attention.json files of several analyses (one per
seed, say) and reports, for each model label, mean ± std over the files that contain it:

- from cka.json: CKA(first block, last block) and the normalised CKA with the last block at
  25 / 50 / 75% depth (how early features converge to the final ones; the paper's figure);
- from attention.json: head similarity averaged over blocks (over-smoothing across heads); over the
  blocks that refine a map, the head similarity of the maps after and before refinement; and the
  cross-block similarity averaged over blocks (DeepViT's attention collapse).

Each difference from a reference model is marked as in ``refiner ablate`` (:mod:`refiner.spread`).
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..data_specs import dataset_key
from ..spread import compare_to, format_stat, seed_stats
from .cka import DEPTHS, depth_key
from .features import AnalysisError

__all__ = ['MEASURES', 'read_analyses', 'summarize', 'format_summary_table', 'write_summary']


def _depth_measure(q: float) -> str:
    return f'normalised_cka_{depth_key(q)}'


KIND_LABELS = {'cka': 'CKA', 'attention': 'attention'}  # how the two kinds of analysis are named in the text


# measure -> (column heading, what it is); the order of the table's columns
MEASURES = {
    'cka_first_last': ('CKA(first, last)', 'linear CKA between the first and the last block'),
    **{_depth_measure(q): (f'normalised CKA at {q:.0%} depth',
                           f'(CKA(block, last) - CKA(first, last)) / (1 - CKA(first, last)) at {q:.0%} of the '
                           f'depth: 0 = like the first block, 1 = like the last')
       for q in DEPTHS},
    'head_similarity': ('head similarity', "cosine similarity between a block's heads' maps, mean over blocks"),
    'head_similarity_refined': ('head similarity after refinement', 'the same over the blocks that refine a map '
                                                                     'only, of the maps after refinement'),
    'head_similarity_before': ('head similarity before refinement', 'the same over the blocks that refine a map '
                                                                     'only, of the maps before refinement'),
    'cross_block_similarity': ('cross-block similarity', "cosine similarity between a head's map and the previous "
                                                         "block's, mean over blocks"),
}


class SummaryError(AnalysisError):
    """Analyses that cannot be combined: no results, unknown files, different data, mismatched models."""


def _kind(payload: Any) -> Optional[str]:
    models = payload.get('models') if isinstance(payload, dict) else None
    if not isinstance(models, dict) or not models:
        return None
    first = next(iter(models.values()))
    if isinstance(first, dict) and 'cka_with_last' in first:
        return 'cka'
    if isinstance(first, dict) and 'blocks' in first:
        return 'attention'
    return None


def read_analyses(paths: Sequence[Union[str, Path]]) -> Dict[str, List[Tuple[Path, Dict[str, Any]]]]:
    """The cka.json / attention.json results under ``paths`` (files, or folders searched recursively),
    as ``{'cka': [(path, payload), ...], 'attention': [...]}``, each list in the order given."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for name in ('cka.json', 'attention.json') for f in p.rglob(name))
            if not found:
                raise SummaryError(f'{p} holds no cka.json or attention.json; expected the output folder of '
                                   f'`refiner analyze cka` or `refiner analyze attention`')
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise SummaryError(f'{p} does not exist; expected a cka.json, an attention.json or a folder holding them')
    out: Dict[str, List[Tuple[Path, Dict[str, Any]]]] = {'cka': [], 'attention': []}
    for f in {f.resolve(): f for f in files}.values():  # one file named twice (relative, absolute, a link) once
        try:
            payload = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SummaryError(f'{f} is not readable JSON ({e}); expected a file written by '
                               f'`refiner analyze`') from None
        kind = _kind(payload)
        if kind is None:
            raise SummaryError(f'{f} is not a result of `refiner analyze cka` or `refiner analyze attention`')
        out[kind].append((f, payload))
    datasets = {(dataset_key(p.get('data')), p.get('split')) for results in out.values() for _, p in results}
    if len(datasets) > 1:
        names = ', '.join(sorted(f'{name} ({s})' for (_, name), s in datasets))
        raise SummaryError(f'the analyses are of different data: {names}; a summary combines analyses of one '
                           f'held-out split')
    return out


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else None


def _per_file_measures(kind: str, entry: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """One model's measures in one analysis file."""
    if kind == 'cka':
        return {'cka_first_last': entry['cka_first_last'],
                **{_depth_measure(q): entry['normalised_at_depth'][depth_key(q)] for q in DEPTHS}}
    blocks = entry['blocks']
    # refining blocks (handed-over map) and attention+refine ones (refine_vit): both have a map before refinement
    refining = [b for b in blocks if b.get('head_similarity_before') is not None]
    return {'head_similarity': _mean([b['head_similarity'] for b in blocks]),
            'head_similarity_refined': _mean([b['head_similarity'] for b in refining]),
            'head_similarity_before': _mean([b.get('head_similarity_before') for b in refining]),
            'cross_block_similarity': _mean([b['cross_block_similarity'] for b in blocks])}


def summarize(analyses: Dict[str, List[Tuple[Path, Dict[str, Any]]]],
              reference: Optional[str] = None) -> Dict[str, Any]:
    """Per model label: every measure's per-file values and their mean ± std, compared with
    ``reference`` (default: the first model of the first CKA file, else of the first attention file);
    the CKA-with-the-last-block curves per file."""
    values: Dict[str, Dict[str, List[float]]] = {}
    curves: Dict[str, List[List[float]]] = {}
    for kind in ('cka', 'attention'):
        for path, payload in analyses[kind]:
            for label, entry in payload['models'].items():
                measures = values.setdefault(label, {})
                try:
                    found = _per_file_measures(kind, entry)
                    curve = [float(v) for v in entry['cka_with_last']] if kind == 'cka' else None
                except (KeyError, TypeError, ValueError):
                    raise SummaryError(f'{path}: the entry of {label} is incomplete; expected a file written by '
                                       f'`refiner analyze {kind}`') from None
                for name, v in found.items():
                    if v is not None:
                        measures.setdefault(name, []).append(v)
                if curve is not None:
                    seen = curves.setdefault(label, [])
                    if seen and len(seen[0]) != len(curve):
                        raise SummaryError(f'{label} has {len(seen[0])} blocks in one analysis and {len(curve)} '
                                           f'in {path}; a label must name the same architecture in every file')
                    seen.append(curve)
    if not values:
        raise SummaryError('no analysis to summarise; expected cka.json or attention.json files')
    reference = reference or next(iter(values))
    if reference not in values:
        raise SummaryError(f'reference model {reference!r} is in none of the analyses; expected one of '
                           f'{", ".join(values)}')
    ref_stats = {name: seed_stats(vs) for name, vs in values[reference].items()}
    models: Dict[str, Any] = {}
    for label, measures in values.items():
        stats = {name: dict(compare_to(seed_stats(vs), None if label == reference else ref_stats.get(name)), values=vs)
                 for name, vs in measures.items()}
        models[label] = {'measures': stats, 'cka_with_last': curves.get(label, [])}
    first = next(p for kind in ('cka', 'attention') for _, p in analyses[kind])
    return {
        'data': first.get('data'), 'split': first.get('split'), 'dataset': first.get('dataset'),
        'files': {kind: [str(p) for p, _ in analyses[kind]] for kind in ('cka', 'attention')},
        'num_images': {kind: sorted({p.get('num_images') for _, p in analyses[kind]}, key=str)
                       for kind in ('cka', 'attention')},
        'reference': reference, 'measures': {k: v[1] for k, v in MEASURES.items()}, 'models': models,
    }


def _runs(measures: Dict[str, Any]) -> str:
    """'3 runs', or '3 CKA, 2 attention runs' where the two analyses saw different runs of the model."""
    counts = {KIND_LABELS[kind]: measures[m]['n']
              for kind, m in (('cka', 'cka_first_last'), ('attention', 'head_similarity')) if m in measures}
    if len(set(counts.values())) <= 1:
        n = next(iter(counts.values()), 0)
        return f'{n} run{"s" if n > 1 else ""}'
    return ', '.join(f'{n} {kind}' for kind, n in counts.items()) + ' runs'


def _images(num_images: Dict[str, List[Any]]) -> str:
    """'1000 (CKA), 256 (attention)'; several counts for one kind are all listed (analyses that differ)."""
    return ', '.join(f'{" / ".join(map(str, ns))} ({KIND_LABELS[kind]})'
                     for kind, ns in num_images.items() if ns)


def format_summary_table(summary: Dict[str, Any]) -> str:
    """The summary as a markdown table: a row per model, a column per measure present."""
    used = [m for m in MEASURES if any(m in e['measures'] for e in summary['models'].values())]
    lines = ['| model | ' + ' | '.join(MEASURES[m][0] for m in used) + ' |', '|' + ' --- |' * (len(used) + 1)]
    for label, entry in summary['models'].items():
        cells = [format_stat(entry['measures'][m]) if m in entry['measures'] else '' for m in used]
        lines.append(f'| {label} ({_runs(entry["measures"])}) | ' + ' | '.join(cells) + ' |')
    lines += ['', f'Mean ± std over the analyses that contain the model (its runs, e.g. one per seed); in brackets '
                  f'the difference of means from {summary["reference"]}, "within spread" when it is smaller than '
                  f'the larger of the two standard deviations. Lower similarity = more diverse; a higher normalised '
                  f'CKA = features that reach their final form earlier. Data: {summary["dataset"]}, '
                  f'{summary["split"]} split; images per analysis: {_images(summary["num_images"])}.']
    return '\n'.join(lines)


def write_summary(summary: Dict[str, Any], out: Union[str, Path]) -> List[Path]:
    """summary.json, summary.md and, with CKA results, cka_curves_normalised.png into ``out``."""
    from ..fileio import atomic_write_text
    from .inputs import write_json
    from .plots import plot_cka_run_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_summary_table(summary)
    files = [write_json(out / 'summary.json', dict(summary, table=table)),
             atomic_write_text(out / 'summary.md', table + '\n')]
    curves = {label: e['cka_with_last'] for label, e in summary['models'].items() if e['cka_with_last']}
    if curves:
        files.append(plot_cka_run_curves(curves, out / 'cka_curves_normalised.png'))
    return files
