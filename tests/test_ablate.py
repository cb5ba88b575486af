"""refiner ablate: every shipped study end to end on tiny settings, reuse of finished runs, a changed
arm refused, a study killed at any moment and continued, invocations sharing a study, the FLOPs
count, bad input."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from refiner.ablate import arm_configs, count_flops, list_studies, load_study
from refiner.cli import main
from refiner.config import load_recipe
from refiner.fileio import exclusive_lock

# one fraction, one seed, a budget of one epoch, two classes, a narrow model (depth kept: the
# blocks study names every block): a second or two per run (half the data: two epochs of 4 steps)
TINY = ['--fractions', '0.5', '--seeds', '0', '--epochs', '1', '--no-progress', '--set', 'classes=[0,1]',
        '--set', 'batch_size=32', '--set', 'ema=false', '--set', 'model_args.embed_dim=32',
        '--set', 'model_args.num_heads=2']
STUDIES = [name for name, _ in list_studies()]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU lose a lot to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ablate(capsys, *args):
    code = main(['ablate', *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob('*')) if p.is_file() and p.parent != root}


def test_shipped_studies():
    assert {'expansion', 'kernel', 'dla_form', 'spatial', 'blocks', 'refinement', 'grid8_refinement',
            'grid8_spatial', 'grid8_expansion', 'grid8_kernel', 'grid8_dla_form', 'clutter_components'} <= set(STUDIES)
    for name in STUDIES:
        study = load_study(name)
        assert study.description and len(study.arms) >= 2
        assert study.fractions in ([0.1, 1.0], [1.0], [0.1]) and study.seeds == [0, 1, 2]
        if name.startswith('fmnist'):  # real images: 3 full-split epochs' worth of images per run
            assert study.base == {'data': 'fashion_mnist'} and study.epochs == 3
            continue
        assert 10 <= study.epochs <= 40 and study.fractions != [0.1]
        if name.startswith(('grid8', 'clutter')):
            assert study.base['img_size'] == 32  # patch 4: an 8x8 token grid
        assert study.base.get('data', 'digits') == ('digits_clutter' if name.startswith('clutter') else 'digits')


@pytest.mark.parametrize('name', STUDIES)
def test_every_arm_builds_at_full_size(name):
    """The arms as the study trains them (default recipe): each model builds, runs, and differs."""
    recipe = load_recipe('default')
    built = {}
    for arm, cfg in arm_configs(study=name).items():
        size = cfg.img_size or 16
        model = timm.create_model(cfg.model, img_size=size, num_classes=10, **cfg.model_args).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 3, size, size)).shape == (2, 10)
        grid = size // cfg.model_args['patch_size']
        assert grid == (8 if name.startswith(('grid8', 'clutter')) else 7 if name.startswith('fmnist') else 4)
        built[arm] = (cfg.model, cfg.model_args)
        if cfg.model == recipe['model']:  # the arm's model_args merge into the recipe's
            assert cfg.model_args['patch_size'] == recipe['model_args']['patch_size']
    assert len({json.dumps(v, sort_keys=True) for v in built.values()}) == len(built)


@pytest.mark.parametrize('name', STUDIES)
def test_study_end_to_end_and_reused(name, tmp_path, capsys, monkeypatch):
    out = tmp_path / name
    tiny = TINY + ([] if name in ('blocks', 'fmnist_components') else ['--set', 'model_args.depth=2'])  # 6 blocks
    if name.startswith('fmnist'):  # tiny Fashion-MNIST files where the Debian package would put them
        from conftest import write_fashion_mnist

        from refiner import fashion_mnist
        write_fashion_mnist(tmp_path / 'fmnist', n_train=400, n_test=40)
        monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', tmp_path / 'fmnist')
        tiny += ['--set', 'classes=[Trouser, Bag]']
    code, stdout, err = _ablate(capsys, '--study', name, '--out', out, *tiny)
    assert code == 0, err
    report = json.loads((out / 'ablation.json').read_text())
    arms = [a.name for a in load_study(name).arms]
    assert report['arms'] == arms and set(report['models']) == set(arms)
    table = (out / 'ablation.md').read_text()
    assert table.splitlines()[0].startswith('| arm | params | MFLOPs | train img/s | train min | 0.5 of train |')
    for arm in arms:
        m = report['models'][arm]
        assert m['params'] > 0 and m['flops'] > 0 and m['train_images_per_s'] > 0
        (run,) = m['runs']['0.5']
        assert run['seed'] == 0 and 0 <= run['top1'] <= 100 and run['images_per_s'] > 0
        assert report['top1'][arm]['0.5'] == [run['top1']]
        assert (out / f'{arm}-f0.5-s0' / 'summary.json').is_file()
        assert any(line.startswith(f'| {arm} (') for line in table.splitlines())
    if 'vit' in arms:  # a built-in arm says what it is, not only the timm model it is built from
        assert '| vit (a plain ViT of matched shape, from vit_' in table
    assert (out / 'ablation.png').stat().st_size > 1000 and table.splitlines()[0] in stdout
    # a second invocation trains nothing: every run file stays as it was, the numbers too
    before = _mtimes(out)
    code, _, err = _ablate(capsys, '--study', name, '--out', out, *tiny)
    assert code == 0, err
    assert _mtimes(out) == before
    assert json.loads((out / 'ablation.json').read_text())['top1'] == report['top1']


def test_arms_from_the_command_line_changed_arm_refused(tmp_path, capsys):
    out = tmp_path / 'cli'
    args = ['--out', out, *TINY, '--fractions', '1', '--seeds', '0', '1']
    code, _, err = _ablate(capsys, *args, '--arm', 'wide:model_args.expansion_ratio=1',
                           '--arm', 'blocks:model_args={refine_blocks: [false, true, true, true, true, true]},lr=1e-3')
    assert code == 0, err
    report = json.loads((out / 'ablation.json').read_text())
    assert report['arms'] == ['wide', 'blocks'] and report['reference'] == 'wide'
    cfg = yaml.safe_load((out / 'blocks-f1-s0' / 'config.yaml').read_text())
    # model_args merge into the recipe's and the --set ones; the arm's own keys win
    assert cfg['model_args']['refine_blocks'] == [False] + [True] * 5 and cfg['model_args']['patch_size'] == 4
    assert cfg['model_args']['embed_dim'] == 32 and cfg['lr'] == 1e-3
    # two seeds: a standard deviation and the within-spread verdict against the reference
    stats = report['models']['blocks']['stats']['1']
    assert stats['n'] == 2 and stats['std'] is not None and isinstance(stats['within_spread'], bool)
    assert abs(stats['diff'] - (stats['mean'] - report['models']['wide']['stats']['1']['mean'])) < 1e-9
    assert '±' in (out / 'ablation.md').read_text()

    # the same name, another definition: refused before anything trains, naming the run and the key
    before = _mtimes(out)
    code, _, err = _ablate(capsys, *args, '--arm', 'wide:model_args.expansion_ratio=2')
    assert code == 2 and 'wide-f1-s0' in err and 'expansion_ratio' in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1
    # a run without the ablation's record (an earlier version's) is compared through its config.yaml
    (out / 'wide-f1-s0' / 'ablation_arm.json').unlink()
    code, _, err = _ablate(capsys, *args, '--arm', 'wide:model_args.expansion_ratio=2')
    assert code == 2 and 'wide-f1-s0' in err and 'expansion_ratio' in err
    del before[out / 'wide-f1-s0' / 'ablation_arm.json']
    assert _mtimes(out) == before
    # and the unchanged definition is still reused
    code, _, err = _ablate(capsys, *args, '--arm', 'wide:model_args.expansion_ratio=1')
    assert code == 0, err
    assert json.loads((out / 'ablation.json').read_text())['top1'] == {'wide': report['top1']['wide']}


def test_started_run_is_continued(tmp_path, capsys):
    out = tmp_path / 'resume'
    args = ['--out', out, *TINY, '--set', 'model_args.depth=2', '--arm', 'a']
    assert _ablate(capsys, *args)[0] == 0
    top1 = json.loads((out / 'ablation.json').read_text())['top1']
    # as if killed before its first checkpoint: config.yaml written, nothing else
    run = out / 'a-f0.5-s0'
    for name in ('summary.json', 'checkpoint.pt', 'model.safetensors', 'metrics.jsonl'):
        (run / name).unlink()
    code, stdout, err = _ablate(capsys, *args)
    assert code == 0, err
    assert 'starting the run from the beginning' in stdout
    # the same run again (CPU training is deterministic)
    assert json.loads((out / 'ablation.json').read_text())['top1'] == top1


def test_model_arguments_resolve_defaults():
    from refiner.models.refiner_vit import RefinerViT
    from refiner.pretrained import model_arguments
    init = RefinerViT.__init__
    args = model_arguments('refiner_vit_nano', 32, patch_size=4)
    assert args == model_arguments('refiner_vit_nano', 32, patch_size=4, expansion_ratio=3)  # the default, given
    assert args['embed_dim'] == 128 and args['expansion_ratio'] == 3  # the entry point's, the class's
    assert args != model_arguments('refiner_vit_nano', 32, patch_size=4, expansion_ratio=6)
    assert RefinerViT.__init__ is init  # the class is left as it was


def test_equivalent_runs_copied_from_another_ablation(tmp_path, capsys):
    first, second = tmp_path / 'first', tmp_path / 'second'
    tiny = [*TINY, '--set', 'model_args.depth=2']
    code, _, err = _ablate(capsys, '--out', first, *tiny, '--arm', 'r3:model_args.expansion_ratio=3',
                           '--arm', 'r1:model_args.expansion_ratio=1')
    assert code == 0, err
    # 'released' leaves expansion_ratio at its default (3): it trains as r3 and is copied; k1 differs and trains
    code, _, err = _ablate(capsys, '--out', second, *tiny, '--arm', 'released', '--arm',
                           'k1:model_args.refine_kernel_size=1', '--reuse', first)
    assert code == 0, err
    copy, source = second / 'released-f0.5-s0', first / 'r3-f0.5-s0'
    record = json.loads((copy / 'ablation_arm.json').read_text())
    assert record['reused_from'] == str(source) and record['arm'] == 'released'
    for name in ('summary.json', 'model.safetensors', 'checkpoint.pt', 'metrics.jsonl'):
        assert (copy / name).read_bytes() == (source / name).read_bytes()
        assert (copy / name).stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert 'reused_from' not in json.loads((second / 'k1-f0.5-s0' / 'ablation_arm.json').read_text())
    report = json.loads((second / 'ablation.json').read_text())
    assert report['models']['released']['runs']['0.5'][0]['reused_from'] == str(source)
    assert report['models']['k1']['runs']['0.5'][0]['reused_from'] is None
    # a copy killed before its summary: the next invocation, even without --reuse, resumes it from the
    # copied final checkpoint straight to the same results
    (copy / 'summary.json').unlink()
    code, _, err = _ablate(capsys, '--out', second, *tiny, '--arm', 'released', '--arm',
                           'k1:model_args.refine_kernel_size=1')
    assert code == 0, err
    assert json.loads((second / 'ablation.json').read_text())['top1'] == report['top1']
    code, _, err = _ablate(capsys, '--out', second, *tiny, '--arm', 'released', '--reuse', tmp_path / 'nowhere')
    assert code == 2 and 'nowhere' in err and len(err.strip().splitlines()) == 1


def test_equivalent_run_in_training_elsewhere_is_waited_for(tmp_path, capsys):
    """A run whose equivalent another invocation is training (in a --reuse folder) is left until the
    rest are trained, then waited for and copied: trained once, across studies."""
    first, second = tmp_path / 'first', tmp_path / 'second'
    tiny = [*TINY, '--set', 'model_args.depth=2']
    assert _ablate(capsys, '--out', first, *tiny, '--arm', 'r3:model_args.expansion_ratio=3')[0] == 0
    source = first / 'r3-f0.5-s0'
    summary = (source / 'summary.json').read_bytes()
    (source / 'summary.json').unlink()  # as if still training
    args = ['ablate', '--out', second, *tiny, '--arm', 'released', '--arm', 'k1:model_args.refine_kernel_size=1',
            '--reuse', first]
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(list(map(str, args)))), daemon=True)
    with exclusive_lock(source / '.ablate.lock') as mine:  # the invocation training it
        assert mine
        thread.start()
        deadline = time.time() + 120
        while thread.is_alive() and time.time() < deadline and not (second / 'k1-f0.5-s0' / 'summary.json').is_file():
            time.sleep(0.05)
        assert thread.is_alive() and not (second / 'released-f0.5-s0' / 'config.yaml').exists()
        (source / 'summary.json').write_bytes(summary)  # it finishes
    thread.join(120)
    assert codes == [0], capsys.readouterr().err
    record = json.loads((second / 'released-f0.5-s0' / 'ablation_arm.json').read_text())
    assert record['reused_from'] == str(source)
    assert (second / 'released-f0.5-s0' / 'summary.json').read_bytes() == summary


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# a study small enough to be killed three times in a test: two runs of two epochs of 6 steps,
# a checkpoint every 2 steps
KILL_STUDY = """
description: two arms, small enough to be killed and continued in a test
base: {classes: [0, 1, 2], batch_size: 32, warmup_epochs: 0, checkpoint_every: 2,
       model_args: {patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}}
