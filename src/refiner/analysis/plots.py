"""Figures of the over-smoothing analysis (Refiner, arXiv 2106.03714): CKA with the last block over
relative depth, block×block CKA heatmaps, attention diversity per block, and attention maps before
and after refinement overlaid on an image."""
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..spread import format_stat, seed_stats  # noqa: E402
from .cka import normalised_curve  # noqa: E402

__all__ = ['plot_cka_curves', 'plot_cka_run_curves', 'plot_cka_heatmap', 'plot_attention_diversity',
           'plot_attention_grid']

PathLike = Union[str, Path]


def _save(fig: plt.Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _depth(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)


def plot_cka_curves(curves: Mapping[str, Sequence[float]], path: PathLike, normalised: bool = False,
                    title: Optional[str] = None) -> Path:
    """Each block's CKA with the last block against relative depth (block index / (L − 1)), one line
    per model, so that models of different depth share the plot.

    ``normalised``: plot ``(CKA(i, last) − CKA(first, last)) / (1 − CKA(first, last))`` instead,
    0 at the first block and 1 at the last (how early features converge to the final ones, as in
    the paper's ViT / DeiT / ResNet figure); the raw CKA(first, last) is given in each legend label.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for name, curve in curves.items():
        c = np.asarray(curve, dtype=np.float64)
        x = _depth(len(c))
        if normalised:
            y = np.asarray(normalised_curve(c))
            label = f'{name} ({len(c)} blocks; raw CKA first–last = {c[0]:.3f})'
        else:
            y = c
            label = f'{name} ({len(c)} blocks)'
        ax.plot(x, y, marker='o', markersize=3.5, label=label)
    _depth_axes(ax, normalised, title)
    return _save(fig, path)


def _depth_axes(ax: plt.Axes, normalised: bool, title: Optional[str]) -> None:
    """Labels, limits and title of a CKA-with-the-last-block plot over relative depth."""
    ax.set_xlabel('relative depth (block index / (blocks − 1))')
    if normalised:
        ax.set_ylabel('normalised CKA with the last block\n(0 = first block, 1 = last block)')
        ax.axhline(0.0, color='0.7', lw=0.8, ls=':')
        ax.axhline(1.0, color='0.7', lw=0.8, ls=':')
    else:
        ax.set_ylabel('linear CKA with the last block')
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    ax.set_title(title or ('How fast block features converge to the last block (normalised CKA)' if normalised
                           else 'Similarity of each block to the last block (linear CKA)'), fontsize=10)


def plot_cka_run_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: PathLike,
                        title: Optional[str] = None) -> Path:
    """The normalised CKA-with-the-last-block curve of several runs per model (e.g. one per seed):
    each run's a thin line, their mean a thick one in the same colour, so the spread between seeds
    shows beside the difference between models."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for k, (name, runs) in enumerate(curves.items()):
        colour = f'C{k % 10}'
        ys = np.array([normalised_curve(c) for c in runs], dtype=np.float64)  # (runs, blocks)
        x = _depth(ys.shape[1])
        for y in ys:
            ax.plot(x, y, color=colour, lw=0.8, alpha=0.45)
        first_last = format_stat(seed_stats([c[0] for c in runs]), digits=3)
        ax.plot(x, np.nanmean(ys, axis=0), color=colour, lw=2.2, marker='o', markersize=3.5,
                label=f'{name} ({len(runs)} run{"s" if len(runs) > 1 else ""}; raw CKA first–last = {first_last})')
    _depth_axes(ax, True, title or 'Normalised CKA with the last block: each run thin, their mean thick')
    return _save(fig, path)


def plot_cka_heatmap(matrix: Union[np.ndarray, Sequence[Sequence[float]]], path: PathLike, title: str,
                     xlabel: str = 'block', ylabel: str = 'block') -> Path:
    """A block×block (or model A × model B) CKA matrix, colour scale fixed to [0, 1]."""
    m = np.asarray(matrix, dtype=np.float64)
    size = max(3.5, min(9.0, 2.5 + 0.3 * max(m.shape)))
    fig, ax = plt.subplots(figsize=(size + 1.0, size), constrained_layout=True)
    im = ax.imshow(m, origin='lower', cmap='magma', vmin=0.0, vmax=1.0, interpolation='nearest')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if max(m.shape) <= 40:
        for axis, n in ((ax.xaxis, m.shape[1]), (ax.yaxis, m.shape[0])):
            step = max(1, math.ceil(n / 16))
            axis.set_ticks(range(0, n, step))
        if max(m.shape) <= 12:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7, color='white' if v < 0.6 else 'black')
    fig.colorbar(im, ax=ax, label='linear CKA (minibatch estimate)')
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_attention_diversity(results: Mapping[str, List[Dict[str, Any]]], path: PathLike) -> Path:
    """Per-block attention diversity of each model, against relative depth: (left) mean cosine
    similarity between the heads of a block, (right) cosine similarity with the previous block's
    map (DeepViT's cross-layer similarity). Solid: the maps that aggregate V; dashed: the same
    blocks' maps before refinement (Refiner models only). ``results`` maps a model name to
    :meth:`refiner.analysis.AttentionDiversity.compute` rows."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    panels = (('head_similarity', 'mean cosine similarity between heads\n(lower = more diverse heads)'),
              ('cross_block_similarity', 'cosine similarity with the previous block\n(1 = same attention as before)'))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for k, (name, rows) in enumerate(results.items()):
        color = colors[k % len(colors)]
        x = _depth(len(rows))
        for ax, (key, _) in zip(axes, panels):
            y = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
            ax.plot(x, y, color=color, marker='o', markersize=3.5, label=f'{name}: used map')
            refined = [i for i, r in enumerate(rows) if r['kind'] != 'attention']
            if refined:
                yb = np.array([np.nan if rows[i].get(key + '_before') is None else rows[i][key + '_before']
                               for i in refined], dtype=np.float64)
                ax.plot(x[refined], yb, color=color, ls='--', marker='x', markersize=5,
                        label=f'{name}: before refinement (refining blocks)')
                ax.plot(x[refined], y[refined], color=color, ls='none', marker='s', markersize=5, mfc='none',
                        label=f'{name}: after refinement')
    for ax, (_, label) in zip(axes, panels):
        ax.set_xlabel('relative depth (block index / (blocks − 1))')
        ax.set_ylabel(label)
        lo = min([v for line in ax.get_lines() for v in np.asarray(line.get_ydata(), float) if np.isfinite(v)],
                 default=0.0)
        lo = min(lo, 0.0) if lo < 0.5 else lo  # zoom in only when every value is high
        span = max(1.0 - lo, 0.01)
        ax.set_ylim(max(-1.05, lo - 0.08 * span), 1.0 + 0.08 * span)
        if lo < 0:
            ax.axhline(0.0, color='0.7', lw=0.8, ls=':')
        ax.grid(alpha=0.3)
    axes[0].set_title('Head diversity within a block', fontsize=10)
    axes[1].set_title('Attention collapse across blocks (DeepViT)', fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='outside lower center', ncol=min(3, max(1, len(labels))), fontsize=8)
    return _save(fig, path)


def _image_array(image: Any) -> np.ndarray:
    """A displayable (H, W, 3) float image in [0, 1] from a PIL image, an array or a (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().float().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    else:
        arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.clip(arr, 0.0, 1.0)


def plot_attention_grid(image: Any, maps: Mapping[str, torch.Tensor], query_index: int, grid_hw: Tuple[int, int],
                        path: PathLike, block: Optional[int] = None, num_prefix_tokens: int = 1,
                        model_name: Optional[str] = None) -> Path:
    """One query token's attention over the patch tokens, per head and per stage, over the image.

    Args:
        image: the preprocessed image as shown to the model (PIL, (H, W, 3) array, or (3, H, W)
            tensor in [0, 1]).
        maps: stage name -> (C, N, N) maps of one image, C = H heads (or r·H expanded maps), in row
            order, e.g. 'before refinement', 'expanded', 'after local conv', 'refined'.
        query_index: the query token (row of the map), counting the prefix tokens (0 = class token).
        grid_hw: (h, w) patch-token grid; N = num_prefix_tokens + h·w.
        path: the PNG to write.
        block: block index, for the titles.

    Each panel is the query's row without the class-token column, reshaped to h×w, upsampled over
    the image (shown in grey). One colour scale per stage (its colourbar at the right of the row);
    a stage with negative values (a refined map: no softmax after refinement) uses a diverging
    colormap centred on 0, and its panel titles say so.
    """
    h, w = grid_hw
    if not maps:
        raise ValueError('expected at least one stage of attention maps')
    img = _image_array(image)
    grey = img @ np.array([0.299, 0.587, 0.114])  # (H, W) luminance: the colour map alone carries the attention
    heads = min(int(m.shape[0]) for m in maps.values())
    ncols = max(1, heads)
    rows_per = {s: math.ceil(int(m.shape[0]) / ncols) for s, m in maps.items()}
    nrows = sum(rows_per.values())
    if query_index < num_prefix_tokens:
        qdesc = 'class token'
    else:
        qr, qc = divmod(query_index - num_prefix_tokens, w)
        qdesc = f'({qr}, {qc})'
    fig = plt.figure(figsize=(2.1 * ncols + 1.4, 2.25 * nrows + 0.9), constrained_layout=True)
    gs = fig.add_gridspec(nrows, ncols)
    r0 = 0
    where = f'block {block}, ' if block is not None else ''
    for stage, m in maps.items():
        rows = m.detach().cpu().double()[:, query_index, num_prefix_tokens:].numpy()  # (C, h·w)
        if rows.shape[1] != h * w:
            raise ValueError(f'stage {stage!r}: {rows.shape[1]} patch tokens do not fit the {h}×{w} grid')
        rows = rows.reshape(-1, h, w)  # (C, h, w)
        lo, hi = float(rows.min()), float(rows.max())
        diverging = lo < 0.0
        if diverging:
            bound = max(abs(lo), abs(hi), 1e-12)
            norm: Normalize = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
            cmap = 'RdBu_r'
        else:
            norm, cmap = Normalize(vmin=0.0, vmax=max(hi, 1e-12)), 'viridis'
        stage_axes = []
        note = ' (< 0 possible)' if diverging else ''
        for j in range(rows.shape[0]):
            ax = fig.add_subplot(gs[r0 + j // ncols, j % ncols])
            stage_axes.append(ax)
            ax.imshow(grey, cmap='gray', vmin=0.0, vmax=1.0, extent=(0, w, h, 0), interpolation='bilinear')
            ax.imshow(rows[j], extent=(0, w, h, 0), cmap=cmap, norm=norm, alpha=0.7, interpolation='bilinear')
            if query_index >= num_prefix_tokens:
                ax.add_patch(Rectangle((qc, qr), 1, 1, fill=False, edgecolor='white', lw=1.5))
                ax.add_patch(Rectangle((qc, qr), 1, 1, fill=False, edgecolor='black', lw=0.6, ls='--'))
            unit = 'head' if rows.shape[0] == heads else 'map'  # r·H expanded maps are not heads
            ax.set_title(f'{where}{stage}{note}\n{unit} {j}, query {qdesc}', fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        stage_axes[0].set_ylabel(stage, fontsize=8)
        cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=stage_axes, fraction=0.025, pad=0.01)
        cb.set_label(f'{stage}: weight' + (' (0 = white)' if diverging else ''), fontsize=7)
        cb.ax.tick_params(labelsize=6)
        r0 += rows_per[stage]
    name = f'{model_name}: ' if model_name else ''
    fig.suptitle(f'{name}{where}attention of query token {qdesc} over the {h}×{w} patch tokens\n'
                 f'(class-token column dropped; one colour scale per stage; query patch outlined)', fontsize=9)
    return _save(fig, path)
