"""The three analyses as functions of plain arguments: block_cka, attention_diversity, show_attention.

Each takes models loaded by :func:`refiner.analysis.inputs.load_models` (or one
:class:`~refiner.analysis.inputs.LoadedModel`), computes on the held-out split (or one image), writes
its JSON and figures into ``out`` and returns what it found; the ``refiner analyze`` and
``refiner show-attention`` commands (:mod:`.commands`) only parse arguments and print.
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..data import eval_transform
from .attention_maps import AttentionDiversity, attention_blocks, attention_maps
from .cka import DEPTHS, MinibatchCKA, curve_at, depth_key, normalised_curve
from .features import AnalysisError, block_features
from .inputs import (
    BlockIndexError,
    LoadedModel,
    QueryError,
    check_counts,
    held_out_split,
    image_loader,
    slug,
    subset_batches,
    write_json,
)

__all__ = ['DEPTHS', 'block_cka', 'attention_diversity', 'show_attention']

ATTENTION_METRICS = {
    'head_similarity': 'mean pairwise cosine similarity between the heads\' flattened N×N maps of a block',
    'cross_block_similarity': 'cosine similarity between the same head\'s attention rows in this and the '
                              'previous block, averaged over heads and queries (DeepViT)',
    '*_before': 'the same for the map before refinement (refining blocks: the handed-over map)',
    'head_similarity_expanded': 'head similarity of the r·H maps after attention expansion',
}


def block_cka(models: Sequence[LoadedModel], data: Optional[str], out: Union[str, Path],
              max_images: Optional[int] = 512, batch_size: int = 64, device: Union[str, torch.device] = 'cpu',
              progress: bool = False) -> Tuple[Dict[str, Any], List[Path]]:
    """Minibatch linear CKA between every pair of blocks, for each model and between the first and each
    other, on ``data``'s held-out split; writes cka.json, cka_curves.png, cka_curves_normalised.png and
    one cka_heatmap_<model>.png per model (plus cka_cross_<a>_vs_<b>.png). Returns (cka.json's content,
    the files written)."""
    from tqdm import tqdm

    from ..data import DataError
    from .plots import plot_cka_curves, plot_cka_heatmap

    check_counts(max_images, batch_size, 4)
    base, description = held_out_split(data)
    batches = subset_batches(len(base), max_images, batch_size)
    loaders = [image_loader(base, m.data_config, batches) for m in models]
    within = [MinibatchCKA() for _ in models]
    cross = [MinibatchCKA() for _ in models[1:]]
    dims: List[Optional[List[int]]] = [None] * len(models)
    skipped_files: set = set()
    small_batches = 0
    for group in tqdm(zip(*loaders), total=len(batches), desc='CKA', disable=not progress, leave=False):
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
        raise DataError(f'no usable minibatch of at least 4 readable images in {data or "digits"} '
                        f'({len(skipped_files)} unreadable files)')
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {
        'estimator': 'minibatch linear CKA, unbiased HSIC (Nguyen, Raghu & Kornblith 2021)',
        'data': data or 'digits', 'split': 'held-out', 'dataset': description,
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
            'normalised_at_depth': {depth_key(q): curve_at(norm, q) for q in DEPTHS},
        }
        files.append(plot_cka_heatmap(matrix, out / f'cka_heatmap_{slug(m.label)}.png',
                                      f'{m.label}: linear CKA between blocks ({acc.num_examples} images)'))
    for m, acc in zip(models[1:], cross):
        a, b = models[0].label, m.label
        matrix = acc.compute()
        result['cross'][f'{a} vs {b}'] = {'rows': a, 'cols': b, 'matrix': matrix}
        files.append(plot_cka_heatmap(matrix, out / f'cka_cross_{slug(a)}_vs_{slug(b)}.png',
                                      f'linear CKA between the blocks of {a} and {b}',
                                      xlabel=f'{b} block', ylabel=f'{a} block'))
    files.append(plot_cka_curves(curves, out / 'cka_curves.png', normalised=False))
    files.append(plot_cka_curves(curves, out / 'cka_curves_normalised.png', normalised=True))
    files.append(write_json(out / 'cka.json', result))
    return result, files


def attention_diversity(models: Sequence[LoadedModel], data: Optional[str], out: Union[str, Path],
                        max_images: Optional[int] = 64, batch_size: int = 8,
                        device: Union[str, torch.device] = 'cpu',
                        progress: bool = False) -> Tuple[Dict[str, Any], List[Path]]:
    """Per-block attention diversity on ``data``'s held-out split: mean cosine similarity between heads,
    and with the previous block's map (DeepViT), before and after refinement; writes attention.json and
    attention_diversity.png. Returns (attention.json's content, the files written)."""
    from tqdm import tqdm

    from ..data import DataError
    from .plots import plot_attention_diversity

    check_counts(max_images, batch_size, 1)
    for m in models:
        attention_blocks(m.model)  # fail before any work for a model without attention blocks
    base, description = held_out_split(data)
    batches = subset_batches(len(base), max_images, batch_size)
    results: Dict[str, List[Dict[str, Any]]] = {}
    counts: Dict[str, int] = {}
    skipped_files: set = set()
    for m in models:
        acc = AttentionDiversity()
        for images, _, skipped in tqdm(image_loader(base, m.data_config, batches), total=len(batches),
                                       desc=f'attention {m.label}', disable=not progress, leave=False):
            skipped_files.update(skipped)
            if images is not None:
                acc.update(attention_maps(m.model, images.to(device)))
        if acc.num_images == 0:
            raise DataError(f'no readable image in the held-out split of {data or "digits"}')
        results[m.label] = acc.compute()
        counts[m.label] = acc.num_images
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        'metrics': ATTENTION_METRICS,
        'data': data or 'digits', 'split': 'held-out', 'dataset': description,
        'num_images': counts[models[0].label], 'skipped_files': len(skipped_files),
        'models': {m.label: {'source': m.source, 'input_size': list(m.data_config['input_size']),
                             'num_images': counts[m.label], 'blocks': results[m.label]} for m in models},
    }
    files = [write_json(out / 'attention.json', payload),
             plot_attention_diversity(results, out / 'attention_diversity.png')]
    return payload, files