fractions: [0.5]
seeds: [0]
epochs: 1
arms:
  a: {}
  r1: {model_args.expansion_ratio: 1}
"""
# `refiner ablate ARGS...` that SIGKILLs itself the moment it would put TARGET in place (written in
# full, not yet renamed over the old one): python -c KILL_AT TARGET ARGS...
KILL_AT = """
import os, signal, sys
target, replace = sys.argv[1], os.replace
def dying(src, dst, *args, **kwargs):
    if str(dst).endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = dying
from refiner.cli import main
sys.exit(main(['ablate', *sys.argv[2:]]))
"""
ENV = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}


def _without_speed(table):
    """The table without its train img/s and train min columns (measured speed, not a result)."""
    return ['|'.join(c for i, c in enumerate(line.split('|')) if i not in (4, 5)) for line in table.splitlines()]


def test_study_killed_at_any_moment_continues(tmp_path, capsys):
    """SIGKILL while a finished run writes its results, mid-run, and while the study writes its summary:
    each time the next invocation continues, and the end result is the uninterrupted study's."""
    study = tmp_path / 'kill.yaml'
    study.write_text(KILL_STUDY)
    ref, out = tmp_path / 'ref', tmp_path / 'killed'
    args = ['--study', str(study), '--no-progress']
    assert _ablate(capsys, *args, '--out', ref)[0] == 0

    def killed_at(target):
        res = subprocess.run([sys.executable, '-c', KILL_AT, target, *args, '--out', str(out)],
                             capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr

    # 1. run a trained to its end, killed as its summary.json goes into place: no summary, a final checkpoint
    killed_at('a-f0.5-s0/summary.json')
    assert (out / 'a-f0.5-s0' / 'checkpoint.pt').is_file() and not (out / 'a-f0.5-s0' / 'summary.json').exists()
    # 2. killed from outside once run r1 has saved a checkpoint mid-run
    proc = subprocess.Popen([sys.executable, '-m', 'refiner', 'ablate', *args, '--out', str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    state, deadline = out / 'r1-f0.5-s0' / 'checkpoint.pt', time.time() + 240
    while proc.poll() is None and time.time() < deadline and not state.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / 'a-f0.5-s0' / 'summary.json').is_file() and not (out / 'r1-f0.5-s0' / 'summary.json').exists()
    # 3. every run finished, killed as ablation.json goes into place
    killed_at('/ablation.json')
    assert (out / 'r1-f0.5-s0' / 'summary.json').is_file() and not (out / 'ablation.json').exists()

    code, _, err = _ablate(capsys, *args, '--out', out)
    assert code == 0, err
    want, got = (json.loads((d / 'ablation.json').read_text()) for d in (ref, out))
    assert got['top1'] == want['top1']
    assert _without_speed(got['table']) == _without_speed(want['table'])
    for run in ('a-f0.5-s0', 'r1-f0.5-s0'):  # resumed bit-identically
        for name in ('model.safetensors', 'model_ema.safetensors'):
            a, b = load_file(str(ref / run / name)), load_file(str(out / run / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (run, name)
    assert (out / 'ablation.png').stat().st_size > 1000
    assert not list(out.rglob('*.tmp'))  # what the kills left half-written is gone


def test_invocations_share_a_study(tmp_path, capsys):
    """A run another invocation holds is left to it while this one trains the rest, then waited for;
    when its holder ends without finishing it (as if killed), this invocation trains it."""
    out = tmp_path / 'shared'
    tiny = [a for a in TINY if a != '--no-progress']  # the waiting is reported
    args = ['ablate', '--out', out, *tiny, '--set', 'model_args.depth=2', '--arm', 'a',
            '--arm', 'b:model_args.expansion_ratio=1']
    held, other = out / 'a-f0.5-s0', out / 'b-f0.5-s0'
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(list(map(str, args)))), daemon=True)
    with exclusive_lock(held / '.ablate.lock') as mine:  # as another invocation training run a would
        assert mine
        thread.start()
        deadline = time.time() + 120
        while thread.is_alive() and time.time() < deadline and not (other / 'summary.json').is_file():
            time.sleep(0.05)
        assert (other / 'summary.json').is_file() and thread.is_alive()  # b trained, a waited for
        assert not (held / 'config.yaml').exists()
    thread.join(120)
    captured = capsys.readouterr()
    assert codes == [0], captured.err
    assert '--- a-f0.5-s0: another refiner ablate is training it; waiting for it' in captured.out
    report = json.loads((out / 'ablation.json').read_text())
    assert set(report['top1']) == {'a', 'b'} and (held / 'summary.json').is_file()


def test_list_studies(capsys):
    code, out, _ = _ablate(capsys, '--list-studies')
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split(':')[0] for line in lines] == STUDIES
    assert all(len(line.split(': ', 1)[1]) > 10 for line in lines)


@pytest.mark.parametrize('args, words', [
    (['--study', 'no_such_study'], ['no_such_study', 'expansion']),
    (['--arm', 'a:no_such_key=1'], ['--arm a', 'no_such_key']),
    (['--arm', 'a:model_args'], ['--arm', 'key=value']),
    (['--arm', 'a/b:lr=1'], ['a/b']),
    (['--arm', 'a:model_args.no_such_arg=1'], ["'a'", 'no_such_arg']),
    (['--arm', 'a:seed=3'], ['seed', 'ablation']),
    (['--set', 'no_such_key=1'], ['no_such_key']),
    (['--fractions', '0', '1'], ['fractions']),
])
def test_bad_input_one_sentence(args, words, tmp_path, capsys):
    code, _, err = _ablate(capsys, '--out', tmp_path / 'bad', '--no-progress', *args)
    assert code == 2 and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err
    assert not (tmp_path / 'bad').exists()  # nothing trained, nothing written


def test_bad_study_file(tmp_path, capsys):
    path = tmp_path / 'mine.yaml'
    path.write_text('description: x\narms: {a: {}}\nfractons: [0.5]\n')
    code, _, err = _ablate(capsys, '--study', path, '--no-progress')
    assert code == 2 and 'fractons' in err
    path.write_text('description: x\narms: {a: {model_args: {expansion_ratio: 1}}, b: {bogus: 1}}\n')
    code, _, err = _ablate(capsys, '--study', path, '--no-progress')
    assert code == 2 and "'b'" in err and 'bogus' in err


def test_flops_count_is_plausible_and_kernel_independent():
    # the default Refiner: more than the linear layers' 2·params·tokens (the conv stem, attention), not wildly
    model = timm.create_model('refiner_vit_nano', img_size=16, patch_size=4, num_classes=10)
    params, tokens = sum(p.numel() for p in model.parameters()), 4 * 4 + 1
    assert 1.0 < count_flops(model, 16) / (2 * params * tokens) < 3.0
    assert model.training  # the count puts the model back as it was
    # a timm ViT: its fused attention kernel is counted like the explicit matmuls
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                            num_classes=10)
    fused = count_flops(vit, 32)
    for block in vit.blocks:
        block.attn.fused_attn = False
    assert count_flops(vit, 32) == fused


