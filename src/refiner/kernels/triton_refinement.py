"""A refining block's inference in one CUDA kernel (Triton): out = R @ v, the refined map R never in memory.

The reference is :meth:`refiner.layers.RefinedAttention.refined_map` followed by ``@ v``, in the
raster layout, with the refinement folded for inference (:mod:`refiner.kernels.fused_weights`):

    R = W3·act(dw_k(act(W1·A + b1)) + b2) + b3 + residual·A        (per head; act: ReLU6)

*attention expansion* (W1: H -> E = r·H maps), *distributed local attention* (a k×k depthwise
convolution over each N×M map, zero-padded), *attention reduction* (W3: E -> H). Each program
holds one tile of BM query rows and walks the keys BN at a time, accumulating ``R @ v`` as flash
attention does. Per key tile (``_activated_kernel``):

1. the expansion, **once**: act(W1·A + b1) of the tile and its k - 1 halo rows and columns,
   (BM + k - 1)·(BN + k - 1) positions, PC at a time, into the program's own scratch slice
   (E × halo positions, in the products' dtype; a few tens of KB that stay in L1/L2);
2. the k² taps read shifted windows of that slice, then ReLU6, the reduction (a matrix product),
   the bias, the residual and the product with v's tile.

The linear form (and its re-parameterization, one dense k×k convolution) has no activation: its
expansion, taps and reduction fold into k² H×H matrices (``_linear_kernel``), k² small products
over shifted tiles of A and no expanded maps at all.

Offsets: the sample's is 64-bit; those inside a sample are 32-bit unless a sample's maps span
2³¹ elements or more (then a 64-bit variant). Launches are sliced so that the grid's second
dimension stays <= 65,535 and the scratch within ``SCRATCH_BYTES``; they run on the tensors'
device (its current stream). ReLU6 propagates NaN as PyTorch's does.

Precision: products of fp32 operands follow PyTorch's ``allow_tf32`` for CUDA matmuls; half-precision
inputs multiply in their format with float32 accumulation; the taps, activations and accumulators
are float32; the result is v's dtype. Inference only (no autograd); :func:`triton_available` says
whether Triton imports; ``TRITON_INTERPRET=1`` before importing runs the kernels on a CPU (tests).
"""
import contextlib
from typing import List, Tuple

import torch

from .fused_weights import FusedWeights, pad_heads

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional 'gpu' extra
    triton = tl = None

__all__ = ['FUSED_PREFERRED', 'dot_dtype', 'fused_preferred', 'launch_plan', 'num_stages', 'refine_aggregate_fused',
           'triton_available']

Tensor = torch.Tensor

BLOCK_M = 16  # query rows per program (tl.dot needs >= 16)
BLOCK_N = 16  # keys per step
HALO_CHUNK = 64  # halo positions expanded per matrix product
MAX_LAUNCH_ELEMENTS = 2 ** 31 - 1  # beyond this, offsets inside a sample go 64-bit
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension
SCRATCH_BYTES = 64 << 20  # the activated kernel's scratch per launch (one slice per program)
NUM_WARPS = {'activated': 8, 'linear': 8}  # 4 warps spill


def num_stages(form: str, capability: int) -> int:
    """Software pipelining depth of the loops: the activated kernel's registers are tight (no spills
    in bf16 / fp16 with 1 stage on sm_90, 2 on sm_80); the linear one's do not depend on it."""
    return 1 if form == 'activated' and capability >= 90 else 2


# where the fused kernel is taken over the eager kernels: by compute capability (the nearest one at or
# below the GPU's; 90 above) and by the eager chain it replaces (fused_weights.dispatch_variant); from
# scripts/gpu_cost.py's estimates at Refiner-ViT-S/L shapes (docs/gpu.md), until gpu_check.py measures
FUSED_PREFERRED = {
    90: {'activated': True, 'activated_reparameterized': False, 'linear': True, 'conv': False},
    80: {'activated': True, 'activated_reparameterized': True, 'linear': True, 'conv': False},
}


