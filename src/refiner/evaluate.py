"""Evaluation: accuracy, per-class accuracy and the confusion matrix of a model on a loader (used by
training too), and ``refiner eval`` of any weight source on a dataset."""
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import (
    DataError,
    EpochSampler,
    SeededTransformDataset,
    SkipLog,
    build_datasets,
    collate_skipping,
    eval_transform,
)
from .data_specs import dataset_key
from .devices import all_reduce, model_dtype, resolve_device, resolve_model_dtype
from .fileio import atomic_write_text
from .pretrained import load_model

__all__ = ['evaluate', 'evaluate_checkpoint', 'plot_confusion']


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, amp: str = 'none',
             skips: Optional[SkipLog] = None, progress: bool = False) -> Dict[str, Any]:
    """Loss, top-1/top-5 (percent), per-class accuracy and the confusion matrix; summed over ranks."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = torch.zeros((), dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp == 'bf16' else nullcontext()
    dtype = model_dtype(model)  # a model cast with --model-dtype takes its inputs in its dtype
    for images, targets, skipped in tqdm(loader, desc='eval', leave=False, disable=not progress):
        if skips is not None:
            skips.add(skipped)
        if images is None:
            continue
        images, targets = images.to(device, dtype), targets.to(device)
        with ctx:
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, targets, reduction='sum').double().cpu()
        pred = logits.argmax(-1)
        confusion += torch.bincount(targets.cpu() * num_classes + pred.cpu(), minlength=num_classes ** 2).view(
            num_classes, num_classes)
        k = min(5, num_classes)
        top5 += (logits.topk(k, dim=-1).indices == targets[:, None]).any(-1).sum().cpu()
    for t in (confusion, top5, loss_sum):
        all_reduce(t)
    n = int(confusion.sum())
    if n == 0:
        raise DataError('no evaluation image could be read')
    per_class = (confusion.diag().double() / confusion.sum(1).clamp_min(1).double() * 100).tolist()
    return {'top1': float(confusion.diag().sum()) / n * 100, 'top5': float(top5) / n * 100,
            'loss': float(loss_sum) / n, 'n': n, 'per_class': per_class, 'confusion': confusion.tolist()}


def evaluate_checkpoint(checkpoint: str, data: Optional[str] = None, split: str = 'val', ema: bool = False,
                        batch_size: int = 64, device: str = 'auto', workers: int = 0,
                        progress: bool = True, model_name: Optional[str] = None,
                        dtype: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` (any source :func:`refiner.pretrained.load_model` reads) on ``data``
    (default: the run's dataset and classes, else the embedded digits), with the weights cast to
    ``dtype`` ('float32', 'float16', 'bfloat16': timm's ``--model-dtype``). Returns metrics and classes."""
    dev = resolve_device(device)
    model, info = load_model(checkpoint, model_name=model_name, ema=ema, device=dev, dtype=resolve_model_dtype(dtype))
    run_cfg = info.get('config') or {}
    if data is None:
        data = run_cfg.get('data')
        if data is None and run_cfg == {} and info['classes'] is None:
            raise DataError(f'{checkpoint} does not say which dataset it was trained on: give --data DIR')
    fraction = 1.0  # evaluation always uses the whole split
    # the classes the model was trained on, where its dataset is the one evaluated
    same_data = dataset_key(data) == dataset_key(run_cfg.get('data') if run_cfg else None)
    trained_on = (run_cfg.get('classes') or info['classes']) if same_data else None
    datasets = build_datasets(data, fraction, classes=trained_on)
    num_classes = getattr(model, 'num_classes', None)
    classes = datasets.classes
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f'the model has {num_classes} classes but {data or "digits"} has {len(classes)}')
    if info.get('classes') and list(info['classes']) != list(classes):
        raise DataError(f'the model was trained on classes {info["classes"][:5]}..., the dataset has {classes[:5]}...')
    tf = eval_transform(info['data_config'])
    base = datasets.val if split == 'val' else datasets.train
    ds = SeededTransformDataset(base, tf)
    if len(ds) == 0:
        raise DataError(f'the {split} split is empty')
    sampler = EpochSampler(len(ds), batch_size, shuffle=False, drop_last=False)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skipping)
    skips = SkipLog()
    res = evaluate(model, loader, dev, len(classes), skips=skips, progress=progress)
    res.update(classes=classes, checkpoint=str(checkpoint), data=data or 'digits', split=split,
               model_dtype=str(model_dtype(model)).replace('torch.', ''),
               skipped_files=len(skips), skipped_paths=sorted(skips.paths)[:100])
    return res


def plot_confusion(confusion: Sequence[Sequence[int]], classes: List[str], path: str, title: str = '') -> Path:
    """A row-normalised confusion matrix (true class × predicted class) as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cm = torch.tensor(confusion, dtype=torch.float64)
    rates = (cm / cm.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(classes)
    size = min(4 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j] > 0:
                    ax.text(j, i, int(cm[i, j]), ha='center', va='center', fontsize=8,
                            color='white' if rates[i, j] > 0.5 else 'black')
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    ax.set_title(title or 'confusion matrix (counts; colour: share of the true class)')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='share of true class')
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_report(res: Dict[str, Any]) -> str:
    lines = [f'{res["checkpoint"]} on {res["data"]} ({res["split"]}, {res["n"]} images, {res["model_dtype"]}): '
             f'top-1 {res["top1"]:.2f}%, top-5 {res["top5"]:.2f}%, loss {res["loss"]:.4f}']
    if res['skipped_files']:
        lines.append(f'{res["skipped_files"]} unreadable file(s) skipped')
    lines.append('per-class top-1:')
    width = max(len(c) for c in res['classes'])
    for c, acc, row in zip(res['classes'], res['per_class'], res['confusion']):
        lines.append(f'  {c:>{width}}  {acc:6.2f}%  ({sum(row)} images)')
    return '\n'.join(lines)


def save_json(res: Dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(res, indent=2) + '\n')  # an interrupted write leaves the old file whole
