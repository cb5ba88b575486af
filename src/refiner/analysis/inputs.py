"""What an analysis runs on: models (loaded through :mod:`refiner.pretrained`), the held-out images, JSON out.

- :func:`load_analysis_model` / :func:`load_models`: a model by name or from any checkpoint, through
  :func:`refiner.pretrained.load_or_create` (the loader export uses too), labelled for reports;
- :func:`parse_model_args`, :func:`parse_compare`, :func:`parse_query`: the text forms of ``--model-args``,
  ``--compare`` and ``--query``;
- :func:`held_out_split`, :func:`subset_batches`, :func:`image_loader`: an evenly spaced subset of a
  dataset's held-out split, in nearly equal batches, preprocessed as each model expects;
- :func:`write_json`: results with NaN as null, written atomically.
"""
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
from .features import AnalysisError

__all__ = [
    'UnknownModelError', 'QueryError', 'BlockIndexError', 'LoadedModel', 'load_analysis_model', 'load_models',
    'parse_model_args', 'parse_compare', 'parse_query', 'analysis_data', 'held_out_split', 'subset_batches',
    'image_loader', 'check_counts', 'write_json', 'slug',
]


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
    import refiner  # noqa: F401  (registers refiner_vit_*)

    from ..pretrained import ModelError, check_model_name, load_or_create, read_source

    if img_size is not None and img_size < 1:
        raise AnalysisError(f'--img-size must be a positive number of pixels, got {img_size}')
    model_args = dict(model_args or {})
    if checkpoint:
        if model_args:
            raise AnalysisError('--model-args only applies to a model created by name; '
                                'a checkpoint fixes the architecture')
        source = read_source(checkpoint)
        # NAME names a bare weights file's model; for a source that names its own it is only a label
        model, info = load_or_create(name if source.model_name is None else None, source, img_size)
        label = label or name or str(info.get('model_name') or Path(checkpoint).stem)
        where, extra = f'checkpoint {checkpoint}', {'classes': info.get('classes')}
        if info.get('config'):  # a run's checkpoint says what it was trained on (data None: the digits)
            extra['trained_on'] = info['config'].get('data') or 'digits'
    else:
        if not name:
            raise AnalysisError('give --model NAME (a timm model name) or --checkpoint PATH')
        try:
            check_model_name(name)
        except ModelError as e:
            raise UnknownModelError(str(e)) from None
        model, info = load_or_create(name, None, img_size, model_args, pretrained)
        label = label or name
        where, extra = 'pretrained weights' if pretrained else 'random initialisation (no checkpoint)', {}
    return LoadedModel(label, model.to(device).eval(), info['data_config'], where, extra)


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


def load_models(model: Optional[str], checkpoint: Optional[str], img_size: Optional[int] = None,
                model_args: Optional[Dict[str, Any]] = None, compare: Sequence[str] = (), pretrained: bool = False,
                device: Union[str, torch.device] = 'cpu') -> List[LoadedModel]:
    """The model under study and those in ``compare`` (:func:`parse_compare` specs), with unique labels."""
    if not model and not checkpoint:
        raise AnalysisError('give --model NAME (a timm model name) or --checkpoint PATH')
    models = [load_analysis_model(model, checkpoint, img_size, model_args, pretrained, device)]
    for spec in compare:
        name, ckpt, kwargs = parse_compare(spec)
        models.append(load_analysis_model(name or None, ckpt, img_size, kwargs, pretrained, device))
    seen: Dict[str, int] = {}
    for m in models:  # unique labels: they name JSON entries and files
        if m.label in seen:
            seen[m.label] += 1
            m.label = f'{m.label}#{seen[m.label]}'
        else:
            seen[m.label] = 1
    return models


def parse_query(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``--query ROW,COL`` -> (row, col); ``cls`` -> (-1, -1) for the class token; None -> None."""
    if text is None:
        return None
    t = text.strip().lower()
    if t in ('cls', 'class'):
        return (-1, -1)
    m = re.fullmatch(r'\(?\s*(\d+)\s*[,x ]\s*(\d+)\s*\)?', t)  # no sign: -1,-1 is not the class token
    if not m:
        raise QueryError(f"--query must be ROW,COL in token-grid coordinates (e.g. 2,3) or 'cls', got {text!r}")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------------------------ data

def subset_batches(n: int, max_images: Optional[int], batch_size: int) -> List[List[int]]:
    """Evenly spaced indices over a split of n images (folder datasets are sorted by class), in nearly
    equal batches of at most batch_size (no tiny last batch)."""
    if max_images is None or max_images >= n:
        indices = list(range(n))
    else:
        indices = sorted(set(np.linspace(0, n - 1, max_images).round().astype(int).tolist()))
    k = max(1, math.ceil(len(indices) / batch_size))
    return [list(map(int, b)) for b in np.array_split(np.asarray(indices), k) if len(b)]


def analysis_data(models: Sequence[LoadedModel], data: Optional[str]) -> Tuple[Optional[str], List[str]]:
    """The dataset whose held-out split is analysed, and notes to print: ``--data`` if given, else the
    one the checkpoints were trained on (as ``refiner eval`` does), else the embedded digits. Checkpoints
    trained on different datasets need ``--data``; a model analysed on other data than its own is noted."""
    from ..data_specs import dataset_key
    trained = {m.label: m.extra['trained_on'] for m in models if m.extra.get('trained_on')}
    if data is None:
        if len({dataset_key(d) for d in trained.values()}) > 1:
            listed = ', '.join(f'{label} on {d}' for label, d in trained.items())
            raise AnalysisError(f'the checkpoints were trained on different datasets ({listed}): give --data')
        data = next(iter(trained.values()), None)
    notes = [f'note: {label} was trained on {d}, analysed on {data or "digits"}'
             for label, d in trained.items() if dataset_key(d) != dataset_key(data)]
    return data, notes


def held_out_split(data: Optional[str]) -> Tuple[Dataset, str]:
    """A dataset's held-out split and its description (default: the embedded digits)."""
    from ..data import DataError, build_datasets
    ds = build_datasets(data)
    if len(ds.val) == 0:
        raise DataError(f'the held-out split of {data or "digits"} is empty')
    return ds.val, ds.description


def image_loader(base: Dataset, dc: Dict[str, Any], batches: List[List[int]]) -> DataLoader:
    """The batches of ``base``, preprocessed by the data config ``dc``; unreadable files are skipped."""
    from ..data import SeededTransformDataset, collate_skipping
    tf = eval_transform(dc)
    return DataLoader(SeededTransformDataset(base, tf), batch_sampler=batches, collate_fn=collate_skipping)


def check_counts(max_images: Optional[int], batch_size: int, minimum: int) -> None:
    if batch_size < minimum:
        raise AnalysisError(f'--batch-size must be at least {minimum}, got {batch_size}')
    if max_images is not None and max_images < minimum:
        raise AnalysisError(f'--max-images must be at least {minimum}, got {max_images}')


# ------------------------------------------------------------------------------------------ output

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


def write_json(path: Path, obj: Any) -> Path:
    from ..fileio import atomic_write_text
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + '\n')


def slug(label: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_') or 'model'
