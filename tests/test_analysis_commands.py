"""refiner analyze {cka,attention} and refiner show-attention: end to end, their errors, their
inputs' text forms, and their numbers recomputed independently on a tiny model."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import cka_minibatch as _cka_minibatch
from conftest import tiny_refiner as _tiny_refiner
from PIL import Image
from torch import nn

import refiner  # noqa: F401  (registers the models)
from refiner.analysis import (
    AnalysisError,
    NoAttentionError,
    NoIntermediatesError,
)
from refiner.analysis import commands as cmd
from refiner.checkpoint import save_weights
from refiner.cli import main
from refiner.data import DataError, build_datasets

TINY_REFINER = '{patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2}'


TINY_VIT = 'vit_tiny_patch16_224{embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}'


def _args(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def _cka_values(matrix):
    return [v for row in matrix for v in row]


def test_cka_command_end_to_end(tmp_path, capsys):
    out = tmp_path / 'cka'
    args = _args(cmd.add_analyze_args, [
        'cka', '--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
        '--compare', TINY_VIT, 'resnet18', '--max-images', '32', '--batch-size', '16', '--out', str(out),
        '--no-progress'])
    assert cmd.run_analyze(args) == 0
    res = json.loads((out / 'cka.json').read_text())
    assert res['num_images'] == 32 and res['num_batches'] == 2
    assert set(res['models']) == {'refiner_vit_nano', 'vit_tiny_patch16_224', 'resnet18'}
    assert [m['num_blocks'] for m in res['models'].values()] == [4, 2, 5]
    for m in res['models'].values():
        values = _cka_values(m['matrix']) + m['cka_with_last']
        assert all(v is not None and -1e-6 <= v <= 1 + 1e-6 for v in values)
        assert m['cka_with_last'][-1] == pytest.approx(1.0)
        assert m['cka_first_last'] == pytest.approx(m['cka_with_last'][0])
        assert set(m['normalised_at_depth']) == {'0.25', '0.50', '0.75'}
    for c in res['cross'].values():
        assert all(v is not None and -0.05 <= v <= 1 + 1e-6 for v in _cka_values(c['matrix']))
    for name in ('cka_curves.png', 'cka_curves_normalised.png', 'cka_heatmap_refiner_vit_nano.png',
                 'cka_heatmap_vit_tiny_patch16_224.png', 'cka_heatmap_resnet18.png'):
        assert (out / name).stat().st_size > 10_000, name
    printed = capsys.readouterr().out
    assert 'CKA(first, last)' in printed and '25/50/75% depth' in printed


def test_cka_command_from_a_checkpoint(tmp_path):
    from refiner.checkpoint import save_weights
    model = _tiny_refiner()
    dc = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')
    ckpt = save_weights(model, tmp_path / 'model.safetensors', 'refiner_vit_nano',
                        dict(img_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=10),
                        extra={'data_config': dc})
    out = tmp_path / 'cka'
    args = _args(cmd.add_cka_args, ['--checkpoint', str(ckpt), '--max-images', '8', '--batch-size', '4',
                                    '--out', str(out), '--no-progress'])
    assert cmd.run_cka(args) == 0
    res = json.loads((out / 'cka.json').read_text())
    (entry,) = res['models'].values()
    assert entry['input_size'] == [3, 16, 16] and entry['source'].startswith('checkpoint')


DATA_CONFIG = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny Refiner-ViT (attention, refining, attention, refining) with non-trivial BatchNorms,
    layer scales and weights, saved as a checkpoint the commands load."""
    torch.manual_seed(0)
    args = dict(img_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    model = timm.create_model('refiner_vit_nano', **args).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
        elif isinstance(m, timm.layers.LayerScale):
            m.gamma.data.uniform_(0.5, 1.5, generator=g)
        elif isinstance(m, nn.Linear):  # weights of trained size: blocks that change the tokens
            m.weight.data.mul_(8.0)
    path = save_weights(model, tmp_path_factory.mktemp('tiny') / 'model.safetensors', 'refiner_vit_nano', args,
                        extra={'data_config': DATA_CONFIG})
    return model, path


def _images(indices):
    """The digits' held-out images, preprocessed here: 8×8 grey -> RGB, bilinear to 16×16, (x - 0.5) / 0.5."""
    val = build_datasets('digits').val
    out = []
    for i in indices:
        img = Image.fromarray(val.images[i], 'L').convert('RGB').resize((16, 16), Image.BILINEAR)
        out.append((torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5)
    return torch.stack(out)


def _evenly_spaced(n, k):
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def _hooked(model, x):
    """Each block's output tokens and its attention's (input, handed-over map, output), from hooks."""
    outs, attn_io = [], []
    handles = [blk.register_forward_hook(lambda m, i, o: outs.append(o[0])) for blk in model.blocks]
    handles += [blk.attn.register_forward_hook(lambda m, i, o: attn_io.append((i[0], i[1] if len(i) > 1 else None, o)))
                for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs, attn_io


def test_cka_command_numbers_recomputed(tiny, tmp_path):
    """cka.json's matrix, curve with the last block and normalised curve, from block outputs taken
    with hooks (class token first, token-major) and the formula above, over the same minibatches."""
    model, path = tiny
    out = tmp_path / 'cka'
    assert main(['analyze', 'cka', '--checkpoint', str(path), '--max-images', '16', '--batch-size', '8',
                 '--out', str(out), '--no-progress']) == 0
    res = json.loads((out / 'cka.json').read_text())
    (entry,) = res['models'].values()
    idx = _evenly_spaced(450, 16)
    feats = [[], [], [], []]
    for batch in (idx[:8], idx[8:]):
        blocks, _ = _hooked(model, _images(batch))
        for layer, f in enumerate(blocks):
            feats[layer].append(f.reshape(len(batch), -1).double().numpy())
    expected = np.array([[_cka_minibatch(feats[a], feats[b]) for b in range(4)] for a in range(4)])
    np.testing.assert_allclose(np.array(entry['matrix']), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(entry['cka_with_last'], expected[:, -1], rtol=0, atol=1e-5)
    c = expected[:, -1]
    np.testing.assert_allclose(entry['normalised_cka_with_last'], (c - c[0]) / (1 - c[0]), rtol=0, atol=1e-4)
    assert entry['cka_first_last'] == pytest.approx(c[0], abs=1e-5)
    assert np.ptp(expected) > 0.02  # the blocks are distinguishable: a constant answer would fail


def test_attention_command_end_to_end(tmp_path, capsys):
    out = tmp_path / 'att'
    args = _args(cmd.add_analyze_args, [
        'attention', '--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
        '--compare', TINY_VIT, '--max-images', '32', '--batch-size', '16', '--out', str(out), '--no-progress'])
    assert cmd.run_analyze(args) == 0
    res = json.loads((out / 'attention.json').read_text())
    assert res['num_images'] == 32
    rows = res['models']['refiner_vit_nano']['blocks']
    assert [r['kind'] for r in rows] == ['attention', 'refining', 'attention', 'refining']
    for model in res['models'].values():
        for r in model['blocks']:
            for key, v in r.items():
                if 'similarity' in key and v is not None:
                    assert -1 - 1e-6 <= v <= 1 + 1e-6 and math.isfinite(v)
    assert rows[1]['head_similarity_before'] is not None and rows[1]['cross_block_similarity'] is not None
    assert (out / 'attention_diversity.png').stat().st_size > 10_000
    assert 'head-sim' in capsys.readouterr().out


def test_attention_command_rejects_a_cnn(tmp_path):
    args = _args(cmd.add_attention_args, ['--model', 'resnet18', '--max-images', '4', '--out', str(tmp_path)])
    with pytest.raises(NoAttentionError):
        cmd.run_attention(args)


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0  # an all-zero map: similarity 0


def _head_sim(maps):
    """Mean over images and ordered head pairs h ≠ g of cos(map_h, map_g), maps (B, H, N, M)."""
    B, H = maps.shape[:2]
    flat = maps.reshape(B, H, -1).double().numpy()
    return np.mean([_cos(flat[i, h], flat[i, g]) for i in range(B) for h in range(H) for g in range(H) if h != g])


def _cross_sim(a, b):
    """DeepViT: mean over images, heads and queries of cos(a's row, b's row)."""
    a, b = a.double().numpy(), b.double().numpy()
    return np.mean([_cos(a[i, h, n], b[i, h, n]) for i in range(a.shape[0]) for h in range(a.shape[1])
                    for n in range(a.shape[2])])


def test_attention_command_numbers_recomputed(tiny, tmp_path):
    """attention.json's per-block head similarity, cross-block similarity, and the same before
    refinement and for the expanded maps, recomputed from maps built here: softmax(q·kᵀ·s) + s·prev
    from the block's own qkv, and the refining blocks' reference refinement of the handed-over map."""
    model, path = tiny
    out = tmp_path / 'att'
    assert main(['analyze', 'attention', '--checkpoint', str(path), '--max-images', '8', '--batch-size', '8',
                 '--out', str(out), '--no-progress']) == 0
    rows = next(iter(json.loads((out / 'attention.json').read_text())['models'].values()))['blocks']
    x = _images(_evenly_spaced(450, 8))
    _, attn_io = _hooked(model, x)
    maps, befores, expanded = [], [], []
    with torch.no_grad():
        for blk, (inp, prev, output) in zip(model.blocks, attn_io):
            a = blk.attn
            if a.reuse_attn:  # refining block: refines the handed-over map
                dla = a.refine
                maps.append(a.refined_map(prev))
                befores.append(prev)
                expanded.append(torch.nn.functional.relu6(dla.expand_norm(dla.expand(prev))))
            else:
                B, N, C = inp.shape
                q, k, _ = a.qkv(inp).view(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
                m = torch.softmax(q @ k.transpose(-2, -1) * a.scale, -1)
                if prev is not None:
                    m = m + a.scale * prev
                torch.testing.assert_close(m, output[1])  # the map the block handed on
                maps.append(m)
                befores.append(None)
                expanded.append(None)
    assert [r['kind'] for r in rows] == ['attention', 'refining', 'attention', 'refining']
    for i, r in enumerate(rows):
        assert r['head_similarity'] == pytest.approx(_head_sim(maps[i]), abs=1e-5), i
        if i == 0:
            assert r['cross_block_similarity'] is None
        else:
            assert r['cross_block_similarity'] == pytest.approx(_cross_sim(maps[i], maps[i - 1]), abs=1e-5), i
        if befores[i] is not None:
            assert r['head_similarity_before'] == pytest.approx(_head_sim(befores[i]), abs=1e-5), i
            assert r['cross_block_similarity_before'] == pytest.approx(_cross_sim(befores[i], maps[i - 1]),
                                                                       abs=1e-5), i
            assert r['head_similarity_expanded'] == pytest.approx(_head_sim(expanded[i]), abs=1e-5), i
    values = [r['head_similarity'] for r in rows]
    assert max(values) - min(values) > 0.05 and min(values) < 0.95  # not a constant, not all 1


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _image(tmp_path: Path) -> Path:
    from PIL import Image
    path = tmp_path / 'digit.png'
    Image.fromarray((_rng(5).random((24, 24, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_show_attention_end_to_end(tmp_path, capsys):
    img = _image(tmp_path)
    png = tmp_path / 'refiner.png'
    args = _args(cmd.add_show_attention_args, [str(img), '--model', 'refiner_vit_nano', '--img-size', '16',
                                               '--model-args', TINY_REFINER, '--query', '1,2', '--out', str(png)])
    assert cmd.run_show_attention(args) == 0
    assert png.stat().st_size > 20_000
    assert 'block 1 (refining), query (1, 2) on the 4×4 grid' in capsys.readouterr().out
    png = tmp_path / 'vit.png'
    args = _args(cmd.add_show_attention_args, [str(img), '--model', 'vit_tiny_patch16_224', '--img-size', '16',
                                               '--model-args', '{embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}',
                                               '--out', str(png)])
    assert cmd.run_show_attention(args) == 0
    assert png.stat().st_size > 10_000
    assert 'block 0 (attention), query (2, 2)' in capsys.readouterr().out


def test_show_attention_errors(tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(_rng(6).integers(0, 256, 300, dtype=np.uint8).tobytes())
    base = ['--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
            '--out', str(tmp_path / 'x.png')]
    with pytest.raises(DataError, match='cannot read image .*broken.png'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [str(bad)] + base))
    img = str(_image(tmp_path))
    with pytest.raises(cmd.QueryError, match=r'outside the 4×4 token grid'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--query', '4,0'] + base))
    with pytest.raises(cmd.QueryError, match='ROW,COL'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--query', 'middle'] + base))
    with pytest.raises(cmd.BlockIndexError, match='blocks 0 to 3'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--block', '7'] + base))
    with pytest.raises(cmd.UnknownModelError, match='not a timm model name'):
        cmd.run_show_attention(_args(cmd.add_show_attention_args, [img, '--model', 'refiner_vit_nanoo']))
    for err in (cmd.QueryError, cmd.BlockIndexError, cmd.UnknownModelError, NoAttentionError, NoIntermediatesError):
        assert issubclass(err, AnalysisError) and issubclass(err, ValueError)


def test_parse_compare_and_model_args():
    assert cmd.parse_compare('resnet18') == ('resnet18', None, {})
    assert cmd.parse_compare('vit:runs/a') == ('vit', 'runs/a', {})
    assert cmd.parse_compare('vit_tiny_patch16_224{depth: 2, img_size: 16}') == (
        'vit_tiny_patch16_224', None, {'depth': 2, 'img_size': 16})
    with pytest.raises(AnalysisError, match='not both'):
        cmd.parse_compare('vit{depth: 2}:runs/a')
    with pytest.raises(AnalysisError, match='YAML mapping'):
        cmd.parse_model_args('[1, 2]')
    assert cmd.parse_query('cls') == (-1, -1) and cmd.parse_query(' 2, 3 ') == (2, 3)


def test_the_analyses_take_plain_arguments(tmp_path):
    """block_cka, attention_diversity and show_attention run without an argparse Namespace."""
    from refiner.analysis.compute import attention_diversity, block_cka, show_attention
    from refiner.analysis.inputs import load_models, parse_model_args
    models = load_models('refiner_vit_nano', None, 16, parse_model_args(TINY_REFINER))
    result, files = block_cka(models, None, tmp_path / 'cka', max_images=8, batch_size=4)
    assert result['num_images'] == 8 and (tmp_path / 'cka' / 'cka.json') in files
    payload, _ = attention_diversity(models, None, tmp_path / 'attention', max_images=2, batch_size=2)
    assert payload['num_images'] == 2 and len(payload['models']['refiner_vit_nano']['blocks']) == 4
    shown = show_attention(models[0], _image(tmp_path), tmp_path / 'a.png', block=1, query=(0, 0))
    assert shown['path'].is_file() and (shown['block'], shown['kind'], shown['grid']) == (1, 'refining', (4, 4))


def test_the_analysed_data_defaults_to_the_checkpoints_own():
    """As ``refiner eval``: no --data means the dataset the checkpoints were trained on (else the digits);
    checkpoints of different datasets need --data; a model analysed on other data is noted."""
    from refiner.analysis.inputs import LoadedModel, analysis_data

    def loaded(label, trained_on=None):
        return LoadedModel(label, nn.Identity(), {}, 'test', {'trained_on': trained_on} if trained_on else {})

    assert analysis_data([loaded('a', 'fashion_mnist:/fm'), loaded('b', 'fashion_mnist'), loaded('vit')], None) \
        == ('fashion_mnist:/fm', [])
    assert analysis_data([loaded('vit')], None) == (None, [])  # nothing recorded: the digits
    with pytest.raises(AnalysisError, match=r'trained on different datasets \(a on fashion_mnist, b on digits\)'):
        analysis_data([loaded('a', 'fashion_mnist'), loaded('b', 'digits')], None)
    assert analysis_data([loaded('a', 'fashion_mnist'), loaded('b', 'digits')], 'digits') == \
        ('digits', ['note: a was trained on fashion_mnist, analysed on digits'])
