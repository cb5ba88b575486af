"""What a new user hits in the first hour (issue 22): file permissions, loading an export with
Hugging Face transformers, the "DeiT + refiner" command, re-parameterizing in train mode, prediction
messages, a loaded run's pretrained_cfg, the CLI's common flags and ONNX input sizes."""
import json
import os
import stat

import pytest
import timm
import torch
from conftest import trained_scale

import refiner  # noqa: F401  (registers the models)
from refiner.checkpoint import save_weights
from refiner.cli import main

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


VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # a tiny timm ViT


def _refined_vit(img_size=16, num_classes=3):
    torch.manual_seed(1)
    model = timm.create_model('refined_vit', base_model='vit_tiny_patch16_224', refine_blocks=[1], img_size=img_size,
                              num_classes=num_classes, **VIT)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return trained_scale(model)


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


@pytest.mark.parametrize('name', ['refiner_vit_nano', 'refined_vit'])
def test_reparameterize_a_model_in_train_mode_as_timms_benchmark_does(name):
    """timm's ``benchmark.py --reparam`` folds before ``.eval()``: the BatchNorms fold with their running
    statistics in either mode, as timm's RepVGG / MobileOne do."""
    import copy
    model = trained_scale(timm.create_model('refiner_vit_nano', **NANO)) if name == 'refiner_vit_nano' \
        else _refined_vit()
    reference = copy.deepcopy(model).eval()
    folded = timm.utils.reparameterize_model(model.train()).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = reference(x)
        assert float((folded(x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_predict_names_what_it_skipped_and_ignored_and_fails_on_nothing(tmp_path, nano_checkpoint, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    _random_image(folder / 'good.png')
    (folder / 'broken.png').write_bytes(b'not an image')
    (folder / 'notes.txt').write_text('not an image either')
    ckpt = str(nano_checkpoint[0])
    assert main(['predict', str(folder), '--checkpoint', ckpt, '--no-progress']) == 0
    out = capsys.readouterr().out
    assert f'skipped {folder / "broken.png"}: not a readable image' in out
    assert f'1 image(s) classified with refiner_vit_nano; 1 unreadable file(s) skipped; 1 non-image file(s) ' \
           f'({folder / "notes.txt"}) ignored' in out
    # nothing classified: exit 1, saying why
    (folder / 'good.png').unlink()
    argv = ['predict', str(folder), '--checkpoint', ckpt, '--no-progress', '--json', str(tmp_path / 'p.json')]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f'skipped {folder / "broken.png"}' in captured.out
    assert 'none of the 1 file(s) could be read as an image' in captured.err
    assert json.loads((tmp_path / 'p.json').read_text())['ignored'] == [str(folder / 'notes.txt')]
    (folder / 'broken.png').unlink()
    assert main(['predict', str(folder), '--checkpoint', ckpt, '--no-progress']) == 1
    assert f'1 non-image file(s) ({folder / "notes.txt"}) ignored' in capsys.readouterr().err



def test_a_loaded_run_carries_its_data_config_in_pretrained_cfg(nano_checkpoint):
    """``load_model`` on weights trained at 16x16: timm's resolve_data_config(model=...) picks the run's
    preprocessing, not refiner_vit_nano's registered 32x32."""
    from timm.data import resolve_data_config

    from refiner.pretrained import load_model
    model, info = load_model(nano_checkpoint[0])
    resolved = resolve_data_config(model=model)
    assert resolved == {k: tuple(v) if isinstance(v, list) else v for k, v in {
        **DATA_CONFIG, 'crop_mode': 'center'}.items()}
    assert model.pretrained_cfg['input_size'] == info['data_config']['input_size'] == (3, 16, 16)
    assert model.pretrained_cfg['num_classes'] == 3
    assert timm.create_model('refiner_vit_nano').pretrained_cfg['input_size'] == (3, 32, 32)  # the registry's own


def test_version_and_no_progress_on_every_long_command(capsys):
    from refiner import __version__
    from refiner.cli import build_parser
    with pytest.raises(SystemExit) as exit_:
        main(['--version'])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f'refiner {__version__} (timm ')
    parser = build_parser()
    for argv in (['train'], ['eval', '--checkpoint', 'R'], ['predict', 'x.png', '--checkpoint', 'R'],
                 ['analyze', 'cka', '--checkpoint', 'R'], ['analyze', 'attention', '--checkpoint', 'R'],
                 ['ablate'], ['bench'], ['export', 'out.onnx', '--format', 'onnx']):
        assert parser.parse_args([*argv, '--no-progress']).no_progress is True, argv


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
