"""The kernels (refiner.kernels) compute what the reference modules compute."""
import copy
import sys

import pytest
import timm
import torch

import refiner  # noqa: F401  (registers the models)
from refiner.kernels import set_kernels
from refiner.layers import DistributedLocalAttention, RefinedAttention


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm affines and running statistics, so that no path is negligible."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g, dtype=m.weight.dtype) + 0.5
            m.bias.data = torch.rand(m.num_features, generator=g, dtype=m.bias.dtype) * 0.6 - 0.3
            m.running_mean.data = torch.rand(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.2
            m.running_var.data = torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5
    return module


def _pair(module: torch.nn.Module):
    ref = copy.deepcopy(module)
    set_kernels(False, ref)
    return module, ref


def _grads(model, inputs, out, grad):
    params = [p for p in model.parameters()]
    return torch.autograd.grad(out, list(inputs) + params, grad, allow_unused=True)


@pytest.mark.parametrize('reuse,with_prev', [(True, True), (False, True), (False, False)])
def test_attention_block_train_matches_reference(reuse, with_prev):
    torch.manual_seed(0)
    H, N, C = 3, 10, 12
    refine = DistributedLocalAttention(H) if (reuse or with_prev) else None
    attn = RefinedAttention(C, H, reuse_attn=reuse, refine=refine, refine_norm=reuse).double().train()
    _randomise(attn)
    kernel, ref = _pair(attn)
    x = torch.randn(4, N, C, dtype=torch.double, requires_grad=True)
    prev = torch.softmax(torch.randn(4, H, N, N, dtype=torch.double), -1).requires_grad_() if with_prev else None
    (o1, a1), (o2, a2) = kernel(x, prev), ref(x, prev)
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a1, a2, rtol=1e-10, atol=1e-12)
    inputs = [x] + ([prev] if with_prev else [])
    g = (torch.randn_like(o1), torch.randn_like(a1))
    grads1 = torch.autograd.grad((o1, a1), inputs + list(kernel.parameters()), g)
    grads2 = torch.autograd.grad((o2, a2), inputs + list(ref.parameters()), g)
    for (name, _), g1, g2 in zip([('x', 0)] + ([('prev', 0)] if with_prev else []) + list(kernel.named_parameters()),
                                 grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10, msg=f'gradient of {name}')
    for (name, b1), b2 in zip(kernel.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b1, b2, rtol=1e-10, atol=1e-12, msg=f'buffer {name}')


def test_model_train_step_matches_reference():
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=16).double()
    kernel, ref = _pair(_randomise(model))
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    o1, o2 = kernel(x), ref(x)
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-11)
    o1.square().sum().backward()
    o2.square().sum().backward()
    for (name, p1), p2 in zip(kernel.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-7, atol=1e-9, msg=f'gradient of {name}')
    for (name, b1), b2 in zip(kernel.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b1.double(), b2.double(), rtol=1e-9, atol=1e-11, msg=f'buffer {name}')


@pytest.mark.parametrize('mode', ['inverted_residual', 'linear', 'conv'])
def test_eval_matches_reference(mode):
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', num_classes=5, refine_mode=mode).eval()
    kernel, ref = _pair(_randomise(model))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), ref(x), rtol=1e-5, atol=1e-6)


