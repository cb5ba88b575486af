"""refiner.convert: files that are not Refiner checkpoints get an error that names the problem."""
import pickle

import pytest
import timm
import torch

import refiner
from refiner import CheckpointError


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='no such checkpoint file'):
        refiner.load_official(tmp_path / 'nope.pth')


def _sd(official):
    return dict(official['official_tiny']['state_dict'])


def test_truncated_file(official, tmp_path):
    path = tmp_path / 'full.pth'
    torch.save({'state_dict': _sd(official)}, path)
    data = path.read_bytes()
    cut = tmp_path / 'truncated.pth'
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        refiner.load_official(cut)


class _Payload:
    def __reduce__(self):
        return (print, ('this must never run',))


def test_arbitrary_objects_are_not_unpickled(tmp_path, capsys):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': _Payload()}, f)
    with pytest.raises(CheckpointError):
        refiner.load_official(path)
    assert 'this must never run' not in capsys.readouterr().out


def test_not_a_refiner_checkpoint():
    deit = timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=16, depth=1).state_dict()
    with pytest.raises(CheckpointError, match='not an original Refiner-ViT checkpoint'):
        refiner.load_official(deit)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / 'list.pth'
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match='not a state dict'):
        refiner.load_official(path)


def test_unexpected_shape_is_named(official):
    sd = _sd(official)
    sd['blocks.1.attn.DLA.conv_pro.weight'] = torch.zeros(4, 9, 1, 1)
    with pytest.raises(CheckpointError, match=r'blocks\.1\.attn\.refine\.reduce\.weight'):
        refiner.load_official(sd)


def test_inconsistent_qkv_is_named(official):
    sd = _sd(official)
    sd['blocks.2.attn.qkv.weight'] = torch.zeros(32, 32)
    with pytest.raises(CheckpointError, match=r'blocks\.2\.attn\.qkv\.weight'):
        refiner.load_official(sd)


def test_missing_and_unexpected_keys_are_named(official):
    sd = _sd(official)
    del sd['norm.weight']
    sd['blocks.0.extra.weight'] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r'it has no norm\.weight.*1 unexpected \(e\.g\. blocks\.0\.extra'):
        refiner.load_official(sd)


def test_aux_head_needs_model_flag(official, tmp_path):
    dst = tmp_path / 'dense.safetensors'
    src = tmp_path / 'dense.pth'
    torch.save(official['official_tiny_dense']['state_dict'], src)
    args = refiner.convert_checkpoint(src, dst)['model_args']
    args['aux_head'] = False
    with pytest.raises(ValueError, match='aux_head=True'):
        timm.create_model('refiner_vit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(dst), num_classes=10),
                          **args)
