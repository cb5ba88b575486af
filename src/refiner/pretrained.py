"""Weights from anywhere: the one path from a weight source to a model and its preprocessing.

A source is any of: a ``refiner train`` run directory; a ``.safetensors`` file written by refiner
(its metadata names the model); an original Refiner checkpoint (``.pth`` / ``.pth.tar``, any
nesting, ``module.`` prefixes); a timm / Hugging Face Hub model folder (``config.json`` plus
``model.safetensors`` or ``pytorch_model.bin``, as ``refiner export --format hf`` and timm's
``save_for_hf`` write it); or a bare weights file of a timm model (``.pth`` / ``.bin`` /
``.safetensors``, which needs the model's name).

:func:`load_model` rebuilds a source's model exactly (evaluation, prediction, analysis, export), and
:func:`load_or_create` also builds one by name (``--model`` without ``--checkpoint``: export, analysis);
:func:`load_pretrained_weights` loads a source into a model built for a new task (fine-tuning), as
timm and DeiT do it: classifier heads of another class count are re-initialised, position
embeddings are resampled, a refinement the source lacks starts as the identity. Either refuses a
source that does not fit with one sentence naming the first tensor that differs.
"""
import difflib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .checkpoint import RunFiles
from .convert import (
    CheckpointError,
    StateDict,
    check_state_dict,
    infer_official_config,
    is_official_state_dict,
    official_to_refiner,
    read_checkpoint,
    variant_name,
)
from .errors import RefinerError

__all__ = ['Source', 'ModelError', 'read_source', 'check_model_name', 'create_model', 'create_model_and_args',
           'model_arguments', 'load_model', 'load_pretrained_weights', 'resolve_data_config', 'classifier_names',
           'load_or_create']


class ModelError(RefinerError, ValueError):
    """A model name timm does not know, or arguments the model rejects."""

# keys of a model's input size and normalisation, as timm's data configs name them
DATA_CONFIG_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')
_HUB_WEIGHTS = ('model.safetensors', 'pytorch_model.bin', 'open_clip_model.safetensors')


@dataclass
class Source:
    """Weights and what the source says about them."""
    path: str
    kind: str  # 'run', 'weights' (refiner safetensors), 'original', 'hub', 'file' (bare weights)
    state_dict: StateDict  # in this project's / timm's layout
    model_name: Optional[str] = None  # None: a bare file, the caller names the model
    model_args: Dict[str, Any] = field(default_factory=dict)  # create_model keyword arguments
    data_config: Optional[Dict[str, Any]] = None
    classes: Optional[List[str]] = None
    run_config: Optional[Dict[str, Any]] = None

    @property
    def description(self) -> str:
        kind = {'run': 'refiner run', 'weights': 'refiner weights', 'original': 'original Refiner checkpoint',
                'hub': 'model folder', 'file': 'weights file'}[self.kind]
        return f'{self.path} ({kind}{", " + self.model_name if self.model_name else ""})'


