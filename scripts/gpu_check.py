"""CUDA checks and the GPU benchmark, one command on a machine with an NVIDIA GPU (under 10 minutes on one H100/H200).

    PYTHONPATH=src python scripts/gpu_check.py --out DIR          # writes DIR/gpu_check.json, DIR/bench.json

1. the original model's parity fixtures on CUDA (float32);
2. the kernels against the reference code on CUDA, a model cast to float64, float32, bfloat16 and
   float16: outputs and gradients;
3. the fused Triton refinement (inference) against the reference code, Refiner-ViT-S shapes, as
   built and re-parameterized, in float32, bfloat16 and float16, and that it did run (every form
   forced onto it, whatever the dispatch table says);
   then one refining block at Refiner-ViT-S's shape in bf16, batch 64: the fused kernel against the
   eager kernels and the reference code, per form (as built, folded, linear, one convolution):
   time (CUDA events, median of 20) and peak memory above the inputs, and whether the measurement
   agrees with the cost model's dispatch table (``block_fused_vs_eager``);
4. a training step of Refiner-ViT-S under bf16 autocast and one of the model cast to bf16
   (finite loss and gradients);
5. ``refiner bench``: Refiner-ViT-S against timm's deit_small_patch16_224 (SDPA attention),
   batch 64 and 128, alternating fresh processes, peak memory: inference in bfloat16 with the
   kernels (re-parameterized: the eager refinement on sm_90; unfolded: the fused one), without
   them (the reference code), and under torch.compile where asked; training under bf16 autocast.

``--smoke`` runs every part at toy sizes (refiner_vit_nano, 32 px, one step), on a CPU too (where
part 3 is skipped): a check that the script itself works, not a measurement.
"""
import argparse
import contextlib
import copy
import functools
import json
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))
import refiner  # noqa: E402
from refiner.bench import BenchConfig, format_table, run_bench  # noqa: E402
from refiner.kernels import set_kernels  # noqa: E402

DTYPES = {'float64': torch.float64, 'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def randomise(model, seed=0):
    """BatchNorm statistics and affines of trained size, so that folding them matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = (torch.rand(n, generator=g) + .5).to(m.weight)
            m.bias.data = (torch.rand(n, generator=g) * .6 - .3).to(m.bias)
            m.running_mean.data = (torch.rand(n, generator=g) * .2).to(m.running_mean)
            m.running_var.data = (torch.rand(n, generator=g) + .5).to(m.running_var)
    return model


def kernels_vs_reference(dtype, device, name, size):
    """A training step's outputs and gradients, kernels on against off, in one dtype."""
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, num_classes=5, img_size=size)).to(device, dtype)
    ref = copy.deepcopy(model)
    set_kernels(False, ref)
    x = torch.randn(6, 3, size, size, device=device, dtype=dtype)
    o1, o2 = model(x), ref(x)
    o1.float().square().sum().backward()
    o2.float().square().sum().backward()
    grad_err = max(rel(p1.grad, p2.grad) for p1, p2 in zip(model.parameters(), ref.parameters())
                   if p2.grad.abs().max() > 1e-6)
    return {'output_rel_diff': rel(o1, o2), 'max_grad_rel_diff': grad_err, 'dtype': str(o1.dtype)}


@contextlib.contextmanager
def forced_fused():
    """Every form takes the fused kernel on CUDA, whatever the cost model's dispatch table says."""
    import refiner.kernels.triton_refinement as fused
    saved = copy.deepcopy(fused.FUSED_PREFERRED)
    for table in fused.FUSED_PREFERRED.values():
        table.update(dict.fromkeys(table, True))
    try:
        yield
    finally:
        fused.FUSED_PREFERRED.clear()
        fused.FUSED_PREFERRED.update(saved)


