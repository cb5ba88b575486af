"""Refiner-ViT behaves like timm's own ViTs."""
import math

import numpy as np
import pytest
import timm
import timm.optim
import torch
from conftest import refined_vit as _refined_vit
from conftest import trained_scale
from timm.models import get_notrace_functions, get_notrace_modules
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import refiner  # noqa: F401  # noqa: F401  (registers the models)
from refiner.models import RefinerViT
from refiner.models.refiner_vit import checkpoint_filter_fn

# the smallest registered variant, at a size that keeps the suite fast
TINY = dict(img_size=32)


def _tiny(**kwargs) -> RefinerViT:
    return timm.create_model('refiner_vit_nano', **{**TINY, **kwargs})


@pytest.mark.parametrize('name,aux,count', [
    ('refiner_vit_s', False, 25_023_656), ('refiner_vit_s', True, 25_408_656),
    ('refiner_vit_m', False, 55_029_932), ('refiner_vit_m', True, 55_450_932),
    ('refiner_vit_l', False, 80_637_192), ('refiner_vit_l', True, 81_150_192),
])
def test_parameter_counts_equal_the_original(name, aux, count):
    with torch.device('meta'):
        model = timm.create_model(name, aux_head=aux)
    assert sum(p.numel() for p in model.parameters()) == count


def test_registered_with_timm():
    names = timm.list_models('refiner_vit_*')
    assert {'refiner_vit_s', 'refiner_vit_m', 'refiner_vit_l', 'refiner_vit_ti', 'refiner_vit_nano'} <= set(names)
    tags = set(timm.list_models('refiner_vit_*', include_tags=True))
    assert {'refiner_vit_s.in1k', 'refiner_vit_s.in1k_384', 'refiner_vit_l.in1k_448'} <= tags
    for tag in tags:  # no download URLs: the authors' weights are converted locally
        assert not timm.models.get_pretrained_cfg(tag).url


@pytest.mark.parametrize('tag,size,crop', [('refiner_vit_s.in1k', 224, 0.9), ('refiner_vit_m.in1k_384', 384, 1.0),
                                           ('refiner_vit_l.in1k', 224, 1.13), ('refiner_vit_l.in1k_448', 448, 1.0)])
def test_pretrained_cfgs(tag, size, crop):
    with torch.device('meta'):
        model = timm.create_model(tag)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, size, size) and cfg['crop_pct'] == crop
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5) and cfg['interpolation'] == 'bicubic'
    assert model.default_cfg == cfg
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg['input_size'] == (3, size, size) and data_cfg['crop_pct'] == crop


def test_create_model_kwargs_and_shapes():
    model = _tiny(num_classes=7, in_chans=1, drop_path_rate=0.1, global_pool='avg').eval()
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 7)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65, 128)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
    state = model.state_dict()
    for key in (model.pretrained_cfg['first_conv'] + '.weight', model.pretrained_cfg['classifier'] + '.weight'):
        assert key in state
    model.reset_classifier(0)
    assert model(x).shape == (2, 128) and model.num_classes == 0
    model.reset_classifier(5, 'token')
    assert model(x).shape == (2, 5)
    model.reset_classifier(0, '')
    assert model(x).shape == (2, 65, 128)


def test_gradients_reach_every_parameter():
    model = _tiny(num_classes=42, aux_head=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_grad_checkpointing_same_outputs_gradients_and_statistics():
    torch.manual_seed(0)
    a, b = _tiny(), _tiny()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    x = torch.randn(3, 3, 32, 32)
    for m in (a, b):
        m.train()
        m(x).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):  # each batch counted once
        torch.testing.assert_close(ba, bb, msg=name)
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
        out, _ = b.forward_intermediates(x)
        torch.testing.assert_close(out, a.forward_features(x))


def test_stem_recomputation_same_outputs_gradients_and_statistics(monkeypatch):
    torch.manual_seed(0)
    a, b = _tiny().patch_embed.train(), _tiny().patch_embed.train()
    b.load_state_dict(a.state_dict())
    monkeypatch.setattr(type(b), '_recompute', lambda self, x: self is a)  # only a recomputes
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for m in (a, b):
        outs.append(m(x))
        outs[-1].square().mean().backward()
    torch.testing.assert_close(outs[0], outs[1])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):  # each batch counted once
        torch.testing.assert_close(ba, bb, msg=name)


def test_stem_hands_the_free_heap_back_between_the_blocks_and_its_backward(monkeypatch):
    import refiner.models.blocks as blocks  # the stem's module
    from refiner.kernels import release_free_heap
    release_free_heap()  # runs wherever it is called (glibc or not)
    model = _tiny().train()
    seen = []
    monkeypatch.setattr(blocks, 'release_free_heap', lambda grad: seen.append(
        (all(p.grad is not None for p in model.blocks.parameters()), model.patch_embed.conv1.weight.grad is None)))
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert seen == []  # these maps are small enough for the heap
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(blocks, 'MMAP_THRESHOLD_MAX', 0)  # as if they were not
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert seen == [(True, True)]  # once, after the blocks' backward and before the stem's
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(seen) == 1
    model.patch_embed.requires_grad_(False)  # a frozen stem: nothing to hook, nothing to recompute for
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert len(seen) == 1


