"""Every floating dtype with the kernels on: a model cast to bf16, fp16 or fp64 runs eval, a training
step and its re-parameterized form, and hands back its own dtype (autocast keeps its float32 results)."""
import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import rel_err, trained_scale
from safetensors.torch import load_file

import refiner  # noqa: F401  (registers the models)
from refiner.config import apply_overrides, load_recipe
from refiner.kernels import attention_handover, set_kernels
from refiner.train import train

# max |logits - fp32 logits| / max |fp32 logits| allowed: a few units of each format's rounding
# (bf16 keeps 8 significant bits, fp16 11) through 6 blocks; measured 1.2e-2, 1.7e-3 and 5e-7
TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 8e-3, torch.float64: 1e-5}
DTYPES = list(TOLERANCE)
# cosine of all gradients with the float64 model's: measured 0.958-0.994 (bf16; the reference code
# without kernels: 0.928-0.992), 0.995-0.998 (fp16), 1.0 (fp64)
GRADIENT_COSINE = {torch.bfloat16: 0.94, torch.float16: 0.99, torch.float64: 0.99999}


def _refiner_vit():
    torch.manual_seed(0)
    return trained_scale(timm.create_model('refiner_vit_nano', num_classes=10))


def _retrofit():
    """'DeiT + refiner': a tiny timm ViT with every block's attention refined."""
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=8, depth=3, num_classes=10)
    return trained_scale(refiner.refine_vit(model))


