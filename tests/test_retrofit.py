"""refine_vit turns chosen blocks of a timm ViT into refined attention ("DeiT + refiner")."""
import json

import pytest
import timm
import torch

import refiner  # noqa: F401  (registers the models)
from refiner.cli import main
from refiner.retrofit import RefinedTimmAttention


def _vit(**kwargs):
    return timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=8, depth=3, num_classes=5, **kwargs)


def test_retrofit_keeps_outputs_then_trains():
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    refiner.refine_vit(model, blocks=[0, 2])
    assert model.refined_blocks == [0, 2]
    assert isinstance(model.blocks[0].attn, RefinedTimmAttention)
    assert not isinstance(model.blocks[1].attn, RefinedTimmAttention)
    assert model.pretrained_cfg['refiner']['blocks'] == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # identity at the start

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    y = torch.tensor([1, 3])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    refine = model.blocks[0].attn.refine
    assert refine.reduce_norm.weight.abs().sum() > 0  # the refinement learned something
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), before, atol=1e-4)


def test_retrofit_keeps_timm_api():
    model = refiner.refine_vit(_vit(), blocks=2).eval()
    assert model.refined_blocks == [1, 2]
    x = torch.randn(1, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 3
    state = model.state_dict()
    assert 'blocks.1.attn.qkv.weight' in state and 'blocks.1.attn.refine.expand.weight' in state
    fresh = _vit()
    missing, unexpected = fresh.load_state_dict(state, strict=False)  # original keys still load
    assert not missing and all('.refine.' in k for k in unexpected)
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['linear', 'conv'])
def test_retrofit_other_forms(mode):
    model = refiner.refine_vit(_vit(), refine_mode=mode, refine_kernel_size=5).eval()
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 5)


def test_retrofit_errors():
    with pytest.raises(TypeError, match='VisionTransformer-like'):
        refiner.refine_vit(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match='out of range'):
        refiner.refine_vit(_vit(), blocks=[7])
    with pytest.raises(TypeError, match='timm.layers.Attention'):
        refiner.refine_vit(refiner.refine_vit(_vit(), blocks=[0]), blocks=[0])
    model = refiner.refine_vit(_vit(), blocks=[0])
    with pytest.raises(ValueError, match='attention masks'):
        model.blocks[0].attn(torch.randn(1, 17, 192), attn_mask=torch.ones(17, 17, dtype=torch.bool))


VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # a tiny timm ViT


def test_deit_plus_refiner_readme_command_without_img_size(tmp_path, capsys):
    """README's ``refiner train --model deit_small_patch16_224 --finetune X.safetensors --refine all
    --data DIR``, at a tiny scale: no --img-size, so the input size is the base model's (224)."""
    from safetensors.torch import save_file
    from timm.data import resolve_data_config
    torch.manual_seed(0)
    source = timm.create_model('vit_tiny_patch16_224', num_classes=1000, **dict(VIT, patch_size=32))
    save_file(source.state_dict(), str(tmp_path / 'vit.safetensors'))
    data = tmp_path / 'data'
    for split, n in (('train', 3), ('val', 1)):
        for c in ('a', 'b'):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                _random_image(data / split / c / f'{i}.png')
    out = tmp_path / 'run'
    assert main(['train', '--model', 'vit_tiny_patch16_224', '--finetune', str(tmp_path / 'vit.safetensors'),
                 '--refine', 'all', '--data', str(data), '--set', f'model_args={json.dumps(dict(VIT, patch_size=32))}',
                 '--epochs', '1', '--batch-size', '2', '--set', 'min_steps=0', '--out', str(out), '--no-progress']) == 0
    printed = capsys.readouterr().out
    assert 'refinement added to blocks [0, 1]' in printed
    assert printed.startswith('--finetune without --config: starting from the finetune recipe')
    assert timm.models.get_pretrained_cfg_value('refined_vit', 'input_size') == (3, 224, 224)
    assert resolve_data_config(model=timm.create_model('refined_vit'))['input_size'] == (3, 224, 224)
    from refiner.pretrained import load_model
    model, info = load_model(out)
    assert info['data_config']['input_size'] == (3, 224, 224) and model.refined_blocks == [0, 1]


def _random_image(path):
    from PIL import Image
    Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()).save(path)


def test_refined_vit_never_loads_its_bases_unrefined_weights(monkeypatch):
    """refined_vit keeps its base's preprocessing but not where the base's weights are: pretrained=True
    without weights of its own refuses (it would fetch the unrefined base), with a file it loads that."""
    import refiner.retrofit as retrofit
    loaded = []
    monkeypatch.setattr(retrofit, 'load_pretrained', lambda model, pretrained_cfg=None, **kw: loaded.append(
        pretrained_cfg))
    small = dict(base_model='deit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=5)
    model = timm.create_model('refined_vit', **small)
    assert not any(model.pretrained_cfg.get(k) for k in ('url', 'hf_hub_id', 'file'))
    assert model.pretrained_cfg['mean'] == timm.create_model('deit_tiny_patch16_224').pretrained_cfg['mean']
    with pytest.raises(ValueError, match='no published weights'):
        timm.create_model('refined_vit', pretrained=True, **small)
    timm.create_model('refined_vit', pretrained=True, pretrained_cfg_overlay=dict(file='w.safetensors'), **small)
    assert [(c.get('file'), c.get('hf_hub_id')) for c in loaded] == [('w.safetensors', None)]