def test_reparameterized_model_still_trains():
    model = _tiny().eval()
    model.reparameterize()
    model.train()(torch.randn(2, 3, 32, 32)).mean().backward()
    assert model.head.weight.grad is not None and model.patch_embed.conv1.weight.grad is not None


def test_forward_intermediates():
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 48)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 6 and all(t.shape == (2, 128, 8, 12) for t in inter)
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=[1, -1], output_fmt='NLC', norm=True, intermediates_only=True)
    assert [t.shape for t in nlc] == [(2, 96, 128)] * 2
    early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[-1], inter[-1])
    with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_prefix[0][1].shape == (2, 1, 128)
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert feature_info.channels() == [128] * 6 and feature_info.reduction() == [4] * 6
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.blocks) == 2


def test_features_only():
    model = timm.create_model('refiner_vit_nano', features_only=True, out_indices=(1, 3, 5)).eval()
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape for o in outs] == [(1, 128, 8, 8)] * 3


def test_no_weight_decay_and_param_groups():
    model = _tiny()
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    groups = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    named = dict(model.named_parameters())
    for name in ('pos_embed', 'cls_token', 'blocks.1.attn.refine_norm.weight', 'blocks.0.ls2.gamma', 'norm.bias'):
        assert id(named[name]) in no_decay, name
    assert id(named['blocks.0.attn.qkv.weight']) not in no_decay
    matcher = model.group_matcher()
    layers = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert matcher and len(layers) > 2


