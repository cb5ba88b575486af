"""Guards on ``refiner export``: the TorchScript file written through the command line, from a
checkpoint of trained-scale weights, reproduces the model before reparameterization."""
import copy

import timm
import torch
from conftest import trained_scale

import refiner  # noqa: F401  (registers the models)
from refiner.checkpoint import save_weights
from refiner.cli import main


def test_export_cli_torchscript_from_a_checkpoint(tmp_path, capsys):
    """``refiner export --format torchscript --checkpoint``: the file's logits equal the checkpoint's
    model before re-parameterization (BatchNorms, layer scales and biases all non-trivial, so that a
    folding or scripting bug in any branch, the MLP included, shows)."""
    torch.manual_seed(0)
    args = dict(img_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    model = trained_scale(timm.create_model('refiner_vit_nano', **args))
    dc = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')
    ckpt = save_weights(model, tmp_path / 'model.safetensors', 'refiner_vit_nano', args, extra={'data_config': dc})
    out = tmp_path / 'model.pt'
    assert main(['export', str(out), '--checkpoint', str(ckpt), '--format', 'torchscript']) == 0
    assert 'torchscript, input (B, 3, 16, 16)' in capsys.readouterr().out
    loaded = torch.jit.load(str(out))
    no_mlp = copy.deepcopy(model)
    for blk in no_mlp.blocks:
        blk.mlp.fc2.weight.data.zero_()
        blk.mlp.fc2.bias.data.zero_()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        err = float((loaded(x) - ref).abs().max() / ref.abs().max())
        sensitivity = float((no_mlp(x) - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5, err
    assert sensitivity > 1e-2, sensitivity  # the MLPs matter at this scale
