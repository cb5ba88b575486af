"""``refiner export``: ONNX (dynamic batch, checked with onnxruntime) and TorchScript files."""
from pathlib import Path
from typing import Dict, Optional, Sequence

import timm
import torch

__all__ = ['export_onnx', 'export_torchscript', 'check_onnx', 'check_torchscript', 'ExportError']


class ExportError(RuntimeError):
    """An export that failed or whose outputs differ from PyTorch's."""


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def prepare(model: torch.nn.Module, fuse: bool = True) -> torch.nn.Module:
    """Eval mode, and re-parameterized (BatchNorms and scales folded) unless ``fuse`` is False."""
    model = model.eval()
    return timm.utils.reparameterize_model(model) if fuse else model


def export_onnx(model: torch.nn.Module, path: str, img_size: int, opset: int = 18, in_chans: int = 3) -> Path:
    """Export with a dynamic batch dimension (torch.export-based exporter, opset >= 17)."""
    if opset < 17:
        raise ExportError(f'opset {opset}: LayerNorm needs opset 17 or later')
    x = torch.randn(2, in_chans, img_size, img_size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, dynamic_shapes={'x': {0: batch}},
                                    input_names=['images'], output_names=['logits'], verbose=False)
        program.save(str(out))
    except Exception as e:  # the exporter's own errors are long; keep the first line
        raise ExportError(f'ONNX export failed: {str(e).strip().splitlines()[0]}') from e
    return out


def check_onnx(path: str, model: torch.nn.Module, img_size: int, batches: Sequence[int] = (1, 3),
               in_chans: int = 3) -> Dict[int, float]:
    """onnxruntime vs PyTorch, max |diff| / max |output| per batch size."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    errs = {}
    for b in batches:
        x = torch.randn(b, in_chans, img_size, img_size)
        with torch.no_grad():
            ref = model(x)
        errs[b] = _rel_err(torch.from_numpy(sess.run(None, {name: x.numpy()})[0]), ref)
    return errs


def export_torchscript(model: torch.nn.Module, path: str) -> Path:
    with timm.layers.set_scriptable(True):
        try:
            scripted = torch.jit.script(model)
        except Exception as e:
            raise ExportError(f'TorchScript export failed: {str(e).strip().splitlines()[0]}') from e
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out))
    return out


def check_torchscript(path: str, model: torch.nn.Module, img_size: int, batches: Sequence[int] = (1, 3),
                      in_chans: int = 3) -> Dict[int, float]:
    loaded = torch.jit.load(str(path))
    errs = {}
    for b in batches:
        x = torch.randn(b, in_chans, img_size, img_size)
        with torch.no_grad():
            errs[b] = _rel_err(loaded(x), model(x))
    return errs


def load_for_export(model_name: Optional[str], checkpoint: Optional[str], img_size: Optional[int],
                    model_args: Optional[dict] = None) -> tuple:
    """The model to export and its input size: from a checkpoint (run, weights, original) or by name."""
    if checkpoint:
        from .checkpoint import load_model
        model, info = load_model(checkpoint)
        size = img_size or (info.get('data_config') or {}).get('input_size', [3, None, None])[-1]
        if size is None:
            size = model.grid_size[0] * model.patch_embed.patch_size if hasattr(model, 'grid_size') else 224
        return model, size
    if not model_name:
        raise ExportError('give --model NAME or --checkpoint PATH')
    if not timm.is_model(model_name):
        raise ExportError(f'--model {model_name}: not a timm model name')
    kwargs = dict(model_args or {})
    if img_size:
        kwargs['img_size'] = img_size
    model = timm.create_model(model_name, **kwargs)
    size = img_size or model.pretrained_cfg['input_size'][-1]
    return model, size