def test_reuse_copies_each_run_from_its_own_seed_and_fraction_summary_last(tmp_path, capsys, monkeypatch):
    """With two seeds and two fractions, each run is copied from the run of the same seed and fraction
    (a record without them would copy seed 0 into seed 1 unnoticed), every copy writing its summary last
    (a copy killed after its first file must not count as finished); and an arm redefined with key=null
    is refused like any other change."""
    import refiner.ablate.run_dirs as run_dirs
    first, second = tmp_path / 'first', tmp_path / 'second'
    tiny = [*TINY, '--set', 'model_args.depth=2', '--fractions', '0.5', '1', '--seeds', '0', '1']
    code, _, err = _ablate(capsys, '--out', first, *tiny, '--arm', 'r3:model_args.expansion_ratio=3')
    assert code == 0, err
    written = []
    original = run_dirs.atomic_write
    monkeypatch.setattr(run_dirs, 'atomic_write', lambda path, write: written.append(path) or original(path, write))
    code, _, err = _ablate(capsys, '--out', second, *tiny, '--arm', 'released', '--reuse', first)
    assert code == 0, err
    for fraction in ('0.5', '1'):
        for seed in (0, 1):
            copy = second / f'released-f{fraction}-s{seed}'
            record = json.loads((copy / 'ablation_arm.json').read_text())
            assert record['reused_from'] == str(first / f'r3-f{fraction}-s{seed}')
            assert (record['fraction'], record['seed']) == (float(fraction), seed)
            assert (copy / 'model.safetensors').read_bytes() == (first / f'r3-f{fraction}-s{seed}' /
                                                                 'model.safetensors').read_bytes()
            names = [p.name for p in written if p.parent == copy]
            assert len(names) >= 4 and names[-1] == 'summary.json', names
    monkeypatch.undo()
    code, _, err = _ablate(capsys, '--out', first, *tiny, '--arm', 'r3:model_args.expansion_ratio=3,mean=null')
    assert code == 2 and 'r3-f' in err and 'mean' in err and 'another definition' in err


