"""The ``refiner`` command line. Each subcommand parses its arguments here and calls the library;
errors that a user can fix are printed as one sentence (exit code 1 or 2), never as a traceback."""
import argparse
import sys
from typing import Callable, Dict, List, Optional

from .errors import RefinerError

__all__ = ['main', 'build_parser']

SOURCE_HELP = ('a run directory, a .safetensors written by refiner, an original Refiner checkpoint (.pth, .pth.tar), '
               'a timm / Hub model folder (config.json + weights), or a timm model file (.pth, .bin, .safetensors; '
               'needs --model)')


class UsageError(RefinerError):
    """Arguments that do not fit together (exit code 2, as argparse's own)."""


def _model_dtype_arg(p: argparse.ArgumentParser, several: bool = False) -> None:
    from .devices import MODEL_DTYPES
    p.add_argument('--model-dtype', choices=list(MODEL_DTYPES), nargs='+' if several else None,
                   default=['float32'] if several else None,
                   help='cast the weights (and inputs) to this dtype, no autocast, as timm\'s --model-dtype'
                        + ('; several: measured side by side' if several else ' (default: as stored)'))


# ---------------------------------------------------------------------------------------- convert

def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('src', help='original checkpoint (.pth / .pth.tar)')
    p.add_argument('dst', help='output .safetensors file')
    p.add_argument('--ema', action='store_true', help='take state_dict_ema when the file holds both')


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint
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


# ------------------------------------------------------------------------------------------ train

_TRAIN_FLAGS = {  # flag -> config key
    'model': 'model', 'data': 'data', 'epochs': 'epochs', 'batch_size': 'batch_size', 'lr': 'lr',
    'img_size': 'img_size', 'seed': 'seed', 'device': 'device', 'workers': 'workers', 'amp': 'amp',
    'checkpoint_every': 'checkpoint_every', 'train_fraction': 'train_fraction', 'classes': 'classes',
    'finetune': 'finetune', 'refine': 'refine', 'layer_decay': 'layer_decay',
}


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--config', default=None,
                   help="a shipped recipe (default, digits_clutter, fashion_mnist, finetune, deit, refiner_s, "
                        "refiner_m, refiner_s_tl, refiner_m_tl, refiner_l_tl, refiner_s_384, refiner_m_384, "
                        "refiner_l_384) or a YAML file; default: the dataset's recipe (default, digits_clutter, "
                        "fashion_mnist), finetune with --finetune, else values derived from your dataset's size "
                        "(printed when the run starts; deit: DeiT's ImageNet values)")
    p.add_argument('--model', help='any timm model name (refiner_vit_*, vit_*, deit_*, resnet*, ...)')
    p.add_argument('--data', help='a folder with train/ and val/ class subfolders, a timm dataset spec '
                                  '(torch/cifar10:DIR, ...), fashion_mnist[:DIR] (its IDX files; Debian package '
                                  'dataset-fashion-mnist), or an embedded dataset: digits (the default), '
                                  'digits_clutter (harder: 32 px, cluttered)')
    p.add_argument('--out', help='run directory (default: runs/<model>-<time>)')
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


def _train_config(args: argparse.Namespace):
    from .config import apply_overrides, default_recipe, load_recipe, parse_set
    from .defaults import DERIVABLE
    recipe = args.config or ('finetune' if args.finetune else default_recipe(args.data))
    if args.finetune and not args.config:
        print('--finetune without --config: starting from the finetune recipe (--config NAME for another)',
              flush=True)
    base = load_recipe(recipe) if recipe else {}
    flags = {key: getattr(args, flag) for flag, key in _TRAIN_FLAGS.items()}
    sets = parse_set(args.set)
    if recipe is None:  # a user's dataset and no recipe: what is not given is derived from the run's size
        given = {key for key, value in flags.items() if value is not None} | set(sets)
        base = {**base, 'derive_keys': [k for k in DERIVABLE if k not in given]}
    if args.refine is not None and args.refine.isdigit():
        flags['refine'] = int(args.refine)  # the last N blocks
    if args.finetune and args.model != base.get('model'):
        # the weights fix the architecture: the recipe's model and its arguments give way to the
        # model the weights name, or to --model
        base = {k: v for k, v in base.items() if k not in ('model', 'model_args')}
    if args.lr is not None or 'lr' in sets:  # a learning rate given wins over the recipe's lr_from_source
        base = {k: v for k, v in base.items() if k != 'lr_from_source'}
    return apply_overrides(base, {**flags, 'linear_probe': args.linear_probe, **sets, 'out': args.out})


