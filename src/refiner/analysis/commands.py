"""``refiner analyze {cka,attention}`` and ``refiner show-attention``: their arguments and what they print.

Each command is a pair ``add_*_args(parser)`` / ``run_*(args) -> int``:

- ``refiner analyze cka``: minibatch linear CKA between all blocks of a model (and of models to
  compare), how fast block features converge to the last block's;
- ``refiner analyze attention``: per-block head diversity and cross-block similarity of the
  attention maps, before and after refinement;
- ``refiner analyze summary RESULT...``: several of those analyses (one per seed) combined, mean ± std
  per model;
- ``refiner show-attention IMAGE``: one query token's attention per head, through the stages of
  the refinement, over the image.

The work is :mod:`.compute`'s (functions of plain arguments) on inputs from :mod:`.inputs`. Errors a
user can cause are :class:`refiner.data.DataError` (data, images) or subclasses of
:class:`AnalysisError` (a ``ValueError``), each with a one-sentence message.
"""
import argparse
import math
from typing import Any, Dict, List, Optional, Tuple

from ..argtypes import output_file, output_folder, positive_int
from ..devices import resolve_device
from .compute import DEPTHS, attention_diversity, block_cka, show_attention
from .features import AnalysisError
from .inputs import (
    BlockIndexError,
    LoadedModel,
    QueryError,
    UnknownModelError,
    analysis_data,
    load_analysis_model,
    load_models,
    parse_compare,
    parse_model_args,
    parse_query,
)
from .summary import KIND_LABELS, SummaryError, format_summary_table, read_analyses, summarize, write_summary

__all__ = [
    'UnknownModelError', 'QueryError', 'BlockIndexError', 'LoadedModel', 'load_analysis_model', 'parse_compare',
    'parse_query', 'parse_model_args', 'add_cka_args', 'run_cka', 'add_attention_args', 'run_attention',
    'add_show_attention_args', 'run_show_attention', 'add_analyze_args', 'run_analyze', 'format_attention_table',
    'DEPTHS', 'SummaryError', 'add_summary_args', 'run_summary',
]


def _model_args(p: argparse.ArgumentParser, families: str) -> None:
    """The arguments that choose the model under study (see :func:`load_analysis_model`)."""
    p.add_argument('--model', help=f'a timm model name ({families}); with --checkpoint, the label shown')
    p.add_argument('--checkpoint', help='a run directory, a .safetensors written by refiner, or an original '
                                        'Refiner checkpoint (default: the named model, randomly initialised)')
    p.add_argument('--model-args', metavar='YAML', help="keyword arguments for a model created by name, "
                                                        "e.g. '{patch_size: 4}'")
    p.add_argument('--pretrained', action='store_true', help="create models named without a checkpoint with "
                                                              "timm's pretrained weights (needs them downloaded)")


def _common_args(p: argparse.ArgumentParser, batch_size: int, max_images: int) -> None:
    _model_args(p, 'refiner_vit_*, vit_*, deit_*, resnet*, ...')
    p.add_argument('--compare', nargs='+', action='extend', default=[], metavar='NAME[:CKPT]',
                   help="models to compare: NAME, NAME:CHECKPOINT, or NAME{yaml kwargs}, e.g. "
                        "'vit_tiny_patch16_224{depth: 4}' or 'resnet18'")
    p.add_argument('--data', help="dataset whose held-out split is used: fashion_mnist[:DIR], digits_clutter, a "
                                  "folder with train/ and val/, or a timm spec (default: the dataset the "
                                  "checkpoints were trained on, else the embedded digits)")
    p.add_argument('--img-size', type=positive_int,
                   help="input size for every model (default: the checkpoint's, else the model's own)")
    p.add_argument('--max-images', type=int, default=max_images, help=f'images used, evenly spaced over the '
                                                                      f'split (default {max_images})')
    p.add_argument('--batch-size', type=int, default=batch_size, help=f'minibatch size (default {batch_size})')
    p.add_argument('--device', default='auto', help="'auto' (default), 'cpu' or 'cuda'")
    p.add_argument('--no-progress', action='store_true', help='no progress bar')


