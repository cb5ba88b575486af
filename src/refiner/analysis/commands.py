"""Command-line front ends of the over-smoothing analysis (Refiner, arXiv 2106.03714).

Each command is a pair ``add_*_args(parser)`` / ``run_*(args) -> int``:

- ``refiner analyze cka``: minibatch linear CKA between all blocks of a model (and of models to
  compare), how fast block features converge to the last block's;
- ``refiner analyze attention``: per-block head diversity and cross-block similarity of the
  attention maps, before and after refinement;
- ``refiner show-attention IMAGE``: one query token's attention per head, through the stages of
  the refinement, over the image.

``add_analyze_args`` / ``run_analyze`` group the first two as ``refiner analyze {cka,attention}``.
Errors a user can cause are :class:`refiner.data.DataError` (data, images) or subclasses of
:class:`AnalysisError` (a ``ValueError``), each with a one-sentence message.
"""
import argparse
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import eval_transform
from ..devices import resolve_device
from ..pretrained import resolve_data_config
from .attention_maps import AttentionDiversity, attention_blocks, attention_maps
from .cka import MinibatchCKA, curve_at, normalised_curve
from .features import AnalysisError, block_features

__all__ = [
    'UnknownModelError', 'QueryError', 'BlockIndexError', 'LoadedModel', 'load_analysis_model', 'parse_compare',
    'parse_query', 'add_cka_args', 'run_cka', 'add_attention_args', 'run_attention', 'add_show_attention_args',
    'run_show_attention', 'add_analyze_args', 'run_analyze',
]

DEPTHS = (0.25, 0.5, 0.75)


class UnknownModelError(AnalysisError):
    """A model name that timm does not know."""


class QueryError(AnalysisError):
    """A ``--query`` that is malformed or outside the token grid."""


class BlockIndexError(AnalysisError):
    """A ``--block`` that the model does not have."""


# ---------------------------------------------------------------------------------------- models

@dataclass
class LoadedModel:
    """A model ready for analysis, with the preprocessing it expects."""
    label: str
    model: nn.Module
    data_config: Dict[str, Any]  # input_size (C, H, W), mean, std, crop_pct, interpolation
    source: str
    extra: Dict[str, Any] = field(default_factory=dict)


def parse_model_args(text: Optional[str]) -> Dict[str, Any]:
    """``--model-args`` YAML, e.g. ``'{patch_size: 4, depth: 4}'``, as a dict of keyword arguments."""
    if not text:
        return {}
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AnalysisError(f'--model-args is not valid YAML ({str(e).splitlines()[0]}); '
                            f"expected a mapping such as '{{patch_size: 4}}'") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AnalysisError(f"--model-args must be a YAML mapping such as '{{patch_size: 4}}', got {text!r}")
    return value


