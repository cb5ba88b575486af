"""``refiner train``: its arguments (recipe, flags, ``--set``, ``--resume``) and the run it starts or resumes.

The precedence of recipe, flags and ``--set`` is :func:`refiner.config.train_config`'s.
"""
import argparse

from ..argtypes import output_folder
from .common import SOURCE_HELP, UsageError

__all__ = ['TRAIN_FLAGS', 'add_train_args', 'train_config', 'run_train']

TRAIN_FLAGS = {  # flag -> config key
    'model': 'model', 'data': 'data', 'epochs': 'epochs', 'batch_size': 'batch_size', 'lr': 'lr',
    'img_size': 'img_size', 'seed': 'seed', 'device': 'device', 'workers': 'workers', 'amp': 'amp',
    'checkpoint_every': 'checkpoint_every', 'train_fraction': 'train_fraction', 'classes': 'classes',
    'finetune': 'finetune', 'refine': 'refine', 'layer_decay': 'layer_decay',
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ..config import list_recipes
    p.add_argument('--config', default=None,
                   help=f"a shipped recipe ({', '.join(list_recipes())}) or a YAML file; default: the dataset's "
                        "recipe (default, digits_clutter, fashion_mnist), finetune with --finetune, else values "
                        "derived from your dataset's size (printed when the run starts; deit: DeiT's ImageNet "
                        "values)")
    p.add_argument('--model', help='any timm model name (refiner_vit_*, vit_*, deit_*, resnet*, ...)')
    p.add_argument('--data', help='a folder with train/ and val/ class subfolders, a timm dataset spec '
                                  '(torch/cifar10:DIR, ...), fashion_mnist[:DIR] (its IDX files; Debian package '
                                  'dataset-fashion-mnist), or an embedded dataset: digits (the default), '
                                  'digits_clutter (harder: 32 px, cluttered)')
    p.add_argument('--out', type=output_folder, help='run directory (default: runs/<model>-<time>)')
    p.add_argument('--epochs', type=int)
    p.add_argument('--batch-size', type=int, help='per process')
    p.add_argument('--lr', type=float, help='learning rate for a global batch of lr_base_size, scaled by lr_base_scale '
                   '(default: timm\'s rule, sqrt for adaptive optimizers, else linear)')
    p.add_argument('--img-size', type=int)
    p.add_argument('--seed', type=int)
    p.add_argument('--device', help="'auto' (default), 'cpu' or 'cuda'")
    p.add_argument('--workers', type=int, help='data-loading processes')
    p.add_argument('--amp', choices=['none', 'bf16', 'fp16'])
    p.add_argument('--checkpoint-every', type=int, help='also checkpoint every N steps')
    p.add_argument('--train-fraction', type=float, help='train on a stratified fraction of the training split')
    p.add_argument('--classes', nargs='+', metavar='CLASS', help='train on these classes only (relabelled in order)')
    p.add_argument('--finetune', metavar='SRC', help=f'start from pretrained weights: {SOURCE_HELP}')
    p.add_argument('--refine', metavar='BLOCKS',
                   help="retrofit refined attention into a timm ViT first: 'all', the last N blocks, or a "
                        "comma-separated list of block indices")
    p.add_argument('--layer-decay', type=float, metavar='R', help='layer-wise learning-rate decay, e.g. 0.65')
    p.add_argument('--linear-probe', action='store_true', default=None,
                   help='train only the classifier; everything else, BatchNorm statistics too, stays frozen')
    p.add_argument('--resume', metavar='DIR', help='continue the run in DIR')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='set any config key (YAML value)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')


def train_config(args: argparse.Namespace):
    """The new run's config (:func:`refiner.config.train_config`), saying which recipe a fine-tune starts from."""
    from ..config import parse_set
    from ..config import train_config as resolve
    flags = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items()}
    cfg, note = resolve(args.config, {**flags, 'linear_probe': args.linear_probe}, parse_set(args.set), args.out)
    if note:
        print(note, flush=True)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from ..train import train
    if args.resume:
        given = [f'--{f.replace("_", "-")}' for f in [*TRAIN_FLAGS, 'linear_probe']
                 if f not in ('device', 'workers') and getattr(args, f) is not None]
        given += (['--config'] if args.config else []) + (['--set'] if args.set else [])
        if given or args.out:
            raise UsageError(f'--resume continues a run with its saved config; drop {", ".join(given or ["--out"])} '
                             f'(only --device and --workers may change)')
        from ..config import TrainConfig
        cfg = TrainConfig(device=args.device or 'auto', workers=args.workers or 0)
        train(cfg, resume=args.resume, progress=not args.no_progress)
    else:
        train(train_config(args), out=args.out, progress=not args.no_progress)
    return 0
