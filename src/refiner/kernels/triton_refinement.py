"""A refining block's inference in one CUDA kernel (Triton): out = R @ v, the refined map R never in memory.

The reference is :meth:`refiner.layers.RefinedAttention.refined_map` followed by ``@ v``, in the
raster layout, with the refinement folded for inference (:meth:`DistributedLocalAttention.folded_chain`):

    R = W3·act(dw_k(act(W1·A + b1)) + b2) + b3 + residual·A        (per head; act: ReLU6 or none)

i.e. *attention expansion* (W1: H -> E = r·H maps), *distributed local attention* (a k×k depthwise
convolution over each N×M map, zero-padded), *attention reduction* (W3: E -> H), with every
BatchNorm, the refine norm and the block's ×s folded into the weights. The eager chain writes the
E expanded maps three times and the H refined maps once per block, (3r + 4)·H maps per image with
the input and the product; here each program holds one tile of BM query rows × BN keys of all H
maps, and for every tap of the k×k kernel re-reads the shifted input tile (from cache) and
recomputes the expansion in registers, E/EC chunks of EC maps at a time, so that only the input map
A (read k² + 1 times, mostly from L1/L2), v and the output touch GPU memory. The product with v
accumulates over key tiles as in flash attention.

Precision: products of fp32 operands follow PyTorch's ``allow_tf32`` for CUDA matmuls; half-precision
inputs multiply in their format with float32 accumulation; the convolution, activations and
accumulators are float32; the result is v's dtype.

Inference only (no autograd); :func:`triton_available` says whether Triton imports. Set
``TRITON_INTERPRET=1`` before importing this module to run the kernel on a CPU (the tests do).
"""
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional 'gpu' extra
    triton = tl = None

__all__ = ['compile_for_target', 'refine_aggregate_fused', 'triton_available']

Tensor = torch.Tensor

BLOCK_M = 16  # query rows per program (tl.dot needs >= 16)
BLOCK_N = 16  # keys per step
EXPAND_CHUNK = 16  # expanded maps held in registers at once
MAX_LAUNCH_ELEMENTS = 2 ** 31 - 1  # the kernel's offsets are int32
NUM_WARPS = 8  # 196 registers a thread and no spills on sm_90 (4 warps: 231; 16: spills)


def triton_available() -> bool:
    return triton is not None


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


