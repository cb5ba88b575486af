"""The ``refiner`` command line: the commands' table, the parser built from it, and ``main``.

Each command group has its module, holding its arguments and what it prints, and calls the library
for the rest: :mod:`.train`, :mod:`.inference` (eval, predict), :mod:`.ablate`, :mod:`.bench`,
:mod:`.export` (export, convert); ``analyze`` and ``show-attention`` are
:mod:`refiner.analysis.commands`'. Errors a user can fix are printed as one sentence (exit code 1, or 2
for arguments that do not fit together), never as a traceback.
"""
import argparse
import sys
from typing import Callable, Dict, List, Optional

from ..errors import RefinerError
from .ablate import add_ablate_args, run_ablate
from .bench import add_bench_args, run_bench_command
from .common import UsageError
from .export import add_convert_args, add_export_args, run_convert, run_export
from .inference import add_eval_args, add_predict_args, run_eval, run_predict
from .train import add_train_args, run_train

__all__ = ['main', 'build_parser', 'COMMANDS', 'register', 'UsageError']

COMMANDS: Dict[str, tuple] = {
    'train': (add_train_args, run_train, 'train or resume a model (default: Refiner-ViT on the embedded digits)'),
    'eval': (add_eval_args, run_eval, 'evaluate a run, a weights file or an original checkpoint'),
    'predict': (add_predict_args, run_predict, 'classify image files and folders with any weights'),
    'ablate': (add_ablate_args, run_ablate, 'ablations under a matched budget: shipped studies or your own arms, on '
                                            'fractions of the training set'),
    'bench': (add_bench_args, run_bench_command, 'images/s and peak memory against a timm reference, in one run'),
    'export': (add_export_args, run_export, 'export to ONNX, TorchScript or a timm / Hub model folder, checked after'),
    'convert': (add_convert_args, run_convert, 'convert an original Refiner checkpoint to safetensors'),
}


def register(name: str, add_arguments: Callable, run: Callable, help_text: str) -> None:
    COMMANDS[name] = (add_arguments, run, help_text)


def _register_analysis() -> None:
    from ..analysis import commands as analysis
    register('analyze', analysis.add_analyze_args, analysis.run_analyze,
             'over-smoothing analysis: CKA between blocks (cka), attention diversity (attention)')
    register('show-attention', analysis.add_show_attention_args, analysis.run_show_attention,
             "one image's attention per head, before and after refinement")


_register_analysis()


def build_parser() -> argparse.ArgumentParser:
    import timm
    import torch

    from .. import __version__
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