def test_float32_training_at_least_as_accurate_as_reference():
    """In float32 the kernels (float64 accumulators) stay as close to a float64 run as autograd."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model('refiner_vit_nano', num_classes=5))
    kernel, ref = _pair(model)
    truth = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 32, 32)
    for m, inp in ((kernel, x), (ref, x), (truth, x.double())):
        m(inp).sum().backward()
    for (name, p1), p2, p3 in zip(kernel.named_parameters(), ref.parameters(), truth.parameters()):
        err_kernel = (p1.grad.double() - p3.grad).abs().max()
        err_ref = (p2.grad.double() - p3.grad).abs().max()
        tolerance = 2 * err_ref + 1e-6 * p3.grad.abs().max().clamp_min(1.0)
        assert err_kernel <= tolerance, f'{name}: {err_kernel:.3g} vs autograd {err_ref:.3g}'


@pytest.mark.parametrize('budget', [1, 2000])
def test_maps_larger_than_the_chunk_budget_go_a_few_rows_at_a_time(monkeypatch, budget):
    """At large inputs one sample's maps outgrow the cache-sized chunk; then the kernels walk its query
    rows in slabs (with the local convolution's halo), with the same results."""
    from refiner.kernels import tiling
    torch.manual_seed(0)
    model = _randomise(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)

    def run():
        m = copy.deepcopy(model)
        out = m.train()(x)
        out.square().sum().backward()
        with torch.no_grad():
            return out, m.eval()(x), [p.grad for p in m.parameters()]

    whole = run()
    slabs = {}  # the kernel that asked -> its slabs of rows per sample

    def tiles(*args, f=tiling.tiles):
        cut = f(*args)
        slabs.setdefault(sys._getframe(1).f_code.co_name, []).append(len(cut) / args[0].shape[0])
        return cut

    monkeypatch.setattr(tiling, 'tiles', tiles)
    monkeypatch.setattr(tiling, 'CHUNK_BYTES', {'cpu': budget})
    sliced = run()
    # attention forward and backward, training refinement (forward, backward), inference refinement
    assert set(slabs) == {'_attention_forward', '_attention_backward', 'forward', 'backward', 'refine_aggregate_eval'}
    assert all(min(counts) >= 4 for counts in slabs.values()), slabs  # every one was cut into slabs
    torch.testing.assert_close(sliced[0], whole[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sliced[1], whole[1], rtol=1e-10, atol=1e-12)
    for (name, _), g1, g2 in zip(model.named_parameters(), sliced[2], whole[2]):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10, msg=f'gradient of {name}')


def test_training_keeps_every_other_handed_over_map():
    """Of the maps handed from block to block, training keeps every other one for backward; the rest
    carry a recipe (q, k and the kept map before them) and are rebuilt in backward, bit for bit."""
    from refiner.kernels.handover import recipe_of
    torch.manual_seed(0)
    model = _randomise(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16))  # 3 attention blocks
    maps = []
    for blk in model.blocks[::2]:
        blk.register_forward_hook(lambda m, inp, out: maps.append(out[1]))
    x = torch.randn(2, 3, 16, 16)
    kept = set()

    def pack(t):
        if t.shape == (2, 4, 17, 17):  # (B, H, N, N)
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.train()(x)
    assert [recipe_of(m) is not None for m in maps] == [True, False, True]
    assert kept == {maps[1].untyped_storage().data_ptr()}
    for m in (maps[0], maps[2]):
        assert torch.equal(recipe_of(m).rebuild(), m)
    out.sum().backward()  # rebuilds them (test_model_train_step_matches_reference checks the gradients)
    # under gradient checkpointing each block keeps its input map anyway: no recipe holds q and k
    model.set_grad_checkpointing()
    maps = model.forward_train(x, return_attn=True)['attn']
    assert all(recipe_of(m) is None for m in maps)


def test_map_changed_in_place_before_its_refining_block_is_kept_not_rebuilt():
    """A recipe rebuilds the map as its attention block made it; a map changed in place since then
    is kept for backward instead (gradients as for the same change made out of place)."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16)).double().train()
    in_place, out_of_place = copy.deepcopy(model), model

    def halve_in_place(m, inp, out):
        out[1].mul_(0.5)

    in_place.blocks[0].register_forward_hook(halve_in_place)
    out_of_place.blocks[0].register_forward_hook(lambda m, inp, out: (out[0], out[1] * 0.5))
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    for m in (in_place, out_of_place):
        m(x).square().sum().backward()
    for (name, p1), p2 in zip(in_place.named_parameters(), out_of_place.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-11, msg=f'gradient of {name}')


def test_bf16_autocast_training_backward_inside_or_outside_the_region():
    """Under CPU bf16 autocast the kernels compute in float32; calling backward() inside the autocast
    region (a common pattern) gives the same gradients as calling it outside."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16)).train()
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for inside in (True, False):
        m = copy.deepcopy(model)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([p.grad for p in m.parameters()])
    for (name, _), g1, g2 in zip(model.named_parameters(), *grads):
        assert g1 is not None and torch.isfinite(g1).all(), name
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8, msg=f'gradient of {name}')
