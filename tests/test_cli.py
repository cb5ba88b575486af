"""The ``refiner`` command line: its interface (a golden file) and how ``main`` reports errors.

``tests/data/cli.json`` holds every subcommand, flag, choice and default of ``build_parser()``. It is
compared as a whole, so that moving code between modules cannot change the interface unnoticed. After a
deliberate change to the interface, regenerate it and review the diff::

    REFINER_REGEN_CLI=1 python -m pytest tests/test_cli.py -k golden
"""
import argparse
import json
import os
from pathlib import Path

import pytest

import refiner  # noqa: F401  (registers the models)
from refiner.cli import build_parser, main

GOLDEN = Path(__file__).parent / 'data' / 'cli.json'


def _describe(parser: argparse.ArgumentParser) -> dict:
    """A parser as plain data: each argument's flags, destination, nargs, type, choices, default and
    whether it is required; each subcommand's parser the same way (help text left out: it is prose)."""
    arguments, commands = [], {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            commands = {name: _describe(sub) for name, sub in action.choices.items()}
            continue
        arguments.append({
            'flags': list(action.option_strings) or [action.dest],
            'dest': action.dest,
            'action': type(action).__name__,
            'nargs': action.nargs,
            'type': getattr(action.type, '__name__', None if action.type is None else repr(action.type)),
            'choices': None if action.choices is None else list(action.choices),
            'default': action.default if action.default is not argparse.SUPPRESS else '==SUPPRESS==',
            'required': action.required,
            'metavar': action.metavar,
        })
    return {'arguments': arguments, 'commands': commands}


def _dump(tree: dict, indent: str = '') -> str:
    """One argument a line, so that a change to the interface is a one-line diff."""
    lines = [f'{indent}{{"arguments": [']
    lines += [f'{indent}  {json.dumps(a)},' for a in tree['arguments']]
    if tree['arguments']:
        lines[-1] = lines[-1][:-1]
    lines.append(f'{indent}], "commands": {{')
    for i, (name, sub) in enumerate(tree['commands'].items()):
        lines.append(f'{indent}  {json.dumps(name)}:')
        lines.append(_dump(sub, indent + '  ') + (',' if i < len(tree['commands']) - 1 else ''))
    lines.append(f'{indent}}}}}')
    return '\n'.join(lines)


def test_the_command_line_matches_the_golden_file():
    """Every subcommand, flag, choice and default, as checked in; regenerate with REFINER_REGEN_CLI=1."""
    now = _describe(build_parser())
    if os.environ.get('REFINER_REGEN_CLI'):
        GOLDEN.write_text(_dump(now) + '\n')
    golden = json.loads(GOLDEN.read_text())
    assert list(now['commands']) == list(golden['commands'])
    for name, command in golden['commands'].items():
        assert now['commands'][name] == command, f'refiner {name}: its arguments changed (see tests/test_cli.py)'
    assert now == golden


def _project_errors():
    import importlib
    import inspect
    import pkgutil

    found = {}
    for info in pkgutil.walk_packages(refiner.__path__, 'refiner.'):
        if info.name.endswith('__main__') or 'triton' in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith('refiner'):
                found[f'{obj.__module__}.{name}'] = obj
    return found


def test_every_project_error_derives_from_refiner_error_and_keeps_its_builtin_base():
    """``main`` catches one class: an error class that does not derive from it would print a traceback."""
    from refiner.errors import RefinerError
    errors = _project_errors()
    from refiner.config import ConfigError
    from refiner.data import DataError
    from refiner.devices import DeviceError
    from refiner.export import ExportError
    from refiner.pretrained import ModelError
    from refiner.train import TrainingError
    for cls in (ConfigError, TrainingError, DataError, ExportError, ModelError, DeviceError):
        assert cls in errors.values(), cls
    for name, cls in errors.items():
        assert issubclass(cls, RefinerError), f'{name} does not derive from refiner.errors.RefinerError'
    # the built-in base each had before stays, so that `except ValueError` / `except RuntimeError` still works
    assert issubclass(ConfigError, ValueError) and issubclass(TrainingError, RuntimeError)
    assert issubclass(ExportError, RuntimeError)


def test_main_prints_a_project_error_as_one_sentence(monkeypatch, capsys):
    from refiner import cli
    from refiner.data import DataError

    def fails(args):
        raise DataError('--data nowhere: no such folder')

    monkeypatch.setitem(cli.COMMANDS, 'eval', (cli.COMMANDS['eval'][0], fails, 'eval'))
    assert cli.main(['eval', '--checkpoint', 'x']) == 1
    assert capsys.readouterr().err == 'refiner eval: --data nowhere: no such folder\n'


def test_version_and_no_progress_on_every_long_command(capsys):
    """A first-hour trap (issue 22): ``--version`` says refiner's, timm's and torch's versions, and
    every long command accepts ``--no-progress``."""
    from refiner import __version__
    from refiner.cli import build_parser
    with pytest.raises(SystemExit) as exit_:
        main(['--version'])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f'refiner {__version__} (timm ')
    parser = build_parser()
    for argv in (['train'], ['eval', '--checkpoint', 'R'], ['predict', 'x.png', '--checkpoint', 'R'],
                 ['analyze', 'cka', '--checkpoint', 'R'], ['analyze', 'attention', '--checkpoint', 'R'],
                 ['ablate'], ['bench'], ['export', 'out.onnx', '--format', 'onnx']):
        assert parser.parse_args([*argv, '--no-progress']).no_progress is True, argv


