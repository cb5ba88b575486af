"""The fused CUDA refinement (Triton), without a GPU: Triton's interpreter runs the kernels on the CPU
against the reference code, the launches are checked for 64-bit safety and grid limits, and the
kernels are compiled for real GPU targets (sm_90, sm_80) as the runtime specialises them."""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import trained_scale

import refiner  # noqa: F401  (registers the models)
from refiner.kernels import set_kernels
from refiner.kernels.fused_weights import fuse_module
from refiner.layers import DistributedLocalAttention, RefinedAttention

pytest.importorskip('triton')

# TRITON_INTERPRET is read when Triton and each kernel are defined, so the interpreter tests run in a
# process of their own that sets it first (test_interpreter_tests below); in this process they skip
INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
interpreter_only = pytest.mark.skipif(not INTERPRETING, reason='run by test_interpreter_tests with TRITON_INTERPRET=1')


def test_interpreter_tests():
    """The kernels' parity tests under Triton's interpreter, in a fresh process with TRITON_INTERPRET=1."""
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
    if mode != 'inverted_residual':
        for p in dla.parameters():
            p.data.normal_(0, .3)
    set_kernels(False, layer)
    return layer.eval()


def _maps(batch, heads, tokens, dim=8):
    g = torch.Generator().manual_seed(tokens)
    return torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1), torch.randn(batch, heads, tokens, dim,
                                                                                          generator=g)


def _fused(module, layer, attn, v, **kw):
    weights = fuse_module(layer.refine, *layer._refined_affine(), module.dot_dtype(attn, v))
    return module.refine_aggregate_fused(attn, v, weights, **kw)


def _rel(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


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
        out = _fused(interpreted, layer, attn.to(dtype), v.to(dtype), precision='ieee')
    assert out.dtype == dtype and out.shape == expected.shape
    assert _rel(out, expected) < tolerance


@interpreter_only
@pytest.mark.parametrize('mode', ['inverted_residual', 'linear'])
def test_fused_kernel_float32_maps_half_values_sliced_and_wide(interpreted, monkeypatch, mode):
    """Under CUDA autocast the handed-over maps are float32 and v fp16: products in v's format, v's
    dtype out. A batch launched one sample at a time, and a head-major map (heads the outermost
    dimension in memory) whose offsets inside a sample pass the 32-bit limit: the 64-bit variant."""
    layer = _refining_block(4, mode=mode)
    attn, v = _maps(3, 4, 17)
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        out = _fused(interpreted, layer, attn, v.half())
        monkeypatch.setattr(interpreted, 'MAX_GRID_Y', 1)  # one sample a launch
        sliced = _fused(interpreted, layer, attn, v, precision='ieee')
        monkeypatch.setattr(interpreted, 'MAX_LAUNCH_ELEMENTS', 2000)
        head_major = attn.transpose(0, 1).contiguous().transpose(0, 1)  # (B, H, N, N), strides (N², B·N², N, 1)
        wide, _ = interpreted.launch_plan(head_major, v, v, 3, 0)
        assert wide
        wide_out = _fused(interpreted, layer, head_major, v, precision='ieee')
    assert out.dtype == torch.float16 and _rel(out, expected) < 4e-3
    torch.testing.assert_close(sliced, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide_out, expected, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize('case', ['reparameterized', 'linear_reparameterized', 'conv', 'refine_own_map'])
def test_fused_kernel_serves_every_raster_form(interpreted, case):
    """The re-parameterized module (biases in every stage), the linear form folded into one dense
    k×k convolution (k² H×H taps), the one-convolution form, and an attention block refining its own
    map (a retrofit: no refine norm, no ×s)."""
    mode = {'linear_reparameterized': 'linear', 'conv': 'conv'}.get(case, 'inverted_residual')
    layer = _refining_block(4, mode=mode, reuse_attn=case != 'refine_own_map')
    attn, v = _maps(3, 4, 26)
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        if case.endswith('reparameterized'):
            layer = copy.deepcopy(layer)
            layer.reparameterize()
            layer.refine.reparameterize()
        out = _fused(interpreted, layer, attn, v, precision='ieee')
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-5), (torch.float16, 4e-3)], ids=['fp32', 'fp16'])
def test_fused_kernel_clamp_regime(interpreted, dtype, tolerance):
    """BatchNorms scaled so that ReLU6 saturates at 6 in the expansion and in the local stage (a
    quarter of the values or more): a kernel without the upper clamp in either stage fails."""
    layer = _refining_block(4)
    dla = layer.refine
    with torch.no_grad():
        for norm in (dla.expand_norm, dla.local_norm):
            norm.weight.mul_(40)
            norm.bias.add_(4)
    attn, v = _maps(2, 4, 26)
    with torch.no_grad():
        stages = dla.stages(attn)
        for name in ('expanded', 'local'):
            assert (stages[name] == 6).float().mean() > 0.2, name
        expected = layer.refined_map(attn) @ v
        out = _fused(interpreted, layer, attn.to(dtype), v.to(dtype), precision='ieee')
    assert _rel(out, expected) < tolerance