def _refiner_safetensors(path: Path) -> Optional[Dict[str, str]]:
    """The metadata of a .safetensors file written by refiner, else None."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
    except Exception:
        return None  # read_checkpoint gives the error for an unreadable file
    return meta if meta.get('format') == 'refiner' else None


def _from_refiner_weights(path: Path, kind: str) -> Source:
    meta = _refiner_safetensors(path)
    if meta is None:
        return Source(str(path), 'file', read_checkpoint(path))
    try:
        extra = {k: json.loads(meta[k]) for k in ('model_args', 'data_config', 'classes') if k in meta}
    except json.JSONDecodeError:
        raise CheckpointError(f'{path}: its refiner metadata is not valid JSON; the file was altered') from None
    return Source(str(path), kind, read_checkpoint(path), meta.get('model_name'), extra.get('model_args', {}),
                  extra.get('data_config'), extra.get('classes'))


def _from_hub_folder(path: Path) -> Source:
    # timm reads this config.json only inside create_model('local-dir:...'), with no public parser
    # of its own; its layout: architecture, num_classes, label_names, model_args, pretrained_cfg
    try:
        cfg = json.loads((path / 'config.json').read_text())
        pretrained_cfg = dict(cfg.get('pretrained_cfg', cfg))  # older files: one flat dict
        name = cfg['architecture'] if 'architecture' in cfg else pretrained_cfg['architecture']
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):  # AttributeError: a list
        raise CheckpointError(f'{path}/config.json is not a timm model config (no architecture)') from None
    weights = next((path / f for f in _HUB_WEIGHTS if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f'{path}: config.json but no weights ({" or ".join(_HUB_WEIGHTS[:2])})')
    args = dict(cfg.get('model_args') or {})
    num_classes = cfg.get('num_classes', pretrained_cfg.get('num_classes'))
    if num_classes is not None:
        args.setdefault('num_classes', num_classes)
    dc = {k: pretrained_cfg[k] for k in DATA_CONFIG_KEYS if pretrained_cfg.get(k) is not None}
    labels = cfg.get('label_names', pretrained_cfg.get('label_names'))
    classes = [str(c) for c in labels] if isinstance(labels, (list, tuple)) else None
    return Source(str(path), 'hub', read_checkpoint(weights), name, args, dc or None, classes)


def read_source(src: Union[str, Path], ema: bool = False) -> Source:
    """Read any weight source (see the module docstring); ``ema`` takes a run's (or an original
    checkpoint's) EMA weights."""
    path = Path(src).expanduser()
    if path.is_dir():
        run = RunFiles(path)
        if run.config.is_file():
            weights = run.ema_weights if ema else run.weights
            if not weights.is_file():
                raise CheckpointError(f'{path}: the run has no {weights.name} yet; it writes its weights when it '
                                      f'ends (resume it with refiner train --resume {path})')
            import yaml
            source = _from_refiner_weights(weights, 'run')
            source.path = str(path)
            try:
                source.run_config = yaml.safe_load(run.config.read_text())
            except (yaml.YAMLError, UnicodeDecodeError):
                source.run_config = None
            if not isinstance(source.run_config, dict):
                raise CheckpointError(f'{run.config} is not a refiner training config (not a YAML mapping); '
                                      f'restore it, or give the weights file {weights} itself')
            return source
        if (path / 'config.json').is_file():
            return _from_hub_folder(path)
        raise CheckpointError(f'{path}: a folder that is neither a refiner run (config.yaml, model.safetensors) '
                              f'nor a model folder (config.json, model.safetensors)')
    if not path.exists():
        raise CheckpointError(f'{path}: no such file or directory')
    if path.suffix == '.safetensors':
        return _from_refiner_weights(path, 'weights')
    state_dict = read_checkpoint(path, use_ema=ema)
    if is_official_state_dict(state_dict):
        config = infer_official_config(state_dict)
        return Source(str(path), 'original', official_to_refiner(state_dict), variant_name(config) or 'refiner_vit_s',
                      config)
    return Source(str(path), 'file', state_dict)


def _native_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The input size the model was built for (its position embeddings), when it has one."""
    pe = getattr(model, 'patch_embed', None)
    grid, patch = getattr(model, 'grid_size', None), getattr(pe, 'patch_size', None)
    if grid is not None and patch is not None:  # Refiner-ViT: grid_size and an int patch size
        p = patch[0] if isinstance(patch, (tuple, list)) else patch
        return int(grid[0]) * int(p), int(grid[1]) * int(p)
    img_size = getattr(pe, 'img_size', None)  # timm ViT
    if img_size is not None:
        return tuple(img_size) if isinstance(img_size, (tuple, list)) else (int(img_size), int(img_size))
    return None


def resolve_data_config(model: nn.Module, stored: Optional[Dict[str, Any]] = None,
                        img_size: Optional[int] = None) -> Dict[str, Any]:
    """The eval preprocessing of a model: ``stored`` (what its training run used) where given, else
    timm's config of the model at the input size it was built for; ``img_size`` overrides the size."""
    from timm.data import resolve_model_data_config
    dc = dict(resolve_model_data_config(model))
    if stored:
        dc.update({k: v for k, v in stored.items() if k in DATA_CONFIG_KEYS})
    else:
        size = _native_size(model)
        if size is not None:
            dc['input_size'] = (3, *size)
    if img_size is not None:
        dc['input_size'] = (3, img_size, img_size)
    return {'input_size': tuple(int(v) for v in dc['input_size']), 'mean': tuple(float(v) for v in dc['mean']),
            'std': tuple(float(v) for v in dc['std']), 'crop_pct': float(dc.get('crop_pct') or 1.0),
            'interpolation': dc.get('interpolation') or 'bicubic'}


