"""Defaults derived from the run for a user's dataset trained without a recipe (refiner.defaults), and
an EMA that is reported only once it is no longer mostly its starting weights."""
import contextlib
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from refiner.cli import main
from refiner.config import TrainConfig
from refiner.defaults import DERIVABLE, RunSize, derive, ema_start_share


def _folder(root, n_per_class=12, side=20):
    """A tiny image folder of three classes that differ in brightness."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_per_class), ('val', 4)):
        for c in range(3):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(n):
                arr = (rng.integers(0, 40, size=(side, side)) + 90 * c).astype(np.uint8)
                Image.fromarray(arr).save(root / split / f'c{c}' / f'{i}.png')
    return root


def test_at_deits_scale_the_derived_values_are_deits():
    """ImageNet (1.28M images at 224 px, 300 epochs of 2,502 steps) derives TrainConfig's own values."""
    values, lines = derive(RunSize(num_train=1_281_167, img_size=224, epochs=300, steps_per_epoch=1251), DERIVABLE)
    deit = TrainConfig()
    for key in ('lr', 'warmup_epochs', 'cooldown_epochs', 'drop_path', 'hflip', 'aa', 'reprob', 'mixup', 'cutmix',
                'ema_decay'):
        assert values[key] == pytest.approx(getattr(deit, key)), key
    assert values['scale'] == pytest.approx(deit.scale) and values['ratio'] == pytest.approx(deit.ratio, abs=1e-4)
    assert len(lines) == len(DERIVABLE)


def test_a_small_short_run_gets_values_that_fit_it():
    """6,000 images at 28 px for 930 steps (the issue's Fashion-MNIST folder): no Mixup/CutMix or
    RandAugment, crops that keep most of the image, no erasing, a 10x learning rate, an EMA over a tenth of the run."""
    values, lines = derive(RunSize(num_train=6000, img_size=28, epochs=10, steps_per_epoch=93), DERIVABLE)
    assert values['mixup'] == values['cutmix'] == 0.0 and values['aa'] is None
    assert values['lr'] == pytest.approx(5e-3) and values['warmup_epochs'] == 0.5 and values['cooldown_epochs'] == 0
    assert values['scale'] == [0.7, 1.0] and values['reprob'] == 0.0 and values['drop_path'] == 0.05
    big = derive(RunSize(6000, 112, 10, 93), ['scale', 'reprob'])[0]  # as many pixels as DeiT's smallest crop
    assert big == {'scale': [0.32, 1.0], 'reprob': 0.25}
    assert values['ema_decay'] == pytest.approx(1 - 10 / 930) and values['ema_warmup'] is True
    assert '  mixup 0: off: 930 steps (Mixup/CutMix need at least 50,000) at 28 px' in lines
    only = derive(RunSize(6000, 28, 10, 93), ['lr'])[0]
    assert list(only) == ['lr']


def test_ema_start_share_follows_timms_decay():
    import torch
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.99996)
    assert ema_start_share(ema.get_decay, 930) == pytest.approx(0.99996 ** 929)  # the first update copies
    warm = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.99, use_warmup=True)
    share = np.prod([warm.get_decay(s) for s in range(2, 501)])
    assert ema_start_share(warm.get_decay, 500) == pytest.approx(share) and share < 1e-3


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    """The same tiny folder trained with no recipe (an lr flag and a --set given) and with --config deit:
    (root, {name: printed lines})."""
    root = tmp_path_factory.mktemp('derived')
    data = _folder(root / 'data')
    common = ['--data', str(data), '--model', 'refiner_vit_nano', '--img-size', '20', '--epochs', '2',
              '--batch-size', '6', '--no-progress']
    printed = {}
    for name, extra in (('derived', ['--lr', '3e-3', '--set', 'reprob=0.5']), ('deit', ['--config', 'deit'])):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(['train', *common, '--out', str(root / name), *extra]) == 0
        printed[name] = out.getvalue().splitlines()
    return root, printed


def test_a_folder_without_recipe_derives_prints_and_records_its_defaults(two_runs):
    root, printed = two_runs
    out = printed['derived']
    assert out[1].startswith('defaults derived from the run (36 training images, 20 px, 12 optimizer steps; no '
                             'recipe given): set any with its flag or --set KEY=VALUE')
    derived = {line.split()[0]: line for line in out[2:2 + len(DERIVABLE) - 2]}
    assert set(derived) == set(DERIVABLE) - {'lr', 'reprob'}  # given by a flag and by --set: kept
    assert derived['mixup'] == '  mixup 0: off: 12 steps (Mixup/CutMix need at least 50,000) at 20 px'
    # classes told apart by brightness alone: centred pixels' neighbours cannot show what mirroring does
    assert derived['hflip'].startswith("  hflip 0.5: DeiT's: nearest neighbours on pixels tell nothing of mirroring")
    assert out[2 + len(DERIVABLE) - 2].startswith('learning rate ') and 'lr 0.003' in out[2 + len(DERIVABLE) - 2]
    cfg = yaml.safe_load((root / 'derived' / 'config.yaml').read_text())
    assert cfg['lr'] == 3e-3 and cfg['reprob'] == 0.5 and cfg['mixup'] == 0.0 and cfg['aa'] is None
    assert cfg['ema_decay'] == pytest.approx(0.9) and cfg['scale'] == [0.7, 1.0]
    assert sorted(cfg['derive_keys']) == sorted(set(DERIVABLE) - {'lr', 'reprob'})

    assert not any('defaults derived' in line for line in printed['deit'])
    cfg = yaml.safe_load((root / 'deit' / 'config.yaml').read_text())
    assert cfg['mixup'] == 0.8 and cfg['aa'] == TrainConfig.aa and cfg['derive_keys'] == []


def test_an_ema_still_mostly_its_start_is_not_reported(two_runs):
    """DeiT's EMA decay over a dozen steps is still its starting weights: neither the epoch lines nor the
    summary give its figure, and they say why; the derived EMA is reported."""
    root, printed = two_runs
    deit = '\n'.join(printed['deit'])
    assert 'EMA not reported: 100% of it is still its starting weights after 12 steps at ema_decay 0.99996' in deit
    assert '(EMA ' not in deit.replace('(EMA not reported', '')
    assert 'ema_top1' not in json.loads((root / 'deit' / 'summary.json').read_text())
    derived = '\n'.join(printed['derived'])
    assert 'EMA not reported' not in derived and '(EMA top-1 ' in derived
    assert 'ema_top1' in json.loads((root / 'derived' / 'summary.json').read_text())


def test_a_resume_keeps_the_values_it_derived(tmp_path, capsys, monkeypatch):
    """The derived values are recorded; a resume trains with them and derives nothing again."""
    import refiner.train.setup as train_setup  # where derive is called
    data = _folder(tmp_path / 'data')
    run = tmp_path / 'run'
    assert main(['train', '--data', str(data), '--model', 'refiner_vit_nano', '--img-size', '20', '--epochs', '2',
                 '--batch-size', '6', '--no-progress', '--out', str(run)]) == 0
    before = (run / 'config.yaml').read_text()
    (run / 'summary.json').unlink()
    calls = []
    monkeypatch.setattr(train_setup, 'derive', lambda *a: calls.append(a) or ({}, []))
    capsys.readouterr()
    assert main(['train', '--resume', str(run), '--no-progress']) == 0
    assert calls == [] and 'defaults derived' not in capsys.readouterr().out
    assert (run / 'config.yaml').read_text() == before