@pytest.mark.parametrize('size', [(48, 48), (32, 64)])
def test_dynamic_input_size(size):
    model = _tiny().eval()
    x = torch.randn(1, 3, *size)
    assert model(x).shape == (1, 1000)
    assert model.forward_features(x).shape[1] == 1 + (size[0] // 4) * (size[1] // 4)


def test_224_weights_run_at_other_resolutions():
    model224 = timm.create_model('refiner_vit_nano', img_size=32).eval()
    sd = model224.state_dict()
    model48 = timm.create_model('refiner_vit_nano', img_size=48)
    from refiner.models.refiner_vit import checkpoint_filter_fn
    model48.load_state_dict(checkpoint_filter_fn(sd, model48))
    model48.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():  # same weights, position embeddings resampled either at load or on the fly
        torch.testing.assert_close(model48(x), model224(x), rtol=1e-4, atol=1e-5)
    model224.set_input_size(48)
    assert model224.pos_embed.shape == (1, 145, 128)


@pytest.mark.parametrize('bad,match', [
    (torch.randn(1, 1, 32, 32), r'\(B, 3, H, W\)'),
    (torch.randn(1, 3, 30, 32), 'not divisible by the patch size 4'),
    (torch.randn(3, 32, 32), r'\(B, 3, H, W\)'),
])
def test_bad_input_gets_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        _tiny()(bad)


def test_refine_mode_per_block():
    model = _tiny(refine_mode=['inverted_residual', 'linear', 'conv', 'inverted_residual', 'conv', 'linear']).eval()
    assert [b.attn.refine.mode for b in model.blocks if b.attn.refine is not None] == ['linear', 'inverted_residual',
                                                                                      'linear']
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_bad_config_gets_a_clear_error():
    with pytest.raises(ValueError, match='first block cannot refine'):
        RefinerViT(depth=2, refine_blocks=[True, False], img_size=32, patch_size=4, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match='even patch size'):
        RefinerViT(img_size=33, patch_size=3, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        RefinerViT(img_size=32, patch_size=4, embed_dim=30, depth=2, num_heads=4)


def test_torchscript():
    model = _tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


def _fx(model, train=False):
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


def test_torch_fx_forward_and_backward():
    model = _tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(next(iter(_fx(model)(x).values())), model(x))
    traced = _fx(_tiny(num_classes=5).train(), train=True)
    next(iter(traced(x).values())).mean().backward()
    assert all(p.grad is not None for p in traced.parameters())


def test_torch_compile():
    model = RefinerViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_no_graph_breaks_for_torch_compile():
    """torch.compile sees the reference code in one graph, in training and in eval."""
    model = RefinerViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    for train in (True, False):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.train(train))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_reparameterize_keeps_outputs():
    model = _tiny(num_classes=5).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        folded = timm.utils.reparameterize_model(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
        again = timm.utils.reparameterize_model(folded)  # idempotent
        torch.testing.assert_close(again(x), ref, rtol=1e-5, atol=1e-5)


def test_forward_train_outputs():
    model = _tiny(num_classes=4, aux_head=True).train()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_train(x, mix_box=(1, 2, 5, 6), return_attn=True)
    assert out['logits'].shape == (2, 4) and out['aux_logits'].shape == (2, 64, 4)
    assert len(out['attn']) == 6 and out['attn'][0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(out['attn'][0], out['attn'][1])  # a refining block hands its map on
    model.eval()
    with torch.no_grad():  # without MixToken, eval logits = head + 0.5 max(aux)
        plain = model.forward_train(x)
        expected = plain['logits'] + 0.5 * plain['aux_logits'].amax(1)
        torch.testing.assert_close(model(x), expected)


def test_drop_path_rate_is_linear():
    model = _tiny(drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, 'drop_prob', 0.0) for b in model.blocks]
    assert math.isclose(rates[-1], 0.2) and rates[0] == 0.0 and rates == sorted(rates)


def test_one_architecture_table_registers_the_variants_and_names_original_checkpoints():
    """convert names an original checkpoint's variant from the same table the registrations read."""
    from refiner.convert import variant_name
    from refiner.models import ARCHITECTURES, RELEASED
    assert set(timm.list_models('refiner_vit_*')) == set(ARCHITECTURES)
    for name, shape in ARCHITECTURES.items():
        assert variant_name(shape) == (name if name in RELEASED else None)
    nano = timm.create_model('refiner_vit_nano', num_classes=3)
    assert (nano.embed_dim, len(nano.blocks)) == (128, ARCHITECTURES['refiner_vit_nano']['depth'])


NANO = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)



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


@pytest.mark.parametrize('name,count', [('refiner_vit_ti', 5_913_572), ('refiner_vit_nano', 1_195_436)])
def test_readme_parameter_counts_of_the_small_variants(name, count):
    """Guards the README's table: the parameter counts it gives for the small variants."""
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize('name,size,gflops', [('refiner_vit_ti', 224, 5.06), ('refiner_vit_nano', 32, 0.19),
                                              ('refiner_vit_s', 224, 13.48), ('deit_small_patch16_224', 224, 8.48)])
def test_readme_gflops(name, size, gflops):
    """The table's GFLOPs: forward FLOPs of one image counted by torch.utils.flop_counter (eval)."""
    with torch.device('meta'):  # FLOPs do not depend on the weights' values: skip the slow initialisation
        model = timm.create_model(name)
    model = model.to_empty(device='cpu').eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(1.0 if t.is_floating_point() else 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    assert round(counter.get_total_flops() / 1e9, 2) == gflops


def _cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bicubic_weights(n_in, n_out):
    """(n_out, n_in) weights of antialiased bicubic resampling with half-pixel centres (PIL's and
    PyTorch's ``antialias=True``): the taps within the kernel's support, renormalised at the borders."""
    scale = n_in / n_out
    support, stretch = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        taps = range(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in))
        w = np.array([_cubic((j - centre + 0.5) * stretch) for j in taps])
        W[i, list(taps)] = w / w.sum()
    return W


def _resampled(pos_embed, old, new):
    """Class token kept; the patch tokens' (old_h, old_w) row-major grid resampled to new."""
    cls, grid = pos_embed[:, :1], pos_embed[0, 1:].double().numpy().reshape(old[0], old[1], -1)
    out = np.einsum('ij,jkc,lk->ilc', _bicubic_weights(old[0], new[0]), grid, _bicubic_weights(old[1], new[1]))
    return torch.cat([cls, torch.from_numpy(out.reshape(1, new[0] * new[1], -1)).to(pos_embed.dtype)], 1)


def test_position_embeddings_resampled_at_load_and_on_the_fly():
    """Weights trained at 32² (an 8×8 grid) loaded into a 48×64 model (12×16 grid), and run as they
    are on 48×64 images: both use the position embeddings that an independent bicubic resampling
    gives (non-square, so that a swapped height and width fails; class token untouched)."""
    torch.manual_seed(0)
    small = timm.create_model('refiner_vit_nano', img_size=32, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5).eval()
    small.pos_embed.data.normal_(0, 1.0)  # embeddings of trained size
    expected = _resampled(small.pos_embed.detach(), (8, 8), (12, 16))
    big = timm.create_model('refiner_vit_nano', img_size=(48, 64), embed_dim=32, depth=2, num_heads=2,
                            num_classes=5).eval()
    big.load_state_dict(checkpoint_filter_fn(small.state_dict(), big))
    torch.testing.assert_close(big.pos_embed.detach(), expected, rtol=1e-5, atol=1e-5)
    # on the fly: the 32² model on 48×64 images equals a model holding the resampled embeddings
    exact = timm.create_model('refiner_vit_nano', img_size=(48, 64), embed_dim=32, depth=2, num_heads=2,
                              num_classes=5).eval()
    state = dict(small.state_dict(), pos_embed=expected)
    exact.load_state_dict(state)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_features(x), exact.forward_features(x), rtol=1e-4, atol=1e-4)
        nearest = dict(state, pos_embed=_resampled(small.pos_embed.detach(), (8, 8), (16, 12)).reshape(1, -1, 32))
        exact.load_state_dict(nearest)  # the same values laid out as a 16×12 grid: must differ
        assert not torch.allclose(small.forward_features(x), exact.forward_features(x), rtol=1e-2, atol=1e-2)