def load_analysis_model(name: Optional[str], checkpoint: Optional[str] = None, img_size: Optional[int] = None,
                        model_args: Optional[Dict[str, Any]] = None, pretrained: bool = False,
                        device: Union[str, torch.device] = 'cpu', label: Optional[str] = None) -> LoadedModel:
    """A model in eval mode from a checkpoint (run directory, .safetensors of this project, original
    Refiner checkpoint) or, without one, ``timm.create_model(name, pretrained=pretrained, **model_args)``.
    Preprocessing: ``img_size`` if given, else the checkpoint's data config, else the model's own."""
    import timm

    import refiner  # noqa: F401  (registers refiner_vit_*)

    if img_size is not None and img_size < 1:
        raise AnalysisError(f'--img-size must be a positive number of pixels, got {img_size}')
    model_args = dict(model_args or {})
    if checkpoint:
        from ..pretrained import load_model, read_source
        if model_args:
            raise AnalysisError('--model-args only applies to a model created by name; '
                                'a checkpoint fixes the architecture')
        source = read_source(checkpoint)
        # NAME names a bare weights file's model; for a source that names its own it is only a label
        model, info = load_model(source, model_name=name if source.model_name is None else None, img_size=img_size)
        dc = info['data_config']
        source = f'checkpoint {checkpoint}'
        label = label or name or str(info.get('model_name') or Path(checkpoint).stem)
        extra = {'classes': info.get('classes')}
    else:
        if not name:
            raise AnalysisError('give --model NAME (a timm model name) or --checkpoint PATH')
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise UnknownModelError(f'model {name!r} is not a timm model name{hint}')
        size = img_size if img_size is not None else model_args.get('img_size')
        try:
            try:
                model = timm.create_model(name, pretrained=pretrained, **({'img_size': size} if size else {}),
                                          **{k: v for k, v in model_args.items() if k != 'img_size'})
            except TypeError as e:
                if size is None or 'img_size' not in str(e):
                    raise
                model = timm.create_model(name, pretrained=pretrained, **model_args)  # CNNs take any size
        except TypeError as e:
            raise AnalysisError(f'cannot create {name} with --model-args {model_args}: {e}') from None
        except (RuntimeError, OSError) as e:
            if not pretrained:
                raise
            raise AnalysisError(f'cannot load pretrained weights of {name}: {str(e).splitlines()[0]}') from None
        dc = resolve_data_config(model, None, size)
        source = 'pretrained weights' if pretrained else 'random initialisation (no checkpoint)'
        label = label or name
        extra = {}
    return LoadedModel(label, model.to(device).eval(), dc, source, extra)


def parse_compare(spec: str) -> Tuple[str, Optional[str], Dict[str, Any]]:
    """``--compare`` spec: ``NAME``, ``NAME:CKPT`` (CKPT gives the weights and architecture, NAME
    the label) or ``NAME{yaml kwargs}`` (e.g. ``vit_tiny_patch16_224{depth: 4}``). Returns
    (name, checkpoint or None, kwargs)."""
    spec = spec.strip()
    if '{' in spec:
        start, end = spec.index('{'), spec.rfind('}')
        if end < start:
            raise AnalysisError(f"--compare {spec!r}: unbalanced braces; expected NAME{{key: value, ...}}")
        name, args_text, rest = spec[:start], spec[start:end + 1], spec[end + 1:]
        if rest and not rest.startswith(':'):
            raise AnalysisError(f'--compare {spec!r}: unexpected text {rest!r} after the keyword arguments')
        ckpt = rest[1:] or None
        args = parse_model_args(args_text)
    else:
        name, _, ckpt_text = spec.partition(':')
        ckpt, args = ckpt_text or None, {}
    if not name and not ckpt:
        raise AnalysisError(f'--compare {spec!r}: expected NAME, NAME:CHECKPOINT or NAME{{kwargs}}')
    if ckpt and args:
        raise AnalysisError(f'--compare {spec!r}: give keyword arguments or a checkpoint, not both')
    return name, ckpt, args


def _load_all(args: argparse.Namespace, device: torch.device) -> List[LoadedModel]:
    if not getattr(args, 'model', None) and not getattr(args, 'checkpoint', None):
        raise AnalysisError('give --model NAME (a timm model name) or --checkpoint PATH')
    pretrained = bool(getattr(args, 'pretrained', False))
    models = [load_analysis_model(args.model, args.checkpoint, args.img_size, parse_model_args(args.model_args),
                                  pretrained, device)]
    for spec in getattr(args, 'compare', None) or []:
        name, ckpt, kwargs = parse_compare(spec)
        models.append(load_analysis_model(name or None, ckpt, args.img_size, kwargs, pretrained, device))
    seen: Dict[str, int] = {}
    for m in models:  # unique labels: they name JSON entries and files
        if m.label in seen:
            seen[m.label] += 1
            m.label = f'{m.label}#{seen[m.label]}'
        else:
            seen[m.label] = 1
    return models


# ------------------------------------------------------------------------------------------ data

def _subset_indices(n: int, max_images: Optional[int]) -> List[int]:
    """Evenly spaced indices over the split (folder datasets are sorted by class)."""
    if max_images is None or max_images >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_images).round().astype(int).tolist()))