@interpreter_only
@pytest.mark.parametrize('mode', ['inverted_residual', 'linear'])
def test_fused_kernel_masks_every_load(interpreted, mode):
    """Maps and values as views into buffers whose padding (the columns after the M keys, the rows
    after them in v, the channels after d) holds NaN: any load that drops its mask reads NaN, and a
    NaN times a zero weight is still NaN."""
    layer = _refining_block(4, mode=mode)
    attn, v = _maps(2, 4, 17)
    big_a = torch.full((2, 4, 17, 17 + 16), float('nan'))
    big_a[..., :17] = attn
    big_v = torch.full((2, 4, 17 + 16, 8 + 8), float('nan'))
    big_v[:, :, :17, :8] = v
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        out = _fused(interpreted, layer, big_a[..., :17], big_v[:, :, :17, :8], precision='ieee')
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize('mode', ['inverted_residual', 'linear'])
def test_fused_kernel_propagates_nan(interpreted, mode):
    """A NaN in a map reaches the outputs that the reference's reach (ReLU6 propagates it in PyTorch;
    a max / min that drops NaN would give numbers in the rows next to it)."""
    layer = _refining_block(4, mode=mode)
    attn, v = _maps(1, 4, 17)
    attn[0, 1, 8, 5] = float('nan')
    with torch.no_grad():
        expected = layer.refined_map(attn) @ v
        out = _fused(interpreted, layer, attn, v, precision='ieee')
    assert torch.isnan(expected).any() and not torch.isnan(expected).all()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-6)