def _grid_hw(n_tokens: int, prefix: int, height: int, width: int) -> Tuple[int, int]:
    patches = n_tokens - prefix
    stride = math.sqrt(height * width / max(patches, 1))
    h, w = max(1, round(height / stride)), max(1, round(width / stride))
    if h * w != patches:
        raise AnalysisError(f'cannot lay out {patches} patch tokens on a grid for a {height}×{width} image')
    return h, w


def show_attention(lm: LoadedModel, image: Union[str, Path], out: Optional[Union[str, Path]] = None,
                   block: Optional[int] = None, query: Optional[Tuple[int, int]] = None,
                   device: Union[str, torch.device] = 'cpu') -> Dict[str, Any]:
    """Write the per-head, per-stage attention of one query token of ``image`` for one block as a PNG.

    ``block``: default the first refining block, else 0; ``query``: (row, col) on the token grid,
    (-1, -1) for the class token, default the grid's centre; ``out``: default
    ``attention_<image>_block<I>.png``. Returns the file, the block, its kind, the grid and the query."""
    from ..data import DataError, load_rgb
    from .plots import plot_attention_grid

    try:
        img = load_rgb(image)
    except Exception as e:  # missing, truncated or not an image
        raise DataError(f'cannot read image {image}: {str(e).splitlines()[0] if str(e) else type(e).__name__}'
                        ) from None
    mods = attention_blocks(lm.model)
    if block is not None and not -len(mods) <= block < len(mods):
        raise BlockIndexError(f'--block {block} is out of range: {lm.label} has blocks 0 to {len(mods) - 1}')
    dc = lm.data_config
    x = eval_transform(dc)(img)  # (3, S, S), normalised
    blocks = attention_maps(lm.model, x[None].to(device))
    block = next((b['block'] for b in blocks if b['kind'] != 'attention'), 0) if block is None else block % len(blocks)
    entry = blocks[block]
    prefix = int(getattr(lm.model, 'num_prefix_tokens', 1))
    h, w = _grid_hw(int(entry['attn'].shape[-1]), prefix, x.shape[1], x.shape[2])
    row, col = (h // 2, w // 2) if query is None else query
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
    path = Path(out) if out else Path(f'attention_{slug(Path(image).stem)}_block{block}.png')
    path = plot_attention_grid(shown, maps, query_index, (h, w), path, block=block, num_prefix_tokens=prefix,
                               model_name=f'{lm.label} ({entry["kind"]} block)')
    return {'path': path, 'block': block, 'kind': entry['kind'], 'grid': (h, w),
            'query': 'class token' if query_index < prefix else (row, col)}