def check_model_name(name: str) -> None:
    """Raise a :class:`ModelError` naming close matches unless timm knows ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise ModelError(f'{name}: not a timm model name{hint}')


TOKEN_GRID_ARGS = ('img_size', 'patch_size')  # a ViT's input geometry, meaningless to a CNN


def create_model(name: str, img_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, img_size=img_size, **kwargs)`` with one sentence for a name timm
    does not know or arguments the model rejects. The token grid's arguments (``img_size``,
    ``patch_size``) are dropped for models that take none (CNNs), so a recipe's grid fits any model."""
    return create_model_and_args(name, img_size, **kwargs)[0]


def create_model_and_args(name: str, img_size: Optional[int] = None,
                          **kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """:func:`create_model`, and the keyword arguments the model was built with (the token grid's
    arguments it does not take left out): what a run records to build it again."""
    check_model_name(name)
    kwargs = {**({'img_size': img_size} if img_size is not None else {}), **kwargs}
    try:
        while True:
            try:
                return timm.create_model(name, **kwargs), kwargs
            except TypeError as e:  # "... got an unexpected keyword argument 'patch_size'"
                rejected = [k for k in TOKEN_GRID_ARGS if k in kwargs and f"'{k}'" in str(e)]
                if not rejected:
                    raise
                del kwargs[rejected[0]]
    except (TypeError, ValueError, AssertionError, ArithmeticError, RuntimeError) as e:  # patch_size 0, width -8
        raise ModelError(f'cannot create {name} with {kwargs}: {str(e).splitlines()[0] or type(e).__name__}') from None


def model_arguments(name: str, img_size: Optional[int] = None, **kwargs: Any) -> Dict[str, Any]:
    """Every argument ``create_model(name, img_size, **kwargs)`` builds the model's class with: what the
    caller gives, what the timm entry point fixes and the class's defaults. Two sets of keyword
    arguments build the same architecture exactly when these are equal (``expansion_ratio=3`` and
    leaving it at its default, say). The model is built on the meta device: no memory, no weights."""
    with torch.device('meta'):
        cls = type(create_model(name, img_size, **kwargs))
    # timm keeps no record of the arguments an entry point passes on, so record them as the class receives them
    signature, own, calls = inspect.signature(cls.__init__), '__init__' in vars(cls), []
    build = cls.__init__

    def recording_init(self, *args: Any, **kw: Any) -> None:
        if not calls:
            calls.append(signature.bind(self, *args, **kw))
        build(self, *args, **kw)

    cls.__init__ = recording_init
    try:
        with torch.device('meta'):
            create_model(name, img_size, **kwargs)
    finally:
        if own:
            cls.__init__ = build
        else:
            del cls.__init__
    bound = calls[0]
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop(next(iter(signature.parameters)))  # self
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:  # **kwargs: its entries, as if named
            args.update(args.pop(param.name, {}))
    return args


def load_model(src: Union[str, Path, Source], model_name: Optional[str] = None, ema: bool = False,
               img_size: Optional[int] = None, device: Union[str, torch.device] = 'cpu',
               dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a source holds, in eval mode, with its weights loaded exactly.

    Args:
        src: any source (see the module docstring), or a :class:`Source` already read.
        model_name: the timm model name, needed for a bare weights file (else it must agree with the source's).
        ema: a run's EMA weights.
        img_size: evaluate at this size (position embeddings resampled).
        dtype: cast the weights to this dtype (timm's ``--model-dtype``; default: as stored, float32).

    Returns (model, info): info has ``source`` (its description), ``model_name``, ``model_args``,
    ``data_config`` (input_size, mean, std, crop_pct, interpolation), ``classes`` (or None) and a run's
    ``config``.
    """
    source = src if isinstance(src, Source) else read_source(src, ema=ema)
    name = source.model_name or model_name
    if name is None:
        raise CheckpointError(f'{source.path} holds bare weights that do not name their model: give --model NAME')
    if model_name is not None and source.model_name is not None and model_name != source.model_name:
        raise CheckpointError(f'{source.path} holds a {source.model_name}, not a {model_name}: drop --model')
    model = create_model(name, **source.model_args)
    check_state_dict(model, source.state_dict, f'{source.path}', f'{name}')
    model.load_state_dict(source.state_dict)
    args = dict(source.model_args)
    if img_size is not None and _native_size(model) not in (None, (img_size, img_size)):
        if not hasattr(model, 'set_input_size'):
            raise CheckpointError(f'{name} cannot change its input size to {img_size}')
        model.set_input_size(img_size)  # resample the position embeddings
        args['img_size'] = img_size  # what rebuilds it (an export) at this size
    data_config = resolve_data_config(model, source.data_config, img_size)
    _carry_data_config(model, data_config)
    info = {'source': source.description, 'model_name': name, 'model_args': args,
            'data_config': data_config, 'classes': source.classes, 'config': source.run_config}
    return model.to(device=device, dtype=dtype).eval(), info


def load_or_create(model_name: Optional[str], checkpoint: Union[str, Path, Source, None] = None,
                   img_size: Optional[int] = None, model_args: Optional[Dict[str, Any]] = None,
                   pretrained: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """The one loader of the commands that take ``--model`` and ``--checkpoint`` (export, analysis; eval
    and predict take a checkpoint only): :func:`load_model` for a checkpoint, else
    ``create_model(model_name, img_size, pretrained=pretrained, **model_args)`` (random weights unless
    ``pretrained``). Returns (model in eval mode, info) with the keys :func:`load_model` gives."""
    model_args = dict(model_args or {})
    if checkpoint is not None:
        if model_args:
            raise ModelError('model arguments apply to a model created by name only: a checkpoint fixes the '
                             'architecture')
        return load_model(checkpoint, model_name=model_name, img_size=img_size)
    if not model_name:
        raise ModelError('give --model NAME or --checkpoint PATH')
    size = img_size if img_size is not None else model_args.pop('img_size', None)
    try:
        model = create_model(model_name, size, **({'pretrained': True} if pretrained else {}), **model_args)
    except (RuntimeError, OSError) as e:
        if not pretrained:
            raise
        raise ModelError(f'cannot load pretrained weights of {model_name}: {str(e).splitlines()[0]}') from None
    args = {**model_args, **({'img_size': size} if size is not None else {})}
    info = {'source': f'{model_name} ({"pretrained" if pretrained else "random"} weights)', 'model_name': model_name,
            'model_args': args, 'data_config': resolve_data_config(model, None, size), 'classes': None,
            'config': None}
    return model.eval(), info


def _carry_data_config(model: nn.Module, data_config: Dict[str, Any]) -> None:
    """Make the model's ``pretrained_cfg`` describe the weights loaded (the eval preprocessing their run
    used), so that ``timm.data.resolve_data_config(model=model)`` and timm's tools pick it, as they do
    for a model folder ``refiner export --format hf`` wrote."""
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k not in ('test_input_size', 'test_crop_pct')}
        model.pretrained_cfg = model.default_cfg = dict(cfg, **data_config, num_classes=getattr(
            model, 'num_classes', cfg.get('num_classes')))


def classifier_names(model: nn.Module) -> List[str]:
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    names = [names] if isinstance(names, str) else list(names)
    return names + ['aux_head']  # Refiner-ViT's token-labeling head


def _num_prefix_tokens(model: nn.Module) -> int:
    return 0 if getattr(model, 'no_embed_class', False) else int(getattr(model, 'num_prefix_tokens', 1))


def _resample_pos_embed(pos: torch.Tensor, target: torch.Tensor, model: nn.Module) -> Optional[torch.Tensor]:
    """``pos`` resampled to the shape of ``target``, the model's own; None where it cannot be
    (another width, not a square grid), which the shape check then reports."""
    prefix = _num_prefix_tokens(model)
    old_tokens = pos.shape[1] - prefix if pos.dim() == 3 else 0
    side = int(round(max(old_tokens, 0) ** 0.5))
    if pos.dim() != 3 or pos.shape[-1] != target.shape[-1] or side < 1 or side * side != old_tokens:
        return None
    new_tokens = target.shape[1] - prefix
    grid = getattr(model, 'grid_size', None) or getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
    if grid is None or int(grid[0]) * int(grid[1]) != new_tokens:
        side_new = int(round(new_tokens ** 0.5))
        grid = (side_new, side_new)
    return resample_abs_pos_embed(pos, [int(grid[0]), int(grid[1])], [side, side], num_prefix_tokens=prefix)


def load_pretrained_weights(model: nn.Module, source: Source, model_name: str,
                            classes: Optional[Sequence[str]] = None, zero_heads: bool = False) -> str:
    """Load ``source`` into ``model`` built for a new task; returns one line saying what was loaded,
    re-initialised and resampled. ``zero_heads``: re-initialised heads start at zero (as BiT's), so that
    the first steps train the head on the source's features instead of back-propagating a random
    head's errors into them.

    Heads (the classifier, a distillation head, the token-labeling head) whose shapes differ from the
    model's, or that were trained on other ``classes`` than the model's (where the source names its
    classes), keep the model's fresh initialisation; ``pos_embed`` is resampled to the model's token
    grid (prefix tokens kept); refinement modules the source lacks keep their identity
    initialisation (a ``refine_vit`` retrofit). Anything else that differs is refused.
    """
    own = model.state_dict()
    state = dict(source.state_dict)
    heads = classifier_names(model)
    notes: List[str] = []
    reinit = []
    other_classes = bool(source.classes and classes and list(source.classes) != [str(c) for c in classes])
    for head in heads:
        keys = [k for k in (f'{head}.weight', f'{head}.bias') if k in state or k in own]
        if keys and (other_classes or any(k not in state or k not in own or state[k].shape != own[k].shape
                                          for k in keys)):
            old = state.get(f'{head}.weight')
            for k in keys:
                state.pop(k, None)
            if f'{head}.weight' in own:
                was = f'{old.shape[0]} -> ' if old is not None and old.dim() == 2 else 'new, '
                was = 'other classes, ' + was if other_classes else was
                zeros = ', zeros' if zero_heads else ''
                reinit.append(f'{head} ({was}{own[f"{head}.weight"].shape[0]} classes{zeros})')
                for k in keys if zero_heads else ():
                    if k in own:
                        own[k].zero_()  # the model's own tensor, which load_state_dict below leaves as it is
            else:
                notes.append(f'dropped {head} (the model has none)')
    if reinit:
        notes.insert(0, 're-initialised ' + ', '.join(reinit))
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        before = state['pos_embed'].shape[1]
        resampled = _resample_pos_embed(state['pos_embed'], own['pos_embed'], model)
        if resampled is not None:
            state['pos_embed'] = resampled
            notes.append(f'resampled pos_embed ({before} -> {own["pos_embed"].shape[1]} tokens)')
    # fresh heads, and a refinement the source lacks (a refine_vit retrofit), keep their initialisation
    added = [] if any('.refine.' in k for k in state) else [k for k in own if '.attn.refine.' in k]
    if added:
        blocks = sorted({int(k.split('.')[1]) for k in added if k.startswith('blocks.')})
        notes.append(f'refinement added to blocks {blocks} (the identity until trained)')
    fresh_heads = [k for k in own if k not in state and k.startswith(tuple(f'{h}.' for h in heads))]
    check_state_dict(model, state, source.path, model_name, allow_missing=added + fresh_heads)
    model.load_state_dict(state, strict=False)
    return f'loaded {len(state)} tensors from {source.description}' + ''.join(f'; {n}' for n in notes)