def test_an_old_run_without_lr_base_scale_resumes_linearly_and_is_recognised():
    """config.yaml written before lr_base_scale existed: the run resumes with linear scaling (as it was
    trained), and ablate compares its folder as the same arm, not as a changed one."""
    import dataclasses

    from refiner.ablate.run_dirs import _differences, comparable, trains_as, with_defaults
    from refiner.config import apply_overrides, complete_saved_config
    cfg = apply_overrides(load_recipe('default'), dict(lr_base_scale='linear'))
    recorded = comparable(cfg.to_dict())
    old = {k: v for k, v in recorded.items() if k != 'lr_base_scale'}
    assert complete_saved_config(old)['lr_base_scale'] == 'linear'
    assert _differences(with_defaults(old), recorded, lenient=True) == []
    assert trains_as(old) == trains_as(recorded)
    sqrt = comparable(dataclasses.replace(cfg, lr_base_scale='sqrt').to_dict())
    assert _differences(with_defaults(old), sqrt, lenient=True) == [
        "lr_base_scale: the run has 'linear', the arm gives 'sqrt'"]


def test_a_dataset_read_from_another_folder_is_the_same_dataset():
    """fashion_mnist and fashion_mnist:DIR are one dataset for the ablation as for evaluation: a run is
    reused and resumed across them, but never across datasets."""
    from refiner.ablate.run_dirs import _differences, comparable, trains_as, with_defaults
    from refiner.config import apply_overrides
    cfg = comparable(apply_overrides(load_recipe('default'), {}).to_dict())
    here, there, other = ({**cfg, 'data': d} for d in ('fashion_mnist', 'fashion_mnist:/data/fm', 'digits'))
    assert trains_as(here) == trains_as(there) != trains_as(other)
    assert _differences(with_defaults(here), there, lenient=False) == []
    assert _differences(with_defaults(here), other, lenient=False) == [
        "data: the run has 'fashion_mnist', the arm gives 'digits'"]


