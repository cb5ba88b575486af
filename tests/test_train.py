"""refiner train / eval end to end on tiny data: outputs, exact resume, torchrun, messy folders, errors."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from refiner.config import TrainConfig, apply_overrides, load_recipe
from refiner.train import TrainingError, train

# a very small Refiner on a fraction of the digits: seconds per epoch
TINY = ['--set', 'model_args={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}', '--train-fraction', '0.2',
        '--batch-size', '16', '--no-progress']
ENV = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}


def _refiner(*args, check=True, timeout=300):
    res = subprocess.run([sys.executable, '-m', 'refiner', *map(str, args)], capture_output=True, text=True,
                         env=ENV, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_default_run_end_to_end_and_eval(tmp_path):
    out = tmp_path / 'run'
    res = _refiner('train', '--epochs', '2', '--out', out, *TINY)
    assert 'results:' in res.stdout
    summary = json.loads((out / 'summary.json').read_text())
    for key in ('top1', 'top5', 'epochs', 'images_per_s', 'skipped_files'):
        assert key in summary
    assert summary['epochs'] == 2 and summary['skipped_files'] == 0 and 0 <= summary['top1'] <= 100
    lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [x['epoch'] for x in lines] == [1, 2]
    for key in ('train_loss', 'top1', 'top5', 'lr', 'images_per_s', 'wall_time_s'):
        assert key in lines[0]
    cfg = yaml.safe_load((out / 'config.yaml').read_text())
    assert cfg['model'] == 'refiner_vit_nano' and cfg['epochs'] == 2 and cfg['data'] == 'digits'
    assert (out / 'model.safetensors').is_file() and (out / 'model_ema.safetensors').is_file()

    ev = _refiner('eval', '--checkpoint', out, '--confusion', tmp_path / 'cm.png', '--json', tmp_path / 'ev.json')
    assert 'top-1' in ev.stdout and 'per-class' in ev.stdout
    evaluated = json.loads((tmp_path / 'ev.json').read_text())
    assert abs(evaluated['top1'] - summary['top1']) < 1e-6  # same weights, same held-out split
    assert (tmp_path / 'cm.png').stat().st_size > 1000
    _refiner('eval', '--checkpoint', out / 'model_ema.safetensors')


def test_eval_accepts_an_original_checkpoint(tmp_path):
    res = _refiner('eval', '--checkpoint', 'tests/data/official_tiny.pt', '--data', 'digits', '--json',
                   tmp_path / 'ev.json')
    assert 'per-class top-1' in res.stdout
    assert json.loads((tmp_path / 'ev.json').read_text())['n'] == 450
    no_data = _refiner('eval', '--checkpoint', 'tests/data/official_tiny.pt', check=False)
    assert no_data.returncode == 1 and 'give --data' in no_data.stderr


def _tensors(path: Path):
    return load_file(str(path))


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    common = ['--epochs', '3', '--checkpoint-every', '2', *TINY, '--seed', '3']
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    _refiner('train', '--out', ref, *common)

    proc = subprocess.Popen([sys.executable, '-m', 'refiner', 'train', '--out', str(killed), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    state = killed / 'checkpoint.pt'
    while time.time() < deadline and proc.poll() is None:  # kill once a few steps are saved, mid-epoch
        if state.is_file():
            step = torch.load(state, weights_only=True)['global_step']
            if step >= 5:
                break
        time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / 'summary.json').exists()
    res = _refiner('train', '--resume', killed, '--no-progress')
    assert 'resuming at epoch' in res.stdout
    a, b = _tensors(ref / 'model.safetensors'), _tensors(killed / 'model.safetensors')
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _tensors(ref / 'model_ema.safetensors'), _tensors(killed / 'model_ema.safetensors')
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert (ref / 'metrics.jsonl').read_text().count('\n') == (killed / 'metrics.jsonl').read_text().count('\n') == 3
    finished = _refiner('train', '--resume', killed, check=False)
    assert finished.returncode == 1 and 'already finished' in finished.stderr


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / 'ddp'
    res = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
         '-m', 'refiner', 'train', '--out', str(out), '--epochs', '1', *TINY],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['world_size'] == 2
    line = json.loads((out / 'metrics.jsonl').read_text().splitlines()[0])
    assert line['top1'] == summary['top1']
    evaluated = _refiner('eval', '--checkpoint', out, '--json', tmp_path / 'ev.json')
    assert evaluated.returncode == 0
    # both ranks evaluated half of the held-out split; the reduced count is the whole split
    assert json.loads((tmp_path / 'ev.json').read_text())['n'] == 450
    assert abs(json.loads((tmp_path / 'ev.json').read_text())['top1'] - summary['top1']) < 1e-6


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _messy_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (('train', 6), ('val', 3)):
        for c, cls in enumerate(('cat', 'dog')):
            d = root / split / cls
            for i in range(n):
                arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
                arr[..., c] = 255  # a learnable colour cue
                _save(Image.fromarray(arr), d / f'rgb{i}.png')
            _save(Image.fromarray(arr[..., 0]), d / 'grey.png')
            _save(Image.fromarray(arr).convert('P', palette=Image.ADAPTIVE), d / 'palette.gif')
            _save(Image.fromarray(arr).convert('RGBA'), d / 'rgba.png')
            _save(Image.fromarray(arr).convert('CMYK'), d / 'cmyk.jpg')
            _save(Image.fromarray(arr[..., 0].astype(np.uint16) * 257), d / 'sixteen.png')
            _save(Image.fromarray(arr[:5, :5]), d / 'tiny.png')  # smaller than the crop
    (root / 'train' / 'cat' / 'corrupt.jpg').write_bytes(b'not an image at all' * 10)
    good = io.BytesIO()
    Image.fromarray(arr).save(good, format='JPEG')
    (root / 'train' / 'dog' / 'truncated.jpg').write_bytes(good.getvalue()[:200])
    (root / 'train' / 'dog' / 'notes.txt').write_text('ignored')


def test_messy_image_folder(tmp_path):
    data, out = tmp_path / 'data', tmp_path / 'run'
    _messy_folder(data)
    res = _refiner('train', '--data', data, '--config', 'default', '--out', out, '--epochs', '2', '--batch-size', '4',
                   '--img-size', '16', '--set', 'model_args={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}',
                   '--no-progress')
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['skipped_files'] == 2, summary
    assert {Path(p).name for p in summary['skipped_paths']} == {'corrupt.jpg', 'truncated.jpg'}
    assert summary['num_train'] == 2 * 12 + 2 and summary['num_val'] == 2 * 9
    assert '2 unreadable file(s) skipped' in res.stdout


@pytest.mark.parametrize('args,message', [
    (['--data', '{tmp}/missing'], 'no such directory'),
    (['--data', '{tmp}/empty'], 'expected train/ and val/ subfolders'),
    (['--data', '{tmp}/noimages'], 'no image files'),
    (['--model', 'refiner_vit_tiniest'], 'not a timm model name'),
    (['--batch-size', '4096'], 'larger than the 1347 training images'),
    (['--resume', '{tmp}'], 'not a run directory'),
    (['--set', 'mixup=0.8', '--batch-size', '7'], 'batch_size must be even'),
    (['--amp', 'fp16', '--device', 'cpu'], 'fp16 needs CUDA'),
    (['--set', 'no_such_key=1'], "unknown config keys ['no_such_key']"),
    (['--config', 'imagenet_giant'], 'not a file and not a shipped recipe'),
])
def test_bad_input_gets_one_clear_sentence(tmp_path, args, message):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'noimages' / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'noimages' / 'val' / 'a').mkdir(parents=True)
    args = [a.replace('{tmp}', str(tmp_path)) for a in args]
    if '--resume' not in args:
        args += ['--out', tmp_path / 'out', '--epochs', '1']
    res = _refiner('train', *args, '--no-progress', check=False)
    assert res.returncode in (1, 2), res.stdout + res.stderr
    assert message in res.stderr, res.stderr
    assert 'Traceback' not in res.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from refiner.train.trainer import Trainer
    original = Trainer._loss
    calls = {'n': 0}

    def poisoned(self, images, targets):
        calls['n'] += 1
        loss = original(self, images, targets)
        return loss * float('nan') if calls['n'] > 4 else loss

    monkeypatch.setattr(Trainer, '_loss', poisoned)
    cfg = apply_overrides(load_recipe('default'), dict(
        epochs=2, batch_size=16, train_fraction=0.2, checkpoint_every=2,
        model_args={'patch_size': 2, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}))
    with pytest.raises(TrainingError, match='the loss became nan at step 4'):
        train(cfg, out=str(tmp_path / 'run'), progress=False)
    state = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)
    assert state['global_step'] == 4
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())


def test_a_failing_save_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    """A write that fails (disk full, kill) must not corrupt what was there: temp file, fsync, rename."""
    from refiner.checkpoint import load_state, save_state
    path = tmp_path / 'checkpoint.pt'
    save_state({'global_step': 1, 'w': torch.ones(3)}, path)

    def disk_full(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(OSError, match='No space left'):
        save_state({'global_step': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_state(path)['global_step'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pt']  # no temporary file left behind


def test_token_labeling_mixtoken_and_attention_regulariser(tmp_path):
    cfg = apply_overrides(load_recipe('default'), dict(
        epochs=1, batch_size=16, train_fraction=0.2, token_labeling=True, mix_token=True, attn_cos_reg=0.1,
        attn_cos_pairs=12, mixup=0.8, cutmix=1.0,
        model_args={'patch_size': 2, 'embed_dim': 32, 'depth': 4, 'num_heads': 2}))
    summary = train(cfg, out=str(tmp_path / 'tl'), progress=False)
    assert summary['epochs'] == 1 and np.isfinite(summary['eval_loss'])
    weights = load_file(str(tmp_path / 'tl' / 'model.safetensors'))
    assert 'aux_head.weight' in weights


def test_plain_vit_baseline_is_one_flag_away(tmp_path):
    res = _refiner('train', '--model', 'vit_tiny_patch16_224', '--out', tmp_path / 'vit', '--epochs', '1',
                   '--set', 'model_args={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}',
                   '--train-fraction', '0.2', '--batch-size', '16', '--no-progress')
    assert 'vit_tiny_patch16_224' in res.stdout
    assert json.loads((tmp_path / 'vit' / 'summary.json').read_text())['epochs'] == 1


def test_recipes_load_and_validate():
    from refiner.config import list_recipes
    names = list_recipes()
    assert {'default', 'refiner_s', 'refiner_m', 'refiner_s_tl', 'refiner_m_tl', 'refiner_l_tl'} <= set(names)
    for name in names:
        cfg = apply_overrides(load_recipe(name), {})
        assert isinstance(cfg, TrainConfig)
    s = apply_overrides(load_recipe('refiner_s'), {})
    assert (s.epochs, s.cooldown_epochs, s.lr, s.weight_decay, s.warmup_epochs, s.ema_decay) == (310, 10, 5e-4, .05, 5,
                                                                                                  .99996)
    assert s.aa == 'rand-m9-mstd0.5-inc1' and s.reprob == 0.25 and (s.mixup, s.cutmix, s.smoothing) == (.8, 1., .1)
    assert apply_overrides(load_recipe('refiner_l_tl'), {}).drop_path == 0.25
    # each embedded dataset has its recipe; a dataset of yours starts from TrainConfig's defaults
    from refiner.config import default_recipe
    assert [default_recipe(d) for d in (None, 'digits', 'digits_clutter', 'data/mine')] == [
        'default', 'default', 'digits_clutter', None]
    clutter, default = apply_overrides(load_recipe('digits_clutter'), {}), apply_overrides(load_recipe('default'), {})
    assert (clutter.data, clutter.img_size, default.img_size) == ('digits_clutter', 32, 16)
    assert clutter.model == default.model and clutter.lr == default.lr  # the rest is the default run's


def test_ablate_end_to_end_reuses_finished_runs(tmp_path):
    out = tmp_path / 'ablate'
    args = ('ablate', '--fractions', '0.1', '1', '--seeds', '0', '1', '--models', 'refiner', 'vit', 'convstem_vit',
            '--epochs', '1', '--out', out, '--no-progress',
            '--set', 'model_args={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}')
    res = _refiner(*args)
    report = json.loads((out / 'ablation.json').read_text())
    assert report['fractions'] == [0.1, 1.0] and report['seeds'] == [0, 1]
    for model in ('refiner', 'vit', 'convstem_vit'):
        for fraction in ('0.1', '1'):
            assert len(report['top1'][model][fraction]) == 2
            assert all(0 <= t <= 100 for t in report['top1'][model][fraction])
            summary = json.loads((out / f'{model}-f{fraction}-s0' / 'summary.json').read_text())
            assert summary['num_train'] == report['models'][model]['train_images'][fraction]
        assert report['models'][model]['train_images']['0.1'] < report['models'][model]['train_images']['1']
    # the arms are matched in shape, and the plain ViT and the stem-only arm carry no refinement
    assert report['models']['vit']['model'].startswith('vit_')
    cfg = yaml.safe_load((out / 'convstem_vit-f1-s0' / 'config.yaml').read_text())
    assert cfg['model_args']['refine_blocks'] == [False, False]
    # the same budget: the 10% runs take 10× the epochs of the full runs
    epochs = {f: json.loads((out / f'refiner-f{f}-s0' / 'summary.json').read_text())['epochs'] for f in ('0.1', '1')}
    assert epochs['0.1'] >= 9 * epochs['1']
    assert 'refiner' in res.stdout and '±' in (out / 'ablation.md').read_text()
    assert (out / 'ablation.png').stat().st_size > 1000
    # finished runs are reused: a second call trains nothing and reports the same numbers
    start = time.time()
    _refiner(*args)
    assert json.loads((out / 'ablation.json').read_text())['top1'] == report['top1']
    assert time.time() - start < 60
