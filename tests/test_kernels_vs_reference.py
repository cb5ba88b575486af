"""Guards on the kernels (refiner.kernels): float64 gradchecks of every custom autograd
Function, reference paths that truly run no kernel, eval chunking and row slabs against the
reference, and the memory claims (what is and is not saved for backward)."""
import copy
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import refiner  # noqa: F401  (registers the models)
from refiner import kernels
from refiner.kernels import handover, refinement, tiling
from refiner.layers import DistributedLocalAttention
from refiner.layers import attention as attention_module
from refiner.layers import dla as dla_module
from refiner.models import blocks as refiner_vit

GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
# where the modules call a kernel (their names there)
KERNEL_CALLS = ((attention_module, 'attention_handover'), (attention_module, 'refine_aggregate_train'),
                (attention_module, 'refine_aggregate_eval'), (refiner_vit, 'gelu_linear'), (refiner_vit, 'recompute'),
                (dla_module, 'recompute'))


def _randomise(module, seed=0):
    """Non-trivial BatchNorm affines and statistics, layer scales of trained size and non-zero biases:
    no path of the network is negligible."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = (torch.rand(n, generator=g) + 0.5).to(m.weight)
            m.bias.data = (torch.rand(n, generator=g) * 0.6 - 0.3).to(m.bias)
            m.running_mean.data = (torch.rand(n, generator=g) * 0.2).to(m.running_mean)
            m.running_var.data = (torch.rand(n, generator=g) + 0.5).to(m.running_var)
        elif isinstance(m, timm.layers.LayerScale):
            m.gamma.data = (torch.rand(m.gamma.shape, generator=g) + 0.5).to(m.gamma)
        elif isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data = (torch.randn(m.bias.shape, generator=g) * 0.02).to(m.bias)
    return module


def _reference(model):
    ref = copy.deepcopy(model)
    kernels.set_kernels(False, ref)
    return ref


def _tiny(**kw):
    torch.manual_seed(0)
    return _randomise(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16, **kw))


# ------------------------------------------------------------------------------------ gradchecks

@pytest.mark.parametrize('bias', [True, False])
def test_gelu_linear_gradcheck(bias):
    """fc2(gelu(h)) with GELU recomputed in backward: a wrong input or weight gradient fails."""
    torch.manual_seed(0)
    h = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(kernels.gelu_linear, (h, w, b), **GRADCHECK)
    out = kernels.gelu_linear(h, w, b)
    assert type(out.grad_fn).__name__ == '_GeluLinearBackward'  # the kernel, not plain autograd, was checked


@pytest.mark.parametrize('dtype,autocast', [(torch.float32, False), (torch.float64, False), (torch.float32, True)])
def test_gelu_linear_equals_plain_autograd(dtype, autocast):
    """The lean MLP's kernel against ``F.linear(F.gelu(h), w, b)`` under plain autograd: the same
    output and the same gradients of h, w and b (also under CPU bf16 autocast)."""
    torch.manual_seed(0)
    h = torch.randn(4, 7, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(8, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 7, 8, dtype=dtype)
    results = []
    for f in (kernels.gelu_linear, lambda h, w, b: F.linear(F.gelu(h), w, b)):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = f(h, w, b)
        results.append((out, *torch.autograd.grad(out, (h, w, b), g.to(out.dtype))))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
    for name, a, e in zip(('output', 'dL/dh', 'dL/dw', 'dL/db'), *results):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, msg=name, **tol)


@pytest.fixture(params=['whole', 'slabs'])
def budget(request, monkeypatch):
    """The default chunk budget (one chunk), or one so small that every kernel walks rows in slabs;
    returns gradcheck's options (with slabs, its fast mode: a random projection of the Jacobian)."""
    if request.param == 'slabs':
        monkeypatch.setattr(tiling, 'CHUNK_BYTES', {'cpu': 1})
        return dict(GRADCHECK, fast_mode=True)
    return GRADCHECK


def test_attention_handover_gradcheck(budget):
    """A chain of two attention blocks: the first map has no hand-over and is rebuilt in backward
    (recipe), the second adds s·prev and is kept; both Functions (_AttentionMap without v,
    _AttentionHandover with v) are checked, with and without row slabs."""
    torch.manual_seed(0)
    B, H, N, d, s = 2, 2, 5, 3, 0.7
    q1, k1, q2, k2, v2 = (torch.randn(B, H, N, d, dtype=torch.double, requires_grad=True) for _ in range(5))

    def chain(q1, k1, q2, k2, v2):
        _, a1 = kernels.attention_handover(q1, k1, None, None, s)
        out, a2 = kernels.attention_handover(q2, k2, v2, a1, s)
        return out, a2

    out, a2 = chain(q1, k1, q2, k2, v2)
    assert type(out.grad_fn).__name__ == '_AttentionHandoverBackward'
    assert torch.autograd.gradcheck(chain, (q1, k1, q2, k2, v2), **budget)
    # a hand-over from a plain tensor (no recipe): A's rows are rebuilt from the softmax and prev
    prev = torch.softmax(torch.randn(B, H, N, N, dtype=torch.double), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, p: kernels.attention_handover(q, k, v, p, s),
                                    (q2, k2, v2, prev), **budget)


