"""``refiner export`` and ``refiner convert``: weights written to other files, and what was written."""
import argparse
import sys
from pathlib import Path

from ..argtypes import output_file, output_path, positive_int
from .common import SOURCE_HELP, UsageError

__all__ = ['add_export_args', 'run_export', 'add_convert_args', 'run_convert']


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('out', type=output_path, help='output: a .onnx or .pt file, or a folder for --format hf')
    p.add_argument('--model', help='a timm model name (random weights unless --checkpoint; names a bare weights file)')
    p.add_argument('--checkpoint', help=SOURCE_HELP)
    p.add_argument('--format', choices=['onnx', 'torchscript', 'hf'], required=True,
                   help="hf: a timm / Hugging Face Hub model folder, loadable with timm.create_model('local-dir:OUT')")
    p.add_argument('--img-size', type=positive_int)
    p.add_argument('--opset', type=int, default=18)
    p.add_argument('--no-reparameterize', action='store_true', help='export without re-parameterizing')
    p.add_argument('--no-progress', action='store_true', help='accepted as by every long command (export shows none)')


_NOT_AN_EXPORT = {'.safetensors': 'weights', '.bin': 'weights', '.json': 'a config', '.yaml': 'a config',
                  '.yml': 'a config', '.tar': 'a checkpoint', '.pth': 'a checkpoint'}


def run_export(args: argparse.Namespace) -> int:
    """Export and check (:func:`refiner.export.export_and_check`), then say what was written and how it compares."""
    from ..export import export_and_check, load_for_export
    out, suffix = Path(args.out), '.onnx' if args.format == 'onnx' else '.pt'
    if args.format != 'hf' and out.is_dir():
        raise UsageError(f'{out} is a folder; --format {args.format} writes one file (e.g. {out / "model"}{suffix})')
    if args.format != 'hf' and out.suffix in _NOT_AN_EXPORT:
        # the output comes first: `export run/model.safetensors ...` would overwrite the weights it names
        raise UsageError(f'{out} names {_NOT_AN_EXPORT[out.suffix]}, not an {args.format} file; the output '
                         f'comes first (refiner export OUT --checkpoint WEIGHTS), e.g. model{suffix}')
    model, info = load_for_export(args.model, args.checkpoint, args.img_size)
    res = export_and_check(model, info, args.out, args.format, reparameterize=not args.no_reparameterize,
                           opset=args.opset)
    path, errs, tol, size = res['path'], res['errors'], res['tolerance'], res['img_size']
    detail = ', '.join(f'batch {b}: {e:.1e}' if isinstance(b, int) else f'{b}: {e:.1e}' for b, e in errs.items())
    shape = f'(B, 3, {size}, {size})'
    if args.format == 'onnx':
        shape += (f', height and width any multiple of {res["any_multiple_of"]}' if res['any_multiple_of']
                  else ', height and width fixed')
    print(f'wrote {path} ({args.format}, input {shape}); max relative difference to {res["compared_with"]}: {detail}')
    if args.format == 'hf':
        print(f"load it after `import refiner` (timm's registry must know the model): timm.create_model("
              f"'local-dir:{path}', pretrained=True), or with transformers: AutoModelForImageClassification"
              f".from_pretrained('{path}'), pipeline('image-classification', model='{path}')")
    if max(errs.values()) > tol:
        print(f'refiner export: outputs differ by more than {tol:g}', file=sys.stderr)
        return 1
    return 0


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('src', help='original checkpoint (.pth / .pth.tar)')
    p.add_argument('dst', type=output_file, help='output .safetensors file')
    p.add_argument('--ema', action='store_true', help='take state_dict_ema when the file holds both')


def run_convert(args: argparse.Namespace) -> int:
    from ..convert import convert_checkpoint
    if not args.dst.endswith('.safetensors'):
        raise UsageError(f'{args.dst}: the output must be a .safetensors file')
    info = convert_checkpoint(args.src, args.dst, use_ema=args.ema)
    cfg = info['model_args']
    name = info['model_name'] or 'refiner_vit_s'
    print(f'wrote {args.dst}: {cfg["depth"]} blocks, width {cfg["embed_dim"]}, {cfg["num_heads"]} heads, '
          f'{cfg["img_size"]}px, {cfg["num_classes"]} classes{", token-labeling head" if cfg["aux_head"] else ""}')
    shown = {k: v for k, v in cfg.items() if info['model_name'] is None or k in ('img_size', 'num_classes', 'aux_head')}
    args_text = ''.join(f', {k}={v!r}' for k, v in shown.items())
    # timm drops the classifier when num_classes differs from the pretrained config's: state it there too
    print(f"load it with: timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay="
          f"dict(file='{args.dst}', num_classes={cfg['num_classes']}){args_text})")
    return 0