def _batches(indices: Sequence[int], batch_size: int) -> List[List[int]]:
    """Split into nearly equal batches of at most batch_size (no tiny last batch)."""
    k = max(1, math.ceil(len(indices) / batch_size))
    return [list(map(int, b)) for b in np.array_split(np.asarray(indices), k) if len(b)]


def _split(data: Optional[str]) -> Tuple[Dataset, str]:
    from ..data import DataError, build_datasets
    ds = build_datasets(data)
    if len(ds.val) == 0:
        raise DataError(f'the held-out split of {data or "digits"} is empty')
    return ds.val, ds.description


def _loader(base: Dataset, dc: Dict[str, Any], batches: List[List[int]]) -> DataLoader:
    from ..data import SeededTransformDataset, collate_skipping
    tf = eval_transform(dc)
    return DataLoader(SeededTransformDataset(base, tf), batch_sampler=batches, collate_fn=collate_skipping)


def _check_counts(max_images: Optional[int], batch_size: int, minimum: int) -> None:
    if batch_size < minimum:
        raise AnalysisError(f'--batch-size must be at least {minimum}, got {batch_size}')
    if max_images is not None and max_images < minimum:
        raise AnalysisError(f'--max-images must be at least {minimum}, got {max_images}')


def _finite(obj: Any) -> Any:
    """JSON-friendly: NaN / inf -> None, numpy -> Python."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_json(path: Path, obj: Any) -> Path:
    from ..fileio import atomic_write_text
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + '\n')


def _slug(label: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_') or 'model'


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
    p.add_argument('--data', help="dataset whose held-out split is used: a folder with train/ and val/, or a timm "
                                  "spec (default: the embedded digits' held-out split)")
    p.add_argument('--img-size', type=int, help="input size for every model (default: the checkpoint's, else the "
                                                "model's own)")
    p.add_argument('--max-images', type=int, default=max_images, help=f'images used, evenly spaced over the '
                                                                      f'split (default {max_images})')
    p.add_argument('--batch-size', type=int, default=batch_size, help=f'minibatch size (default {batch_size})')
    p.add_argument('--device', default='auto', help="'auto' (default), 'cpu' or 'cuda'")
    p.add_argument('--no-progress', action='store_true', help='no progress bar')


# ------------------------------------------------------------------------------------------- cka

def add_cka_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner analyze cka``."""
    _common_args(parser, batch_size=64, max_images=512)
    parser.add_argument('--out', default='runs/analysis/cka', help='output folder (default runs/analysis/cka)')