def _refining_pair():
    torch.manual_seed(0)
    dla = DistributedLocalAttention(2, expansion_ratio=3, refine_kernel_size=3).double().train()
    norm = torch.nn.BatchNorm2d(2).double().train()
    _randomise(dla)
    _randomise(norm, seed=1)
    return dla, norm


def _kernel_params(dla, norm):
    """The training kernel's eleven parameter tensors, detached copies that require gradients."""
    params = [dla.expand.weight, dla.expand_norm.weight, dla.expand_norm.bias, dla.local.weight,
              dla.local_norm.weight, dla.local_norm.bias, dla.reduce.weight, dla.reduce_norm.weight,
              dla.reduce_norm.bias, norm.weight, norm.bias]
    return [p.detach().clone().requires_grad_() for p in params]


def _states(dla, norm):
    return [kernels.BatchNormState(m.weight, m.bias, m.running_mean, m.running_var, m.momentum, m.eps)
            for m in (dla.expand_norm, dla.local_norm, dla.reduce_norm, norm)]


def test_refine_aggregate_gradcheck(budget):
    """The training refinement (BatchNorms in closed form, expanded maps recomputed): gradients of
    the map, v and all twelve parameters against finite differences."""
    dla, norm = _refining_pair()
    a = torch.softmax(torch.randn(2, 2, 6, 6, dtype=torch.double), -1).requires_grad_()
    v = torch.randn(2, 2, 6, 3, dtype=torch.double, requires_grad=True)
    params = _kernel_params(dla, norm)
    states = _states(dla, norm)
    meta = (states, 0.6, refinement._LocalStage(None, 1, 1), False, None)  # raster, no statistics update, no recipe

    def f(a, v, *p):
        return refinement._RefineAggregate.apply(meta, a, v, *p)

    assert torch.autograd.gradcheck(f, (a, v, *params), **budget)
    # and the public entry point takes this kernel
    out = kernels.refine_aggregate_train(a, v, dla.expand.weight, dla.local.weight, dla.reduce.weight, states, 0.6,
                                         update_stats=False)
    assert type(out.grad_fn).__name__ == '_RefineAggregateBackward'


def test_refine_aggregate_on_the_key_grid_gradcheck(budget):
    """The training refinement with its local convolution over the keys' 2×3 token grid (spatial
    DLA; the class token by the centre tap): all gradients against finite differences."""
    dla, norm = _refining_pair()
    a = torch.softmax(torch.randn(2, 2, 7, 7, dtype=torch.double), -1).requires_grad_()
    v = torch.randn(2, 2, 7, 3, dtype=torch.double, requires_grad=True)
    params = _kernel_params(dla, norm)
    meta = (_states(dla, norm), 0.6, refinement._LocalStage((2, 3), 1, 0), False, None)
    assert torch.autograd.gradcheck(lambda a, v, *p: refinement._RefineAggregate.apply(meta, a, v, *p),
                                    (a, v, *params), **budget)


def test_refine_aggregate_of_a_rebuilt_map_gradcheck(budget):
    """A refining block whose input map carries a recipe rebuilds it from q, k in backward: the
    gradients reach q and k through the rebuild."""
    dla, norm = _refining_pair()
    states = _states(dla, norm)
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 3, dtype=torch.double, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        _, a = kernels.attention_handover(q, k, None, None, 0.5)
        assert handover.recipe_of(a) is not None
        return kernels.refine_aggregate_train(a, v, dla.expand.weight, dla.local.weight, dla.reduce.weight,
                                              states, 0.6, update_stats=False)

    assert torch.autograd.gradcheck(f, (q, k, v), **budget)


# ------------------------------------------------------------- the reference side runs no kernel

