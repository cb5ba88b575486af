"""What the command groups share: the one-sentence usage error, the weight-source help and ``--model-dtype``."""
import argparse

from ..errors import RefinerError

__all__ = ['UsageError', 'SOURCE_HELP', 'model_dtype_arg']

SOURCE_HELP = ('a run directory, a .safetensors written by refiner, an original Refiner checkpoint (.pth, .pth.tar), '
               'a timm / Hub model folder (config.json + weights), or a timm model file (.pth, .bin, .safetensors; '
               'needs --model)')


class UsageError(RefinerError):
    """Arguments that do not fit together (exit code 2, as argparse's own)."""


def model_dtype_arg(p: argparse.ArgumentParser, several: bool = False) -> None:
    from ..devices import MODEL_DTYPES
    p.add_argument('--model-dtype', choices=list(MODEL_DTYPES), nargs='+' if several else None,
                   default=['float32'] if several else None,
                   help='cast the weights (and inputs) to this dtype, no autocast, as timm\'s --model-dtype'
                        + ('; several: measured side by side' if several else ' (default: as stored)'))
