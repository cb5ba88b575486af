"""``refiner eval`` and ``refiner predict``: a model's weights applied to a dataset or to image files."""
import argparse
import sys

from ..argtypes import non_negative_int, output_file, positive_int
from .common import SOURCE_HELP, model_dtype_arg

__all__ = ['add_eval_args', 'run_eval', 'add_predict_args', 'run_predict']


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', required=True, help=SOURCE_HELP)
    p.add_argument('--model', help='the timm model name of a bare weights file')
    p.add_argument('--data', help="dataset (default: the run's, else the embedded digits)")
    p.add_argument('--split', choices=['val', 'train'], default='val')
    p.add_argument('--ema', action='store_true', help="evaluate a run's EMA weights")
    p.add_argument('--batch-size', type=positive_int, default=64)
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=non_negative_int, default=0)
    p.add_argument('--confusion', metavar='PNG', type=output_file, help='write the confusion matrix as a PNG')
    p.add_argument('--json', metavar='FILE', type=output_file, help='write the metrics as JSON')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    model_dtype_arg(p)


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_checkpoint, format_report, plot_confusion, save_json
    res = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.ema, args.batch_size, args.device,
                              args.workers, progress=not args.no_progress, model_name=args.model,
                              dtype=args.model_dtype)
    print(format_report(res))
    if args.confusion:
        print(f'confusion matrix: {plot_confusion(res["confusion"], res["classes"], args.confusion)}')
    if args.json:
        save_json(res, args.json)
    return 0


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('inputs', nargs='+', metavar='INPUT', help='image files and folders (searched recursively)')
    p.add_argument('--checkpoint', required=True, help=SOURCE_HELP)
    p.add_argument('--model', help='the timm model name of a bare weights file')
    p.add_argument('--topk', type=positive_int, default=5)
    p.add_argument('--ema', action='store_true', help="a run's EMA weights")
    p.add_argument('--batch-size', type=positive_int, default=32)
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=non_negative_int, default=0)
    p.add_argument('--json', metavar='FILE', type=output_file, help='write every prediction as JSON')
    p.add_argument('--csv', metavar='FILE', type=output_file,
                   help='write one row per image: file, label1, prob1, label2, ...')
    p.add_argument('--no-progress', action='store_true')
    model_dtype_arg(p)


def run_predict(args: argparse.Namespace) -> int:
    from ..predict import format_predictions, predict, write_predictions
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
