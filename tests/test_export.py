"""refiner export: ONNX, TorchScript and Hub model folders round-trip, through the library and the command line."""
import copy
import json
import subprocess
import sys

import onnxruntime  # noqa: F401  (the export extra must be installed)
import pytest
import timm
import torch
from conftest import TINY_VIT as VIT
from conftest import refined_vit as _refined_vit
from conftest import trained_scale

import refiner  # noqa: F401  (registers the models)
from refiner.checkpoint import save_weights
from refiner.cli import main
from refiner.export import check_onnx, check_torchscript, export_onnx, export_torchscript, prepare


def _reference_outputs(model, batches=(1, 3)):
    """The eval model (not reparameterized)'s logits on fixed inputs, and how far they move without the MLPs."""
    import copy
    xs = [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in batches]
    no_mlp = copy.deepcopy(model)
    for blk in no_mlp.blocks:
        blk.mlp.fc2.weight.data.zero_()
        blk.mlp.fc2.bias.data.zero_()
    with torch.no_grad():
        ref = [model(x) for x in xs]
        sensitivity = min(_rel(n, r) for n, r in zip([no_mlp(x) for x in xs], ref))
    assert sensitivity > 1e-2, sensitivity  # an export that lost its MLPs would be far outside the tolerance
    return xs, ref


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize('reparameterize', [True, False])
def test_onnx_round_trip_dynamic_batch(tmp_path, reparameterize):
    import onnxruntime as ort
    original = trained_scale(timm.create_model('refiner_vit_nano', num_classes=7))
    xs, ref = _reference_outputs(original)
    model = prepare(original, reparameterize=reparameterize)
    path = export_onnx(model, str(tmp_path / 'm.onnx'), img_size=32, opset=18)
    errs = check_onnx(str(path), model, 32, batches=(1, 3, 5))
    assert max(errs.values()) <= 1e-4, errs
    # against the model before reparameterization too
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for x, r in zip(xs, ref):
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        assert _rel(out, r) <= 1e-4
    import onnx
    assert onnx.load(str(path)).opset_import[0].version >= 17


def test_torchscript_round_trip(tmp_path):
    original = trained_scale(timm.create_model('refiner_vit_nano', num_classes=7))
    xs, ref = _reference_outputs(original)
    model = prepare(original)
    path = export_torchscript(model, str(tmp_path / 'm.pt'))
    assert max(check_torchscript(str(path), model, 32).values()) <= 1e-5
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert max(_rel(loaded(x), r) for x, r in zip(xs, ref)) <= 1e-5


ENV_ARGS = dict(capture_output=True, text=True, timeout=600)


def _cli(*args):
    return subprocess.run([sys.executable, '-W', 'ignore', '-m', 'refiner', *map(str, args)], **ENV_ARGS)


def test_export_cli_from_an_original_checkpoint(tmp_path):
    res = _cli('export', tmp_path / 'orig.onnx', '--checkpoint', 'tests/data/official_tiny.pt', '--format', 'onnx')
    assert res.returncode == 0, res.stderr
    assert 'max relative difference' in res.stdout
    fixture = torch.load('tests/data/official_tiny.pt', weights_only=True)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / 'orig.onnx'), providers=['CPUExecutionProvider'])
    out = sess.run(None, {sess.get_inputs()[0].name: fixture['input'].numpy()})[0]
    err = (torch.from_numpy(out) - fixture['logits']).abs().max() / fixture['logits'].abs().max()
    assert err <= 1e-4  # the exported file reproduces the authors' model


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


def test_export_errors(tmp_path):
    res = _cli('export', tmp_path / 'x.onnx', '--model', 'not_a_model', '--format', 'onnx')
    assert res.returncode == 1 and 'not a timm model name' in res.stderr and 'Traceback' not in res.stderr
    assert refiner  # imported for registration



