"""The authors' original Refiner-ViT checkpoints: read them safely, infer the architecture from
tensor shapes, convert them to this project's layout, and write safetensors weights.

Their checkpoints (a timm-0.4-era training script) hold a bare state dict or one nested under
``state_dict`` / ``state_dict_ema`` / ``model``, maybe with DDP's ``module.`` prefix, and nothing
that says which variant or resolution they are. Conversion renames the refinement modules and
folds the original's constant factor 2 on both residual branches into ``attn.proj`` and the MLP's
layer scale (exact: a power of two), so that the converted model's outputs equal the original's.
"""
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import RefinerError
from .fileio import atomic_write
from .models.official_keys import is_official_state_dict, official_to_refiner
from .models.refiner_vit import RefinerViT
from .models.variants import ARCHITECTURES, RELEASED

__all__ = [
    'CheckpointError', 'check_state_dict', 'convert_checkpoint', 'infer_official_config', 'is_official_state_dict',
    'load_official', 'official_to_refiner', 'read_checkpoint',
]

StateDict = Dict[str, torch.Tensor]

# (embed_dim, depth, num_heads) -> registered name, for the shapes the authors released
_VARIANTS = {(a['embed_dim'], a['depth'], a['num_heads']): name
             for name, a in ARCHITECTURES.items() if name in RELEASED}


class CheckpointError(RefinerError, ValueError):
    """A file or state dict that is not a usable Refiner checkpoint."""


def load_tensors_file(path: Path) -> Any:
    """torch.load(weights_only=True) or safetensors, with one sentence of ours for each way a file
    can fail to be a checkpoint (the libraries' own messages run to many lines)."""
    with open(path, 'rb') as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f'{path} is empty, not a checkpoint')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception:
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt)') from None
    if head.startswith(b'PK'):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f'{path} is truncated or corrupt (an incomplete PyTorch zip archive)')
    elif head[:1] != b'\x80':  # neither a zip archive nor a pickle (protocol 2+)
        text = all(32 <= c < 127 or c in (9, 10, 13) for c in head)
        raise CheckpointError(f'{path} is {"a text file" if text else "not a PyTorch or safetensors file"}, '
                              f'not a checkpoint')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e) or 'Unsupported' in str(e):
            raise CheckpointError(f'{path} holds Python objects other than tensors and plain containers, which '
                                  f'would run code when unpickled; refiner never unpickles them') from None
        raise CheckpointError(f'{path} is truncated or corrupt (its pickle cannot be read)') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError):
        raise CheckpointError(f'{path} is truncated or corrupt (PyTorch cannot read it)') from None


def read_checkpoint(src: Union[str, os.PathLike, Mapping[str, Any]], use_ema: bool = False) -> StateDict:
    """Read a checkpoint into a flat state dict without unpickling arbitrary objects.

    Args:
        src: a ``.pth`` / ``.pth.tar`` / ``.safetensors`` file, or a (possibly nested) state dict.
        use_ema: prefer ``state_dict_ema`` when the file holds both.
    """
    if isinstance(src, Mapping):
        obj: Any = src
        name = 'the state dict'
    else:
        path = Path(src)
        name = str(path)
        if not path.is_file():
            raise CheckpointError(f'{path}: no such checkpoint file')
        obj = load_tensors_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{name} holds a {type(obj).__name__}, not a state dict')
    order = ('state_dict_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model', 'state_dict_ema')
    for key in order:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state_dict: StateDict = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f'{name}: entry {k!r} is a {type(v).__name__}, not a tensor; is this a state dict?')
        state_dict[k[len('module.'):] if k.startswith('module.') else k] = v
    if not state_dict:
        raise CheckpointError(f'{name} holds no tensors')
    return state_dict


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f'not a Refiner-ViT checkpoint: {key!r} is missing')
    return tuple(sd[key].shape)