def run_cka(args: argparse.Namespace) -> int:
    """Minibatch linear CKA between every pair of blocks, for the model and each compared model, on
    the held-out split; writes cka.json, cka_curves.png, cka_curves_normalised.png and one
    cka_heatmap_<model>.png per model (plus cka_cross_<a>_vs_<b>.png against each compared model)."""
    from tqdm import tqdm

    from .plots import plot_cka_curves, plot_cka_heatmap

    _check_counts(args.max_images, args.batch_size, 4)
    device = resolve_device(args.device)
    models = _load_all(args, device)
    base, description = _split(args.data)
    batches = _batches(_subset_indices(len(base), args.max_images), args.batch_size)
    loaders = [_loader(base, m.data_config, batches) for m in models]
    within = [MinibatchCKA() for _ in models]
    cross = [MinibatchCKA() for _ in models[1:]]
    dims: List[Optional[List[int]]] = [None] * len(models)
    skipped_files: set = set()
    small_batches = 0
    for group in tqdm(zip(*loaders), total=len(batches), desc='CKA', disable=args.no_progress, leave=False):
        feats = []
        for k, (m, (images, _, skipped)) in enumerate(zip(models, group)):
            skipped_files.update(skipped)
            if images is None or len(images) < 4:
                feats = None
                break
            f = block_features(m.model, images.to(device))
            dims[k] = [int(t.shape[1]) for t in f]
            feats.append(f)
        if feats is None or len({len(f[0]) for f in feats}) != 1:
            small_batches += 1
            continue
        for k, f in enumerate(feats):
            within[k].update(f)
        for k, f in enumerate(feats[1:]):
            cross[k].update_cross(feats[0], f)
    if within[0].num_batches == 0:
        from ..data import DataError
        raise DataError(f'no usable minibatch of at least 4 readable images in {args.data or "digits"} '
                        f'({len(skipped_files)} unreadable files)')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {
        'estimator': 'minibatch linear CKA, unbiased HSIC (Nguyen, Raghu & Kornblith 2021)',
        'data': args.data or 'digits', 'split': 'held-out', 'dataset': description,
        'num_images': within[0].num_examples, 'num_batches': within[0].num_batches,
        'skipped_files': len(skipped_files), 'skipped_batches': small_batches, 'models': {}, 'cross': {},
    }
    curves: Dict[str, List[float]] = {}
    files: List[Path] = []
    for m, acc, d in zip(models, within, dims):
        matrix = acc.compute()
        curve = matrix[:, -1].tolist()  # each block with the last block
        if len(curve) < 2:
            raise AnalysisError(f'model {m.label} has {len(curve)} block output; CKA curves need at least 2')
        norm = normalised_curve(curve)
        curves[m.label] = curve
        result['models'][m.label] = {
            'source': m.source, 'input_size': list(m.data_config['input_size']), 'num_blocks': len(curve),
            'feature_dims': d, 'matrix': matrix, 'cka_with_last': curve, 'normalised_cka_with_last': norm,
            'cka_first_last': curve[0],
            'normalised_at_depth': {f'{q:.2f}': curve_at(norm, q) for q in DEPTHS},
        }
        files.append(plot_cka_heatmap(matrix, out / f'cka_heatmap_{_slug(m.label)}.png',
                                      f'{m.label}: linear CKA between blocks ({acc.num_examples} images)'))
    for m, acc in zip(models[1:], cross):
        a, b = models[0].label, m.label
        matrix = acc.compute()
        result['cross'][f'{a} vs {b}'] = {'rows': a, 'cols': b, 'matrix': matrix}
        files.append(plot_cka_heatmap(matrix, out / f'cka_cross_{_slug(a)}_vs_{_slug(b)}.png',
                                      f'linear CKA between the blocks of {a} and {b}',
                                      xlabel=f'{b} block', ylabel=f'{a} block'))
    files.append(plot_cka_curves(curves, out / 'cka_curves.png', normalised=False))
    files.append(plot_cka_curves(curves, out / 'cka_curves_normalised.png', normalised=True))
    files.append(_write_json(out / 'cka.json', result))
    print(f'linear CKA (minibatch) on {result["num_images"]} held-out images of {result["data"]}:')
    for label, r in result['models'].items():
        at = ' / '.join('n/a' if not math.isfinite(v) else f'{v:.3f}' for v in r['normalised_at_depth'].values())
        print(f'  {label} ({r["num_blocks"]} blocks): CKA(first, last) = {r["cka_first_last"]:.3f}; '
              f'normalised CKA with the last block at 25/50/75% depth: {at}')
    if result['skipped_files'] or small_batches:
        print(f'  skipped {result["skipped_files"]} unreadable files, {small_batches} batches with < 4 images')
    print(f'wrote {", ".join(str(f) for f in files)}')
    return 0


# ------------------------------------------------------------------------------------- attention