if triton is not None:
    @triton.jit
    def _refine_aggregate_kernel(
            A, V, OUT, W1, B1, W2, B2, W3, B3, RES,
            N, M, H, D,
            s_ab, s_ah, s_an, s_am, s_vb, s_vh, s_vm, s_vd, s_ob, s_oh, s_on, s_od,
            E_CHUNKS: tl.constexpr, HP: tl.constexpr, EC: tl.constexpr, DP: tl.constexpr, K: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, ACTIVATED: tl.constexpr, PRECISION: tl.constexpr):
        m0 = tl.program_id(0) * BM
        b = tl.program_id(1)
        PAD: tl.constexpr = K // 2
        EP: tl.constexpr = E_CHUNKS * EC
        heads = tl.arange(0, HP)
        pos = tl.arange(0, BM * BN)  # a tile's positions, row-major: query row pos // BN, key pos % BN
        rows = m0 + pos // BN
        chans = tl.arange(0, EC)
        dims = tl.arange(0, DP)
        head_ok = heads < H
        a_ptr = A + b * s_ab + heads[:, None] * s_ah  # (HP, 1)
        acc = tl.zeros((HP, BM, DP), dtype=tl.float32)  # out rows m0.., all heads
        for n0 in range(0, M, BN):
            cols = n0 + pos % BN
            reduced = tl.zeros((HP, BM * BN), dtype=tl.float32)  # W3·u of this tile
            for c in range(E_CHUNKS):
                e = c * EC + chans
                w1 = tl.load(W1 + e[:, None] * HP + heads[None, :])  # (EC, HP), zero-padded on the host
                b1 = tl.load(B1 + e)
                local = tl.zeros((EC, BM * BN), dtype=tl.float32)  # dw_k(act(W1·A + b1)) of the tile
                for t in range(K * K):
                    r = rows + (t // K - PAD)
                    q = cols + (t % K - PAD)
                    inside = (r >= 0) & (r < N) & (q >= 0) & (q < M)
                    a = tl.load(a_ptr + r[None, :] * s_an + q[None, :] * s_am, mask=head_ok[:, None] & inside[None, :],
                                other=0.)  # (HP, BM·BN): A shifted by this tap
                    x = tl.dot(w1, a.to(w1.dtype), input_precision=PRECISION) + b1[:, None]  # (EC, BM·BN)
                    if ACTIVATED:
                        x = tl.minimum(tl.maximum(x, 0.), 6.)
                    x = tl.where(inside[None, :], x, 0.)  # the convolution's zero padding
                    local += tl.load(W2 + e * (K * K) + t)[:, None] * x
                local += tl.load(B2 + e)[:, None]
                if ACTIVATED:
                    local = tl.minimum(tl.maximum(local, 0.), 6.)
                w3 = tl.load(W3 + heads[:, None] * EP + e[None, :])  # (HP, EC)
                reduced += tl.dot(w3, local.to(w3.dtype), input_precision=PRECISION)
            centre = tl.load(a_ptr + rows[None, :] * s_an + cols[None, :] * s_am,
                             mask=head_ok[:, None] & (rows < N)[None, :] & (cols < M)[None, :], other=0.)
            refined = reduced + tl.load(B3 + heads)[:, None] + tl.load(RES + heads)[:, None] * centre.to(tl.float32)
            keys = n0 + tl.arange(0, BN)
            v = tl.load(V + b * s_vb + heads[:, None, None] * s_vh + keys[None, :, None] * s_vm
                        + dims[None, None, :] * s_vd,
                        mask=head_ok[:, None, None] & (keys < M)[None, :, None] & (dims < D)[None, None, :],
                        other=0.)  # (HP, BN, DP)
            refined = tl.reshape(refined, (HP, BM, BN))
            acc += tl.dot(refined.to(v.dtype), v, input_precision=PRECISION)
        out_rows = m0 + tl.arange(0, BM)
        tl.store(OUT + b * s_ob + heads[:, None, None] * s_oh + out_rows[None, :, None] * s_on
                 + dims[None, None, :] * s_od, acc.to(OUT.dtype.element_ty),
                 mask=head_ok[:, None, None] & (out_rows < N)[None, :, None] & (dims < D)[None, None, :])


def _padded(t: Tensor, shape, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(shape, dtype=dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def refine_aggregate_fused(attn: Tensor, v: Tensor, expand_weight: Tensor, expand_bias: Tensor, local_weight: Tensor,
                           local_bias: Tensor, reduce_weight: Tensor, reduce_bias: Tensor, residual: Tensor,
                           activated: bool = True, precision: Optional[str] = None) -> Tensor:
    """``R @ v`` with R = W3·act(dw(act(W1·attn + b1)) + b2) + b3 + residual·attn, attn (B, H, N, M),
    v (B, H, M, d), weights as :class:`~refiner.layers.dla.FoldedChain` holds them (raster layout).
    Returns (B, H, N, d) in v's dtype. ``precision``: of fp32 products ('ieee' or 'tf32'; default:
    PyTorch's ``torch.backends.cuda.matmul.allow_tf32``)."""
    if triton is None:
        raise RuntimeError('the fused refinement needs triton: pip install refiner[gpu]')
    B, H, N, M = attn.shape
    d = v.shape[-1]
    E, k = expand_weight.shape[0], local_weight.shape[-1]
    if v.shape != (B, H, M, d) or expand_weight.shape[1] != H or local_weight.shape[1] != 1:
        raise ValueError(f'maps {tuple(attn.shape)}, v {tuple(v.shape)} and expansion {tuple(expand_weight.shape)} '
                         f'do not fit a refining block')
    HP, DP, EP = _pow2(H), _pow2(d), -(-E // EXPAND_CHUNK) * EXPAND_CHUNK
    # products in half precision where either operand is (under autocast: float32 maps, bf16 values)
    half = [t.dtype for t in (v, attn) if t.dtype in (torch.float16, torch.bfloat16)]
    dot_dtype = half[0] if half else torch.float32
    f32 = torch.float32
    w1 = _padded(expand_weight.reshape(E, H), (EP, HP), dot_dtype)
    w3 = _padded(reduce_weight.reshape(H, E), (HP, EP), dot_dtype)
    w2 = _padded(local_weight.reshape(E, k * k), (EP, k * k), f32)
    b1, b2 = _padded(expand_bias, (EP,), f32), _padded(local_bias, (EP,), f32)
    b3, res = _padded(reduce_bias, (HP,), f32), _padded(residual, (HP,), f32)
    result_dtype = v.dtype
    attn, v = (t.float() if t.dtype == torch.float64 else t for t in (attn, v))  # Triton's dots stop at fp32
    out = torch.empty(B, H, N, d, dtype=v.dtype, device=v.device)
    if precision is None:
        precision = 'tf32' if torch.backends.cuda.matmul.allow_tf32 else 'ieee'
    # the kernel's offsets are 32-bit: launch on slices of the batch that stay below 2^31 elements
    per_sample = max(attn[0].numel(), v[0].numel(), out[0].numel(), max(s for s in attn.stride() + v.stride()))
    step = max(1, MAX_LAUNCH_ELEMENTS // per_sample)
    for i in range(0, B, step):
        j = min(i + step, B)
        _refine_aggregate_kernel[(triton.cdiv(N, BLOCK_M), j - i)](
            attn[i:j], v[i:j], out[i:j], w1, b1, w2, b2, w3, b3, res, N, M, H, d,
            *attn.stride(), *v.stride(), *out.stride(),
            E_CHUNKS=EP // EXPAND_CHUNK, HP=HP, EC=EXPAND_CHUNK, DP=DP, K=k, BM=BLOCK_M, BN=BLOCK_N,
            ACTIVATED=bool(activated), PRECISION=precision, num_warps=NUM_WARPS)
    return out.to(result_dtype)


_TRITON_DTYPES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}


def compile_for_target(capability: int, dtype: torch.dtype = torch.bfloat16, heads: int = 12, expanded_heads: int = 36,
                       head_dim: int = 32, kernel_size: int = 3, activated: bool = True) -> Dict[str, Any]:
    """Compile the kernel ahead of time for an NVIDIA GPU of this compute capability (90: H100/H200,
    80: A100), no GPU needed, for maps and v of ``dtype`` and a refinement of this shape (default:
    Refiner-ViT-S's). Returns the compiled kernel's registers per thread, stack (spill) bytes and
    shared memory, as the CUDA tools report them (None where the tools are missing)."""
    if triton is None:
        raise RuntimeError('compiling the fused refinement needs triton: pip install refiner[gpu]')
    from triton.backends.compiler import GPUTarget
    dot = _TRITON_DTYPES[dtype]
    kinds = [f'*{dot}'] * 4 + ['*fp32'] * 3 + [f'*{dot}'] + ['*fp32'] * 2 + ['i32'] * 16  # A, V, O, W1, ..., sizes
    signature = dict(zip(_refine_aggregate_kernel.arg_names, kinds))
    constants = dict(E_CHUNKS=-(-expanded_heads // EXPAND_CHUNK), HP=_pow2(heads), EC=EXPAND_CHUNK, DP=_pow2(head_dim),
                     K=kernel_size, BM=BLOCK_M, BN=BLOCK_N, ACTIVATED=activated,
                     PRECISION='ieee' if dtype == torch.float32 else 'tf32')
    signature.update({name: 'constexpr' for name in constants})
    compiled = triton.compile(triton.compiler.ASTSource(fn=_refine_aggregate_kernel, signature=signature,
                                                        constexprs=constants),
                              target=GPUTarget('cuda', capability, 32), options={'num_warps': NUM_WARPS})
    usage: Dict[str, Any] = {'capability': capability, 'dtype': str(dtype).replace('torch.', ''), 'registers': None,
                             'stack_bytes': None, 'shared_bytes': compiled.metadata.shared,
                             'cubin_bytes': len(compiled.asm['cubin'])}
    from triton.backends.nvidia import compiler as nvidia
    tool = os.path.join(os.path.dirname(nvidia.__file__), 'bin', 'cuobjdump')
    if os.path.isfile(tool):
        with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
            f.write(compiled.asm['cubin'])
            f.flush()
            report = subprocess.run([tool, '-res-usage', f.name], capture_output=True, text=True).stdout
        found = re.search(r'REG:(\d+) STACK:(\d+)', report)
        if found:
            usage['registers'], usage['stack_bytes'] = int(found.group(1)), int(found.group(2))
    return usage
