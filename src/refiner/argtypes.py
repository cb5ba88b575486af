"""argparse types that refuse a bad value as the arguments are read: counts, sizes and output paths.

A value a command cannot use (``--batch-size 0``, ``--workers -1``, an output folder under a file) is a
usage error that names the flag (argparse's exit code 2), before a model is loaded or a file written,
instead of a traceback from deep inside PyTorch minutes later. argparse shows the message of an
``ArgumentTypeError`` only, hence these small wrappers.
"""
import argparse
from typing import Callable

from .fileio import output_problem

__all__ = ['positive_int', 'non_negative_int', 'output_folder', 'output_file', 'output_path']


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {value}')
    return value


def positive_int(text: str) -> int:
    """A count or a size: 1 or more."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """A count that may be 0 (``--workers``, ``--warmup``)."""
    return _int(text, 0)


def _output_type(kind: str, name: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        problem = output_problem(value, kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    check.__name__ = name
    return check


# ``add_argument('--out', type=output_folder)``: a path that cannot be written is a usage error
output_folder = _output_type('folder', 'output_folder')
output_file = _output_type('file', 'output_file')
output_path = _output_type('any', 'output_path')  # a file or a folder (export: a file, or a folder for hf)
