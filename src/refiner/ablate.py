"""``refiner ablate``: the paper's data-efficiency claim, measured.

Trains the default Refiner and a plain ViT of matched size (same width, depth, heads, MLP ratio and
token grid; a linear patch embedding instead of the convolutional stem, no refinement) on stratified
fractions of the training split, several seeds each, with the same recipe and the same budget:
every run sees as many training images as the full-data run (epochs scale with 1/fraction, and
the batch shrinks to fit the smallest fractions). Optionally a third arm, ``convstem_vit``: the
Refiner-ViT with every block a plain attention block (its stem, no refinement), to separate the
stem's effect from the refinement's.

Every run is an ordinary run directory under ``--out``; finished runs are reused, so an interrupted
ablation continues where it stopped.
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .checkpoint import RunFiles
from .config import DEFAULT_MODEL, TrainConfig, apply_overrides, load_recipe
from .data import build_datasets
from .fileio import atomic_write_text
from .train import train

__all__ = ['run_ablation', 'MODELS']

MODELS = ('refiner', 'vit', 'convstem_vit')


def _arm(name: str, base: TrainConfig) -> Dict[str, Any]:
    """Config overrides for one arm, matched to the base Refiner's shape."""
    import timm
    ref = timm.create_model(base.model or DEFAULT_MODEL, img_size=base.img_size or 16, **base.model_args)
    shape = dict(embed_dim=ref.embed_dim, depth=len(ref.blocks), num_heads=ref.blocks[0].attn.num_heads,
                 mlp_ratio=ref.blocks[0].mlp.fc1.out_features / ref.embed_dim)
    patch = ref.patch_embed.patch_size
    if name == 'refiner':
        return {}
    if name == 'vit':
        return dict(model='vit_tiny_patch16_224', model_args=dict(patch_size=patch, qkv_bias=True, **shape))
    if name == 'convstem_vit':
        return dict(model_args=dict(base.model_args, refine_blocks=[False] * shape['depth'], attn_handover=False))
    raise ValueError(f'unknown ablation arm {name!r}; choose from {MODELS}')


def run_ablation(data: Optional[str] = None, fractions: Sequence[float] = (0.05, 0.1, 0.25, 1.0),
                 seeds: Sequence[int] = (0, 1, 2), out: str = 'runs/ablate', models: Sequence[str] = ('refiner', 'vit'),
                 config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                 progress: bool = True) -> Dict[str, Any]:
    """Train every (model, fraction, seed) run that has not finished yet; write ablation.json,
    ablation.md (the table) and ablation.png (top-1 against the training fraction)."""
    recipe_name = config or ('default' if data in (None, 'digits') else None)
    recipe = load_recipe(recipe_name) if recipe_name else {}
    base = apply_overrides(recipe, {**(overrides or {}), 'data': data or recipe.get('data')})
    full = build_datasets(base.data).num_train
    root = Path(out)
    results: Dict[str, Dict[str, List[float]]] = {m: {} for m in models}
    info: Dict[str, Any] = {}
    for model in models:
        arm = _arm(model, base)
        for fraction in fractions:
            n_train = build_datasets(base.data, fraction, 0).num_train
            batch = base.batch_size if n_train >= base.batch_size else max(2, (n_train // 2) * 2)
            # the same number of training images as the full run: epochs scale with 1/fraction
            epochs = max(1, round(base.epochs * (full // base.batch_size) * base.batch_size
                                  / ((n_train // batch) * batch)))
            for seed in seeds:
                name = f'{model}-f{fraction:g}-s{seed}'
                files = RunFiles(root / name)
                if not files.summary.is_file():
                    cfg = apply_overrides(base.to_dict(), dict(
                        arm, train_fraction=fraction, seed=seed, batch_size=batch, epochs=epochs,
                        warmup_epochs=base.warmup_epochs * epochs / base.epochs, eval_every=epochs,
                        checkpoint_epochs=max(1, epochs // 20), out=None))
                    if progress:
                        print(f'--- {name}: {n_train} training images, batch {batch}, {epochs} epochs', flush=True)
                    if files.state.is_file():
                        train(cfg, resume=str(files.root), progress=progress)
                    else:
                        train(cfg, out=str(files.root), progress=progress)
                summary = json.loads(files.summary.read_text())
                results[model].setdefault(f'{fraction:g}', []).append(summary['top1'])
                info.setdefault(model, dict(params=summary['params'], model=summary['model']))
                info[model].setdefault('train_images', {})[f'{fraction:g}'] = summary['num_train']
    table = _table(results, fractions, info)
    report = {'data': base.data or 'digits', 'fractions': list(fractions), 'seeds': list(seeds), 'models': info,
              'top1': results, 'table': table}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / 'ablation.json', json.dumps(report, indent=2) + '\n')
    atomic_write_text(root / 'ablation.md', table + '\n')
    plot_ablation(results, fractions, info, root / 'ablation.png', base.data or 'digits')
    return report


def _mean_std(values: List[float]) -> str:
    arr = np.array(values)
    return f'{arr.mean():.2f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.2f}'


def _table(results: Dict[str, Dict[str, List[float]]], fractions: Sequence[float], info: Dict[str, Any]) -> str:
    header = '| model | params | ' + ' | '.join(f'{f:g} of train' for f in fractions) + ' |'
    lines = [header, '|' + ' --- |' * (len(fractions) + 2)]
    for model, by_fraction in results.items():
        cells = [_mean_std(by_fraction[f'{f:g}']) for f in fractions]
        lines.append(f'| {model} ({info[model]["model"]}) | {info[model]["params"] / 1e6:.2f}M | ' + ' | '.join(cells)
                     + ' |')
    return '\n'.join(lines)


def plot_ablation(results: Dict[str, Dict[str, List[float]]], fractions: Sequence[float], info: Dict[str, Any],
                  path: Path, data: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model, by_fraction in results.items():
        xs = [info[model]['train_images'][f'{f:g}'] for f in fractions]
        vals = [np.array(by_fraction[f'{f:g}']) for f in fractions]
        mean = np.array([v.mean() for v in vals])
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
        ax.plot(xs, mean, marker='o', label=f'{model} ({info[model]["params"] / 1e6:.2f}M params)')
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xscale('log')
    ax.set_xlabel('training images (log scale)')
    ax.set_ylabel('held-out top-1 (%), mean ± std over seeds')
    n_seeds = len(next(iter(next(iter(results.values())).values())))
    ax.set_title(f'Data efficiency on {data}: same recipe, same images seen, {n_seeds} seeds')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right')
    lo = min(min(min(v) for v in r.values()) for r in results.values())
    ax.set_ylim(max(0.0, math.floor(lo / 5) * 5 - 5), 100.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
