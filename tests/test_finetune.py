"""Fine-tuning end to end: from every kind of weight source, retrofitting a timm ViT, linear probing,
layer decay, the learning rate and input size a fine-tune derives, resuming, and the one-sentence refusals."""
import dataclasses
import json
import pickle

import pytest
import timm
import torch
import yaml
from conftest import finetune_cfg as _cfg
from PIL import Image
from safetensors.torch import load_file, save_file

import refiner  # noqa: F401  (registers the models)
from refiner.cli import main
from refiner.config import TrainConfig, apply_overrides, load_recipe
from refiner.pretrained import load_model, read_source
from refiner.train import train

NANO = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a tiny Refiner-ViT on 16x16 digits


def _metrics(run):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def test_finetune_on_other_classes_records_the_start_and_reinitialises_the_head(pretrained_run, tmp_path, capsys):
    out = tmp_path / 'ft'
    main(['train', '--config', 'default', '--finetune', str(pretrained_run), '--classes', '5', '6', '7', '8', '9',
          '--epochs', '1', '--batch-size', '16', '--train-fraction', '0.1', '--out', str(out), '--no-progress'])
    printed = capsys.readouterr().out
    assert 're-initialised head (other classes, 5 -> 5 classes)' in printed
    assert 'input 16x16 px (img_size of the recipe or --img-size; --img-size N' in printed  # the load report's
    cfg = yaml.safe_load((out / 'config.yaml').read_text())
    assert cfg['model'] == 'refiner_vit_nano' and cfg['model_args']['embed_dim'] == 32  # from the source
    epochs = [m['epoch'] for m in _metrics(out)]
    assert epochs == [0, 1]  # epoch 0: the starting weights, evaluated before training
    start = _metrics(out)[0]
    assert 'train_loss' not in start and 0 <= start['top1'] <= 100
    # every tensor but the head starts from the source
    src = read_source(pretrained_run).state_dict
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=16, **NANO)
    report = refiner.pretrained.load_pretrained_weights(model, read_source(pretrained_run), 'refiner_vit_nano',
                                                        classes=['5', '6', '7', '8', '9'])
    assert 'head' in report
    for k, v in model.state_dict().items():
        if not k.startswith('head.'):
            assert torch.equal(v, src[k]), k
    assert not torch.equal(model.head.weight, src['head.weight'])


def test_finetune_an_original_checkpoint_at_new_classes_and_resolution(official, tmp_path):
    """The authors' layout (nested, module. prefixes), 10 ImageNet-like classes at 64px, fine-tuned
    on 5 digit classes at 32px: head re-initialised, pos_embed resampled, the rest loaded."""
    sd = official['official_tiny']['state_dict']
    path = tmp_path / 'refiner_tiny.pth.tar'
    torch.save({'state_dict_ema': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 3}, path)
    source = read_source(path)
    assert source.kind == 'original' and source.model_args['embed_dim'] == 32
    out = tmp_path / 'ft'
    summary = train(_cfg(model=None, finetune=str(path), classes=[0, 1, 2, 3, 4], img_size=32,
                         batch_size=16, train_fraction=0.1), out=str(out), progress=False)
    assert summary['epochs'] == 1 and 'start_top1' in summary
    model, info = load_model(out)
    assert model.num_classes == 5 and model.grid_size == (2, 2) and model.pos_embed.shape[1] == 5
    assert info['classes'] == ['0', '1', '2', '3', '4'] and info['data_config']['input_size'] == (3, 32, 32)
    # an original checkpoint fine-tuned at its own classes and size keeps the head
    model = timm.create_model('refiner_vit_s', **source.model_args)
    report = refiner.pretrained.load_pretrained_weights(model, source, 'refiner_vit_s')
    assert 're-initialised' not in report and 'resampled' not in report
    torch.testing.assert_close(model.eval()(official['official_tiny']['input']), official['official_tiny']['logits'],
                               rtol=1e-4, atol=1e-5)


VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a tiny timm ViT on 16x16 digits


def test_deit_plus_refiner_starts_as_its_source_and_reloads_without_repeating_refine(vit_run, tmp_path, capsys):
    root, source_summary = vit_run
    out = tmp_path / 'refined'
    main(['train', '--config', 'default', '--model', 'vit_tiny_patch16_224', '--finetune', str(root / 'vit.pth'),
          '--refine', 'all', '--set', f'model_args={json.dumps(VIT)}', '--epochs', '1', '--batch-size', '16',
          '--train-fraction', '0.1', '--out', str(out), '--no-progress'])
    printed = capsys.readouterr().out
    assert 'refinement added to blocks [0, 1]' in printed
    start = _metrics(out)[0]
    assert start['epoch'] == 0
    # the retrofit is the identity until trained: the first evaluation is the source model's
    assert start['top1'] == pytest.approx(source_summary['top1'], abs=1e-9)
    assert start['eval_loss'] == pytest.approx(source_summary['eval_loss'], rel=1e-5)
    cfg = yaml.safe_load((out / 'config.yaml').read_text())
    assert cfg['model'] == 'refined_vit' and cfg['model_args']['refine_blocks'] == 'all'
    model, info = load_model(out)  # eval, predict, export, analyze all load this way
    assert model.refined_blocks == [0, 1] and info['model_args']['refine_blocks'] == [0, 1]
    assert main(['eval', '--checkpoint', str(out), '--json', str(tmp_path / 'ev.json')]) == 0


def test_linear_probe_trains_only_the_classifier(pretrained_run, tmp_path):
    out = tmp_path / 'probe'
    train(_cfg(model=None, finetune=str(pretrained_run), classes=[5, 6, 7, 8, 9], linear_probe=True,
               lr=0.05, ema=True), out=str(out), progress=False)
    before = read_source(pretrained_run).state_dict
    for weights in ('model.safetensors', 'model_ema.safetensors'):  # the run loaded the source, EMA too
        after = load_file(str(out / weights))
        changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
        assert changed == ['head.bias', 'head.weight'], weights  # BatchNorm statistics included: all else frozen


def test_layer_decay_gives_each_block_its_own_learning_rate(pretrained_run, tmp_path):
    out = tmp_path / 'ld'
    train(_cfg(model=None, finetune=str(pretrained_run), layer_decay=0.5, classes=[0, 1, 2, 3, 4]),
          out=str(out), progress=False)
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    scales = sorted({round(g['lr_scale'], 6) for g in state['optimizer']['param_groups']})
    # stem (layer 0), two blocks, final norm + head: 0.5^3, 0.5^2, 0.5, 1
    assert scales == [0.125, 0.25, 0.5, 1.0]


