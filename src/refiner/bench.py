"""``refiner bench``: images/s and peak memory of Refiner models against a timm reference, one run.

Each configuration (model × inference/training) is measured in a fresh process, so that its peak
memory is its own; processes of the compared models alternate over several rounds, so that a
shared, noisy machine slows them alike; the reported figure is the median over rounds of each
process's median step time. FLOPs are counted with ``torch.utils.flop_counter`` (forward, per
image; a training step is counted as 3× the forward), and a large matrix product measured in the
same run gives the machine's practical roofline.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .devices import model_dtype, resolve_model_dtype
from .fileio import atomic_write_text

__all__ = ['BenchConfig', 'count_flops', 'run_bench', 'measure', 'gemm_gflops', 'format_table']


@dataclass
class BenchConfig:
    model: str
    mode: str = 'infer'  # 'infer' (eval, reparameterized when the model supports it) or 'train'
    batch_size: int = 16
    img_size: int = 224
    device: str = 'cpu'
    amp: str = 'none'  # 'none' or 'bf16'
    model_dtype: str = 'float32'  # the weights' and inputs' dtype, no autocast (timm's --model-dtype)
    compile: bool = False
    kernels: bool = True  # refiner.kernels' fast paths (False: the reference code, as set_kernels(False))
    reparameterize: bool = True  # fold BatchNorms and scales for inference (timm.utils.reparameterize_model)
    steps: int = 5
    warmup: int = 2
    threads: Optional[int] = None
    model_args: Dict[str, Any] = field(default_factory=dict)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def count_flops(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> int:
    """FLOPs of one image's forward pass (eval mode, no autograd; a multiply-add counts 2), with
    ``torch.utils.flop_counter``. The CPU's fused attention kernel, which that counter does not
    know, is counted like the other scaled-dot-product kernels."""
    def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = cpu_sdpa_flops
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size, device=device, dtype=model_dtype(model)))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def measure(cfg: BenchConfig) -> Dict[str, Any]:
    """Run one configuration in this process; returns step times, throughput and memory."""
    import timm

    import refiner  # noqa: F401  (registers refiner_vit_*)
    from refiner.kernels import set_kernels
    set_kernels(cfg.kernels)  # this process builds one model
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    base_rss = _current_rss_mb()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    dtype = resolve_model_dtype(cfg.model_dtype)
    model = timm.create_model(cfg.model, img_size=cfg.img_size, **cfg.model_args).to(device, dtype)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    flops = count_flops(model, cfg.img_size)  # forward, one image
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == 'bf16')
    check = None
    if cfg.mode == 'infer':
        model.eval()
        if cfg.reparameterize:
            with torch.no_grad():
                ref = model(x[:2])
            model = timm.utils.reparameterize_model(model)
            with torch.no_grad():
                out = model(x[:2])
            check = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))  # in the model's dtype
        run = torch.compile(model) if cfg.compile else model

        def step():
            with torch.inference_mode(), autocast:
                return run(x)
    elif cfg.mode == 'train':
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        y = torch.randint(0, 1000, (cfg.batch_size,), device=device)
        run = torch.compile(model) if cfg.compile else model

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(run(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        raise ValueError(f"mode must be 'infer' or 'train', got {cfg.mode!r}")
    t_first = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t_first
    times = []
    for _ in range(cfg.steps):
        t = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    res = {
        'config': asdict(cfg), 'params': params, 'gflops_per_image': flops / 1e9,
        'step_s': times, 'median_step_s': med, 'images_per_s': cfg.batch_size / med, 'warmup_s': warmup_s,
        'peak_rss_mb': _peak_rss_mb(), 'base_rss_mb': base_rss, 'peak_mem_mb': _peak_rss_mb() - base_rss,
        'reparameterized_max_rel_diff': check,
    }
    if device.type == 'cuda':
        res['peak_mem_mb'] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2 ** 20
        res['device_name'] = torch.cuda.get_device_name(device)
    return res


def gemm_gflops(n: int = 2048, device: str = 'cpu', dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Practical roofline: GFLOP/s of an n×n×n matrix product (median of repeats)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _measure_in_subprocess(cfg: BenchConfig, timeout: float) -> Dict[str, Any]:
    code = ('import json, sys; from refiner.bench import BenchConfig, measure; '
            'print("BENCH" + json.dumps(measure(BenchConfig(**json.loads(sys.argv[1])))))')
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    res = subprocess.run([sys.executable, '-c', code, json.dumps(asdict(cfg))], capture_output=True, text=True,
                         timeout=timeout, env=env)
    for line in res.stdout.splitlines():
        if line.startswith('BENCH'):
            return json.loads(line[5:])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {'config': asdict(cfg), 'error': ' | '.join(tail) or f'exit code {res.returncode}'}


def run_bench(configs: List[BenchConfig], reference: Optional[str] = 'deit_small_patch16_224', rounds: int = 3,
              timeout: float = 1800, progress: bool = True) -> Dict[str, Any]:
    """Measure every configuration (and the reference model in the same modes and sizes) in
    alternating fresh processes; ratios are against the reference's median."""
    all_cfgs = list(configs)
    if reference:
        for c in configs:
            ref = BenchConfig(**{**asdict(c), 'model': reference, 'model_args': {}, 'kernels': True})
            if all(asdict(ref) != asdict(o) for o in all_cfgs):
                all_cfgs.append(ref)
    device = configs[0].device if configs else 'cpu'
    # the practical roofline of each precision measured: the matrix products' dtype
    rooflines = {name: gemm_gflops(device=device, dtype=resolve_model_dtype(name))
                 for name in dict.fromkeys(_compute_dtype(c) for c in all_cfgs)}
    runs: Dict[int, List[Dict[str, Any]]] = {i: [] for i in range(len(all_cfgs))}
    for r in range(rounds):
        for i, c in enumerate(all_cfgs):
            if progress:
                print(f'round {r + 1}/{rounds}: {c.model} {c.mode} batch {c.batch_size} {c.img_size}px {c.model_dtype}'
                      + (' compiled' if c.compile else ''), file=sys.stderr, flush=True)
            runs[i].append(_measure_in_subprocess(c, timeout))
    rows = []
    for i, c in enumerate(all_cfgs):
        ok = [m for m in runs[i] if 'error' not in m]
        if not ok:
            rows.append({'config': asdict(c), 'error': runs[i][0]['error']})
            continue
        med_step = statistics.median(m['median_step_s'] for m in ok)
        row = {k: ok[0][k] for k in ('params', 'gflops_per_image', 'reparameterized_max_rel_diff') if k in ok[0]}
        row.update(config=asdict(c), images_per_s=c.batch_size / med_step, median_step_s=med_step,
                   round_images_per_s=[m['images_per_s'] for m in ok],
                   peak_mem_mb=statistics.median(m['peak_mem_mb'] for m in ok), device_name=ok[0].get('device_name'))
        work = row['gflops_per_image'] * (3 if c.mode == 'train' else 1)
        row['achieved_gflops'] = work * row['images_per_s']
        row['roofline_fraction'] = row['achieved_gflops'] / rooflines[_compute_dtype(c)]
        rows.append(row)
    for row in rows:
        if 'error' in row or not reference:
            continue
        c = row['config']
        ref = next((o for o in rows if 'error' not in o and o['config']['model'] == reference
                    and all(o['config'][k] == c[k] for k in ('mode', 'batch_size', 'img_size', 'device', 'amp',
                                                               'model_dtype', 'compile'))), None)
        if ref is not None:
            row['speed_ratio'] = row['images_per_s'] / ref['images_per_s']
            row['mem_ratio'] = row['peak_mem_mb'] / ref['peak_mem_mb']
    return {'rows': rows, 'gemm_gflops': rooflines, 'reference': reference, 'rounds': rounds,
            'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'cpu': _cpu_name(), 'time': time.strftime('%Y-%m-%d %H:%M:%S')}


def _compute_dtype(cfg: BenchConfig) -> str:
    """The dtype of a configuration's matrix products: bfloat16 under bf16 autocast, else the model's."""
    return 'bfloat16' if cfg.amp == 'bf16' else cfg.model_dtype


def _cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'unknown'


def format_table(report: Dict[str, Any]) -> str:
    lines = ['| model | mode | precision | batch | size | params | GFLOPs | images/s | × ref | peak MB | × ref mem | '
             'GFLOP/s (% roofline) |', '|' + ' --- |' * 12]
    for row in report['rows']:
        c = row['config']
        args = ','.join(f'{k}={v}' for k, v in c.get('model_args', {}).items())
        name = (c['model'] + (f':{args}' if args else '') + (' (compiled)' if c['compile'] else '')
                + ('' if c.get('kernels', True) else ' (reference code)'))
        folded = c['mode'] == 'infer' and c['reparameterize'] and c['model'].startswith('refiner')
        mode = c['mode'] + (' (reparameterized)' if folded else '')
        precision = 'bf16 autocast' if c['amp'] == 'bf16' else c.get('model_dtype', 'float32')
        head = f'| {name} | {mode} | {precision} | {c["batch_size"]} | {c["img_size"]} |'
        if 'error' in row:
            lines.append(f'{head} error: {row["error"][:80]} |' + ' |' * 6)
            continue
        lines.append(
            f'{head} {row["params"] / 1e6:.1f}M | '
            f'{row["gflops_per_image"]:.2f} | {row["images_per_s"]:.1f} | {row.get("speed_ratio", float("nan")):.2f} | '
            f'{row["peak_mem_mb"]:.0f} | {row.get("mem_ratio", float("nan")):.2f} | '
            f'{row["achieved_gflops"]:.0f} ({100 * row["roofline_fraction"]:.0f}%) |')
    rooflines = ', '.join(f'{dtype} {gflops:.0f}' for dtype, gflops in report['gemm_gflops'].items())
    lines.append(f'\nGEMM roofline (GFLOP/s) {rooflines}; {report["threads"]} threads; {report["cpu"]}; '
                 f'torch {report["torch"]}; medians over {report["rounds"]} alternating rounds')
    return '\n'.join(lines)


def save_report(report: Dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + '\n')