def _train(args: argparse.Namespace) -> int:
    from .train import train
    if args.resume:
        given = [f'--{f.replace("_", "-")}' for f in [*_TRAIN_FLAGS, 'linear_probe']
                 if f not in ('device', 'workers') and getattr(args, f) is not None]
        given += (['--config'] if args.config else []) + (['--set'] if args.set else [])
        if given or args.out:
            raise UsageError(f'--resume continues a run with its saved config; drop {", ".join(given or ["--out"])} '
                             f'(only --device and --workers may change)')
        from .config import TrainConfig
        cfg = TrainConfig(device=args.device or 'auto', workers=args.workers or 0)
        train(cfg, resume=args.resume, progress=not args.no_progress)
    else:
        train(_train_config(args), out=args.out, progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------------------------------- eval

def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', required=True, help=SOURCE_HELP)
    p.add_argument('--model', help='the timm model name of a bare weights file')
    p.add_argument('--data', help="dataset (default: the run's, else the embedded digits)")
    p.add_argument('--split', choices=['val', 'train'], default='val')
    p.add_argument('--ema', action='store_true', help="evaluate a run's EMA weights")
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--confusion', metavar='PNG', help='write the confusion matrix as a PNG')
    p.add_argument('--json', metavar='FILE', help='write the metrics as JSON')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    _model_dtype_arg(p)


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, format_report, plot_confusion, save_json
    res = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.ema, args.batch_size, args.device,
                              args.workers, progress=not args.no_progress, model_name=args.model,
                              dtype=args.model_dtype)
    print(format_report(res))
    if args.confusion:
        print(f'confusion matrix: {plot_confusion(res["confusion"], res["classes"], args.confusion)}')
    if args.json:
        save_json(res, args.json)
    return 0


# ---------------------------------------------------------------------------------------- predict

def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('inputs', nargs='+', metavar='INPUT', help='image files and folders (searched recursively)')
    p.add_argument('--checkpoint', required=True, help=SOURCE_HELP)
    p.add_argument('--model', help='the timm model name of a bare weights file')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--ema', action='store_true', help="a run's EMA weights")
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--json', metavar='FILE', help='write every prediction as JSON')
    p.add_argument('--csv', metavar='FILE', help='write one row per image: file, label1, prob1, label2, ...')
    p.add_argument('--no-progress', action='store_true')
    _model_dtype_arg(p)


def _predict(args: argparse.Namespace) -> int:
    from .predict import format_predictions, predict, write_predictions
    res = predict(args.inputs, args.checkpoint, args.topk, args.batch_size, args.device, args.model, args.workers,
                  progress=not args.no_progress, ema=args.ema, dtype=args.model_dtype)
    print(format_predictions(res))
    write_predictions(res, args.json, args.csv)
    for path in (args.json, args.csv):
        if path:
            print(f'wrote {path}')
    if not res['predictions']:
        print(f'refiner predict: none of the {len(res["skipped"])} file(s) could be read as an image', file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------- ablate

def _ablate_args(p: argparse.ArgumentParser) -> None:
    from .ablate import BUILTINS
    p.add_argument('--study', metavar='NAME',
                   help='a shipped study (see --list-studies) or a YAML study file: its arms, base overrides, '
                        'fractions, seeds and epochs')
    p.add_argument('--list-studies', action='store_true', help='list the shipped studies and exit')
    p.add_argument('--arm', action='append', default=[], metavar='NAME[:KEY=VALUE,...]',
                   help="an arm: a name and config overrides (YAML values; model_args.KEY sets one model "
                        "argument, model_args merge into the base's), e.g. r1:model_args.expansion_ratio=1; "
                        "repeatable, added to the study's arms")
    p.add_argument('--models', nargs='+', choices=list(BUILTINS),
                   help='built-in arms: ' + ', '.join(f'{name} ({arm.description})' for name, arm in BUILTINS.items())
                        + ' (default without --study or --arm: refiner vit)')
    p.add_argument('--data', help='dataset (default: the embedded digits; digits_clutter: harder, cluttered)')
    p.add_argument('--fractions', type=float, nargs='+', help="fractions of the training split (default: the "
                                                               "study's, else 0.05 0.1 0.25 1)")
    p.add_argument('--seeds', type=int, nargs='+', help="default: the study's, else 0 1 2")
    p.add_argument('--config', help="recipe every arm starts from (default: the embedded dataset's: 'default' "
                                    "on digits, 'digits_clutter' on digits_clutter)")
    p.add_argument('--epochs', type=int, help="the full-data run's epochs (the budget; default: the study's, "
                                              "else the recipe's)")
    p.add_argument('--out', help='folder of the runs and results (default: runs/ablate/<study>, else runs/ablate)')
    p.add_argument('--reuse', nargs='+', metavar='FOLDER',
                   help="other ablations' output folders: a run that one of their finished runs trains exactly as "
                        "(same config, model arguments resolved, same fraction and seed) is copied, not trained; "
                        "one that another invocation is training there is waited for")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help="override any config key for every arm (YAML value; the arms' own overrides win)")
    p.add_argument('--no-progress', action='store_true')