def infer_official_config(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Every architectural choice of an original checkpoint, from its tensor shapes: keyword
    arguments for :class:`refiner.models.RefinerViT`."""
    sd = state_dict
    cls_shape = _shape(sd, 'cls_token')
    if len(cls_shape) != 3 or cls_shape[:2] != (1, 1):
        raise CheckpointError(f'cls_token has shape {list(cls_shape)}, expected (1, 1, embed_dim)')
    dim = cls_shape[2]
    conv1 = _shape(sd, 'patch_embed.conv1.weight')
    proj = _shape(sd, 'patch_embed.proj.weight')
    if len(conv1) != 4 or len(proj) != 4 or proj[0] != dim or proj[2] != proj[3]:
        raise CheckpointError(
            f'patch_embed has unexpected shapes: conv1 {list(conv1)}, proj {list(proj)} (embed_dim {dim})')
    patch_size = 2 * proj[2]  # the 7×7 stride-2 conv, then the projection's stride
    pos = _shape(sd, 'pos_embed')
    grid = int(round((pos[1] - 1) ** 0.5)) if len(pos) == 3 else 0
    if len(pos) != 3 or pos[2] != dim or grid * grid != pos[1] - 1:
        raise CheckpointError(f'pos_embed has shape {list(pos)}; expected (1, 1 + g·g, {dim}) for a square grid')

    depth = 0
    while f'blocks.{depth}.norm1.weight' in sd:
        depth += 1
    if depth == 0:
        raise CheckpointError('not a Refiner-ViT checkpoint: no blocks.0.* weights')
    refine_blocks: List[bool] = []
    heads: Optional[int] = None
    expand: Optional[Tuple[int, ...]] = None
    local: Optional[Tuple[int, ...]] = None
    for i in range(depth):
        qkv = _shape(sd, f'blocks.{i}.attn.qkv.weight')
        refines = f'blocks.{i}.attn.DLA.conv_exp.weight' in sd
        want = (dim if refines else 3 * dim, dim)
        if qkv != want:
            kind = 'refining' if refines else 'attention'
            raise CheckpointError(
                f'blocks.{i}.attn.qkv.weight has shape {list(qkv)}; a {kind} block needs {list(want)}')
        refine_blocks.append(refines)
        if refines:
            e = _shape(sd, f'blocks.{i}.attn.DLA.conv_exp.weight')
            lc = _shape(sd, f'blocks.{i}.attn.DLA.depth_sep_conv.weight')
            if expand is None:
                heads, expand, local = e[1], e, lc
            elif (e, lc) != (expand, local):
                raise CheckpointError(f'blocks.{i} refines with shapes {list(e)}, {list(lc)}; earlier blocks use '
                                      f'{list(expand)}, {list(local)}')
    if heads is None or expand is None or local is None:
        raise CheckpointError('no refining block (attn.DLA.*) found: the number of heads cannot be inferred; '
                              'is this a Refiner-ViT checkpoint?')
    if refine_blocks[0]:
        raise CheckpointError('blocks.0 refines, but no block before it hands over an attention map')
    if dim % heads or expand[0] % heads or len(local) != 4 or local[2] != local[3] or local[2] % 2 == 0:
        raise CheckpointError(f'inconsistent refinement shapes: embed_dim {dim}, expansion {list(expand)}, '
                              f'local kernel {list(local)}')
    fc1 = _shape(sd, 'blocks.0.mlp.fc1.weight')
    num_classes = sd['head.weight'].shape[0] if 'head.weight' in sd else 0
    config = dict(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=conv1[1],
        num_classes=num_classes,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=fc1[0] / dim,
        qkv_bias='blocks.0.attn.qkv.bias' in sd,
        refine_blocks=refine_blocks,
        expansion_ratio=expand[0] // heads,
        refine_kernel_size=local[2],
        aux_head='aux_head.weight' in sd,
    )
    if config['aux_head'] and not num_classes:
        raise CheckpointError('aux_head.weight found without head.weight')
    return config


def variant_name(config: Mapping[str, Any]) -> Optional[str]:
    """The registered model name matching an inferred config, if any."""
    return _VARIANTS.get((config['embed_dim'], config['depth'], config['num_heads']))


def load_official(
        src: Union[str, os.PathLike, Mapping[str, Any]],
        use_ema: bool = False,
        device: Union[str, torch.device] = 'cpu',
) -> RefinerViT:
    """Build a :class:`RefinerViT` from an original Refiner checkpoint, in eval mode.

    The architecture (width, depth, heads, which blocks refine, expansion, kernel, MLP ratio,
    classes, token-labeling head, input size) is inferred from tensor shapes. Its eval outputs
    equal the original model's.

    Args:
        src: checkpoint path (``.pth``, ``.pth.tar``) or a state dict, nested or not.
        use_ema: take ``state_dict_ema`` when the file has both.
        device: where to put the model.
    """
    sd = read_checkpoint(src, use_ema=use_ema)
    if not is_official_state_dict(sd):
        raise CheckpointError('not an original Refiner-ViT checkpoint (no attn.DLA.* or mlp.scale_channel keys); '
                              "for this project's own weights use timm.create_model(..., pretrained_cfg_overlay=...)")
    config = infer_official_config(sd)
    model = RefinerViT(**config)
    converted = official_to_refiner(sd)
    check_state_dict(model, converted, 'the checkpoint', 'the inferred architecture')
    model.load_state_dict(converted)
    return model.to(device).eval()


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     model_name: str, allow_missing: Sequence[str] = ()) -> None:
    """Raise a :class:`CheckpointError` of one sentence unless ``state_dict`` fits ``model`` exactly
    (bar the keys in ``allow_missing``): it names the first of the model's tensors that is missing,
    has another shape, or holds integers where the model has floating-point weights."""
    expected = model.state_dict()
    allowed = set(allow_missing)
    missing = [k for k in expected if k not in state_dict and k not in allowed]
    unexpected = [k for k in state_dict if k not in expected]

    def counts() -> str:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing (e.g. {", ".join(missing[:3])})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3])})')
        return f' (tensors: {"; ".join(parts)})' if parts else ''

    for k, want in expected.items():
        if k in allowed and k not in state_dict:
            continue
        if k not in state_dict:
            raise CheckpointError(f'{source} does not fit {model_name}: it has no {k}{counts()}')
        got = state_dict[k]
        if got.shape != want.shape:
            raise CheckpointError(f'{source} does not fit {model_name}: {k} has shape {list(got.shape)}, '
                                  f'{model_name} needs {list(want.shape)}')
        if want.is_floating_point() and not got.is_floating_point():
            raise CheckpointError(f'{source}: {k} holds {str(got.dtype).replace("torch.", "")} values where '
                                  f'weights must be floating point')
    if unexpected:
        raise CheckpointError(f'{source} does not fit {model_name}: {unexpected[0]} is not one of its tensors'
                              f'{counts()}')


def save_safetensors(state_dict: Mapping[str, torch.Tensor], dst: Union[str, os.PathLike],
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write safetensors atomically (see :mod:`refiner.fileio`)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(dst, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def convert_checkpoint(
        src: Union[str, os.PathLike], dst: Union[str, os.PathLike], use_ema: bool = False,
) -> Dict[str, Any]:
    """Convert an original checkpoint to safetensors weights in this project's layout.

    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=dst), **model_args)``
    then loads them. The inferred ``model_args`` and the matching registered name are stored in
    the file's metadata and returned.
    """
    state_dict = read_checkpoint(src, use_ema=use_ema)
    model = load_official(state_dict)
    config = infer_official_config(state_dict)
    name = variant_name(config)
    save_safetensors(model.state_dict(), dst, metadata={
        'format': 'refiner', 'model_name': name or 'refiner_vit_s', 'model_args': json.dumps(config)})
    return {'model_name': name, 'model_args': config, 'dst': str(dst)}
