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