def test_an_hf_export_loads_in_timm_and_transformers_with_its_labels(tmp_path, nano_checkpoint, monkeypatch):
    """``refiner export --format hf``: timm (local-dir:) and Hugging Face transformers
    (AutoModelForImageClassification, pipeline) load the folder, with identical outputs and the class names."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    from refiner.data import eval_transform
    from refiner.export import export_hf
    from refiner.pretrained import load_model, resolve_data_config
    nano = tmp_path / 'nano'
    assert main(['export', str(nano), '--format', 'hf', '--checkpoint', str(nano_checkpoint[0])]) == 0
    refined = _refined_vit()
    export_hf(refined, str(tmp_path / 'refined'), {'data_config': resolve_data_config(refined), 'classes': list('abc'),
                                                   'model_args': refined._model_args})
    x = torch.randn(2, 3, 16, 16)
    img = Image.fromarray(torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8).numpy())
    for folder in (nano, tmp_path / 'refined'):
        model, info = load_model(folder)
        from_timm = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        from_hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        assert from_hf.config.id2label == dict(enumerate(info['classes']))
        with torch.no_grad():
            ref = model(x)
            assert torch.equal(from_timm(x), ref) and torch.equal(from_hf(pixel_values=x).logits, ref)
            probs = model(eval_transform(info['data_config'])(img)[None]).softmax(-1)[0]
        top = pipeline('image-classification', model=str(folder))(img, top_k=3)
        assert [t['label'] for t in top] == [info['classes'][i] for i in probs.topk(3).indices]
        assert [t['score'] for t in top] == pytest.approx(probs.topk(3).values.tolist(), abs=1e-6)
    assert info['classes'] == ['a', 'b', 'c'] and from_timm.refined_blocks == [1]


def test_onnx_height_and_width_are_dynamic_where_the_model_allows(tmp_path, nano_checkpoint, capsys):
    """A Refiner-ViT resamples its position embeddings: its ONNX file takes any multiple of the patch
    size; a timm ViT of fixed size says so, and refuses another size."""
    import onnxruntime as ort

    from refiner.export import export_onnx, onnx_input_shape, prepare
    path = tmp_path / 'nano.onnx'
    assert main(['export', str(path), '--checkpoint', str(nano_checkpoint[0]), '--format', 'onnx']) == 0
    out = capsys.readouterr().out
    assert 'input (B, 3, 16, 16), height and width any multiple of 4' in out and '16x20: ' in out
    assert [isinstance(d, int) for d in onnx_input_shape(path)] == [False, True, False, False]
    model = prepare(nano_checkpoint[1])
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for shape in ((2, 3, 32, 32), (1, 3, 24, 12)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(sess.run(None, {'images': x.numpy()})[0])
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4, shape
    vit = timm.create_model('vit_tiny_patch16_224', img_size=16, num_classes=3, **VIT).eval()
    fixed = export_onnx(vit, str(tmp_path / 'vit.onnx'), img_size=16)
    assert onnx_input_shape(fixed)[1:] == (3, 16, 16)
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
    with pytest.raises(InvalidArgument, match='Got invalid dimensions'):
        ort.InferenceSession(str(fixed), providers=['CPUExecutionProvider']).run(
            None, {'images': torch.randn(1, 3, 32, 32).numpy()})


def test_a_timm_vit_with_dynamic_img_size_exports_any_height_and_width(tmp_path):
    """timm keeps dynamic_img_size on the model, not on patch_embed: such a ViT's ONNX file takes any
    multiple of the patch size, as the docstring of input_stride says."""
    from refiner.export import check_onnx, export_onnx, input_stride, onnx_input_shape
    vit = timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True, img_size=16, num_classes=3, **VIT).eval()
    assert input_stride(vit) == VIT['patch_size']
    path = export_onnx(vit, str(tmp_path / 'dynamic.onnx'), img_size=16)
    assert [isinstance(d, int) for d in onnx_input_shape(path)] == [False, True, False, False]
    errs = check_onnx(path, vit, 16)
    assert set(errs) >= {1, 3, '32x32', f'16x{16 + VIT["patch_size"]}'} and max(errs.values()) <= 1e-4


def test_an_hf_export_with_a_pretrained_cfg_in_its_model_arguments_loads_in_timm(tmp_path, nano_checkpoint):
    """A model built with pretrained_cfg among its arguments (as timm records it) still exports to a
    folder that timm.create_model('local-dir:...') loads as the same model."""
    from refiner.export import check_hf, export_hf
    from refiner.pretrained import load_model
    model, info = load_model(nano_checkpoint[0])
    info = dict(info, model_args={**info['model_args'], 'pretrained_cfg': dict(model.pretrained_cfg)})
    out = export_hf(model, str(tmp_path / 'hub'), info)
    assert 'pretrained_cfg' not in json.loads((out / 'config.json').read_text()).get('model_args', {})
    assert max(check_hf(out, model, 16).values()) <= 1e-5


def test_an_hf_export_removes_what_a_killed_one_left(tmp_path, nano_checkpoint):
    """A killed export leaves its hidden temporary folder; the next export to that folder removes it, but
    not one that a live export holds."""
    from refiner.export import export_hf
    from refiner.fileio import held_temp_dir, make_temp_dir
    from refiner.pretrained import load_model
    model, info = load_model(nano_checkpoint[0])
    abandoned = make_temp_dir(tmp_path, 'hub')  # as a SIGKILL leaves it: nobody holds it
    (abandoned / 'model.safetensors').write_bytes(b'half')
    with held_temp_dir(tmp_path, 'hub') as live:  # another export, still writing
        export_hf(model, str(tmp_path / 'hub'), info)
        assert not abandoned.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.hub.')) == [live.name]


def test_export_and_check_is_the_library_call_behind_the_command(tmp_path):
    """export.export_and_check writes and checks a file without the command line, and refuses a format
    it does not know."""
    from refiner.export import ExportError, export_and_check, load_for_export
    model, info = load_for_export('refiner_vit_nano', None, 16, dict(VIT, patch_size=4))
    res = export_and_check(model, info, str(tmp_path / 'nano.pt'), 'torchscript')
    assert res['path'].is_file() and res['img_size'] == 16 and res['any_multiple_of'] is None
    assert set(res['errors']) == {1, 3} and max(res['errors'].values()) <= res['tolerance'] == 1e-5
    with pytest.raises(ExportError, match='expected'):
        export_and_check(model, info, str(tmp_path / 'x'), 'tflite')
