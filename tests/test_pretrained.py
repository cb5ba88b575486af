"""refiner.pretrained: weight sources read and loaded (runs, Hub folders), heads re-initialised, the
preprocessing a loaded model carries, and the one loader of export and analysis."""
import json

import pytest
import timm
import torch
from conftest import finetune_cfg as _cfg

import refiner  # noqa: F401  (registers the models)
from refiner.cli import main
from refiner.config import load_recipe
from refiner.pretrained import ModelError, create_model, load_model, read_source
from refiner.train import train

NANO = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a tiny Refiner-ViT on 16x16 digits


VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a tiny timm ViT on 16x16 digits


def test_hub_folder_round_trip_and_finetune_from_it(pretrained_run, vit_run, tmp_path):
    for src, name in ((pretrained_run, 'nano'), (vit_run[0] / 'run', 'vit')):
        out = tmp_path / f'hf_{name}'
        assert main(['export', str(out), '--format', 'hf', '--checkpoint', str(src)]) == 0
        assert (out / 'config.json').is_file() and (out / 'model.safetensors').is_file()
        loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        model, info = load_model(src)
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(loaded(x), model(x))
        assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5]
    # at another input size: position embeddings resampled, and the folder says so
    assert main(['export', str(tmp_path / 'hf32'), '--format', 'hf', '--checkpoint', str(pretrained_run),
                 '--img-size', '32']) == 0
    assert timm.create_model(f'local-dir:{tmp_path / "hf32"}', pretrained=True).pos_embed.shape[1] == 65
    # a refined timm ViT as a Hub folder
    refined = timm.create_model('refined_vit', base_model='vit_tiny_patch16_224', refine_blocks=[1], img_size=16,
                                num_classes=3, **VIT).eval()
    for p in refined.parameters():
        p.data.normal_(0, 0.2)
    from refiner.export import export_hf
    from refiner.pretrained import resolve_data_config
    export_hf(refined, str(tmp_path / 'hf_refined'), {'data_config': resolve_data_config(refined),
                                                      'model_args': refined._model_args})
    again = timm.create_model(f'local-dir:{tmp_path / "hf_refined"}', pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    assert again.refined_blocks == [1] and torch.equal(again(x), refined(x))
    # fine-tune from the folder: its config names the architecture
    summary = train(_cfg(model=None, finetune=str(tmp_path / 'hf_nano'), classes=[5, 6, 7]),
                    out=str(tmp_path / 'ft'), progress=False)
    assert summary['epochs'] == 1
    assert read_source(tmp_path / 'hf_nano').kind == 'hub'


def test_zero_head_starts_a_reinitialised_head_at_zero(pretrained_run):
    model = timm.create_model('refiner_vit_nano', num_classes=3, img_size=16, **NANO)
    report = refiner.pretrained.load_pretrained_weights(model, read_source(pretrained_run), 'refiner_vit_nano',
                                                        classes=['a', 'b', 'c'], zero_heads=True)
    assert 're-initialised head (other classes, 5 -> 3 classes, zeros)' in report
    assert not model.head.weight.any() and not model.head.bias.any()
    assert torch.equal(model.pos_embed, read_source(pretrained_run).state_dict['pos_embed'])  # the rest: loaded
    assert load_recipe('finetune')['zero_head'] and load_recipe('finetune')['augment_from_source']


DATA_CONFIG = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')


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


def test_one_loader_by_name_or_checkpoint_for_export_and_analysis(nano_checkpoint, monkeypatch):
    """export and the analysis load a model by name or from a checkpoint through one function,
    refiner.pretrained.load_or_create, not through copies of their own."""
    import refiner.pretrained as pretrained
    from refiner.analysis.inputs import load_analysis_model
    from refiner.export import load_for_export
    from refiner.pretrained import ModelError, load_model, load_or_create
    tiny = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model, info = load_or_create('refiner_vit_nano', None, 16, tiny)
    assert not model.training and info['source'] == 'refiner_vit_nano (random weights)'
    assert info['model_args'] == {**tiny, 'img_size': 16} and info['data_config']['input_size'] == (3, 16, 16)
    _, from_file = load_or_create(None, nano_checkpoint[0])
    assert from_file['data_config'] == load_model(nano_checkpoint[0])[1]['data_config']
    with pytest.raises(ModelError, match='give --model NAME or --checkpoint PATH'):
        load_or_create(None)
    with pytest.raises(ModelError, match='a checkpoint fixes the architecture'):
        load_or_create(None, nano_checkpoint[0], model_args=tiny)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[:2])
        return load_or_create(*args, **kwargs)

    monkeypatch.setattr(pretrained, 'load_or_create', spy)
    load_for_export('refiner_vit_nano', None, 16, tiny)
    load_for_export(None, str(nano_checkpoint[0]), None)
    load_analysis_model('refiner_vit_nano', None, 16, tiny)
    load_analysis_model(None, str(nano_checkpoint[0]))
    assert [name for name, _ in calls] == ['refiner_vit_nano', None, 'refiner_vit_nano', None]


def test_a_recipe_token_grid_fits_a_cnn_and_other_rejected_args_still_fail():
    """A recipe's ``patch_size`` (the fashion_mnist and default recipes set 4) once stopped
    ``train --model resnet18``; the token grid is dropped for a CNN, any other bad argument still refused."""
    cnn = create_model('resnet18', img_size=28, patch_size=4, num_classes=3)
    assert cnn.fc.out_features == 3
    vit = create_model('vit_tiny_patch16_224', img_size=28, patch_size=4, num_classes=3, depth=1)
    assert vit.patch_embed.grid_size == (7, 7)  # kept where the model has a token grid
    with pytest.raises(ModelError, match="cannot create resnet18 .*'depth'"):
        create_model('resnet18', img_size=28, patch_size=4, depth=1)


def test_broken_run_and_model_folders_are_one_sentence(nano_checkpoint, tmp_path):
    """A run folder whose config.yaml was damaged, a model folder whose config.json is not a mapping, and
    model arguments the model rejects with an arithmetic or tensor error: each a CheckpointError /
    ModelError naming the file or the arguments."""
    import shutil

    from refiner.convert import CheckpointError
    from refiner.pretrained import create_model_and_args
    run = tmp_path / 'run'  # a run folder: its config.yaml beside its weights
    run.mkdir()
    shutil.copy(nano_checkpoint[0], run / 'model.safetensors')
    for text in ('lr: [1, 2\n', '- a list\n'):
        (run / 'config.yaml').write_text(text)
        with pytest.raises(CheckpointError, match='config.yaml is not a refiner training config'):
            read_source(run)
    hub = tmp_path / 'hub'
    hub.mkdir()
    (hub / 'config.json').write_text('[]')
    with pytest.raises(CheckpointError, match='config.json is not a timm model config'):
        read_source(hub)
    for bad in ({'patch_size': 0}, {'embed_dim': -8}):
        with pytest.raises(ModelError, match='cannot create refiner_vit_nano with'):
            create_model_and_args('refiner_vit_nano', **bad)
