"""``refiner export``: ONNX (dynamic batch, and dynamic height and width where the model takes any input
size, checked with onnxruntime), TorchScript files, and timm /
Hugging Face Hub model folders (checked through ``timm.create_model('local-dir:...')``)."""
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import timm
import torch

from .errors import RefinerError

__all__ = ['export_onnx', 'export_torchscript', 'export_hf', 'check_onnx', 'check_torchscript', 'check_hf',
           'ExportError', 'input_stride', 'onnx_input_shape', 'export_and_check', 'TOLERANCES']


class ExportError(RefinerError, RuntimeError):
    """An export that failed or whose outputs differ from PyTorch's."""


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _compare(loaded, model: torch.nn.Module, img_size: int, batches: Sequence[int], in_chans: int) -> Dict[int, float]:
    """A re-loaded model against the original on random batches: max |diff| / max |output| per batch size."""
    errs = {}
    for b in batches:
        x = torch.randn(b, in_chans, img_size, img_size)
        with torch.no_grad():
            errs[b] = _rel_err(loaded(x), model(x))
    return errs


def prepare(model: torch.nn.Module, reparameterize: bool = True) -> torch.nn.Module:
    """Eval mode, and re-parameterized (BatchNorms and scales folded) unless ``reparameterize`` is False."""
    model = model.eval()
    return timm.utils.reparameterize_model(model) if reparameterize else model


def input_stride(model: torch.nn.Module) -> Optional[int]:
    """The multiple of which a model takes any input height and width (Refiner-ViT, which resamples its
    position embeddings, in the raster layout; a timm ViT built with ``dynamic_img_size=True``); None: a
    fixed input size (the spatial layouts' convolutions over the token grid export for one grid)."""
    from .layers import DistributedLocalAttention
    from .models.refiner_vit import RefinerViT
    pe = getattr(model, 'patch_embed', None)
    patch = getattr(pe, 'patch_size', None)
    dynamic = getattr(model, 'dynamic_img_size', False) or getattr(pe, 'dynamic_img_size', False)  # timm: the model's
    if patch is None or not (isinstance(model, RefinerViT) or dynamic):
        return None
    if any(isinstance(m, DistributedLocalAttention) and m.refine_layout != 'raster' for m in model.modules()):
        return None
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def export_onnx(model: torch.nn.Module, path: str, img_size: int, opset: int = 18, in_chans: int = 3) -> Path:
    """Export with a dynamic batch dimension, and dynamic height and width (multiples of
    :func:`input_stride`) where the model takes any input size (torch.export-based exporter, opset >= 17).
    :func:`onnx_input_shape` tells which dimensions the file left dynamic."""
    if opset < 17:
        raise ExportError(f'opset {opset}: LayerNorm needs opset 17 or later')
    x = torch.randn(2, in_chans, img_size, img_size)
    dims: Dict[int, Any] = {0: torch.export.Dim('batch', min=1, max=4096)}
    stride = input_stride(model)
    if stride and img_size % stride == 0:
        dims[2] = stride * torch.export.Dim('height', min=1, max=1024)
        dims[3] = stride * torch.export.Dim('width', min=1, max=1024)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, dynamic_shapes={'x': dims},
                                    input_names=['images'], output_names=['logits'], verbose=False)
        program.save(str(out))
    except Exception as e:  # the exporter's own errors are long; keep the first line
        raise ExportError(f'ONNX export failed: {str(e).strip().splitlines()[0]}') from e
    return out


def onnx_input_shape(path: str) -> Tuple[Union[int, str], ...]:
    """The input shape an ONNX file declares: an int per fixed dimension, a name per dynamic one."""
    import onnx
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField('dim_value') else d.dim_param for d in dims)


def check_onnx(path: str, model: torch.nn.Module, img_size: int, batches: Sequence[int] = (1, 3),
               in_chans: int = 3) -> Dict[Union[int, str], float]:
    """onnxruntime vs PyTorch, max |diff| / max |output| per batch size; for a file with dynamic height
    and width, also at twice the size and at a non-square size (batch 1, keys '64x64', '32x48')."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    shapes: Dict[Union[int, str], Tuple[int, ...]] = {b: (b, in_chans, img_size, img_size) for b in batches}
    stride = input_stride(model)
    if stride and not isinstance(onnx_input_shape(path)[2], int):
        shapes[f'{2 * img_size}x{2 * img_size}'] = (1, in_chans, 2 * img_size, 2 * img_size)
        shapes[f'{img_size}x{img_size + stride}'] = (1, in_chans, img_size, img_size + stride)
    errs: Dict[Union[int, str], float] = {}
    for key, shape in shapes.items():
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        errs[key] = _rel_err(torch.from_numpy(sess.run(None, {name: x.numpy()})[0]), ref)
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
    return _compare(loaded, model, img_size, batches, in_chans)


def load_for_export(model_name: Optional[str], checkpoint: Optional[str], img_size: Optional[int],
                    model_args: Optional[dict] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model to export and its info (``data_config``, ``classes``, ``model_name``, ``model_args``):
    from a checkpoint (any source :func:`refiner.pretrained.load_model` reads) or by name (random weights),
    through :func:`refiner.pretrained.load_or_create`."""
    from .pretrained import load_or_create
    if not checkpoint and not model_name:
        raise ExportError('give --model NAME or --checkpoint PATH')
    return load_or_create(model_name, checkpoint or None, img_size, model_args)