def _folder_dataset(root, classes=3, per_class=(8, 3), size=64):
    """DIR/train/<class>/*.png and DIR/val/<class>/*.png: a dataset with no default input size."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for split, n in zip(('train', 'val'), per_class):
        for c in range(classes):
            folder = root / split / f'digit{c}'
            folder.mkdir(parents=True)
            of_class = digits.images[digits.target == c]
            images = of_class[:n] if split == 'train' else of_class[-n:]
            for i, img in enumerate(images):
                Image.fromarray((img * 15).astype('uint8')).resize((size, size)).save(folder / f'{i}.png')
    return root


def test_a_finetune_run_resumes_exactly(official, tmp_path, monkeypatch):
    """Killed before its first checkpoint or after one, a fine-tune resumes to the same weights; the
    input size and normalisation it took from the source are in config.yaml, not re-derived."""
    from refiner.train.trainer import Trainer
    data = _folder_dataset(tmp_path / 'data')
    src = tmp_path / 'original.pth'
    torch.save(official['official_tiny']['state_dict'], src)
    base = {k: v for k, v in load_recipe('default').items() if k not in ('model', 'model_args', 'img_size', 'mean',
                                                                         'std', 'crop_pct')}
    cfg = apply_overrides(base, dict(finetune=str(src), data=str(data), epochs=2, batch_size=4, checkpoint_every=2,
                                     warmup_epochs=0, ema=True))
    train(cfg, out=str(tmp_path / 'full'), progress=False)
    saved = yaml.safe_load((tmp_path / 'full' / 'config.yaml').read_text())
    assert (saved['img_size'], saved['mean'], saved['crop_pct']) == (64, [0.5, 0.5, 0.5], 0.9)  # the source's
    original_step = Trainer._step
    for crash_at in (1, 3):  # before any checkpoint; after the one at step 2
        def crash(self, *args, _at=crash_at):
            if self.global_step == _at:
                raise KeyboardInterrupt
            return original_step(self, *args)
        monkeypatch.setattr(Trainer, '_step', crash)
        out = tmp_path / f'crash{crash_at}'
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out=str(out), progress=False)
        monkeypatch.setattr(Trainer, '_step', original_step)
        train(TrainConfig(), resume=str(out), progress=False)
        for weights in ('model.safetensors', 'model_ema.safetensors'):
            a, b = load_file(str(tmp_path / 'full' / weights)), load_file(str(out / weights))
            assert all(torch.equal(a[k], b[k]) for k in a), (crash_at, weights)
        assert [m['epoch'] for m in _metrics(out)] == [0, 1, 2]


def test_a_token_labeling_head_follows_the_recipe(official, tmp_path):
    """An original token-labeling checkpoint fine-tuned without token labeling loses its aux head."""
    src = tmp_path / 'dense.pth'
    torch.save(official['official_tiny_dense']['state_dict'], src)
    summary = train(_cfg(model=None, finetune=str(src), img_size=32, batch_size=16, train_fraction=0.1),
                    out=str(tmp_path / 'r'), progress=False)
    model, _ = load_model(tmp_path / 'r')
    assert model.aux_head is None and summary['epochs'] == 1


def test_a_finetune_run_says_its_learning_rate_and_input_size(pretrained_run, tmp_path, capsys):
    """The run's first lines: the learning rate and how it was derived, then the load report with the
    input size and where it came from; config.yaml records the rule, so that a resume scales alike."""
    out = tmp_path / 'ft'
    main(['train', '--config', 'finetune', '--finetune', str(pretrained_run), '--classes', '5', '6', '7', '8', '9',
          '--epochs', '1', '--batch-size', '8', '--train-fraction', '0.1', '--img-size', '24', '--out', str(out),
          '--set', 'min_steps=0', '--no-progress'])  # one epoch: the line on min_steps is tested below
    lines = capsys.readouterr().out.splitlines()
    base = 0.2 * load_recipe('default')['lr']  # lr_from_source: a fifth of the source run's
    lr = base * (8 / 512) ** 0.5
    assert lines[1] == (f'learning rate {lr:.3g} = lr {base:.3g} (for a batch of 512) x sqrt(8/512) (global batch 8): '
                        f"sqrt scaling (timm's rule for adamw; lr_base_scale overrides it)")
    assert lines[2].startswith('loaded ') and 'resampled pos_embed (17 -> 37 tokens)' in lines[2]
    assert lines[2].endswith('; input 24x24 px (img_size of the recipe or --img-size; --img-size N to change it)')
    assert lines[3].startswith('augmentation as the source run was trained: scale [0.7, 1.0], ratio [0.85, 1.18], '
                               'hflip 0.0, aa None, reprob 0.0,')
    assert lines[4] == f"lr {base:.3g} per 512 images: lr_from_source 0.2 x the source run's 0.016 (--lr sets it " \
                       f"instead)"
    saved = yaml.safe_load((out / 'config.yaml').read_text())
    assert saved['lr_base_scale'] == 'sqrt' and saved['lr'] == pytest.approx(base)
    assert (saved['hflip'], saved['aa'], saved['scale']) == (0.0, None, [0.7, 1.0])


def test_min_steps_raises_the_epochs_of_a_small_dataset():
    from refiner.train.setup import epochs_for_min_steps
    cfg = apply_overrides(load_recipe('finetune'), {})
    assert cfg.min_steps == 500 and epochs_for_min_steps(cfg, 42) == (cfg, None)  # 30 x 42 steps: enough
    raised, line = epochs_for_min_steps(cfg, 8)  # 135 images at batch 16
    assert raised.epochs == 63 and line.startswith('epochs: 63, not 30: min_steps 500 optimizer steps at 8 per epoch')
    assert epochs_for_min_steps(apply_overrides(load_recipe('default'), {}), 1)[1] is None  # min_steps 0


def test_augmentation_and_lr_come_from_a_source_run_only_when_asked(pretrained_run):
    from refiner.cli import build_parser
    from refiner.cli.train import train_config
    from refiner.train.setup import from_source_run
    deit = apply_overrides({}, {})  # DeiT's ImageNet augmentation: flips, 8% crops, RandAugment
    asked = apply_overrides({}, dict(augment_from_source=True, lr_from_source=0.5, hflip=0.5, mixup=0.3))
    for cfg, source in ((deit, read_source(pretrained_run)),  # not asked
                        (asked, read_source(pretrained_run / 'model.safetensors')),  # weights, not a run
                        (asked, None)):
        assert from_source_run(cfg, source) == (cfg, [])
    cfg, lines = from_source_run(asked, read_source(pretrained_run))  # a run trained on the digits
    assert (cfg.hflip, cfg.aa, cfg.scale, cfg.interpolation) == (0.0, None, [0.7, 1.0], 'bilinear')
    assert cfg.mixup == 0.3 and 'hflip 0.0' in lines[0]  # mixing is the recipe's
    assert (cfg.lr, cfg.lr_base_size) == (0.5 * load_recipe('default')['lr'], 512) and 'lr_from_source 0.5' in lines[1]
    for given in (['--lr', '1e-3'], ['--set', 'lr=0.001']):  # a learning rate given wins over lr_from_source
        cfg = train_config(build_parser().parse_args(['train', '--config', 'finetune', '--finetune', 'x', *given]))
        assert (cfg.lr, cfg.lr_from_source) == (1e-3, 0.0)


def test_without_a_size_of_its_own_a_finetune_keeps_the_sources_and_says_so(pretrained_run):
    import dataclasses
    from types import SimpleNamespace

    from refiner.train.setup import resolve_img_size
    source = read_source(pretrained_run)
    photos = SimpleNamespace(default_img_size=None)  # an image folder: no size of its own
    cfg = dataclasses.replace(_cfg(model=None), img_size=None)  # as the finetune recipe: no img_size
    assert resolve_img_size(cfg, photos, source) == (16, "the source's: the size its weights were trained at")
    assert resolve_img_size(dataclasses.replace(cfg, img_size=32), photos, source) == (
        32, 'img_size of the recipe or --img-size')


def test_epochs_counts_the_cooldown(tmp_path):
    summary = train(_cfg(epochs=2, cooldown_epochs=10), out=str(tmp_path / 'r'), progress=False)
    assert summary['epochs'] == 2 and len(_metrics(tmp_path / 'r')) == 2


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    for f in fragments:
        assert f in err, err
    return err


class _Payload:
    def __reduce__(self):
        return (print, ('this must never run',))


def test_every_refusal_is_one_sentence(pretrained_run, official, tmp_path, capsys):
    common = ['--epochs', '1', '--no-progress', '--out', str(tmp_path / 'x')]
    # S weights into M: a wider model than the weights
    _one_line_error(capsys, ['train', '--finetune', str(pretrained_run), '--model', 'refiner_vit_ti', *common],
                    'does not fit refiner_vit_ti', 'cls_token has shape [1, 1, 32], refiner_vit_ti needs [1, 1, 192]')
    # a ResNet's weights into a ViT
    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), tmp_path / 'resnet.pth')
    _one_line_error(capsys, ['train', '--finetune', str(tmp_path / 'resnet.pth'), '--model', 'vit_tiny_patch16_224',
                             *common], 'does not fit vit_tiny_patch16_224', 'it has no cls_token')
    # a bare file without --model
    _one_line_error(capsys, ['train', '--finetune', str(tmp_path / 'resnet.pth'), *common], 'give --model NAME')
    # truncated, text, code-running pickle, integer weights, empty, corrupt safetensors
    good = tmp_path / 'good.pth'
    torch.save(official['official_tiny']['state_dict'], good)
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:5000])
    (tmp_path / 'text.pth').write_text('weights: none\n')
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'state_dict': _Payload()}, f)
    weights = pretrained_run / 'model.safetensors'
    from safetensors import safe_open
    with safe_open(str(weights), 'pt') as f:
        meta = f.metadata()
    ints = {k: v.to(torch.int64) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(ints, str(tmp_path / 'ints.safetensors'), metadata=meta)  # refiner's metadata: it names its model
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'bad.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    for name, fragment in (('cut.pth', 'truncated or corrupt'), ('text.pth', 'is a text file'),
                           ('evil.pth', 'never unpickles'), ('empty.pth', 'is empty'),
                           ('bad.safetensors', 'not a readable safetensors file')):
        for argv in (['eval', '--checkpoint', str(tmp_path / name)],
                     ['predict', str(tmp_path), '--checkpoint', str(tmp_path / name)],
                     ['export', str(tmp_path / 'o.onnx'), '--format', 'onnx', '--checkpoint', str(tmp_path / name)],
                     ['train', '--finetune', str(tmp_path / name), '--model', 'refiner_vit_s', *common]):
            _one_line_error(capsys, argv, fragment)
    assert 'this must never run' not in capsys.readouterr().out
    _one_line_error(capsys, ['eval', '--checkpoint', str(tmp_path / 'ints.safetensors')],
                    'holds int64 values where weights must be floating point')
    _one_line_error(capsys, ['eval', '--checkpoint', str(tmp_path)], 'neither a refiner run')


def test_lr_from_source_takes_the_sources_own_base_size():
    """A source run trained with lr_base_size 128 (not the recipe's 512): its rate is per 128 images, so
    the fine-tune's lr_base_size must become 128 too, or the rate is scaled for the wrong batch."""
    from refiner.pretrained import Source
    from refiner.train.setup import from_source_run
    source = Source('run', 'run', {}, run_config={'lr': 4e-3, 'lr_base_size': 128})
    cfg = apply_overrides(load_recipe('finetune'), dict(lr_from_source=0.5))
    assert cfg.lr_base_size == 512
    taken, lines = from_source_run(cfg, source)
    assert (taken.lr, taken.lr_base_size) == (pytest.approx(2e-3), 128) and 'per 128 images' in lines[-1]


def test_the_finetune_recipe_starts_the_new_head_at_zero(pretrained_run):
    """--config finetune: a re-initialised head starts at zero in the model the run trains (the load
    report says so; this checks the weights)."""
    from refiner.train.setup import build_model
    cfg = apply_overrides(load_recipe('finetune'), dict(model='refiner_vit_nano', model_args=dict(NANO)))
    model, _, loaded = build_model(cfg, ['a', 'b', 'c'], 16, read_source(pretrained_run), torch.device('cpu'))
    assert 'zeros' in loaded and not model.head.weight.any() and not model.head.bias.any()
    model, _, _ = build_model(dataclasses.replace(cfg, zero_head=False), ['a', 'b', 'c'], 16,
                              read_source(pretrained_run), torch.device('cpu'))
    assert model.head.weight.any()
