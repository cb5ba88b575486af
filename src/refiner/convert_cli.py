"""``refiner convert SRC DST``: an original Refiner checkpoint to safetensors weights for timm."""
import argparse
import sys

from .convert import CheckpointError, convert_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('src', help='original checkpoint (.pth / .pth.tar)')
    p.add_argument('dst', help='output .safetensors file')
    p.add_argument('--ema', action='store_true', help='take state_dict_ema when the file holds both')


def main(args: argparse.Namespace) -> int:
    if not args.dst.endswith('.safetensors'):
        print(f'error: {args.dst}: the output must be a .safetensors file', file=sys.stderr)
        return 2
    try:
        info = convert_checkpoint(args.src, args.dst, use_ema=args.ema)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
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
