"""Spatial distributed local attention: the local convolution over the 2-D token grid of the keys
(and of the queries), tested like the raster form."""
import copy

import pytest
import timm
import torch

import refiner  # noqa: F401  (registers the models)
from refiner import functional as RF
from refiner import refine_vit
from refiner.export import check_onnx, check_torchscript, export_onnx, export_torchscript, prepare
from refiner.kernels import set_kernels
from refiner.layers import DistributedLocalAttention

LAYOUTS = ('spatial_keys', 'spatial')


def _impulse_response(layout, grid=(3, 5), query=(1, 2), key=(2, 4)):
    """The local stage of a conv-form DLA whose 3×3 kernel is all ones, on a map that is zero but
    for one (query, key) pair of patch tokens: where that entry spreads to."""
    h, w = grid
    N = 1 + h * w
    dla = DistributedLocalAttention(1, mode='conv', residual=False, refine_layout=layout, grid_size=grid).double()
    with torch.no_grad():
        for m in (dla.conv, dla.local_query):
            if m is not None:
                m.weight.fill_(1.0)
    a = torch.zeros(1, 1, N, N, dtype=torch.double)
    q, k = 1 + query[0] * w + query[1], 1 + key[0] * w + key[1]
    a[0, 0, q, k] = 1.0
    return (dla(a)[0, 0] != 0).nonzero().tolist()


def _cells(tokens, w):
    return sorted(((t - 1) // w, (t - 1) % w) for t in tokens)


def test_keys_spread_to_their_grid_neighbours_only():
    """spatial_keys: a key's 3×3 neighbourhood on the h×w grid (no wrap across rows, no class
    token), in the same query's row only; raster: the previous/next tokens in flattened order and
    the neighbouring queries."""
    spread = _impulse_response('spatial_keys')
    q = 1 + 1 * 5 + 2
    assert {r for r, _ in spread} == {q}
    assert _cells([c for _, c in spread], 5) == [(1, 3), (1, 4), (2, 3), (2, 4)]  # key (2, 4): a corner of the grid
    raster = _impulse_response('raster')
    k = 1 + 2 * 5 + 4
    assert sorted({c for _, c in raster}) == [k - 1, k]  # (k + 1 is past the map's end)
    assert sorted({r for r, _ in raster}) == [q - 1, q, q + 1]


def test_keys_and_queries_spread_over_both_grids():
    spread = _impulse_response('spatial', query=(1, 2), key=(1, 1))
    rows, cols = {r for r, _ in spread}, {c for _, c in spread}
    assert _cells(rows, 5) == [(i, j) for i in (0, 1, 2) for j in (1, 2, 3)]
    assert _cells(cols, 5) == [(i, j) for i in (0, 1, 2) for j in (0, 1, 2)]
    assert 0 not in rows and 0 not in cols  # the class token's row and column are not mixed in


def test_class_token_row_and_column_see_the_centre_tap_alone():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 1 + 12, 1 + 12, dtype=torch.double)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.double)
    bias = torch.randn(4, dtype=torch.double)
    for dim in (-1, -2):
        out = RF.grid_conv(t, weight, bias, (3, 4), 1, dim)
        centre = weight[:, 0, 1, 1].view(1, -1, 1)
        if dim == -1:
            torch.testing.assert_close(out[..., 0], t[..., 0] * centre + bias.view(1, -1, 1))
        else:
            torch.testing.assert_close(out[:, :, 0], t[:, :, 0] * centre + bias.view(1, -1, 1))


