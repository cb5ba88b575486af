"""refiner.config: recipes, overrides and their precedence, the learning-rate scaling rule."""
import pytest

import refiner  # noqa: F401  (registers the models)
from refiner.config import TrainConfig, apply_overrides, load_recipe


def test_the_learning_rate_follows_timms_scaling_rule():
    """lr is given for lr_base_size images: adaptive optimizers scale it by the square root of the batch
    ratio (timm's rule), the others linearly; lr_base_scale overrides it; the from-scratch recipes keep
    the linear rule they were tuned with."""
    from refiner.config import ConfigError, lr_scale_rule, scaled_lr
    rules = [lr_scale_rule(o) for o in ('adamw', 'AdamW', 'nadam', 'lamb', 'adafactor', 'sgd', 'momentum')]
    assert rules == ['sqrt'] * 5 + ['linear'] * 2
    cfg = apply_overrides(load_recipe('finetune'), dict(batch_size=8))
    lr, rule, line = scaled_lr(cfg, 8)
    assert rule == 'sqrt' and lr == pytest.approx(cfg.lr * (8 / 512) ** 0.5)
    assert line.startswith(f'learning rate {lr:.3g} = lr {cfg.lr:.3g} (for a batch of 512) x sqrt(8/512)')
    assert "sqrt scaling (timm's rule for adamw; lr_base_scale overrides it)" in line
    lr, rule, line = scaled_lr(apply_overrides(load_recipe('finetune'), dict(lr_base_scale='linear')), 8)
    assert rule == 'linear' and lr == pytest.approx(cfg.lr * 8 / 512) and 'x 8/512' in line
    assert 'linear scaling (set by lr_base_scale)' in line
    assert scaled_lr(apply_overrides({}, dict(opt='sgd')), 1024)[0] == pytest.approx(2 * TrainConfig.lr)
    for name in ('default', 'refiner_s', 'refiner_m_tl', 'refiner_l_384'):
        assert load_recipe(name)['lr_base_scale'] == 'linear', name
    with pytest.raises(ConfigError, match='lr_base_scale'):
        apply_overrides({}, dict(lr_base_scale='cube'))


def test_finetune_drops_the_recipes_model_arguments():
    """The default recipe's patch_size 4 is for its own model, not for the weights' architecture."""
    from refiner.cli import build_parser
    from refiner.cli.train import train_config
    cfg = train_config(build_parser().parse_args(['train', '--model', 'vit_tiny_patch16_224', '--finetune', 'x.pth',
                                                   '--refine', 'all']))
    assert (cfg.model, cfg.model_args, cfg.refine) == ('vit_tiny_patch16_224', {}, 'all')
    cfg = train_config(build_parser().parse_args(['train', '--finetune', 'x.pth']))
    assert (cfg.model, cfg.model_args) == (None, {})
    cfg = train_config(build_parser().parse_args(['train', '--model', 'vit_tiny_patch16_224']))  # from scratch
    assert cfg.model_args == {'patch_size': 4}


def test_train_config_precedence_with_plain_arguments():
    """refiner.config.train_config, without argparse: recipe < flags given < --set; a flag left None is not
    given; a fine-tune without a recipe starts from the finetune recipe and says so."""
    from refiner.config import train_config
    cfg, note = train_config('default', {'epochs': 3, 'lr': None}, {})
    assert (cfg.epochs, cfg.lr, note) == (3, load_recipe('default')['lr'], None)
    cfg, _ = train_config('default', {'epochs': 3}, {'epochs': 5})
    assert cfg.epochs == 5
    cfg, note = train_config(None, {'finetune': 'x.pth', 'model': None}, {})
    assert note.startswith('--finetune without --config: starting from the finetune recipe')
    assert cfg.min_steps == load_recipe('finetune')['min_steps'] and cfg.model is None


def test_a_value_of_the_wrong_type_or_not_yaml_is_one_sentence(tmp_path):
    """--set, recipes and arms go through apply_overrides: a value of another type than its key's is named
    there, not met as a TypeError deep in training; YAML that does not parse is named where it was given."""
    from refiner.config import ConfigError, parse_set
    for overrides, message in [({'lr': 'abc'}, "lr must be a number, got 'abc'"),
                               ({'model_args': 3}, 'model_args must be a mapping of keys to values, got 3'),
                               ({'classes': 5}, 'classes must be a list of strings (or null), got 5'),
                               ({'epochs': 2.5}, 'epochs must be an integer, got 2.5'),
                               ({'ema': 'yes please'}, "ema must be true or false, got 'yes please'"),
                               ({'img_size': 0}, 'img_size must be a positive number of pixels, got 0'),
                               ({'workers': -1}, 'workers must be >= 0, got -1'),
                               ({'checkpoint_every': -1}, 'checkpoint_every must be >= 0')]:
        with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
            apply_overrides(load_recipe('default'), overrides)
    # what YAML gives for the digits' class names and for whole numbers of a float key still fits
    cfg = apply_overrides(load_recipe('default'), {'classes': [0, 1], 'lr': 1, 'scale': [1, 1]})
    assert cfg.classes == [0, 1] and cfg.lr == 1
    with pytest.raises(ConfigError, match=r"^--set 'lr=\[': the value is not YAML"):
        parse_set(['lr=['])
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: [1, 2\n')
    with pytest.raises(ConfigError, match=f'^--config {bad}: not valid YAML'):
        load_recipe(str(bad))
    binary = tmp_path / 'checkpoint.pt'
    binary.write_bytes(b'\x80\x02\x8a\x0a\xff\xfe')
    with pytest.raises(ConfigError, match=f'^--config {binary}: not a YAML text file'):
        load_recipe(str(binary))


def test_set_data_picks_the_datasets_recipe_as_the_flag_does():
    from refiner.config import train_config
    by_flag, _ = train_config(None, {'data': 'fashion_mnist'}, {})
    by_set, _ = train_config(None, {}, {'data': 'fashion_mnist'})
    assert by_flag == by_set and by_set.img_size == 28 and by_set.description.startswith('refiner_vit_nano on Fashion')