MODELS = {'refiner_vit': _refiner_vit, 'refine_vit': _retrofit}


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('kind', MODELS)
def test_eval_in_model_dtype_matches_float32(kind, dtype, batch):
    """Eval, as built and re-parameterized: the model's dtype back, the fp32 model's logits within the
    format's tolerance and the same top-1 for every image."""
    x, _ = batch
    model = MODELS[kind]()
    with torch.no_grad():
        expected = model(x)
    low = copy.deepcopy(model).to(dtype)
    folded = timm.utils.reparameterize_model(copy.deepcopy(low))
    for m in (low, folded):
        with torch.no_grad():
            out = m(x.to(dtype))
        assert out.dtype == dtype
        assert rel_err(out.double(), expected.double()) < TOLERANCE[dtype]
        assert torch.equal(out.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('kind', MODELS)
def test_training_step_in_model_dtype(kind, dtype, batch):
    """A training step of the cast model: its dtype back, finite gradients in the parameters' dtype
    on every parameter, non-zero wherever the float64 gradient is, pointing the same way overall."""
    x, y = batch
    model = MODELS[kind]().train()

    def gradients(m, dt):
        m = copy.deepcopy(m).to(dt)
        out = m(x.to(dt))
        assert out.dtype == dt
        F.cross_entropy(out.float(), y).backward()
        return {n: p.grad for n, p in m.named_parameters()}, dict(m.named_parameters())

    reference, _ = gradients(model, torch.float64)
    grads, params = gradients(model, dtype)
    for name, g in grads.items():
        assert g is not None and g.dtype == dtype and torch.isfinite(g).all(), name
        if reference[name].norm() > 1e-8:  # a few BatchNorm shifts that the next BatchNorm removes get none
            assert g.abs().sum() > 0, name
    flat = torch.cat([grads[n].double().flatten() for n in params])
    flat_ref = torch.cat([reference[n].flatten() for n in params])
    assert F.cosine_similarity(flat, flat_ref, 0) > GRADIENT_COSINE[dtype]


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_kernels_compute_in_float32_inside(dtype):
    """In half precision the kernels' logits are at least as close to fp32 as the reference code's,
    which computes every stage in the half-precision format."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _refiner_vit()
    with torch.no_grad():
        expected = model(x)
        kernels = copy.deepcopy(model).to(dtype)
        reference = copy.deepcopy(kernels)
        set_kernels(False, reference)
        err_kernels = rel_err(kernels(x.to(dtype)).double(), expected.double())
        err_reference = rel_err(reference(x.to(dtype)).double(), expected.double())
    assert err_kernels <= 1.5 * err_reference


def test_autocast_results_stay_float32():
    """Under autocast the attention kernel hands back float32 from half-precision inputs (autocast
    casts what follows), as before; outside autocast it hands back the inputs' dtype."""
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.bfloat16) for _ in range(3))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, attn = attention_handover(q, k, v, None, 0.5)
    assert out.dtype == attn.dtype == torch.float32
    out, attn = attention_handover(q, k, v, None, 0.5)
    assert out.dtype == attn.dtype == torch.bfloat16
    torch.testing.assert_close(attn.float(), torch.softmax(q.float() @ k.float().transpose(-2, -1) * 0.5, -1),
                               rtol=1e-2, atol=4e-3)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A tiny Refiner-ViT trained for two epochs on a fraction of the digits."""
    from refiner.config import apply_overrides, load_recipe
    from refiner.train import train
    out = tmp_path_factory.mktemp('run') / 'run'
    cfg = apply_overrides(dict(load_recipe('default')), dict(
        epochs=2, batch_size=32, train_fraction=0.3, warmup_epochs=0, ema=False,
        model_args=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)))
    train(cfg, out=str(out), progress=False)
    return out


def test_eval_and_predict_take_timm_model_dtype(tiny_run, tmp_path):
    """``--model-dtype`` (timm's flag) casts the weights and inputs: eval reports the dtype and the
    float32 top-1 within a point, predict gives the cast model's own probabilities."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from refiner.cli import main
    from refiner.data import eval_transform, load_rgb
    from refiner.pretrained import load_model
    results = {}
    for dtype in ('float32', 'bfloat16', 'float16'):
        path = tmp_path / f'{dtype}.json'
        assert main(['eval', '--checkpoint', str(tiny_run), '--model-dtype', dtype, '--json', str(path)]) == 0
        results[dtype] = json.loads(path.read_text())
        assert results[dtype]['model_dtype'] == dtype
    for dtype in ('bfloat16', 'float16'):
        assert abs(results[dtype]['top1'] - results['float32']['top1']) <= 1.0

    digits = load_digits()
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(4):
        Image.fromarray((digits.images[i] * 15).astype('uint8')).save(folder / f'{i}.png')
    assert main(['predict', str(folder), '--checkpoint', str(tiny_run), '--model-dtype', 'bfloat16',
                 '--json', str(tmp_path / 'p.json'), '--no-progress']) == 0
    first = json.loads((tmp_path / 'p.json').read_text())['predictions'][0]
    model, info = load_model(tiny_run, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        probs = model(eval_transform(info['data_config'])(load_rgb(first['file']))[None].bfloat16()).float().softmax(-1)
    assert first['probs'] == pytest.approx(probs[0].topk(len(first['probs'])).values.tolist(), rel=1e-5)
    with pytest.raises(SystemExit):  # argparse's usage error: not one of timm's three
        main(['eval', '--checkpoint', str(tiny_run), '--model-dtype', 'float64'])


TINY_ARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}


def _cfg(**overrides):
    return apply_overrides(load_recipe('default'), dict(dict(model_args=dict(TINY_ARGS)), **overrides))


def test_bf16_autocast_end_to_end(tmp_path):
    """``--amp bf16`` on a CPU: a short run trains and evaluates under autocast (its results differ
    from float32 by bf16 rounding, not more)."""
    common = dict(epochs=1, batch_size=16, train_fraction=0.05, warmup_epochs=0, lr=0.08)
    runs = {amp: train(_cfg(amp=amp, **common), out=str(tmp_path / amp), progress=False) for amp in ('none', 'bf16')}
    hist = {amp: json.loads((tmp_path / amp / 'metrics.jsonl').read_text()) for amp in runs}
    assert runs['bf16']['steps'] == runs['none']['steps'] == 4
    assert math.isfinite(hist['bf16']['train_loss']) and math.isfinite(runs['bf16']['eval_loss'])
    assert hist['bf16']['train_loss'] == pytest.approx(hist['none']['train_loss'], rel=0.05)
    assert runs['bf16']['eval_loss'] == pytest.approx(runs['none']['eval_loss'], rel=0.05)
    a, b = (load_file(str(tmp_path / amp / 'model.safetensors')) for amp in ('none', 'bf16'))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast did run in bf16