def test_report_only_writes_an_interim_report_and_trains_nothing(tmp_path, capsys):
    """A long study's results so far: each cell of how many seeds, the arms with no finished run named,
    nothing trained; with nothing finished, one sentence."""
    out = tmp_path / 'abl'
    base = [*TINY[2:], '--set', 'model_args.depth=2', '--models', 'refiner', 'vit', '--out', out]
    code, _, err = _ablate(capsys, *base, '--report-only', '--fractions', '0.5', '--seeds', '0')
    assert code == 2 and 'no run of this ablation has finished' in err
    code, _, err = _ablate(capsys, *base, '--fractions', '0.5', '--seeds', '0')  # all of seed 0
    assert code == 0, err
    (out / 'vit-f0.5-s0' / 'summary.json').unlink()  # as if vit's run were still training
    before = _mtimes(out)
    code, stdout, err = _ablate(capsys, *base, '--report-only', '--fractions', '0.5', '1', '--seeds', '0', '1')
    assert code == 0, err
    assert _mtimes(out) == before and not (out / 'refiner-f0.5-s1').exists()  # nothing trained
    report = json.loads((out / 'ablation.json').read_text())
    assert (report['finished_runs'], report['planned_runs']) == (1, 8) and list(report['top1']) == ['refiner']
    table = (out / 'ablation.md').read_text()
    row = next(line for line in table.splitlines() if line.startswith('| refiner ('))
    assert row.endswith('[1 of 2 seeds] | not finished |'), row
    assert 'Interim report: 1 of 8 runs finished; no run of vit yet.' in table and table.splitlines()[0] in stdout