def _ablate(args: argparse.Namespace) -> int:
    from .ablate import list_studies, run_ablation
    from .config import ConfigError, parse_set
    if args.list_studies:
        for name, description in list_studies():
            print(f'{name}: {description}')
        return 0
    if args.fractions and any(not 0 < f <= 1 for f in args.fractions):
        raise UsageError(f'--fractions must lie in (0, 1], got {args.fractions}')
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f'--epochs must be >= 1, got {args.epochs}')
    try:
        report = run_ablation(args.data, args.fractions, args.seeds, args.out, args.models, args.config,
                              parse_set(args.set), progress=not args.no_progress, study=args.study, arms=args.arm,
                              epochs=args.epochs, reuse=args.reuse)
    except ConfigError as e:  # a study, an arm or an override that is not valid: the user's input
        raise UsageError(str(e)) from None
    print(report['table'])
    print(f'results: {report["out"]}/ablation.json, ablation.md, ablation.png')
    return 0


# ------------------------------------------------------------------------------------------ bench

def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', nargs='+', default=['refiner_vit_s'], metavar='NAME[:KEY=VALUE,...]',
                   help='timm models, each with optional model arguments (YAML values), '
                        'e.g. refiner_vit_s:refine_layout=spatial')
    p.add_argument('--batch-size', type=int, nargs='+', default=[16])
    p.add_argument('--img-size', type=int, nargs='+', default=[224])
    p.add_argument('--train', action='store_true', help='also measure a training step (forward, backward, AdamW)')
    p.add_argument('--no-infer', action='store_true', help='skip the inference measurement')
    p.add_argument('--compile', action='store_true', help='torch.compile the models')
    p.add_argument('--no-reparameterize', action='store_true', help='measure inference without re-parameterizing')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['none', 'bf16'], default='none')
    _model_dtype_arg(p, several=True)
    p.add_argument('--reference', default='deit_small_patch16_224', help="timm model to compare with ('none': skip)")
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds of fresh processes')
    p.add_argument('--steps', type=int, default=5, help='timed steps per process')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--json', metavar='FILE', help='write the report (default: runs/bench/bench-<time>.json)')
    p.add_argument('--no-progress', action='store_true', help="no 'round i/n' lines")


def _bench(args: argparse.Namespace) -> int:
    import time

    import timm

    import refiner  # noqa: F401

    from .bench import BenchConfig, format_table, run_bench, save_report
    from .config import ConfigError, parse_set
    models = []
    for spec in args.model:
        name, _, model_args = spec.partition(':')
        try:
            models.append((name, parse_set(model_args.split(',')) if model_args else {}))
        except ConfigError:
            raise UsageError(f'--model {spec}: expected NAME or NAME:KEY=VALUE,...') from None
    for name in [m for m, _ in models] + ([args.reference] if args.reference != 'none' else []):
        if not timm.is_model(name):
            raise UsageError(f'--model {name}: not a timm model name')
    modes = ([] if args.no_infer else ['infer']) + (['train'] if args.train else [])
    if not modes:
        raise UsageError('nothing to measure: drop --no-infer or add --train')
    if args.amp != 'none' and args.model_dtype != ['float32']:
        raise UsageError('--amp runs float32 weights under autocast: drop --amp or --model-dtype')
    configs = [BenchConfig(model=m, model_args=kw, mode=mode, batch_size=b, img_size=s, device=args.device,
                           amp=args.amp, model_dtype=dtype, compile=args.compile,
                           reparameterize=not args.no_reparameterize, steps=args.steps, warmup=args.warmup)
               for m, kw in models for mode in modes for b in args.batch_size for s in args.img_size
               for dtype in args.model_dtype]
    report = run_bench(configs, None if args.reference == 'none' else args.reference, rounds=args.rounds,
                       progress=not args.no_progress)
    print(format_table(report))
    path = args.json or f'runs/bench/bench-{time.strftime("%Y%m%d-%H%M%S")}.json'
    save_report(report, path)
    print(f'report: {path}')
    return 0


# ----------------------------------------------------------------------------------------- export

