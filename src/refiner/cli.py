"""The ``refiner`` command line: one subcommand per job, each implemented in its own module."""
import argparse
import importlib
import sys
from typing import List, Optional

# subcommand -> module that provides add_arguments(parser) and main(args) -> int
COMMANDS = {
    'convert': ('refiner.convert_cli', 'convert an original Refiner checkpoint to safetensors'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='refiner', description='Refiner: refined self-attention for vision transformers')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.main(args) or 0
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