def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner analyze attention``."""
    _common_args(parser, batch_size=8, max_images=64)
    parser.add_argument('--out', default='runs/analysis/attention',
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
    """Per-block attention diversity on the held-out split: mean cosine similarity between heads,
    and with the previous block's map (DeepViT), before and after refinement; writes attention.json
    and attention_diversity.png and prints a table per model."""
    from tqdm import tqdm

    from ..data import DataError
    from .plots import plot_attention_diversity

    _check_counts(args.max_images, args.batch_size, 1)
    device = resolve_device(args.device)
    models = _load_all(args, device)
    for m in models:
        attention_blocks(m.model)  # fail before any work for a model without attention blocks
    base, description = _split(args.data)
    batches = _batches(_subset_indices(len(base), args.max_images), args.batch_size)
    results: Dict[str, List[Dict[str, Any]]] = {}
    counts: Dict[str, int] = {}
    skipped_files: set = set()
    for m in models:
        acc = AttentionDiversity()
        for images, _, skipped in tqdm(_loader(base, m.data_config, batches), total=len(batches),
                                       desc=f'attention {m.label}', disable=args.no_progress, leave=False):
            skipped_files.update(skipped)
            if images is not None:
                acc.update(attention_maps(m.model, images.to(device)))
        if acc.num_images == 0:
            raise DataError(f'no readable image in the held-out split of {args.data or "digits"}')
        results[m.label] = acc.compute()
        counts[m.label] = acc.num_images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        'metrics': {
            'head_similarity': 'mean pairwise cosine similarity between the heads\' flattened N×N maps of a block',
            'cross_block_similarity': 'cosine similarity between the same head\'s attention rows in this and the '
                                      'previous block, averaged over heads and queries (DeepViT)',
            '*_before': 'the same for the map before refinement (refining blocks: the handed-over map)',
            'head_similarity_expanded': 'head similarity of the r·H maps after attention expansion',
        },
        'data': args.data or 'digits', 'split': 'held-out', 'dataset': description,
        'num_images': counts[models[0].label], 'skipped_files': len(skipped_files),
        'models': {m.label: {'source': m.source, 'input_size': list(m.data_config['input_size']),
                             'num_images': counts[m.label], 'blocks': results[m.label]} for m in models},
    }
    files = [_write_json(out / 'attention.json', payload),
             plot_attention_diversity(results, out / 'attention_diversity.png')]
    for label, rows in results.items():
        print(format_attention_table(label, rows))
    print(f'wrote {", ".join(str(f) for f in files)}')
    return 0


# -------------------------------------------------------------------------------- show-attention

def parse_query(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``--query ROW,COL`` -> (row, col); ``cls`` -> (-1, -1) for the class token; None -> None."""
    if text is None:
        return None
    t = text.strip().lower()
    if t in ('cls', 'class'):
        return (-1, -1)
    m = re.fullmatch(r'\(?\s*(-?\d+)\s*[,x ]\s*(-?\d+)\s*\)?', t)
    if not m:
        raise QueryError(f"--query must be ROW,COL in token-grid coordinates (e.g. 2,3) or 'cls', got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _grid_hw(n_tokens: int, prefix: int, height: int, width: int) -> Tuple[int, int]:
    patches = n_tokens - prefix
    stride = math.sqrt(height * width / max(patches, 1))
    h, w = max(1, round(height / stride)), max(1, round(width / stride))
    if h * w != patches:
        raise AnalysisError(f'cannot lay out {patches} patch tokens on a grid for a {height}×{width} image')
    return h, w


def add_show_attention_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refiner show-attention``."""
    parser.add_argument('image', help='an image file')
    _model_args(parser, 'refiner_vit_*, vit_*, deit_*')
    parser.add_argument('--block', type=int, help='block index (default: the first refining block, else 0)')
    parser.add_argument('--query', metavar='ROW,COL', help="query token in token-grid coordinates, or 'cls' "
                                                          "(default: the centre of the grid)")
    parser.add_argument('--img-size', type=int, help="input size (default: the checkpoint's, else the model's own)")
    parser.add_argument('--out', help='output PNG (default: attention_<image>_block<I>.png)')
    parser.add_argument('--device', default='auto', help="'auto' (default), 'cpu' or 'cuda'")


def run_show_attention(args: argparse.Namespace) -> int:
    """Write the per-head, per-stage attention of one query token of IMAGE for one block as a PNG."""
    from ..data import DataError, load_rgb
    from .plots import plot_attention_grid

    query = parse_query(args.query)
    try:
        img = load_rgb(args.image)
    except Exception as e:  # missing, truncated or not an image
        raise DataError(f'cannot read image {args.image}: {str(e).splitlines()[0] if str(e) else type(e).__name__}'
                        ) from None
    device = resolve_device(args.device)
    lm = load_analysis_model(args.model, args.checkpoint, args.img_size, parse_model_args(args.model_args),
                             bool(args.pretrained), device)
    mods = attention_blocks(lm.model)
    if args.block is not None and not -len(mods) <= args.block < len(mods):
        raise BlockIndexError(f'--block {args.block} is out of range: {lm.label} has blocks 0 to {len(mods) - 1}')
    dc = lm.data_config
    tf = eval_transform(dc)
    x = tf(img)  # (3, S, S), normalised
    blocks = attention_maps(lm.model, x[None].to(device))
    if args.block is None:
        block = next((b['block'] for b in blocks if b['kind'] != 'attention'), 0)
    else:
        block = args.block % len(blocks)
    entry = blocks[block]
    prefix = int(getattr(lm.model, 'num_prefix_tokens', 1))
    n_tokens = int(entry['attn'].shape[-1])
    h, w = _grid_hw(n_tokens, prefix, x.shape[1], x.shape[2])
    if query is None:
        row, col = h // 2, w // 2
    else:
        row, col = query
    if (row, col) == (-1, -1):
        if prefix == 0:
            raise QueryError(f"--query cls: {lm.label} has no class token; give ROW,COL on its {h}×{w} grid")
        query_index = 0
    else:
        if not (0 <= row < h and 0 <= col < w):
            raise QueryError(f'--query {row},{col} is outside the {h}×{w} token grid: rows run 0 to {h - 1}, '
                             f'columns 0 to {w - 1}')
        query_index = prefix + row * w + col
    if entry['kind'] == 'attention':
        maps = {'attention (softmax)': entry['attn'][0]}
    else:
        maps = {'before refinement': entry['before'][0]}
        if 'expanded' in entry:
            maps['expanded'] = entry['expanded'][0]
        maps['after local conv'] = entry['local'][0]
        maps['refined'] = entry['attn'][0]
    mean = torch.tensor(dc['mean']).view(3, 1, 1)
    std = torch.tensor(dc['std']).view(3, 1, 1)
    shown = (x * std + mean).clamp(0, 1)  # the preprocessed image, un-normalised for display
    out = Path(args.out) if args.out else Path(f'attention_{_slug(Path(args.image).stem)}_block{block}.png')
    path = plot_attention_grid(shown, maps, query_index, (h, w), out, block=block, num_prefix_tokens=prefix,
                               model_name=f'{lm.label} ({entry["kind"]} block)')
    where = 'class token' if query_index < prefix else f'({row}, {col})'
    print(f'{lm.label}, block {block} ({entry["kind"]}), query {where} on the {h}×{w} grid: wrote {path}')
    return 0


# ------------------------------------------------------------------------------ analyze (group)

def add_analyze_args(parser: argparse.ArgumentParser) -> None:
    """``refiner analyze {cka,attention}`` as one command with two subcommands."""
    sub = parser.add_subparsers(dest='analysis', metavar='ANALYSIS', required=True)
    add_cka_args(sub.add_parser('cka', help='CKA between blocks: how early features converge to the last block'))
    add_attention_args(sub.add_parser('attention', help='attention diversity per block, before/after refinement'))


def run_analyze(args: argparse.Namespace) -> int:
    """Dispatch ``refiner analyze cka`` / ``refiner analyze attention``."""
    if args.analysis == 'cka':
        return run_cka(args)
    if args.analysis == 'attention':
        return run_attention(args)
    raise AnalysisError(f"unknown analysis {args.analysis!r}: expected 'cka' or 'attention'")
