"""The fused CUDA refinement (Triton), without a GPU: Triton's interpreter runs the kernel on the CPU
against the reference code, and the kernel is compiled for real GPU targets (sm_90, sm_80)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import trained_scale

from refiner.kernels import set_kernels
from refiner.layers import DistributedLocalAttention, RefinedAttention

pytest.importorskip('triton')

# TRITON_INTERPRET is read when Triton and each kernel are defined, so the interpreter tests run in a
# process of their own that sets it first (test_interpreter_tests below); in this process they skip
INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
interpreter_only = pytest.mark.skipif(not INTERPRETING, reason='run by test_interpreter_tests with TRITON_INTERPRET=1')


def test_interpreter_tests():
    """The kernel's parity tests under Triton's interpreter, in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETING:
        pytest.skip('this is the interpreter process')
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'PYTHONWARNINGS': 'ignore'}
    res = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__, '-k', 'fused'],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert ' passed' in res.stdout and 'skipped' not in res.stdout.splitlines()[-1], res.stdout[-500:]


@pytest.fixture(scope='module')
def interpreted():
    import refiner.kernels.triton_refinement as module
    return module


def _refining_block(heads, expansion_ratio=3, kernel_size=3, mode='inverted_residual', reuse_attn=True):
    """An eval-mode attention layer whose refinement has trained-size BatchNorms, kernels off (the reference)."""
    torch.manual_seed(heads * 10 + kernel_size)
    dla = DistributedLocalAttention(heads, expansion_ratio=expansion_ratio, refine_kernel_size=kernel_size, mode=mode)
    layer = trained_scale(RefinedAttention(8 * heads, heads, reuse_attn=reuse_attn, refine=dla,
                                           refine_norm=reuse_attn))
    if mode == 'linear':
        for p in dla.parameters():
            p.data.normal_(0, .3)
    set_kernels(False, layer)
    return layer.eval()


def _maps(batch, heads, tokens, dim=8):
    g = torch.Generator().manual_seed(tokens)
    return torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1), torch.randn(batch, heads, tokens, dim,
                                                                                          generator=g)


# (heads, tokens N = 1 + h·w with a class token, r, k); N = 17, 26, 50 are no multiple of the 16-row tile
SHAPES = [(4, 17, 3, 3), (6, 26, 3, 3), (12, 50, 3, 3), (4, 17, 1, 5)]


@interpreter_only
@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-5), (torch.float16, 4e-3)], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('heads,tokens,ratio,k', SHAPES)
def test_fused_kernel_equals_the_reference(interpreted, heads, tokens, ratio, k, dtype, tolerance):
    """R @ v of a refining block (BatchNorms, refine norm and ×s folded) equals the reference's, in v's dtype."""
    layer = _refining_block(heads, ratio, k)
    attn, v = _maps(2, heads, tokens)
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        folded = layer.refine.folded_chain(*layer._refined_affine())
        out = interpreted.refine_aggregate_fused(attn.to(dtype), v.to(dtype), *folded, precision='ieee')
    assert out.dtype == dtype and out.shape == expected.shape
    err = ((out.double() - expected.double()).abs().max() / expected.abs().max()).item()
    assert err < tolerance


@interpreter_only
def test_fused_kernel_float32_maps_half_values(interpreted, monkeypatch):
    """Under CUDA autocast the handed-over maps are float32 and v bf16 / fp16: products in v's
    format, v's dtype out; and a batch launched in slices (as maps of 2^31 elements or more are)."""
    layer = _refining_block(4)
    attn, v = _maps(3, 4, 17)
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        folded = layer.refine.folded_chain(*layer._refined_affine())
        out = interpreted.refine_aggregate_fused(attn, v.half(), *folded)
        monkeypatch.setattr(interpreted, 'MAX_LAUNCH_ELEMENTS', attn[0].numel())  # one sample a launch
        sliced = interpreted.refine_aggregate_fused(attn, v, *folded, precision='ieee')
    assert out.dtype == torch.float16
    assert ((out.double() - expected.double()).abs().max() / expected.abs().max()).item() < 4e-3
    torch.testing.assert_close(sliced, expected, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize('case', ['reparameterized', 'linear', 'refine_own_map'])
def test_fused_kernel_serves_every_three_stage_form(interpreted, case):
    """The re-parameterized module (biases in every stage), the paper's linear form (no activation)
    and an attention block refining its own map (a retrofit: no refine norm, no ×s)."""
    layer = _refining_block(4, mode='linear' if case == 'linear' else 'inverted_residual',
                            reuse_attn=case != 'refine_own_map')
    attn, v = _maps(3, 4, 26)
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        if case == 'reparameterized':
            layer = copy.deepcopy(layer)
            layer.reparameterize()
            layer.refine.reparameterize()
        folded = layer.refine.folded_chain(*layer._refined_affine())
        out = interpreted.refine_aggregate_fused(attn, v, *folded, activated=layer.refine.activated, precision='ieee')
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_cpu_never_takes_the_fused_kernel(monkeypatch):
    """The switch picks the fused kernel for CUDA tensors only: on a CPU the kernels' results are unchanged."""
    import refiner.kernels.triton_refinement as module

    def refuse(*args, **kwargs):
        raise AssertionError('the fused CUDA kernel ran on CPU tensors')

    monkeypatch.setattr(module, 'refine_aggregate_fused', refuse)
    layer = _refining_block(4)
    set_kernels(True, layer)
    attn, v = _maps(2, 4, 17)
    with torch.no_grad():
        out = layer._aggregate_refined(attn, v)
        set_kernels(False, layer)
        torch.testing.assert_close(out, layer._aggregate_refined(attn, v))


@pytest.mark.parametrize('capability', [90, 80])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_compiles_for_gpu_targets(capability, dtype):
    """The GPU compiler (stricter than the interpreter) builds the kernel for H100/H200 and A100 at
    Refiner-ViT-S's shape (12 heads, 36 expanded maps, head width 32), to a cubin."""
    from refiner.kernels.triton_refinement import compile_for_target
    usage = compile_for_target(capability, dtype)
    assert usage['cubin_bytes'] > 0
    if usage['registers'] is not None:
        assert usage['registers'] <= 255


def test_gpu_check_says_plainly_when_there_is_no_gpu(tmp_path):
    """scripts/gpu_check.py, the one GPU command, refuses in one sentence where CUDA is missing."""
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is here')
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'gpu_check.py')
    res = subprocess.run([sys.executable, script, '--out', str(tmp_path / 'out')], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and 'no CUDA device here' in res.stderr and 'Traceback' not in res.stderr