def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('out', help='output: a .onnx or .pt file, or a folder for --format hf')
    p.add_argument('--model', help='a timm model name (random weights unless --checkpoint; names a bare weights file)')
    p.add_argument('--checkpoint', help=SOURCE_HELP)
    p.add_argument('--format', choices=['onnx', 'torchscript', 'hf'], required=True,
                   help="hf: a timm / Hugging Face Hub model folder, loadable with timm.create_model('local-dir:OUT')")
    p.add_argument('--img-size', type=int)
    p.add_argument('--opset', type=int, default=18)
    p.add_argument('--no-reparameterize', action='store_true', help='export without re-parameterizing')
    p.add_argument('--no-progress', action='store_true', help='accepted as by every long command (export shows none)')


def _export(args: argparse.Namespace) -> int:
    from .export import (
        check_hf,
        check_onnx,
        check_torchscript,
        export_hf,
        export_onnx,
        export_torchscript,
        load_for_export,
        prepare,
    )
    model, info = load_for_export(args.model, args.checkpoint, args.img_size)
    size = info['data_config']['input_size'][-1]
    if args.format == 'hf':  # the weights as trained: a folder to fine-tune or re-parameterize later
        path = export_hf(model.eval(), args.out, info)
        errs, tol, what = check_hf(path, model, size), 1e-5, "timm.create_model('local-dir:...')"
        if max(errs.values()) > tol:
            import shutil
            shutil.rmtree(path)  # never leave a folder that does not reload as the model
    elif args.format == 'onnx':
        model = prepare(model, reparameterize=not args.no_reparameterize)
        path = export_onnx(model, args.out, size, opset=args.opset)
        errs, tol, what = check_onnx(path, model, size), 1e-4, 'PyTorch'
    else:
        model = prepare(model, reparameterize=not args.no_reparameterize)
        path = export_torchscript(model, args.out)
        errs, tol, what = check_torchscript(path, model, size), 1e-5, 'PyTorch'
    detail = ', '.join(f'batch {b}: {e:.1e}' if isinstance(b, int) else f'{b}: {e:.1e}' for b, e in errs.items())
    shape = f'(B, 3, {size}, {size})'
    if args.format == 'onnx':
        from .export import input_stride, onnx_input_shape
        shape += (f', height and width any multiple of {input_stride(model)}'
                  if not isinstance(onnx_input_shape(path)[2], int) else ', height and width fixed')
    print(f'wrote {path} ({args.format}, input {shape}); max relative difference to {what}: {detail}')
    if args.format == 'hf':
        print(f"load it after `import refiner` (timm's registry must know the model): timm.create_model("
              f"'local-dir:{path}', pretrained=True), or with transformers: AutoModelForImageClassification"
              f".from_pretrained('{path}'), pipeline('image-classification', model='{path}')")
    if max(errs.values()) > tol:
        print(f'refiner export: outputs differ by more than {tol:g}', file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------- main

COMMANDS: Dict[str, tuple] = {
    'train': (_train_args, _train, 'train or resume a model (default: Refiner-ViT on the embedded digits)'),
    'eval': (_eval_args, _eval, 'evaluate a run, a weights file or an original checkpoint'),
    'predict': (_predict_args, _predict, 'classify image files and folders with any weights'),
    'ablate': (_ablate_args, _ablate, 'ablations under a matched budget: shipped studies or your own arms, on '
                                      'fractions of the training set'),
    'bench': (_bench_args, _bench, 'images/s and peak memory against a timm reference, in one run'),
    'export': (_export_args, _export, 'export to ONNX, TorchScript or a timm / Hub model folder, checked after'),
    'convert': (_convert_args, _convert, 'convert an original Refiner checkpoint to safetensors'),
}


def register(name: str, add_arguments: Callable, run: Callable, help_text: str) -> None:
    COMMANDS[name] = (add_arguments, run, help_text)


def _register_analysis() -> None:
    from .analysis import commands as analysis
    register('analyze', analysis.add_analyze_args, analysis.run_analyze,
             'over-smoothing analysis: CKA between blocks (cka), attention diversity (attention)')
    register('show-attention', analysis.add_show_attention_args, analysis.run_show_attention,
             "one image's attention per head, before and after refinement")


_register_analysis()


def build_parser() -> argparse.ArgumentParser:
    import timm
    import torch

    from . import __version__
    parser = argparse.ArgumentParser(
        prog='refiner', description='Refiner: refined self-attention for vision transformers')
    parser.add_argument('--version', action='version',
                        version=f'refiner {__version__} (timm {timm.__version__}, torch {torch.__version__})')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args) or 0
    except UsageError as e:
        print(f'refiner {args.command}: {e}', file=sys.stderr)
        return 2
    except RefinerError as e:  # every project error: a sentence for the user
        print(f'refiner {args.command}: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
