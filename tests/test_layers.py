"""The refinement layers: forms, shapes, re-parameterisation, errors."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from refiner.layers import BatchNorm2d, DistributedLocalAttention, RefinedAttention


def _maps(B=2, H=3, N=9):
    return torch.softmax(torch.randn(B, H, N, N), -1)


@pytest.mark.parametrize('mode', ['inverted_residual', 'linear', 'conv'])
@pytest.mark.parametrize('k', [1, 3, 5])
def test_forms_keep_shape_and_train(mode, k):
    dla = DistributedLocalAttention(3, expansion_ratio=2, refine_kernel_size=k, mode=mode).train()
    a = _maps().requires_grad_()
    out = dla(a)
    assert out.shape == a.shape
    out.square().sum().backward()
    assert a.grad is not None and all(p.grad is not None for p in dla.parameters())


def test_expanded_form_matches_its_definition():
    """inverted residual: BN(W_R·relu6(BN(dw(relu6(BN(W_A·A)))))) + A, with plain convolutions."""
    torch.manual_seed(0)
    dla = DistributedLocalAttention(3, expansion_ratio=3, refine_kernel_size=3).eval()
    for m in dla.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-.2, .2)
            m.running_var.uniform_(.5, 1.5)
            m.weight.data.uniform_(.5, 1.5)
            m.bias.data.uniform_(-.2, .2)
    a = _maps()
    t = torch.nn.functional.relu6(dla.expand_norm(torch.nn.functional.conv2d(a, dla.expand.weight)))
    t = torch.nn.functional.relu6(dla.local_norm(torch.nn.functional.conv2d(t, dla.local.weight, padding=1, groups=9)))
    expected = dla.reduce_norm(torch.nn.functional.conv2d(t, dla.reduce.weight)) + a
    with torch.no_grad():
        torch.testing.assert_close(dla(a), expected, rtol=1e-5, atol=1e-6)


def test_linear_form_is_the_papers_equation():
    """Ã^h = Σ_i W_A(h, i)·A^i, then a k×k kernel per expanded map, then W_R back to H maps."""
    torch.manual_seed(0)
    dla = DistributedLocalAttention(2, expansion_ratio=3, refine_kernel_size=3, mode='linear', residual=False)
    a = _maps(1, 2, 6)
    expanded = torch.einsum('eh,bhnm->benm', dla.expand.weight[:, :, 0, 0], a)
    local = torch.nn.functional.conv2d(expanded, dla.local.weight, padding=1, groups=6)
    expected = torch.einsum('he,benm->bhnm', dla.reduce.weight[:, :, 0, 0], local)
    torch.testing.assert_close(dla(a), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode,residual', [('inverted_residual', True), ('linear', False), ('linear', True),
                                           ('conv', True), ('conv', False)])
def test_reparameterize_keeps_outputs(mode, residual):
    torch.manual_seed(0)
    dla = DistributedLocalAttention(4, mode=mode, residual=residual).eval()
    for m in dla.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(.5, 2)
            m.running_mean.uniform_(-.1, .1)
    a = _maps(2, 4, 11)
    with torch.no_grad():
        ref = dla(a)
        dla.reparameterize()
        torch.testing.assert_close(dla(a), ref, rtol=1e-5, atol=1e-6)
    if mode == 'linear':
        assert dla.mode == 'conv' and dla.expand is None  # W_R·DW·W_A collapses into one k×k convolution


def test_refining_attention_folds_norm_and_scale():
    torch.manual_seed(0)
    attn = RefinedAttention(24, 4, reuse_attn=True, refine=DistributedLocalAttention(4), refine_norm=True).eval()
    attn.refine_norm.running_var.uniform_(.5, 2)
    attn.refine_norm.weight.data.uniform_(.5, 1.5)
    x, prev = torch.randn(2, 9, 24), _maps(2, 4, 9)
    with torch.no_grad():
        ref, _ = attn(x, prev)
        attn.reparameterize()
        out, handed = attn(x, prev)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert handed is prev  # a refining block hands the unrefined map on


def test_zero_init_last_starts_as_identity():
    for mode in ('inverted_residual', 'linear', 'conv'):
        dla = DistributedLocalAttention(3, mode=mode, residual=True, zero_init_last=True)
        a = _maps()
        for train in (True, False):
            dla.train(train)
            torch.testing.assert_close(dla(a), a)


@pytest.mark.parametrize('kwargs,match', [
    (dict(mode='pool'), 'refine mode must be one of'),
    (dict(refine_kernel_size=4), 'positive odd'),
    (dict(expansion_ratio=0), 'expansion_ratio'),
    (dict(mode='linear', residual=False, zero_init_last=True), 'needs a residual'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedLocalAttention(3, **kwargs)


def test_refining_block_needs_a_map():
    attn = RefinedAttention(12, 3, reuse_attn=True, refine=DistributedLocalAttention(3))
    with pytest.raises(ValueError, match='needs the attention map'):
        attn(torch.randn(1, 4, 12))
    with pytest.raises(ValueError, match='needs a refine module'):
        RefinedAttention(12, 3, reuse_attn=True)


def test_batchnorm_counts_a_checkpointed_batch_once():
    torch.manual_seed(0)
    plain, ours = torch.nn.BatchNorm2d(3), BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    plain(x)
    checkpoint(ours, x, use_reentrant=False).sum().backward()  # forward, then the recomputation
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)
    assert int(ours.num_batches_tracked) == 1
    ours.eval()
    plain.eval()
    torch.testing.assert_close(ours(x), plain(x))
