"""Eval outputs equal the authors' original model's (tests/data fixtures), through every loading path."""
import subprocess
import sys

import pytest
import timm
import torch
from conftest import rel_err

import refiner
from refiner.convert import infer_official_config

NAMES = ['official_tiny', 'official_tiny_dense']


@pytest.mark.parametrize('name', NAMES)
def test_load_official_matches_original(official, name):
    fx = official[name]
    model = refiner.load_official(fx['state_dict'])
    assert not model.training
    with torch.no_grad():
        err = rel_err(model(fx['input']), fx['logits'])
    assert err <= 1e-5, f'{name}: relative error {err:.2e}'


@pytest.mark.parametrize('name', NAMES)
def test_architecture_inferred_from_shapes(official, name):
    fx = official[name]
    cfg = infer_official_config(fx['state_dict'])
    ref = fx['config']  # only compared against, never used to build
    assert cfg['img_size'] == ref['img_size']
    assert cfg['patch_size'] == ref['patch']
    assert cfg['embed_dim'] == ref['embed_dim']
    assert cfg['refine_blocks'] == list(ref['depth'])
    assert cfg['num_heads'] == ref['num_heads']
    assert cfg['num_classes'] == ref['num_classes']
    assert cfg['aux_head'] == ref['dense']
    assert cfg['mlp_ratio'] == 3.0 and cfg['expansion_ratio'] == 3 and cfg['refine_kernel_size'] == 3


@pytest.mark.parametrize('wrap', ['bare', 'state_dict', 'state_dict_ema', 'model'])
@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_checkpoint_file_layouts(official, tmp_path, wrap, prefix):
    fx = official['official_tiny_dense']
    sd = {prefix + k: v for k, v in fx['state_dict'].items()}
    obj = sd if wrap == 'bare' else {wrap: sd, 'epoch': 299, 'arch': 'Refiner_ViT'}
    path = tmp_path / 'refiner.pth.tar'
    torch.save(obj, path)
    model = refiner.load_official(path)
    with torch.no_grad():
        assert rel_err(model(fx['input']), fx['logits']) <= 1e-5


def test_ema_preferred_when_asked(official, tmp_path):
    fx = official['official_tiny']
    broken = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in fx['state_dict'].items()}
    path = tmp_path / 'both.pth'
    torch.save({'state_dict': broken, 'state_dict_ema': fx['state_dict']}, path)
    with torch.no_grad():
        assert rel_err(refiner.load_official(path, use_ema=True)(fx['input']), fx['logits']) <= 1e-5
        assert rel_err(refiner.load_official(path)(fx['input']), fx['logits']) > 0.5


@pytest.mark.parametrize('name', NAMES)
def test_convert_then_timm_create_model(official, tmp_path, name):
    fx = official[name]
    src, dst = tmp_path / 'orig.pth', tmp_path / 'converted.safetensors'
    torch.save({'state_dict': fx['state_dict']}, src)
    info = refiner.convert_checkpoint(src, dst)
    args = info['model_args']
    model = timm.create_model(
        'refiner_vit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(dst), num_classes=args['num_classes']),
        **args).eval()
    with torch.no_grad():
        assert rel_err(model(fx['input']), fx['logits']) <= 1e-5


def test_convert_cli(official, tmp_path):
    src, dst = tmp_path / 'orig.pth.tar', tmp_path / 'out.safetensors'
    torch.save({'state_dict': official['official_tiny']['state_dict']}, src)
    res = subprocess.run([sys.executable, '-m', 'refiner', 'convert', str(src), str(dst)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert dst.is_file() and 'timm.create_model' in res.stdout
    # the written file itself, loaded strictly without any conversion, reproduces the original's logits
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from refiner.convert import is_official_state_dict
    with safe_open(str(dst), 'pt') as f:
        meta = f.metadata()
    state = load_file(str(dst))
    assert not is_official_state_dict(state)  # this project's layout, not the original's
    model = timm.create_model(meta['model_name'], **json.loads(meta['model_args'])).eval()
    model.load_state_dict(state, strict=True)
    fx = official['official_tiny']
    with torch.no_grad():
        assert rel_err(model(fx['input']), fx['logits']) <= 1e-5
    bad = subprocess.run([sys.executable, '-m', 'refiner', 'convert', str(tmp_path / 'missing.pth'), str(dst)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and 'no such checkpoint file' in bad.stderr and 'Traceback' not in bad.stderr


@pytest.mark.parametrize('name', NAMES)
def test_reparameterized_equals_original(official, name):
    fx = official[name]
    model = timm.utils.reparameterize_model(refiner.load_official(fx['state_dict']))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert rel_err(model(fx['input']), fx['logits']) <= 1e-5