def triton_available() -> bool:
    return triton is not None


def fused_preferred(variant: str, attn: Tensor) -> bool:
    """Whether a refinement of this variant (:func:`~refiner.kernels.fused_weights.dispatch_variant`)
    takes the fused kernel for these maps, else the eager kernels (maps off CUDA, under Triton's
    interpreter in tests: as on sm_90)."""
    major, minor = torch.cuda.get_device_capability(attn.device) if attn.is_cuda else (9, 0)
    known = [c for c in sorted(FUSED_PREFERRED) if c <= 10 * major + minor] or [min(FUSED_PREFERRED)]
    return FUSED_PREFERRED[known[-1]].get(variant, False)


def dot_dtype(attn: Tensor, v: Tensor) -> torch.dtype:
    """The dtype of the kernel's products: half precision where either operand is (under autocast the
    maps are float32 and v bf16), else float32."""
    half = [t.dtype for t in (v, attn) if t.dtype in (torch.float16, torch.bfloat16)]
    return half[0] if half else torch.float32


if triton is not None:
    @triton.jit
    def _wide(x, WIDE: tl.constexpr):
        """Indices as offsets: 64-bit where a sample's maps are too large for 32."""
        if WIDE:
            return x.to(tl.int64)
        return x

    @triton.jit
    def _relu6(x):
        return tl.clamp(x, 0., 6., propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out (as torch's hardtanh)

    @triton.jit
    def _aggregate(acc, refined, V, b, n0, M, D, s_vb, s_vh, s_vm, s_vd, heads, head_ok, dims, HP: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
        """acc (HP, BM, DP) += refined (HP, BM·BN) @ v[keys n0..n0 + BN] (HP, BN, DP)."""
        keys = n0 + tl.arange(0, BN)
        v = tl.load(V + b * s_vb + _wide(heads, WIDE)[:, None, None] * s_vh + _wide(keys, WIDE)[None, :, None] * s_vm
                    + dims[None, None, :] * s_vd,
                    mask=head_ok[:, None, None] & (keys < M)[None, :, None] & (dims < D)[None, None, :], other=0.)
        return acc + tl.dot(tl.reshape(refined, (HP, BM, BN)).to(v.dtype), v, input_precision=PRECISION)

    @triton.jit
    def _store(OUT, acc, b, m0, N, D, s_ob, s_oh, s_on, s_od, heads, head_ok, dims, BM: tl.constexpr,
               WIDE: tl.constexpr):
        rows = m0 + tl.arange(0, BM)
        tl.store(OUT + b * s_ob + _wide(heads, WIDE)[:, None, None] * s_oh + _wide(rows, WIDE)[None, :, None] * s_on
                 + dims[None, None, :] * s_od, acc.to(OUT.dtype.element_ty),
                 mask=head_ok[:, None, None] & (rows < N)[None, :, None] & (dims < D)[None, None, :])

    @triton.jit
    def _activated_kernel(
            A, V, OUT, SCR, W1, B1, W2, B2, W3, B3, RES,
            N, M, H, D,
            s_ab, s_ah, s_an, s_am, s_vb, s_vh, s_vm, s_vd, s_ob, s_oh, s_on, s_od,
            E_CHUNKS: tl.constexpr, HP: tl.constexpr, EC: tl.constexpr, DP: tl.constexpr, K: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, PC: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
        PAD: tl.constexpr = K // 2
        HN: tl.constexpr = BN + 2 * PAD  # halo tile: (BM + 2·PAD) rows × HN keys, row-major
        HALO: tl.constexpr = (BM + 2 * PAD) * HN
        NPC: tl.constexpr = (HALO + PC - 1) // PC
        HALO_P: tl.constexpr = NPC * PC  # scratch positions per expanded map
        EP: tl.constexpr = E_CHUNKS * EC
        tile = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        m0 = tile * BM
        scr = SCR + (b * tl.num_programs(0) + tile) * (EP * HALO_P)  # this program's (EP, HALO_P) slice
        heads = tl.arange(0, HP)
        head_ok = heads < H
        chans = tl.arange(0, EC)
        dims = tl.arange(0, DP)
        pos = tl.arange(0, BM * BN)  # the tile's positions, row-major: query row pos // BN, key pos % BN
        a_ptr = A + b * s_ab + _wide(heads, WIDE)[:, None] * s_ah  # (HP, 1)
        window = (pos // BN) * HN + pos % BN  # a position's top-left tap in the halo tile
        acc = tl.zeros((HP, BM, DP), dtype=tl.float32)
        for n0 in range(0, M, BN):
            # 1. act(W1·A + b1) over the halo tile, once, zero outside the map (the convolution's padding)
            for pc in range(NPC):  # a loop; the chunks of expanded maps unrolled
                p = pc * PC + tl.arange(0, PC)
                r = m0 - PAD + p // HN
                q = n0 - PAD + p % HN
                inside = (p < HALO) & (r >= 0) & (r < N) & (q >= 0) & (q < M)
                a = tl.load(a_ptr + _wide(r, WIDE)[None, :] * s_an + _wide(q, WIDE)[None, :] * s_am,
                            mask=head_ok[:, None] & inside[None, :], other=0.)  # (HP, PC)
                a = a.to(W1.dtype.element_ty)
                for c in tl.static_range(E_CHUNKS):
                    e = c * EC + chans
                    w1 = tl.load(W1 + e[:, None] * HP + heads[None, :])  # (EC, HP)
                    x = _relu6(tl.dot(w1, a, input_precision=PRECISION) + tl.load(B1 + e)[:, None])  # (EC, PC)
                    x = tl.where(inside[None, :], x, 0.)
                    tl.store(scr + p[None, :] * EP + e[:, None], x.to(SCR.dtype.element_ty))  # channels-last
            tl.debug_barrier()  # the slice is written: every thread of the program may read it
            # 2. the k² taps over shifted windows, ReLU6, the reduction W3 (EC maps at a time)
            reduced = tl.zeros((HP, BM * BN), dtype=tl.float32)
            for c in range(E_CHUNKS):
                e = c * EC + chans
                local = tl.zeros((EC, BM * BN), dtype=tl.float32)
                for t in tl.static_range(K * K):  # unrolled
                    x = tl.load(scr + (window + (t // K) * HN + t % K)[None, :] * EP + e[:, None])  # (EC, BM·BN)
                    local += tl.load(W2 + e * (K * K) + t)[:, None] * x.to(tl.float32)
                local = _relu6(local + tl.load(B2 + e)[:, None])
                w3 = tl.load(W3 + heads[:, None] * EP + e[None, :])  # (HP, EC)
                reduced += tl.dot(w3, local.to(w3.dtype), input_precision=PRECISION)
            tl.debug_barrier()  # read before the next key tile overwrites the slice
            rows = m0 + pos // BN
            cols = n0 + pos % BN
            centre = tl.load(a_ptr + _wide(rows, WIDE)[None, :] * s_an + _wide(cols, WIDE)[None, :] * s_am,
                             mask=head_ok[:, None] & (rows < N)[None, :] & (cols < M)[None, :], other=0.)
            refined = reduced + tl.load(B3 + heads)[:, None] + tl.load(RES + heads)[:, None] * centre.to(tl.float32)
            acc = _aggregate(acc, refined, V, b, n0, M, D, s_vb, s_vh, s_vm, s_vd, heads, head_ok, dims, HP, BM, BN,
                             WIDE, PRECISION)
        _store(OUT, acc, b, m0, N, D, s_ob, s_oh, s_on, s_od, heads, head_ok, dims, BM, WIDE)

    @triton.jit
    def _linear_kernel(
            A, V, OUT, TAPS, TAP_BIAS, BIAS, RES,
            N, M, H, D,
            s_ab, s_ah, s_an, s_am, s_vb, s_vh, s_vm, s_vd, s_ob, s_oh, s_on, s_od,
            HP: tl.constexpr, DP: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            WIDE: tl.constexpr, PRECISION: tl.constexpr):
        PAD: tl.constexpr = K // 2
        m0 = tl.program_id(0) * BM
        b = tl.program_id(1).to(tl.int64)
        heads = tl.arange(0, HP)
        head_ok = heads < H
        dims = tl.arange(0, DP)
        pos = tl.arange(0, BM * BN)
        rows = m0 + pos // BN
        a_ptr = A + b * s_ab + _wide(heads, WIDE)[:, None] * s_ah  # (HP, 1)
        acc = tl.zeros((HP, BM, DP), dtype=tl.float32)
        for n0 in range(0, M, BN):
            cols = n0 + pos % BN
            refined = tl.zeros((HP, BM * BN), dtype=tl.float32)
            for t in range(K * K):  # R += T_t·shift_t(A) + [inside]·c_t
                r = rows + (t // K - PAD)
                q = cols + (t % K - PAD)
                inside = (r >= 0) & (r < N) & (q >= 0) & (q < M)
                a = tl.load(a_ptr + _wide(r, WIDE)[None, :] * s_an + _wide(q, WIDE)[None, :] * s_am,
                            mask=head_ok[:, None] & inside[None, :], other=0.)  # (HP, BM·BN)
                taps = tl.load(TAPS + t * HP * HP + heads[:, None] * HP + heads[None, :])  # (HP, HP)
                refined += tl.dot(taps, a.to(taps.dtype), input_precision=PRECISION)
                refined += tl.load(TAP_BIAS + t * HP + heads)[:, None] * inside.to(tl.float32)[None, :]
            centre = tl.load(a_ptr + _wide(rows, WIDE)[None, :] * s_an + _wide(cols, WIDE)[None, :] * s_am,
                             mask=head_ok[:, None] & (rows < N)[None, :] & (cols < M)[None, :], other=0.)
            refined += tl.load(BIAS + heads)[:, None] + tl.load(RES + heads)[:, None] * centre.to(tl.float32)
            acc = _aggregate(acc, refined, V, b, n0, M, D, s_vb, s_vh, s_vm, s_vd, heads, head_ok, dims, HP, BM, BN,
                             WIDE, PRECISION)
        _store(OUT, acc, b, m0, N, D, s_ob, s_oh, s_on, s_od, heads, head_ok, dims, BM, WIDE)


def halo_positions(kernel_size: int) -> int:
    """Scratch positions per expanded map of one program (the halo tile, padded to whole chunks)."""
    halo = (BLOCK_M + kernel_size - 1) * (BLOCK_N + kernel_size - 1)
    return -(-halo // HALO_CHUNK) * HALO_CHUNK


def _extent(t: Tensor, reach: Tuple[int, ...]) -> int:
    """The largest offset inside one sample the kernel computes for t: index reach[i] along dim i + 1."""
    return sum(r * s for r, s in zip(reach, t.stride()[1:]))


def launch_plan(attn: Tensor, v: Tensor, out: Tensor, kernel_size: int, scratch_per_sample: int
                ) -> Tuple[bool, List[Tuple[int, int]]]:
    """(wide, slices): whether offsets inside a sample need 64 bits, and the [i, j) batch slices of
    the launches (each <= MAX_GRID_Y samples, with its scratch within SCRATCH_BYTES)."""
    B, H, N, M = attn.shape
    pad, HP, DP = kernel_size // 2, pad_heads(H), pad_heads(v.shape[-1])
    n_pad, m_pad = -(-N // BLOCK_M) * BLOCK_M, -(-M // BLOCK_N) * BLOCK_N
    # indices reach the padded tiles and the halo (masked, but their offsets are still computed)
    reach = max(_extent(attn, (HP - 1, n_pad + pad - 1, m_pad + pad - 1)),
                _extent(v, (HP - 1, m_pad - 1, DP - 1)), _extent(out, (HP - 1, n_pad - 1, DP - 1)))
    wide = reach >= MAX_LAUNCH_ELEMENTS
    step = min(MAX_GRID_Y, max(1, SCRATCH_BYTES // max(scratch_per_sample, 1)))
    return wide, [(i, min(i + step, B)) for i in range(0, B, step)]


def _device_guard(t: Tensor):
    """Launch on t's GPU (and its current stream), whatever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def refine_aggregate_fused(attn: Tensor, v: Tensor, weights: FusedWeights, precision=None) -> Tensor:
    """``R @ v`` for maps attn (B, H, N, M) and values v (B, H, M, d), R the refinement that ``weights``
    folds (:func:`~refiner.kernels.fused_weights.fuse_module`), raster layout. Returns (B, H, N, d) in
    v's dtype. ``precision``: of fp32 products ('ieee' or 'tf32'; default: PyTorch's
    ``torch.backends.cuda.matmul.allow_tf32``)."""
    if triton is None:
        raise RuntimeError('the fused refinement needs triton: pip install refiner[gpu]')
    if attn.dim() != 4 or v.dim() != 4:
        raise ValueError(f'maps (B, H, N, M) and values (B, H, M, d) expected, got {tuple(attn.shape)} and '
                         f'{tuple(v.shape)}')
    B, H, N, M = attn.shape
    d = v.shape[-1]
    if v.shape[:3] != (B, H, M) or weights.heads != H:
        raise ValueError(f'maps {tuple(attn.shape)}, v {tuple(v.shape)} and a refinement of {weights.heads} heads '
                         f'do not fit a refining block')
    if attn.dtype not in _DTYPES or v.dtype not in _DTYPES or attn.device != v.device:
        raise ValueError(f'maps and values must be floating point on one device, got {attn.dtype} on {attn.device} '
                         f'and {v.dtype} on {v.device}')
    if weights.dot_dtype != dot_dtype(attn, v):
        raise ValueError(f'weights folded for {weights.dot_dtype} products, inputs {attn.dtype} and {v.dtype}')
    if precision is None:
        precision = 'tf32' if torch.backends.cuda.matmul.allow_tf32 else 'ieee'
    result_dtype = v.dtype
    attn, v = (t.float() if t.dtype == torch.float64 else t for t in (attn, v))  # Triton's dots stop at fp32
    k, HP, DP = weights.kernel_size, pad_heads(H), pad_heads(d)
    tiles = triton.cdiv(N, BLOCK_M)
    with _device_guard(attn):
        out = torch.empty(B, H, N, d, dtype=v.dtype, device=v.device)
        major, minor = torch.cuda.get_device_capability(attn.device) if attn.is_cuda else (9, 0)
        common = dict(HP=HP, DP=DP, K=k, BM=BLOCK_M, BN=BLOCK_N, PRECISION=precision,
                      num_warps=NUM_WARPS[weights.form], num_stages=num_stages(weights.form, 10 * major + minor))
        if weights.form == 'activated':
            EP = weights.tensors[0].shape[0]
            per_program = EP * halo_positions(k)
            wide, slices = launch_plan(attn, v, out, k, tiles * per_program * weights.dot_dtype.itemsize)
            step = max(j - i for i, j in slices)
            scratch = torch.empty(step * tiles * per_program, dtype=weights.dot_dtype, device=attn.device)
            for i, j in slices:
                _activated_kernel[(tiles, j - i)](
                    attn[i:j], v[i:j], out[i:j], scratch, *weights.tensors, N, M, H, d,
                    *attn.stride(), *v.stride(), *out.stride(), E_CHUNKS=EP // 16, EC=16, PC=HALO_CHUNK, WIDE=wide,
                    **common)
        else:
            wide, slices = launch_plan(attn, v, out, k, 0)
            for i, j in slices:
                _linear_kernel[(tiles, j - i)](
                    attn[i:j], v[i:j], out[i:j], *weights.tensors, N, M, H, d,
                    *attn.stride(), *v.stride(), *out.stride(), WIDE=wide, **common)
    return out.to(result_dtype)
