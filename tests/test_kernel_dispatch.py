"""When the kernels may run: a fast path only where no dropout is active and no submodule that matters
trains, whatever the model's own flag says (Monte-Carlo dropout, BatchNorm recalibration), for the
eager kernels and the fused Triton refinement alike; and the fused weights' cache."""
import copy

import pytest
import timm
import torch
from conftest import trained_scale

import refiner  # noqa: F401  (registers the models)
from refiner.kernels import set_kernels, tiling
from refiner.kernels.dispatch import dropout_active, statistics_training
from refiner.layers import DistributedLocalAttention
from refiner.layers import attention as attention_module


def _model(**kw):
    torch.manual_seed(0)
    return trained_scale(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16, **kw))


def _pair(**kw):
    """A model with the kernels and its reference (kernels off), the same weights."""
    model = _model(**kw)
    ref = copy.deepcopy(model)
    set_kernels(True, model)
    set_kernels(False, ref)
    return model, ref


def _mc_dropout(model):
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.train()
    return model


def _recalibrating(model, which='refine'):
    """Eval, with the BatchNorms of the refine modules (``which='refine'``: not the refine norms after
    them) or all BatchNorms (``'all'``) in train."""
    model.eval()
    scope = [m for m in model.modules() if isinstance(m, DistributedLocalAttention)] if which == 'refine' else [model]
    for part in scope:
        for m in part.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
    return model


def test_rules():
    drop = torch.nn.Dropout(0.1).eval()
    assert not dropout_active(drop, None) and not dropout_active(torch.nn.Dropout(0.).train())
    assert dropout_active(torch.nn.Sequential(torch.nn.Linear(2, 2), drop.train()).eval().apply(
        lambda m: m.train() if isinstance(m, torch.nn.Dropout) else None))
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval()
    assert not statistics_training(seq)
    seq[0].train()  # a linear layer computes the same in either mode
    assert not statistics_training(seq)
    seq[1].train()
    assert statistics_training(seq) and not seq.training


def test_mc_dropout_with_kernels_samples_as_the_reference_does():
    """model.eval() then dropout back in train: every call draws new masks (outputs vary), and with
    the same seed the kernels' model gives exactly the reference's sample (the same distribution)."""
    model, ref = (_mc_dropout(m) for m in _pair(attn_drop_rate=0.3))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        first, second = model(x), model(x)
        assert (first - second).abs().max() > 1e-3, 'dropout was skipped: two MC samples are equal'
        torch.manual_seed(7)
        out = model(x)
        torch.manual_seed(7)
        expected = ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('which', ['refine', 'all'])
def test_batchnorm_recalibration_updates_running_statistics_with_kernels(which, monkeypatch):
    """model.eval() then the BatchNorms in train, under no_grad: batch statistics normalise and the
    running estimates update, exactly as in the reference code (once per batch, from the whole
    batch: not per tile of a kernel that walks the batch in chunks and rows in slabs)."""
    monkeypatch.setattr(tiling, 'CHUNK_BYTES', {'cpu': 1})
    model, ref = (_recalibrating(m, which) for m in _pair())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    ref_norms = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
    for m, r, b in zip(norms, ref_norms, before):
        assert not torch.equal(m.running_mean, b), 'running statistics did not update'
        torch.testing.assert_close(m.running_mean, r.running_mean)
        torch.testing.assert_close(m.running_var, r.running_var)
        assert int(m.num_batches_tracked) == int(r.num_batches_tracked) == 1


@pytest.fixture
def fused_spy(monkeypatch):
    """Maps on a CPU take the fused kernel's dispatch (as CUDA maps do); the kernel itself is replaced
    by a spy that counts its calls and returns the eager kernels' result."""
    pytest.importorskip('triton')
    from refiner.kernels import triton_refinement as fused
    calls = []

    def spy(attn, v, weights, precision=None):
        calls.append(weights.form)
        return torch.zeros(v.shape, dtype=v.dtype)

    monkeypatch.setattr(attention_module, 'FUSED_DEVICES', ('cuda', 'cpu'))
    monkeypatch.setattr(fused, 'refine_aggregate_fused', spy)
    return calls


def test_fused_kernel_is_taken_in_eval_only(fused_spy):
    """In plain eval the refining blocks take the fused kernel; under MC dropout or BatchNorm
    recalibration not once (the reference code runs)."""
    model = _model(attn_drop_rate=0.3)
    refining = sum(1 for m in model.modules() if isinstance(m, attention_module.RefinedAttention) and m.reuse_attn)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.eval()(x)
        assert len(fused_spy) == refining > 0
        fused_spy.clear()
        a, b = _mc_dropout(model)(x), model(x)
        assert not fused_spy and (a - b).abs().max() > 1e-3
        model = _recalibrating(model)
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training)
        before = norm.running_mean.clone()
        model(x)
        assert not fused_spy and not torch.equal(norm.running_mean, before)


def test_fused_weights_are_cached_until_a_parameter_or_mode_changes():
    """Folded once per module; refolded after an in-place update (an optimizer step bumps the version
    counter), a re-parameterization, or a forward in a training mode."""
    from refiner.kernels import fused_weights as fw
    layer = next(m for m in _model().modules() if isinstance(m, attention_module.RefinedAttention) and m.reuse_attn)
    fold = lambda: fw.cached_fusion(layer, layer.refine, layer.refine_norm, layer._refined_affine,  # noqa: E731
                                    torch.float32, (layer.refine_scale,))
    first = fold()
    assert fold() is first
    with torch.no_grad():
        layer.refine.expand.weight.mul_(2)
    second = fold()
    assert second is not first and fold() is second
    torch.testing.assert_close(second.tensors[0], first.tensors[0] * 2)
    layer.refine.local_norm.running_var.add_(1)  # a buffer
    third = fold()
    assert third is not second
    layer.train()
    attn = torch.randn(1, layer.num_heads, 5, 5).softmax(-1)
    with torch.no_grad():
        layer._aggregate_refined(attn, torch.randn(1, layer.num_heads, 5, 8))
    layer.eval()
    assert fold() is not third


def test_fused_kernel_follows_the_dispatch_table(fused_spy, monkeypatch):
    """The fused kernel replaces an eager chain only where the table (the cost model's verdict) says it
    wins: on sm_90 the BatchNorm-folded chain stays eager, the unfolded one goes fused."""
    from refiner.kernels import triton_refinement as fused
    assert fused.FUSED_PREFERRED[90]['activated'] and not fused.FUSED_PREFERRED[90]['activated_reparameterized']
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
        assert fused_spy and set(fused_spy) == {'activated'}
        fused_spy.clear()
        folded = timm.utils.reparameterize_model(model)
        folded(x)
        assert not fused_spy
        monkeypatch.setitem(fused.FUSED_PREFERRED[90], 'activated_reparameterized', True)
        folded(x)
        assert fused_spy