@interpreter_only
def test_fused_kernel_runs_the_model(interpreted, monkeypatch):
    """A Refiner-ViT in eval with the kernels takes the fused refinement in every refining block (as
    CUDA maps do; here on the interpreter) and gives the reference's logits, before and after
    re-parameterization (whose new weights are folded again, not taken from the cache)."""
    from refiner.layers import attention as attention_module
    monkeypatch.setattr(attention_module, 'FUSED_DEVICES', ('cuda', 'cpu'))
    monkeypatch.setitem(interpreted.FUSED_PREFERRED, 90, dict.fromkeys(interpreted.FUSED_PREFERRED[90], True))
    calls = []
    original = interpreted.refine_aggregate_fused
    monkeypatch.setattr(interpreted, 'refine_aggregate_fused', lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = trained_scale(timm.create_model('refiner_vit_nano', num_classes=5, img_size=16))
    ref = copy.deepcopy(model)
    set_kernels(False, ref)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 3
        torch.testing.assert_close(timm.utils.reparameterize_model(model)(x), expected, rtol=1e-4, atol=1e-4)
        assert len(calls) == 6


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


class _Launches:
    """Stands in for a kernel: records each launch's grid, arguments and keywords; runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def _in_sample_reach(t):
    return sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:]))


@pytest.mark.parametrize('form', ['activated', 'linear'])
def test_launches_are_64bit_safe_and_within_grid_limits(monkeypatch, form):
    """Every launch keeps its grid's second dimension <= 65,535 and covers the batch once; offsets
    inside a sample that pass the 32-bit limit (a head-major map) launch the 64-bit variant."""
    import refiner.kernels.triton_refinement as module
    spy = _Launches()
    monkeypatch.setattr(module, '_activated_kernel' if form == 'activated' else '_linear_kernel', spy)
    layer = _refining_block(1, mode='inverted_residual' if form == 'activated' else 'linear')
    weights = fuse_module(layer.refine, *layer._refined_affine(), torch.float32)
    attn, v = torch.rand(70000, 1, 1, 1), torch.rand(70000, 1, 1, 2)
    module.refine_aggregate_fused(attn, v, weights)
    assert all(grid[1] <= 65535 for grid, _, _ in spy.launches)
    assert sum(grid[1] for grid, _, _ in spy.launches) == 70000 and len(spy.launches) >= 2
    spy.launches.clear()
    monkeypatch.setattr(module, 'MAX_LAUNCH_ELEMENTS', 6000)  # between the two maps' reach (padded heads)
    layer = _refining_block(4, mode='inverted_residual' if form == 'activated' else 'linear')
    weights = fuse_module(layer.refine, *layer._refined_affine(), torch.float32)
    attn, v = _maps(2, 4, 17)
    for maps, wide in ((attn, False), (attn.transpose(0, 1).contiguous().transpose(0, 1), True)):
        module.refine_aggregate_fused(maps, v, weights)
        for _grid, args, kwargs in spy.launches:
            assert kwargs.get('WIDE', False) == wide
            assert kwargs.get('WIDE', False) or max(_in_sample_reach(t) for t in args[:3]) < 6000
        spy.launches.clear()


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device and stream: the fused kernel enters the maps' device
    first (maps on cuda:1 while cuda:0 is current must not read another GPU's memory)."""
    from types import SimpleNamespace

    import refiner.kernels.triton_refinement as module
    guard = module._device_guard(SimpleNamespace(is_cuda=True, device=torch.device('cuda', 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    state = {'inside': None, 'launches': []}

    class Recorder:
        def __init__(self, t):
            state['device'] = t.device

        def __enter__(self):
            state['inside'] = True

        def __exit__(self, *exc):
            state['inside'] = False

    spy = _Launches()
    monkeypatch.setattr(module, '_device_guard', Recorder)
    monkeypatch.setattr(module, '_activated_kernel', spy)
    monkeypatch.setattr(spy, '__class__', type('Guarded', (_Launches,), {
        '__getitem__': lambda self, grid: lambda *a, **k: state['launches'].append(state['inside'])}))
    layer = _refining_block(4)
    attn, v = _maps(2, 4, 17)
    module.refine_aggregate_fused(attn, v, fuse_module(layer.refine, *layer._refined_affine(), torch.float32))
    assert state['launches'] == [True] and state['inside'] is False and state['device'] == attn.device


def test_bad_input_gets_a_clear_error():
    import refiner.kernels.triton_refinement as module
    layer = _refining_block(4)
    weights = fuse_module(layer.refine, *layer._refined_affine(), torch.float32)
    attn, v = _maps(2, 4, 17)
    with pytest.raises(ValueError, match='do not fit'):
        module.refine_aggregate_fused(attn, v[:, :3], weights)
    with pytest.raises(ValueError, match='folded for'):
        module.refine_aggregate_fused(attn, v.half(), weights)
    with pytest.raises(ValueError, match='floating point'):
        module.refine_aggregate_fused(attn, v.int(), weights)


@pytest.mark.parametrize('capability,dtype,form', [
    (90, torch.bfloat16, 'activated'), (80, torch.float16, 'activated'), (90, torch.float32, 'activated'),
    (90, torch.bfloat16, 'linear'), (80, torch.bfloat16, 'linear')], ids=str)
def test_kernel_compiles_for_gpu_targets(capability, dtype, form):
    """The GPU compiler (stricter than the interpreter) builds the kernels for H100/H200 and A100 at
    Refiner-ViT-S's shape (12 heads, 36 expanded maps, head width 32, 197 tokens), specialised as a
    launch is (unit strides constant, sizes divisible by 16 marked): no spills in half precision,
    and ReLU6's max / min propagate NaN."""
    from refiner.kernels.triton_compile import compile_for_target
    usage = compile_for_target(capability, dtype, form)
    assert usage['cubin_bytes'] > 0
    assert {'s_am', 's_vd', 's_od'} <= set(usage['unit_arguments'])  # specialised to the constant 1
    assert 'D' in usage['divisible_arguments']  # head width 32
    if form == 'activated':
        assert 'max.NaN.f32' in usage['ptx'] or 'max.NaN.ftz.f32' in usage['ptx']
    if usage['registers'] is not None:
        assert usage['registers'] <= 255
        if dtype != torch.float32:
            assert usage['stack_bytes'] == 0


def test_gpu_check_says_plainly_when_there_is_no_gpu(tmp_path):
    """scripts/gpu_check.py, the one GPU command, refuses in one sentence where CUDA is missing."""
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is here')
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'gpu_check.py')
    res = subprocess.run([sys.executable, script, '--out', str(tmp_path / 'out')], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and 'no CUDA device here' in res.stderr and 'Traceback' not in res.stderr