def _load_all(args: argparse.Namespace, device) -> Tuple[List[LoadedModel], Optional[str]]:
    """The models, and the data they are analysed on (printing a note for a model trained on other data)."""
    models = load_models(getattr(args, 'model', None), getattr(args, 'checkpoint', None), args.img_size,
                         parse_model_args(args.model_args), getattr(args, 'compare', None) or [],
                         bool(getattr(args, 'pretrained', False)), device)
    data, notes = analysis_data(models, args.data)
    for note in notes:
        print(note)
    return models, data


# ------------------------------------------------------------------------------------------- cka

def add_cka_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner analyze cka``."""
    _common_args(parser, batch_size=64, max_images=512)
    parser.add_argument('--out', type=output_folder, default='runs/analysis/cka',
                        help='output folder (default runs/analysis/cka)')


def run_cka(args: argparse.Namespace) -> int:
    """``refiner analyze cka``: :func:`refiner.analysis.compute.block_cka`, and a summary line per model."""
    device = resolve_device(args.device)
    models, data = _load_all(args, device)
    result, files = block_cka(models, data, args.out, args.max_images, args.batch_size, device,
                              progress=not args.no_progress)
    print(f'linear CKA (minibatch) on {result["num_images"]} held-out images of {result["data"]}:')
    for label, r in result['models'].items():
        at = ' / '.join('n/a' if not math.isfinite(v) else f'{v:.3f}' for v in r['normalised_at_depth'].values())
        print(f'  {label} ({r["num_blocks"]} blocks): CKA(first, last) = {r["cka_first_last"]:.3f}; '
              f'normalised CKA with the last block at 25/50/75% depth: {at}')
    if result['skipped_files'] or result['skipped_batches']:
        print(f'  skipped {result["skipped_files"]} unreadable files, {result["skipped_batches"]} batches with '
              f'< 4 images')
    print(f'wrote {", ".join(str(f) for f in files)}')
    return 0


# ------------------------------------------------------------------------------------- attention

def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner analyze attention``."""
    _common_args(parser, batch_size=8, max_images=64)
    parser.add_argument('--out', type=output_folder, default='runs/analysis/attention',
                        help='output folder (default runs/analysis/attention)')


def _fmt(v: Optional[float]) -> str:
    return '   -  ' if v is None else f'{v:6.3f}'


def format_attention_table(label: str, rows: List[Dict[str, Any]]) -> str:
    """A per-block text table of :class:`AttentionDiversity` results."""
    lines = [f'{label}: mean cosine similarity (lower = more diverse); "before" = the map before refinement',
             f'  {"block":>5}  {"kind":<16} {"heads":>5}  {"head-sim":>8} {"before":>8}  '
             f'{"cross-blk":>9} {"before":>8}']
    for r in rows:
        lines.append(f'  {r["block"]:>5}  {r["kind"]:<16} {r["num_heads"]:>5}  {_fmt(r["head_similarity"]):>8} '
                     f'{_fmt(r.get("head_similarity_before")):>8}  {_fmt(r["cross_block_similarity"]):>9} '
                     f'{_fmt(r.get("cross_block_similarity_before")):>8}')
    return '\n'.join(lines)


def run_attention(args: argparse.Namespace) -> int:
    """``refiner analyze attention``: :func:`refiner.analysis.compute.attention_diversity`, a table per model."""
    device = resolve_device(args.device)
    models, data = _load_all(args, device)
    payload, files = attention_diversity(models, data, args.out, args.max_images, args.batch_size, device,
                                         progress=not args.no_progress)
    for label, entry in payload['models'].items():
        print(format_attention_table(label, entry['blocks']))
    print(f'wrote {", ".join(str(f) for f in files)}')
    return 0


