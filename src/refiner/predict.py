"""``refiner predict``: classify image files and folders with any weight source.

Preprocessing is the model's own eval transform (what its run used, else its pretrained config);
class names come from the source (a run's class folders, a Hub folder's label names), else
ImageNet's for a 1000-class model (timm's ``ImageNetInfo``, no download), else class indices.
A file that cannot be read as an image is skipped and named, never fatal; files in folders without an
image extension are ignored and named too. Nothing classified is an error (``refiner predict`` exits 1).
"""
import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data import IMG_EXTENSIONS, DataError, eval_transform, load_rgb
from .devices import model_dtype, resolve_device, resolve_model_dtype
from .fileio import atomic_write, atomic_write_text
from .pretrained import load_model

__all__ = ['find_images', 'predict', 'class_names', 'write_predictions']


def find_images(inputs: Sequence[str], ignored: Optional[List[str]] = None) -> List[str]:
    """Image files among ``inputs``, folders searched recursively (sorted, hidden files skipped); the
    other files found in folders (no image extension) are appended to ``ignored`` where given."""
    found: List[str] = []
    others: List[str] = []
    seen = set()  # real folders walked, so that a symlink loop ends
    for item in inputs:
        if not str(item).strip():  # an unset shell variable: not the current folder, searched whole
            raise DataError("an empty input path: give image files or folders ('.' for the current folder)")
        path = Path(item).expanduser()
        if path.is_dir():
            for dirpath, dirnames, files in os.walk(path, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
                for f in sorted(f for f in files if not f.startswith('.')):
                    (found if f.lower().endswith(IMG_EXTENSIONS) else others).append(os.path.join(dirpath, f))
        elif path.is_file():
            found.append(str(path))  # named explicitly: tried whatever its extension
        else:
            raise DataError(f'{item}: no such file or folder')
    if ignored is not None:
        ignored += others
    if not found:
        also = f'; {_named(others)} ignored' if others else ''
        raise DataError(f'no image files ({", ".join(IMG_EXTENSIONS)}) in {", ".join(inputs)}{also}')
    return found


def _named(files: Sequence[str], limit: int = 5) -> str:
    """'3 non-image file(s) (a.txt, b.csv, c)', at most ``limit`` of them named."""
    names = ', '.join(files[:limit]) + (f', ... {len(files) - limit} more' if len(files) > limit else '')
    return f'{len(files)} non-image file(s) ({names})'


def class_names(num_classes: int, classes: Optional[Sequence[str]]) -> List[str]:
    """The source's class names; ImageNet-1k's for 1000 classes (also in place of WordNet ids,
    as timm's Hub configs give them); else the indices."""
    synsets = bool(classes) and all(re.fullmatch(r'n\d{8}', str(c)) for c in classes)
    if classes and len(classes) == num_classes and not (synsets and num_classes == 1000):
        return [str(c) for c in classes]
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [str(i) for i in range(num_classes)]


class _Files(Dataset):
    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int]:
        try:
            return self.transform(load_rgb(self.paths[index])), index
        except Exception:  # not an image, truncated, unreadable: counted, not fatal
            return None, index


def _collate(batch):
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


@torch.no_grad()
def predict(inputs: Sequence[str], checkpoint: str, topk: int = 5, batch_size: int = 32, device: str = 'auto',
            model_name: Optional[str] = None, workers: int = 0, progress: bool = True, ema: bool = False,
            dtype: Optional[str] = None) -> Dict[str, Any]:
    """Top-k classes for every readable image under ``inputs``, the weights cast to ``dtype``
    ('float32', 'float16', 'bfloat16': timm's ``--model-dtype``; default: as stored).

    Returns ``predictions`` (one dict per image: file, top-k labels, indices and probabilities),
    ``skipped`` (unreadable files), ``ignored`` (files in the folders without an image extension),
    ``classes`` and the ``data_config`` used.
    """
    if topk < 1:
        raise DataError(f'--topk must be at least 1, got {topk}')
    dev = resolve_device(device)
    model, info = load_model(checkpoint, model_name=model_name, ema=ema, device=dev, dtype=resolve_model_dtype(dtype))
    num_classes = getattr(model, 'num_classes', 0)
    if not num_classes:
        raise DataError(f'{checkpoint} has no classifier head (num_classes 0): nothing to predict')
    names = class_names(num_classes, info['classes'])
    ignored: List[str] = []
    paths = find_images(inputs, ignored)
    loader = DataLoader(_Files(paths, eval_transform(info['data_config'])), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    k = min(topk, num_classes)
    dtype_in = model_dtype(model)  # the inputs' dtype: the model's, as --model-dtype cast it
    predictions: List[Dict[str, Any]] = []
    skipped: List[str] = []
    for images, index, bad in tqdm(loader, desc='predict', unit='batch', disable=not progress):
        skipped += [paths[i] for i in bad]
        if images is None:
            continue
        probs = model(images.to(dev, dtype_in)).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        for i, p, c in zip(index, top.values.tolist(), top.indices.tolist()):
            predictions.append({'file': paths[i], 'labels': [names[j] for j in c], 'indices': c, 'probs': p})
    return {'checkpoint': str(checkpoint), 'model': info['model_name'], 'data_config': info['data_config'],
            'classes': names, 'predictions': predictions, 'skipped': skipped, 'ignored': ignored}


def write_predictions(result: Dict[str, Any], json_path: Optional[str] = None, csv_path: Optional[str] = None) -> None:
    """The predictions as JSON (everything) and/or CSV (one row per image: file, then label and
    probability for each rank), written atomically."""
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=2) + '\n')
    if csv_path:
        k = max((len(p['labels']) for p in result['predictions']), default=1)

        def write(tmp: str) -> None:
            with open(tmp, 'w', newline='') as f:
                w = csv.writer(f)
                w.writerow(['file'] + [f'{what}{r}' for r in range(1, k + 1) for what in ('label', 'prob')])
                for p in result['predictions']:
                    w.writerow([p['file']] + [v for pair in zip(p['labels'], p['probs']) for v in
                                              (pair[0], f'{pair[1]:.6f}')])
        atomic_write(csv_path, write)


def format_predictions(result: Dict[str, Any], limit: int = 20) -> str:
    lines = []
    for p in result['predictions'][:limit]:
        top = ', '.join(f'{label} {prob:.1%}' for label, prob in zip(p['labels'], p['probs']))
        lines.append(f'{p["file"]}: {top}')
    if len(result['predictions']) > limit:
        lines.append(f'... {len(result["predictions"]) - limit} more')
    lines += [f'skipped {path}: not a readable image' for path in result['skipped']]
    n, bad, ignored = len(result['predictions']), len(result['skipped']), result.get('ignored') or []
    lines.append(f'{n} image(s) classified with {result["model"]}' + (f'; {bad} unreadable file(s) skipped'
                                                                    if bad else '')
                 + (f'; {_named(ignored)} ignored' if ignored else ''))
    return '\n'.join(lines)
