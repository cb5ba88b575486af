"""``refiner ablate``: its arguments (the built-in arms' choices read from the arm table) and its results table."""
import argparse

from ..argtypes import output_folder
from .common import UsageError

__all__ = ['add_ablate_args', 'run_ablate']


def add_ablate_args(p: argparse.ArgumentParser) -> None:
    from ..ablate import BUILTINS
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
    p.add_argument('--data', help="dataset, as train's --data (default: the study's, else the embedded digits)")
    p.add_argument('--fractions', type=float, nargs='+', help="fractions of the training split (default: the "
                                                               "study's, else 0.05 0.1 0.25 1)")
    p.add_argument('--seeds', type=int, nargs='+', help="default: the study's, else 0 1 2")
    p.add_argument('--config', help="recipe every arm starts from (default: the dataset's own: 'default' on the "
                                    "digits, 'digits_clutter', 'fashion_mnist'; none for a folder)")
    p.add_argument('--epochs', type=int, help="the full-data run's epochs (the budget; default: the study's, "
                                              "else the recipe's)")
    p.add_argument('--out', type=output_folder,
                   help='folder of the runs and results (default: runs/ablate/<study>, else runs/ablate)')
    p.add_argument('--reuse', nargs='+', metavar='FOLDER',
                   help="other ablations' output folders: a run that one of their finished runs trains exactly as "
                        "(same config, model arguments resolved, same fraction and seed) is copied, not trained; "
                        "one that another invocation is training there is waited for")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help="override any config key for every arm (YAML value; the arms' own overrides win)")
    p.add_argument('--report-only', action='store_true',
                   help='train nothing: write the results of the runs finished so far (an interim report of a '
                        'long study, which may be running meanwhile)')
    p.add_argument('--no-progress', action='store_true')


def run_ablate(args: argparse.Namespace) -> int:
    from ..ablate import list_studies, run_ablation
    from ..config import ConfigError, parse_set
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
                              epochs=args.epochs, reuse=args.reuse, report_only=args.report_only)
    except ConfigError as e:  # a study, an arm or an override that is not valid: the user's input
        raise UsageError(str(e)) from None
    print(report['table'])
    print(f'results: {report["out"]}/ablation.json, ablation.md, ablation.png')
    return 0