def _class_count_once(config_path: Path) -> None:
    """Keep the class count in config.json's own ``num_classes`` only: timm's ``save_for_hf`` repeats
    it in ``model_args``, and Hugging Face transformers' timm wrapper, which passes ``num_classes``
    and ``model_args`` to ``timm.create_model`` side by side, then fails with 'got multiple values
    for keyword argument'. timm takes the count from the config's ``num_classes`` either way."""
    import json
    cfg = json.loads(config_path.read_text())
    if cfg.get('model_args', {}).pop('num_classes', cfg.get('num_classes')) != cfg.get('num_classes'):
        raise ExportError('config.json: model_args.num_classes disagrees with num_classes')
    config_path.write_text(json.dumps(cfg, indent=2))  # as timm writes it


def export_hf(model: torch.nn.Module, out_dir: str, info: Dict[str, Any]) -> Path:
    """A timm / Hugging Face Hub model folder (timm's ``save_for_hf``: config.json and
    model.safetensors) that ``timm.create_model('local-dir:OUT_DIR')`` and Hugging Face transformers'
    ``AutoModelForImageClassification.from_pretrained(OUT_DIR)`` / ``pipeline('image-classification')``
    load after ``import refiner`` (both build the model by name through timm's registry); its
    ``label_names`` are the classes, when ``info`` has them.

    The folder is written beside the target and renamed into place, so a failure leaves no partial folder;
    what an export killed outright (SIGKILL) left there is removed by the next export to the same folder.
    """
    import shutil

    from timm.models import save_for_hf

    from .fileio import apply_umask, held_temp_dir, remove_abandoned_temp_dirs
    from .pretrained import DATA_CONFIG_KEYS

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f'{out} already exists and is not an empty folder; choose another OUT_DIR')
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in info['data_config'].items()
                   if k in DATA_CONFIG_KEYS}
    model_config: Dict[str, Any] = {}
    if info.get('classes'):
        model_config['label_names'] = list(info['classes'])
    args = {k: v for k, v in (info.get('model_args') or {}).items()  # what rebuilds it, not how it trained
            if k != 'pretrained_cfg' and not (k.startswith('drop') or k.endswith('drop_rate'))}
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temp_dirs(out.parent, out.name)  # what an export killed midway left
    with held_temp_dir(out.parent, out.name) as tmp:
        try:
            save_for_hf(model, str(tmp), model_config=model_config, model_args=args, safe_serialization=True,
                        data_config=data_config)
            _class_count_once(tmp / 'config.json')
            apply_umask(tmp)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (ValueError, TypeError, AssertionError)):
                raise ExportError(f'cannot write a model folder: {str(e).splitlines()[0]}') from None
            raise
    return out


def check_hf(out_dir: str, model: torch.nn.Module, img_size: int, batches: Sequence[int] = (1, 3),
             in_chans: int = 3) -> Dict[int, float]:
    """``timm.create_model('local-dir:...')`` against the model, max |diff| / max |output| per batch size."""
    loaded = timm.create_model(f'local-dir:{Path(out_dir).resolve()}', pretrained=True).eval()
    return _compare(loaded, model, img_size, batches, in_chans)


TOLERANCES = {'onnx': 1e-4, 'torchscript': 1e-5, 'hf': 1e-5}  # max relative difference an export may show


def export_and_check(model: torch.nn.Module, info: Dict[str, Any], out: str, fmt: str,
                     reparameterize: bool = True, opset: int = 18) -> Dict[str, Any]:
    """Export ``model`` (with ``info`` as :func:`load_for_export` gives it) to ``out`` in ``fmt`` ('onnx',
    'torchscript' or 'hf') and check the file against the model. A Hub folder keeps the weights as trained
    (to fine-tune or re-parameterize later) and is removed again when it does not reload as the model;
    the files re-parameterize first unless ``reparameterize`` is False. Returns the path, the relative
    differences (per batch size, and per input size for a dynamic ONNX file), the tolerance, what was
    compared with, the input size and, for ONNX, the multiple of which any height and width is taken
    (None: fixed)."""
    size = info['data_config']['input_size'][-1]
    if fmt == 'hf':
        path = export_hf(model.eval(), out, info)
        errs, what = check_hf(path, model, size), "timm.create_model('local-dir:...')"
        if max(errs.values()) > TOLERANCES[fmt]:
            import shutil
            shutil.rmtree(path)  # never leave a folder that does not reload as the model
    elif fmt == 'onnx':
        model = prepare(model, reparameterize=reparameterize)
        path = export_onnx(model, out, size, opset=opset)
        errs, what = check_onnx(path, model, size), 'PyTorch'
    elif fmt == 'torchscript':
        model = prepare(model, reparameterize=reparameterize)
        path = export_torchscript(model, out)
        errs, what = check_torchscript(path, model, size), 'PyTorch'
    else:
        raise ExportError(f"format {fmt!r}: expected 'onnx', 'torchscript' or 'hf'")
    stride = None
    if fmt == 'onnx' and not isinstance(onnx_input_shape(path)[2], int):
        stride = input_stride(model)
    return {'path': path, 'errors': errs, 'tolerance': TOLERANCES[fmt], 'compared_with': what, 'img_size': size,
            'any_multiple_of': stride}