def fused_vs_reference(dtype, device, name, size, batch):
    """Inference with the kernels (on CUDA: the fused Triton refinement) against the reference code,
    as built and re-parameterized; counts the fused kernel's calls."""
    import refiner.kernels.triton_refinement as fused
    calls = []
    original = fused.refine_aggregate_fused

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.manual_seed(0)
    model = randomise(timm.create_model(name, img_size=size)).to(device, dtype).eval()
    ref = copy.deepcopy(model)
    set_kernels(False, ref)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    res = {}
    fused.refine_aggregate_fused = counted
    try:
        with torch.inference_mode(), forced_fused():
            expected = ref(x)
            res['rel_diff'] = rel(model(x), expected)
            res['reparameterized_rel_diff'] = rel(timm.utils.reparameterize_model(model)(x), expected)
    finally:
        fused.refine_aggregate_fused = original
    res['fused_calls'] = len(calls)
    return res


def _time_ms(fn, steps=20):
    """Median time of fn() in ms (CUDA events) and its peak memory above what was allocated before, MB."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def block_fused_vs_eager(device, batch=64, tokens=197, heads=12, head_dim=32):
    """One refining block of Refiner-ViT-S in bf16: R @ v by the fused kernel, the eager kernels and
    the reference code, for each eager variant the dispatch table names; per image µs and peak MB."""
    from refiner.kernels import triton_refinement as fused
    from refiner.kernels.fused_weights import dispatch_variant
    from refiner.layers import DistributedLocalAttention, RefinedAttention
    from refiner.layers import attention as attention_module
    g = torch.Generator(device=device).manual_seed(0)
    attn = torch.randn(batch, heads, tokens, tokens, device=device, generator=g).softmax(-1).bfloat16()
    v = torch.randn(batch, heads, tokens, head_dim, device=device, generator=g).bfloat16()
    rows = []
    for mode, folded in (('inverted_residual', False), ('inverted_residual', True), ('linear', False),
                         ('linear', True)):
        torch.manual_seed(0)
        dla = DistributedLocalAttention(heads, 3, 3, mode=mode)
        layer = randomise(RefinedAttention(heads * head_dim, heads, reuse_attn=True, refine=dla,
                                           refine_norm=mode == 'inverted_residual')).to(device, torch.bfloat16).eval()
        if folded:
            layer.reparameterize()
            layer.refine.reparameterize()
        variant = dispatch_variant(layer.refine)
        ref = copy.deepcopy(layer)
        set_kernels(False, ref)
        row = {'variant': variant, 'preferred_by_cost_model': fused.fused_preferred(variant, attn)}
        run, run_ref = functools.partial(layer._aggregate_refined, attn, v), functools.partial(ref._aggregate_refined,
                                                                                                attn, v)
        with torch.inference_mode():
            expected = run_ref()
            with forced_fused():
                row['fused_rel_diff'] = rel(run(), expected)
                row['fused_ms'], row['fused_mb'] = _time_ms(run)
            saved = attention_module.FUSED_DEVICES
            try:
                attention_module.FUSED_DEVICES = ()  # the eager kernels
                row['eager_kernels_ms'], row['eager_kernels_mb'] = _time_ms(run)
            finally:
                attention_module.FUSED_DEVICES = saved
            row['reference_ms'], row['reference_mb'] = _time_ms(run_ref)
        for key in ('fused', 'eager_kernels', 'reference'):
            row[f'{key}_us_per_image'] = row[f'{key}_ms'] * 1e3 / batch
        row['fused_wins_measured'] = row['fused_ms'] < row['eager_kernels_ms']
        row['table_agrees'] = row['fused_wins_measured'] == row['preferred_by_cost_model']
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def train_step(device, name, size, batch, dtype=None):
    """One AdamW step of a model cast to ``dtype``, or under bf16 autocast (dtype None)."""
    model = timm.create_model(name, img_size=size).to(device, dtype or torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype or torch.float32)
    y = torch.randint(0, 1000, (batch,), device=device)
    t = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is None):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    return {'loss': float(loss), 'grads_finite': all(torch.isfinite(p.grad).all().item() for p in model.parameters()),
            'seconds_first_step': time.time() - t}


def bench_configs(model, size, batch_sizes, device, steps, warmup, compile_batches):
    """Inference in bfloat16 (kernels, reference code, compiled) and training under bf16 autocast (eager, compiled)."""
    common = dict(img_size=size, device=device, steps=steps, warmup=warmup)
    configs = []
    for b in batch_sizes:
        configs.append(BenchConfig(model, 'infer', b, model_dtype='bfloat16', **common))
        configs.append(BenchConfig(model, 'infer', b, model_dtype='bfloat16', reparameterize=False, **common))
        configs.append(BenchConfig(model, 'infer', b, model_dtype='bfloat16', kernels=False, **common))
        configs.append(BenchConfig(model, 'train', b, amp='bf16', **common))
        if b in compile_batches:
            configs.append(BenchConfig(model, 'infer', b, model_dtype='bfloat16', compile=True, **common))
            configs.append(BenchConfig(model, 'train', b, amp='bf16', compile=True, **common))
    return configs


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='gpu_check', help='folder of gpu_check.json and bench.json')
    p.add_argument('--device', default='cuda')
    p.add_argument('--rounds', type=int, default=1, help='alternating benchmark rounds (each a fresh process)')
    p.add_argument('--batch-size', type=int, nargs='+', default=[64, 128])
    p.add_argument('--compile-batch-size', type=int, nargs='*', default=[],
                   help='batch sizes also measured under torch.compile (default none: compiling may not fit '
                        'the 10 minutes)')
    p.add_argument('--skip-bench', action='store_true')
    p.add_argument('--smoke', action='store_true', help='toy sizes: check that the script runs (a CPU will do)')
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_check: no CUDA device here (torch.cuda.is_available() is False); '
                 'run it on a machine with an NVIDIA GPU, or try --smoke --device cpu')
    name, size = ('refiner_vit_nano', 32) if args.smoke else ('refiner_vit_s', 224)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {'torch': torch.__version__, 'timm': timm.__version__, 'smoke': args.smoke,
           'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}
    try:
        import triton
        res['triton'] = triton.__version__
    except ImportError:
        res['triton'] = None
    print(res, flush=True)

    def save():
        (out / 'gpu_check.json').write_text(json.dumps(res, indent=2) + '\n')

    fixtures = Path(__file__).resolve().parents[1] / 'tests' / 'data'
    for fixture in ('official_tiny', 'official_tiny_dense'):
        fx = torch.load(fixtures / f'{fixture}.pt', weights_only=True)
        model = refiner.load_official(fx['state_dict'], device=dev)
        with torch.no_grad():
            res[f'parity_{fixture}'] = rel(model(fx['input'].to(dev)).cpu(), fx['logits'])
    for dtype_name, dtype in DTYPES.items():
        res[f'kernels_vs_reference_{dtype_name}'] = kernels_vs_reference(dtype, dev, 'refiner_vit_nano', 32)
    save()
    print(json.dumps(res, indent=1), flush=True)

    if dev.type == 'cuda' and res['triton']:
        for dtype_name in ('float32', 'bfloat16', 'float16'):
            res[f'fused_vs_reference_{dtype_name}'] = fused_vs_reference(DTYPES[dtype_name], dev, name, size, 8)
            print(dtype_name, res[f'fused_vs_reference_{dtype_name}'], flush=True)
        save()
        res['block_fused_vs_eager'] = block_fused_vs_eager(dev, batch=8 if args.smoke else 64)
    else:
        res['fused_vs_reference'] = 'skipped: needs CUDA and triton'
    save()

    batch = 2 if args.smoke else 64
    res['bf16_autocast_train_step'] = train_step(dev, name, size, batch)
    res['bf16_model_train_step'] = train_step(dev, name, size, batch, torch.bfloat16)
    print(json.dumps({k: res[k] for k in ('bf16_autocast_train_step', 'bf16_model_train_step')}), flush=True)
    save()
    if dev.type == 'cuda':
        torch.cuda.empty_cache()

    if not args.skip_bench:
        if args.smoke:
            configs = bench_configs(name, size, [2], args.device, 1, 0, [])
            reference = 'vit_tiny_patch16_224'
        else:
            configs = bench_configs(name, size, args.batch_size, args.device, 10, 3, args.compile_batch_size)
            reference = 'deit_small_patch16_224'
        report = run_bench(configs, reference, rounds=args.rounds)
        (out / 'bench.json').write_text(json.dumps(report, indent=2) + '\n')
        res['bench_table'] = format_table(report)
        print(res['bench_table'], flush=True)
    save()


if __name__ == '__main__':
    main()