@pytest.mark.parametrize('argv', [
    ['train', '--out', '{bad}'],
    ['ablate', '--out', '{bad}'],
    ['analyze', 'cka', '--out', '{bad}'],
    ['analyze', 'attention', '--out', '{bad}'],
    ['analyze', 'summary', 'R', '--out', '{bad}'],
    ['show-attention', 'x.png', '--out', '{bad}/a.png'],
    ['eval', '--checkpoint', 'R', '--json', '{bad}/m.json'],
    ['eval', '--checkpoint', 'R', '--confusion', '{bad}/c.png'],
    ['predict', 'x.png', '--checkpoint', 'R', '--json', '{bad}/p.json'],
    ['predict', 'x.png', '--checkpoint', 'R', '--csv', '{bad}/p.csv'],
    ['bench', '--json', '{bad}/b.json'],
    ['export', '{bad}/m.onnx', '--format', 'onnx'],
    ['convert', 'src.pth', '{bad}/m.safetensors'],
], ids=lambda argv: '-'.join(a for a in argv[:2] if not a.startswith('{')))
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(argv, tmp_path, capsys):
    """Every output a command writes is checked as the arguments are read (a usage error, exit 2), not
    after minutes of work as an ``OSError`` traceback: here a path inside an existing file."""
    bad = tmp_path / 'a_file'
    bad.write_text('not a folder')
    with pytest.raises(SystemExit) as exit_:
        main([a.format(bad=bad) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'Traceback' not in err
    assert f'{bad} is a file' in err.splitlines()[-1], err


@pytest.mark.parametrize('argv,code,message', [
    (['eval', '--checkpoint', 'R', '--batch-size', '0'], 2, 'argument --batch-size: must be >= 1, got 0'),
    (['predict', 'x.png', '--checkpoint', 'R', '--workers', '-1'], 2, 'argument --workers: must be >= 0, got -1'),
    (['bench', '--rounds', '0'], 2, 'argument --rounds: must be >= 1, got 0'),
    (['bench', '--batch-size', '4', 'x'], 2, "argument --batch-size: expected a whole number, got 'x'"),
    (['export', 'm.onnx', '--format', 'onnx', '--img-size', '-4'], 2, 'argument --img-size: must be >= 1'),
    (['export', '{tmp}', '--format', 'torchscript', '--model', 'refiner_vit_nano'], 2, 'is a folder; --format '
     'torchscript writes one file'),
    (['export', '{tmp}/model.safetensors', '--format', 'onnx', '--model', 'refiner_vit_nano'], 2,
     'model.safetensors names weights, not an onnx file; the output comes first'),
    (['show-attention', 'x.png', '--model', 'refiner_vit_nano', '--query=-1,-1'], 1, '--query must be ROW,COL'),
])
def test_a_bad_count_size_or_output_is_refused_before_any_work(argv, code, message, tmp_path, capsys):
    """Values PyTorch would only refuse deep inside (a DataLoader with batch 0), a folder or a weights file
    named as the export's output (which would be overwritten), a signed query that once meant the class
    token: each a one-line error before a model is built."""
    try:
        returned = main([a.replace('{tmp}', str(tmp_path)) for a in argv])
    except SystemExit as exit_:  # argparse's own usage errors
        returned = exit_.code
    assert returned == code
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err, err
    assert not (tmp_path / 'model.safetensors').exists()


def test_bench_on_a_missing_gpu_is_one_sentence(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip('a GPU is here')
    assert main(['bench', '--model', 'refiner_vit_nano', '--reference', 'none', '--device', 'cuda']) == 1
    assert 'no CUDA device is available; use --device cpu' in capsys.readouterr().err