# --------------------------------------------------------------------------------------- summary

def add_summary_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner analyze summary``."""
    parser.add_argument('results', nargs='+', metavar='RESULT',
                        help='cka.json / attention.json files written by `refiner analyze cka` / `attention`, or '
                             'folders holding them (searched recursively), e.g. one analysis per seed')
    parser.add_argument('--reference', help='the model the others are compared with (default: the first model '
                                            'of the first CKA result, else of the first attention result)')
    parser.add_argument('--out', type=output_folder, default='runs/analysis/summary',
                        help='output folder (default runs/analysis/summary)')


def run_summary(args: argparse.Namespace) -> int:
    """``refiner analyze summary``: :func:`refiner.analysis.summary.summarize`, its table and files."""
    analyses = read_analyses(args.results)
    summary = summarize(analyses, args.reference)
    files = write_summary(summary, args.out)
    counts = ' and '.join(f'{len(analyses[kind])} {label}' for kind, label in KIND_LABELS.items())
    print(f'{counts} analyses of {summary["data"]}:')
    print(format_summary_table(summary))
    print(f'wrote {", ".join(str(f) for f in files)}')
    return 0


# -------------------------------------------------------------------------------- show-attention

def add_show_attention_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner show-attention``."""
    parser.add_argument('image', help='an image file')
    _model_args(parser, 'refiner_vit_*, vit_*, deit_*')
    parser.add_argument('--block', type=int, help='block index (default: the first refining block, else 0)')
    parser.add_argument('--query', metavar='ROW,COL', help="query token in token-grid coordinates, or 'cls' "
                                                          "(default: the centre of the grid)")
    parser.add_argument('--img-size', type=positive_int,
                        help="input size (default: the checkpoint's, else the model's own)")
    parser.add_argument('--out', type=output_file, help='output PNG (default: attention_<image>_block<I>.png)')
    parser.add_argument('--device', default='auto', help="'auto' (default), 'cpu' or 'cuda'")


def run_show_attention(args: argparse.Namespace) -> int:
    """``refiner show-attention``: :func:`refiner.analysis.compute.show_attention`, and the file it wrote."""
    query = parse_query(args.query)
    device = resolve_device(args.device)
    lm = load_analysis_model(args.model, args.checkpoint, args.img_size, parse_model_args(args.model_args),
                             bool(args.pretrained), device)
    shown = show_attention(lm, args.image, args.out, args.block, query, device)
    where = shown['query'] if isinstance(shown['query'], str) else '({}, {})'.format(*shown['query'])
    h, w = shown['grid']
    print(f'{lm.label}, block {shown["block"]} ({shown["kind"]}), query {where} on the {h}×{w} grid: '
          f'wrote {shown["path"]}')
    return 0


# ------------------------------------------------------------------------------ analyze (group)

def add_analyze_args(parser: argparse.ArgumentParser) -> None:
    """``refiner analyze {cka,attention,summary}`` as one command with three subcommands."""
    sub = parser.add_subparsers(dest='analysis', metavar='ANALYSIS', required=True)
    add_cka_args(sub.add_parser('cka', help='CKA between blocks: how early features converge to the last block'))
    add_attention_args(sub.add_parser('attention', help='attention diversity per block, before/after refinement'))
    add_summary_args(sub.add_parser('summary', help='several cka / attention analyses (e.g. one per seed) '
                                                    'combined: mean ± std per model'))


def run_analyze(args: argparse.Namespace) -> int:
    """Dispatch ``refiner analyze cka`` / ``attention`` / ``summary``."""
    if args.analysis == 'cka':
        return run_cka(args)
    if args.analysis == 'attention':
        return run_attention(args)
    if args.analysis == 'summary':
        return run_summary(args)
    raise AnalysisError(f"unknown analysis {args.analysis!r}: expected 'cka', 'attention' or 'summary'")
