"""refiner eval: a run's EMA weights and its training split."""
import json

import pytest

import refiner  # noqa: F401  (registers the models)


def test_eval_ema_and_train_split(trained_run, tmp_path):
    """``refiner eval --ema`` evaluates the EMA weights (the run's EMA loss, not the model's), and
    ``--split train`` the whole training split (1347 digits, not the 450 held out)."""
    from refiner.cli import main
    out, summary = trained_run
    last = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert abs(last['ema_eval_loss'] - last['eval_loss']) > 1e-4  # the two are distinguishable
    results = {}
    for name, extra in (('val', []), ('ema', ['--ema']), ('train', ['--split', 'train'])):
        path = tmp_path / f'{name}.json'
        assert main(['eval', '--checkpoint', str(out), '--json', str(path), *extra]) == 0
        results[name] = json.loads(path.read_text())
    assert results['val']['n'] == results['ema']['n'] == 450 and results['train']['n'] == 1347
    assert results['val']['loss'] == pytest.approx(last['eval_loss'], rel=1e-5)
    assert results['ema']['loss'] == pytest.approx(last['ema_eval_loss'], rel=1e-5)
    assert results['ema']['top1'] == pytest.approx(summary['ema_top1'])
    assert results['train']['loss'] != pytest.approx(results['val']['loss'], rel=1e-3)
