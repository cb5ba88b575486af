"""An ESTIMATE, without a GPU, of the fused refinement's time per refining block and image against the eager chain's.

    PYTHONPATH=src python scripts/gpu_cost.py                  # S/M/L, bf16, sm_90 and sm_80: a table
    PYTHONPATH=src python scripts/gpu_cost.py --json cost.json [--baseline-ref REV]

The fused kernel is compiled for each target as the runtime would specialise it
(:mod:`refiner.kernels.triton_compile`); its SASS is cut into loops, and the instructions of each
loop body are multiplied by the loop's trip count at the model's shape (key tiles, halo chunks,
expanded-map chunks, taps), giving warp-instructions per program, times warps and programs per
image. Time = the largest of: those instructions issued at one per scheduler and clock (the
optimistic bound; at the 1-2 warps per scheduler this kernel's registers allow, about half of that
rate is likelier, the second figure), DRAM bytes (the map A, v, the output) over DRAM bandwidth,
and L2 bytes (the scratch slices, the halo re-reads) over L2 bandwidth.

The eager chain (the refinement's stages as PyTorch runs them, then ``R @ v``) is costed on its
roofline on the same GPU: each operation takes the larger of its bytes over DRAM bandwidth and its
FLOPs over peak (tensor cores for the products, CUDA cores for the depthwise convolution), launch
costs ignored (a lower bound: eager never runs faster than this). None of this is a measurement:
``scripts/gpu_check.py`` measures both on a GPU.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))
from refiner.kernels import triton_compile as C  # noqa: E402
from refiner.kernels import triton_refinement as T  # noqa: E402

# published peak figures (SXM parts, dense): SMs, boost clock GHz, DRAM and L2 TB/s, bf16 tensor and fp32 TFLOP/s
GPUS = {90: dict(name='H100 SXM', sms=132, ghz=1.755, dram=3.35, l2=5.5, tensor=989., fp32=67.),
        80: dict(name='A100 SXM 80GB', sms=108, ghz=1.41, dram=2.04, l2=4.0, tensor=312., fp32=19.5)}
# Refiner-ViT at 224² (patch 16: 196 patches + a class token), r = 3, k = 3; a refining block every other block
MODELS = {'S': dict(heads=12, head_dim=32, blocks=8), 'M': dict(heads=12, head_dim=35, blocks=16),
          'L': dict(heads=16, head_dim=32, blocks=16)}
TOKENS, RATIO, K = 197, 3, 3


def _tree(loops):
    """Loop intervals (first, last) as a nesting forest: [(first, last, children)]."""
    forest, stack = [], []
    for first, last in sorted(loops, key=lambda x: (x[0], -x[1])):
        if last <= first:
            continue  # the trap loop after EXIT
        while stack and stack[-1][1] < first:
            stack.pop()
        node = (first, last, [])
        (stack[-1][2] if stack else forest).append(node)
        stack.append(node)
    return forest


def dynamic_count(sass: str, trips) -> int:
    """Instructions one warp executes: every loop body times its trip count. ``trips``: the expected
    loop nest, [(trip count, [inner loops...]), ...] in source order (a ValueError if the SASS's
    loops do not match it, e.g. where the compiler unrolled or split a loop)."""
    instructions, loops = C.sass_loops(sass)

    def count(first, last, nodes, expected):
        if len(nodes) != len(expected):
            raise ValueError(f'SASS loop nest {[(a, b) for a, b, _ in nodes]} does not match {expected}')
        total = last - first + 1
        for (a, b, children), (trip, inner) in zip(nodes, expected):
            total += trip * count(a, b, children, inner) - (b - a + 1)
        return total

    return count(0, len(instructions) - 1, _tree(loops), trips)


def fused_estimate(capability, heads, head_dim, form='activated', dtype=torch.bfloat16):
    gpu = GPUS[capability]
    E, b = heads * RATIO, torch.finfo(dtype).bits // 8
    usage = C.compile_for_target(capability, dtype, form, heads=heads, expanded_heads=E, head_dim=head_dim,
                                 kernel_size=K, tokens=TOKENS)
    key_tiles = programs = -(-TOKENS // T.BLOCK_M)
    EP, HP, DP = -(-E // 16) * 16, max(16, 1 << (heads - 1).bit_length()), max(16, 1 << (head_dim - 1).bit_length())
    halo = T.halo_positions(K)
    if form == 'activated':
        trips = [(key_tiles, [(halo // T.HALO_CHUNK, []), (EP // 16, [])])]
    else:
        trips = [(key_tiles, [(K * K, [])])]
    per_warp = dynamic_count(usage['sass'], trips)
    warp_instructions = per_warp * usage['num_warps'] * programs  # per image and refining block
    issue_us = warp_instructions / (gpu['sms'] * 4 * gpu['ghz'] * 1e3)
    dram = (heads * TOKENS * TOKENS + 2 * heads * TOKENS * head_dim) * b
    tile = T.BLOCK_M * T.BLOCK_N
    per_tile_l2 = HP * halo * b + HP * T.BLOCK_N * DP * b  # A's halo tile, v's tile
    if form == 'activated':
        per_tile_l2 += EP * halo * b + K * K * EP * tile * b  # scratch written once, read k² times
    else:
        per_tile_l2 += K * K * HP * tile * b
    l2 = per_tile_l2 * key_tiles * programs
    regs = usage['registers'] or 255
    ctas = max(1, 65536 // (regs * 32 * usage['num_warps']))
    return dict(form=form, registers=usage['registers'], spill_bytes=usage['stack_bytes'],
                sass_instructions=len(C.sass_loops(usage['sass'])[0]), warp_instructions_per_image=warp_instructions,
                warps_per_scheduler=ctas * usage['num_warps'] / 4, dram_bytes=dram, l2_bytes=l2,
                issue_us=issue_us, dram_us=dram / gpu['dram'] / 1e6, l2_us=l2 / gpu['l2'] / 1e6,
                estimate_us=(max(issue_us, dram / gpu['dram'] / 1e6, l2 / gpu['l2'] / 1e6),
                             max(2 * issue_us, dram / gpu['dram'] / 1e6, l2 / gpu['l2'] / 1e6)))


def eager_operations(form, heads, head_dim):
    """The eager chain's operations per image: (name, FLOPs, elements read, elements written, on
    tensor cores). ``form``: 'activated' (as built: BatchNorms after each stage and the refine norm),
    'activated_reparameterized' (folded), 'linear' (three stages, no activation), 'conv' (the linear
    form re-parameterized: one dense k×k convolution, the residual in its centre tap)."""
    H, E, d, NN = heads, heads * RATIO, head_dim, TOKENS * TOKENS
    norms = form == 'activated'
    product = [('R @ v', 2 * H * NN * d, H * NN + H * TOKENS * d, H * TOKENS * d, True)]
    if form == 'conv':
        return [('conv', 2 * K * K * H * H * NN, H * NN, H * NN, False)] + product
    ops = [('expand', 2 * E * H * NN, H * NN, E * NN, True)]
    ops += [('expand_norm', 2 * E * NN, E * NN, E * NN, False)] if norms else []
    ops += [('relu6', E * NN, E * NN, E * NN, False)] if form != 'linear' else []
    ops += [('local_conv', 2 * K * K * E * NN, E * NN, E * NN, False)]
    ops += [('local_norm', 2 * E * NN, E * NN, E * NN, False)] if norms else []
    ops += [('relu6', E * NN, E * NN, E * NN, False)] if form != 'linear' else []
    ops += [('reduce', 2 * E * H * NN, E * NN, H * NN, True)]
    ops += [('reduce_norm', 2 * H * NN, H * NN, H * NN, False)] if norms else []
    ops += [('residual', 2 * H * NN, 2 * H * NN, H * NN, False)]
    ops += [('refine_norm', 2 * H * NN, H * NN, H * NN, False)] if norms else []
    return ops + product


def eager_roofline(capability, heads, head_dim, form='activated', dtype=torch.bfloat16):
    """The eager chain's lower bound per image: each operation at the larger of its DRAM time and its
    compute time on the GPU's peak (launch costs ignored)."""
    gpu, b = GPUS[capability], torch.finfo(dtype).bits // 8
    ops = eager_operations(form, heads, head_dim)
    time_us = sum(max((r + w) * b / gpu['dram'] / 1e6, f / (gpu['tensor'] if tc else gpu['fp32']) / 1e6)
                  for _, f, r, w, tc in ops)
    return dict(operations=len(ops), dram_bytes=sum((r + w) * b for _, _, r, w, _ in ops),
                flops=sum(f for _, f, _, _, _ in ops), estimate_us=time_us)


