"""What a new user hits in the first hour (issue 22): file permissions, loading an export with
Hugging Face transformers, the "DeiT + refiner" command, re-parameterizing in train mode, prediction
messages, a loaded run's pretrained_cfg, the CLI's common flags and ONNX input sizes."""
import os
import stat

import pytest
import timm
import torch
from conftest import trained_scale

import refiner  # noqa: F401  (registers the models)
from refiner.checkpoint import save_weights

NANO = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
DATA_CONFIG = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')


@pytest.fixture
def nano_checkpoint(tmp_path):
    """A tiny Refiner-ViT's weights file, as a run writes it: 16x16 inputs, three named classes."""
    torch.manual_seed(0)
    model = trained_scale(timm.create_model('refiner_vit_nano', **NANO))
    path = save_weights(model, tmp_path / 'model.safetensors', 'refiner_vit_nano', NANO,
                        extra={'data_config': DATA_CONFIG, 'classes': ['cat', 'dog', 'owl']})
    return path, model


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_written_files_keep_the_umask_permissions(tmp_path, umask, nano_checkpoint):
    from refiner.export import export_hf
    from refiner.fileio import atomic_write_text
    from refiner.pretrained import load_model
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / 'a.txt', 'x')
        (tmp_path / 'b.txt').write_text('x')  # what open() gives
        (tmp_path / 'plain').mkdir()
        model, info = load_model(nano_checkpoint[0])
        out = export_hf(model, str(tmp_path / 'hub'), info)
    finally:
        os.umask(old)
    assert _mode(tmp_path / 'a.txt') == _mode(tmp_path / 'b.txt') == 0o666 & ~umask
    assert _mode(out) == _mode(tmp_path / 'plain') == 0o777 & ~umask
    assert _mode(out / 'model.safetensors') == _mode(out / 'config.json') == 0o666 & ~umask