def _forbid_kernels(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('the reference path ran a kernel')

    for module, name in KERNEL_CALLS:
        monkeypatch.setattr(module, name, forbidden)


def test_reference_model_runs_no_kernel_and_kernel_model_runs_all(monkeypatch):
    """``set_kernels(False, model)`` must switch off every kernel, the lean MLP included: otherwise a
    kernel runs on both sides of a kernel-vs-reference comparison and its bugs go unseen."""
    model = _tiny().double().train()
    ref = _reference(model)
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    calls = {}

    def counting(name, f):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return f(*args, **kwargs)
        return counted

    for module, name in KERNEL_CALLS:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    out = model(x)
    out.square().sum().backward()
    # 3 attention and 3 refining blocks, 6 MLPs, the stem's recomputation (the refining blocks' own
    # recomputation is inside their kernel)
    assert calls == {'attention_handover': 3, 'refine_aggregate_train': 3, 'gelu_linear': 6, 'recompute': 1}, calls
    monkeypatch.undo()
    _forbid_kernels(monkeypatch)
    ref_out = ref(x)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-11)
    for (name, p1), p2 in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-7, atol=1e-9, msg=f'gradient of {name}')


def test_block_lean_mlp_matches_reference_at_trained_scale(monkeypatch):
    """One block with layer scales of trained size: input and weight gradients through the lean
    MLP (layer scale folded into fc2, GELU recomputed) equal plain autograd's."""
    torch.manual_seed(0)
    blk = _randomise(refiner_vit.RefinerBlock(8, 2)).double().train()
    ref = _reference(blk)
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 5, 8, dtype=torch.double)
    y = blk(x)[0]
    grads = torch.autograd.grad(y, [x] + list(blk.parameters()), g)
    _forbid_kernels(monkeypatch)
    y_ref = ref(x)[0]
    ref_grads = torch.autograd.grad(y_ref, [x] + list(ref.parameters()), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for (name, _), g1, g2 in zip([('x', 0)] + list(blk.named_parameters()), grads, ref_grads):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11, msg=f'gradient of {name}')


# ------------------------------------------------------------------- eval: chunks and row slabs

@pytest.mark.parametrize('mode', ['inverted_residual', 'linear', 'conv'])
def test_eval_chunks_and_row_slabs_match_reference(monkeypatch, mode):
    """The eval refinement walks samples in chunks and rows in slabs with the k×k kernel's halo:
    with budgets that force both, outputs equal the reference path (which runs no kernel)."""
    model = _tiny(refine_mode=mode).double().eval()
    ref = _reference(model)
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    with torch.no_grad():
        _forbid_kernels(monkeypatch)
        expected = ref(x)
        monkeypatch.undo()
        N, E = 17, model.blocks[1].attn.refine.expanded_heads  # tokens; maps the local kernel convolves
        cuts = []

        def tiles(*args, f=tiling.tiles):
            cut = f(*args)
            if sys._getframe(1).f_code.co_name == 'refine_aggregate_eval':
                cuts.append(cut)
            return cut

        monkeypatch.setattr(tiling, 'tiles', tiles)
        # one sample per chunk, whole maps; then slabs of a few rows
        for budget in (E * N * N * 8, 3 * E * N * 8, 1):
            cuts.clear()
            monkeypatch.setattr(tiling, 'CHUNK_BYTES', {'cpu': budget})
            torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12, msg=f'budget {budget}')
            samples = {(i, j) for cut in cuts for i, j, _, _ in cut}
            rows = {(r0, r1) for cut in cuts for _, _, r0, r1 in cut}
            assert len(cuts) == 3 and len(samples) == 3, (budget, samples)  # each refining block, per sample
            assert (len(rows) == 1) == (budget == E * N * N * 8), (budget, rows)


# --------------------------------------------------------------------------------- memory claims

def _saved(model, x):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, saved


@pytest.mark.parametrize('kernel', [True, False])
def test_expanded_maps_and_gelu_output_are_not_saved_for_backward(kernel):
    """README: the refining blocks' expanded maps (B, r·H, N, N) are never stored for backward, and
    the MLP's GELU output is recomputed, not saved. The reference path saves both (so the check can
    see them)."""
    model = _tiny().train()
    if not kernel:  # the reference path, storing its maps rather than recomputing them
        model = _reference(model)
    x = torch.randn(2, 3, 16, 16)
    hidden = []
    for blk in model.blocks:
        blk.mlp.fc1.register_forward_hook(lambda m, i, o: hidden.append(o.detach()))
    out, saved = _saved(model, x)
    B, E, N = 2, 12, 17
    expanded = [t for t in saved if t.numel() % (E * N * N) == 0 and t.dim() == 4 and E in t.shape
                and t.shape[-1] == N]
    gelus = [F.gelu(h) for h in hidden]
    kept_gelu = [t for t in saved if any(t.numel() == g.numel() and torch.equal(t.reshape(g.shape), g) for g in gelus)]
    if kernel:
        assert expanded == [], [tuple(t.shape) for t in expanded]
        assert kept_gelu == []
        out.sum().backward()  # what was saved suffices
    else:
        assert len(expanded) >= 3 and all(t.shape[0] == B for t in expanded)
        assert len(kept_gelu) == len(model.blocks)