def fused_wins(fused, eager):
    """The dispatch rule: the fused kernel where the middle of its estimate is below the eager roofline."""
    return sum(fused['estimate_us']) / 2 < eager['estimate_us']


def baseline_estimate(ref, capability, heads, head_dim, dtype=torch.bfloat16):
    """The kernel of git revision ``ref`` (before this rewrite: the expansion recomputed for each
    of the k² taps), specialised and counted the same way: its warp-instructions per image."""
    source = subprocess.run(['git', 'show', f'{ref}:src/refiner/kernels/triton_refinement.py'], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1], check=True).stdout
    with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location('refiner_baseline_kernel', f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    E = heads * RATIO
    EP, HP, DP = -(-E // 16) * 16, max(16, 1 << (heads - 1).bit_length()), max(16, 1 << (head_dim - 1).bit_length())
    attn, v = torch.zeros(1, heads, TOKENS, TOKENS, dtype=dtype), torch.zeros(1, heads, TOKENS, head_dim, dtype=dtype)
    f32 = torch.zeros(EP)
    args = (attn, v, v.clone(), torch.zeros(EP, HP, dtype=dtype), f32, torch.zeros(EP, K * K), f32,
            torch.zeros(HP, EP, dtype=dtype), torch.zeros(HP), torch.zeros(HP), TOKENS, TOKENS, heads, head_dim,
            *attn.stride(), *v.stride(), *v.stride())
    constants = dict(E_CHUNKS=EP // 16, HP=HP, EC=16, DP=DP, K=K, BM=16, BN=16, ACTIVATED=True, PRECISION='tf32')
    usage = C.compile_kernel(old._refine_aggregate_kernel, args, constants, capability, old.NUM_WARPS, 3)
    tiles = -(-TOKENS // 16)
    per_warp = dynamic_count(usage['sass'], [(tiles, [(EP // 16, [(K * K, [])])])])
    return dict(registers=usage['registers'], sass_instructions=len(C.sass_loops(usage['sass'])[0]),
                warp_instructions_per_image=per_warp * old.NUM_WARPS * tiles)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--json', help='also write the figures here')
    p.add_argument('--baseline-ref', default=None,
                   help='a git revision whose kernel to count the same way (e.g. one before the kernel changed)')
    p.add_argument('--models', nargs='+', default=list(MODELS))
    args = p.parse_args()
    rows = []
    print('ESTIMATE (no GPU measured): one refining block, one 224² image, bf16. Fused µs = max(instruction '
          'issue, DRAM, L2) at 1 and 0.5 instructions per scheduler and clock; eager µs = roofline (a lower bound). '
          'fused wins: the middle of its range below the eager roofline.', flush=True)
    header = ('model', 'GPU', 'regs', 'spill', 'SASS', 'warp-instr', 'old warp-instr', 'DRAM KB', 'L2 KB',
              'fused µs', 'eager µs', 'eager reparam µs', 'linear fused µs', 'linear eager µs', 'conv eager µs')
    print(' | '.join(header))
    for name in args.models:
        shape = MODELS[name]
        for cap in (90, 80):
            h, d = shape['heads'], shape['head_dim']
            fused, linear = fused_estimate(cap, h, d), fused_estimate(cap, h, d, form='linear')
            eager = {form: eager_roofline(cap, h, d, form)
                     for form in ('activated', 'activated_reparameterized', 'linear', 'conv')}
            old = baseline_estimate(args.baseline_ref, cap, h, d) if args.baseline_ref else None
            wins = {form: fused_wins(fused if form.startswith('activated') else linear, e)
                    for form, e in eager.items()}
            rows.append(dict(model=name, gpu=GPUS[cap]['name'], capability=cap, fused=fused, linear=linear,
                             eager=eager, baseline=old, fused_wins=wins, blocks=shape['blocks']))
            mark = {form: '*' if won else '' for form, won in wins.items()}
            print(' | '.join(str(x) for x in (
                name, GPUS[cap]['name'], fused['registers'], fused['spill_bytes'], fused['sass_instructions'],
                f"{fused['warp_instructions_per_image'] / 1e6:.2f}M",
                f"{old['warp_instructions_per_image'] / 1e6:.2f}M" if old else '-',
                f"{fused['dram_bytes'] / 1e3:.0f}", f"{fused['l2_bytes'] / 1e3:.0f}",
                '{:.1f}-{:.1f}'.format(*fused['estimate_us']),
                f"{eager['activated']['estimate_us']:.1f}{mark['activated']}",
                f"{eager['activated_reparameterized']['estimate_us']:.1f}{mark['activated_reparameterized']}",
                '{:.1f}-{:.1f}'.format(*linear['estimate_us']), f"{eager['linear']['estimate_us']:.1f}{mark['linear']}",
                f"{eager['conv']['estimate_us']:.1f}{mark['conv']}")), flush=True)
    print('*: the fused kernel wins there (its estimate); dispatch: refiner.kernels.triton_refinement.FUSED_PREFERRED')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + '\n')


if __name__ == '__main__':
    main()