def test_a_map_that_fits_no_grid_is_refused():
    dla = DistributedLocalAttention(2, refine_layout='spatial_keys')
    with pytest.raises(ValueError, match='do not fit a 3x3 token grid'):
        dla(torch.rand(1, 2, 11, 11))  # 10 patch tokens: not a square; no grid given
    with pytest.raises(ValueError, match='refine_layout must be one of'):
        DistributedLocalAttention(2, refine_layout='hexagonal')


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('mode', ['inverted_residual', 'linear', 'conv'])
def test_kernels_equal_reference_and_gradients_reach_every_parameter(layout, mode):
    """On a grid that is neither square nor 14×14 (3×5 tokens): training outputs, gradients and
    BatchNorm statistics with the kernels equal the reference code's; eval too."""
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=(12, 20), refine_layout=layout,
                              refine_mode=mode).double()
    ref = copy.deepcopy(model)
    set_kernels(False, ref)
    x = torch.randn(3, 3, 12, 20, dtype=torch.double)
    outs = [m.train()(x) for m in (model, ref)]
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for (name, p1), p2 in zip(model.named_parameters(), ref.parameters()):
        assert p1.grad is not None and p1.grad.abs().sum() > 0, f'no gradient reaches {name}'
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-8, atol=1e-10, msg=name)
    for (name, b1), b2 in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b1.double(), b2.double(), msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-12)
    assert any(m.local_query is not None for m in model.modules() if isinstance(m, DistributedLocalAttention)) \
        == (layout == 'spatial')


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('mode', ['inverted_residual', 'linear', 'conv'])
def test_reparameterized_spatial_model_computes_the_same(layout, mode):
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=(12, 20), refine_layout=layout,
                              refine_mode=mode)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5
            m.running_mean.data = torch.rand(m.num_features, generator=g) * 0.2
    model.eval()
    x = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        expected = model(x)
        folded = prepare(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
        other = torch.randn(2, 3, 20, 12)  # another grid (5×3) at run time
        torch.testing.assert_close(folded(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fmt', ['torchscript', 'onnx'])
def test_spatial_model_export_round_trip(tmp_path, fmt):
    """The re-parameterized spatial model, exported and reloaded, computes what PyTorch does at
    several batch sizes (ONNX: dynamic batch, onnxruntime)."""
    torch.manual_seed(0)
    model = prepare(timm.create_model('refiner_vit_nano', num_classes=5, img_size=24, refine_layout='spatial'))
    if fmt == 'torchscript':
        export_torchscript(model, str(tmp_path / 'model.pt'))
        errs = check_torchscript(str(tmp_path / 'model.pt'), model, 24, batches=(1, 3))
        assert max(errs.values()) <= 1e-5, errs
    else:
        pytest.importorskip('onnxruntime')
        export_onnx(model, str(tmp_path / 'model.onnx'), 24)
        errs = check_onnx(str(tmp_path / 'model.onnx'), model, 24, batches=(1, 3))
        assert max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize('layout', LAYOUTS)
def test_retrofit_with_spatial_refinement_starts_as_the_original(layout):
    """refine_vit on a timm ViT of a 3×5 patch grid: the refinement starts as the identity, uses
    the model's grid and trains."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=(12, 20), patch_size=4, num_classes=3, depth=2)
    x = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        before = vit.eval()(x)
    refine_vit(vit, 'all', refine_layout=layout)
    dla = vit.blocks[0].attn.refine
    assert dla.refine_layout == layout and dla.grid_size == (3, 5)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before, rtol=1e-5, atol=1e-6)
    vit.train()(x).sum().backward()
    assert dla.reduce_norm.weight.grad is not None and dla.reduce_norm.weight.grad.abs().sum() > 0


def test_analysis_shows_the_spatial_stages():
    """refiner's attention analysis runs on a spatial model of a non-square grid; its stages are
    the module's own computation (the last stage scaled is the map that aggregates V)."""
    from refiner.analysis.attention_maps import attention_maps
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=(12, 20), refine_layout='spatial')
    blocks = attention_maps(model, torch.randn(2, 3, 12, 20))
    refining = [b for b in blocks if b['kind'] == 'refining']
    assert len(refining) == 3 and all(b['local'].shape == (2, 12, 16, 16) for b in refining)
    bn = model.blocks[1].attn.refine_norm
    expected = bn(refining[0]['reduced']) * model.blocks[1].attn.refine_scale
    torch.testing.assert_close(refining[0]['attn'], expected)


@pytest.mark.parametrize('layout,kernel_runs', [('raster', True), ('spatial_keys', True), ('spatial', False)])
def test_which_layouts_train_in_the_kernel(monkeypatch, layout, kernel_runs):
    """The training kernel serves the key-grid layout (no query mixing) as it serves raster order;
    the query-grid layout trains on the reference path (its expanded maps recomputed)."""
    from refiner.layers import attention
    calls = []
    original = attention.refine_aggregate_train
    monkeypatch.setattr(attention, 'refine_aggregate_train', lambda *a, **k: calls.append(1) or original(*a, **k))
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=(12, 20), refine_layout=layout).train()
    model(torch.randn(2, 3, 12, 20)).sum().backward()
    assert (len(calls) == 3) == kernel_runs, calls
