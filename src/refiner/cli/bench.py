"""``refiner bench``: its arguments, the configurations they span, and the table it prints."""
import argparse
import sys

from ..argtypes import non_negative_int, output_file, positive_int
from .common import UsageError, model_dtype_arg

__all__ = ['add_bench_args', 'run_bench_command']


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', nargs='+', default=['refiner_vit_s'], metavar='NAME[:KEY=VALUE,...]',
                   help='timm models, each with optional model arguments (YAML values), '
                        'e.g. refiner_vit_s:refine_layout=spatial')
    p.add_argument('--batch-size', type=positive_int, nargs='+', default=[16])
    p.add_argument('--img-size', type=positive_int, nargs='+', default=[224])
    p.add_argument('--train', action='store_true', help='also measure a training step (forward, backward, AdamW)')
    p.add_argument('--no-infer', action='store_true', help='skip the inference measurement')
    p.add_argument('--compile', action='store_true', help='torch.compile the models')
    p.add_argument('--no-reparameterize', action='store_true', help='measure inference without re-parameterizing')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['none', 'bf16'], default='none')
    model_dtype_arg(p, several=True)
    p.add_argument('--reference', default='deit_small_patch16_224', help="timm model to compare with ('none': skip)")
    p.add_argument('--rounds', type=positive_int, default=3, help='alternating rounds of fresh processes')
    p.add_argument('--steps', type=positive_int, default=5, help='timed steps per process')
    p.add_argument('--warmup', type=non_negative_int, default=2)
    p.add_argument('--json', metavar='FILE', type=output_file,
                   help='write the report (default: runs/bench/bench-<time>.json)')
    p.add_argument('--no-progress', action='store_true', help="no 'round i/n' lines")


def run_bench_command(args: argparse.Namespace) -> int:
    import time

    import timm

    import refiner  # noqa: F401  (registers the models)

    from ..bench import BenchConfig, format_table, run_bench, save_report
    from ..config import ConfigError, parse_set
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
    from ..devices import resolve_device
    device = str(resolve_device(args.device))  # 'cuda' without a GPU: one sentence, not a driver traceback
    configs = [BenchConfig(model=m, model_args=kw, mode=mode, batch_size=b, img_size=s, device=device,
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
    if all('error' in row for row in report['rows']):
        print('refiner bench: every configuration failed (see the errors above)', file=sys.stderr)
        return 1
    return 0
