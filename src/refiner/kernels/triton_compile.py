"""Compiling the fused refinement ahead of time for an NVIDIA GPU, without one, as the runtime would launch it.

At launch Triton specialises the kernel on its arguments: an integer equal to 1 (a unit stride)
becomes a constant, integers divisible by 16 and 16-byte aligned pointers are marked so. The
variant compiled here is that one (:func:`launch_arguments` builds the arguments of a real launch at
a given shape, :func:`compile_for_target` specialises and compiles them), so that registers, spills
and instruction counts describe the code a GPU would run. :func:`sass_loops` reads the SASS
(``cuobjdump -sass``, which ships with Triton) into straight-line regions and their loops, for the
cost model of ``scripts/gpu_cost.py``.
"""
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import triton_refinement as T
from .fused_weights import FusedWeights, pad_heads

__all__ = ['compile_for_target', 'compile_kernel', 'launch_arguments', 'sass_loops']


def _tool(name: str) -> Optional[str]:
    from triton.backends.nvidia import compiler as nvidia
    path = os.path.join(os.path.dirname(nvidia.__file__), 'bin', name)
    return path if os.path.isfile(path) else None


def launch_arguments(form: str, dtype: torch.dtype, heads: int = 12, expanded_heads: int = 36, head_dim: int = 32,
                     kernel_size: int = 3, tokens: int = 197) -> Tuple[Any, tuple, dict]:
    """(kernel, positional arguments, keyword arguments) of one launch of the ``form`` kernel for
    maps and v of ``dtype`` (contiguous, one sample of ``tokens`` tokens; small CPU tensors stand in
    for the GPU's: only dtypes, strides and alignment matter)."""
    H, N, d, k = heads, tokens, head_dim, kernel_size
    HP, DP = pad_heads(H), pad_heads(d)
    attn, v = torch.zeros(1, H, N, N, dtype=dtype), torch.zeros(1, H, N, d, dtype=dtype)
    out = torch.zeros(1, H, N, d, dtype=dtype)
    dot = dtype if dtype != torch.float32 else torch.float32
    f32 = torch.float32
    common = dict(HP=HP, DP=DP, K=k, BM=T.BLOCK_M, BN=T.BLOCK_N, WIDE=False,
                  PRECISION='ieee' if dtype == torch.float32 else 'tf32')
    sizes = (N, N, H, d, *attn.stride(), *v.stride(), *out.stride())
    if form == 'activated':
        EP = -(-expanded_heads // 16) * 16
        scratch = torch.zeros(16, dtype=dot)
        w = FusedWeights('activated', H, k, dot, (torch.zeros(EP, HP, dtype=dot), torch.zeros(EP, dtype=f32),
                                                  torch.zeros(EP, k * k, dtype=f32), torch.zeros(EP, dtype=f32),
                                                  torch.zeros(HP, EP, dtype=dot), torch.zeros(HP, dtype=f32),
                                                  torch.zeros(HP, dtype=f32)))
        return (T._activated_kernel, (attn, v, out, scratch, *w.tensors, *sizes),
                dict(common, E_CHUNKS=EP // 16, EC=16, PC=T.HALO_CHUNK))
    w = FusedWeights('linear', H, k, dot, (torch.zeros(k * k, HP, HP, dtype=dot), torch.zeros(k * k, HP, dtype=f32),
                                           torch.zeros(HP, dtype=f32), torch.zeros(HP, dtype=f32)))
    return T._linear_kernel, (attn, v, out, *w.tensors, *sizes), common


def compile_kernel(kernel, args: tuple, constants: dict, capability: int, num_warps: int, num_stages: int,
                   specialise: bool = True) -> Dict[str, Any]:
    """Compile a Triton kernel for ``capability`` with these launch arguments and constexprs,
    specialised as a launch would be (``specialise``). Returns registers per thread, stack (spill)
    bytes, shared memory, the arguments specialised to 1 or marked divisible by 16, and the PTX
    and SASS texts (registers, spills and SASS None where the CUDA tools are missing)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    names = kernel.arg_names
    signature, constexprs, attrs, unit, divisible = {}, {}, {}, [], []
    for i, (name, arg) in enumerate(zip(names, args)):
        kind, spec = native_specialize_impl(CUDABackend, arg, False, specialise, specialise)
        if kind == 'constexpr':  # an integer 1, a unit stride
            constexprs[(i,)] = arg
            unit.append(name)
        elif spec:  # 'D': divisible by 16 (integers), 16-byte aligned (pointers)
            attrs[(i,)] = CUDABackend.parse_attr(spec)
            divisible.append(name)
        signature[name] = kind
    for name, value in constants.items():
        signature[name] = 'constexpr'
        constexprs[(names.index(name),)] = value
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                        attrs=attrs),
                              target=GPUTarget('cuda', capability, 32),
                              options={'num_warps': num_warps, 'num_stages': num_stages})
    usage: Dict[str, Any] = {'capability': capability, 'num_warps': num_warps, 'num_stages': num_stages,
                             'unit_arguments': unit, 'divisible_arguments': divisible, 'registers': None,
                             'stack_bytes': None, 'shared_bytes': compiled.metadata.shared,
                             'cubin_bytes': len(compiled.asm['cubin']), 'ptx': compiled.asm['ptx'], 'sass': None}
    cuobjdump = _tool('cuobjdump')
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
            f.write(compiled.asm['cubin'])
            f.flush()
            report = subprocess.run([cuobjdump, '-res-usage', f.name], capture_output=True, text=True).stdout
            usage['sass'] = subprocess.run([cuobjdump, '-sass', f.name], capture_output=True, text=True).stdout
        found = re.search(r'REG:(\d+) STACK:(\d+)', report)
        if found:
            usage['registers'], usage['stack_bytes'] = int(found.group(1)), int(found.group(2))
    return usage


def compile_for_target(capability: int, dtype: torch.dtype = torch.bfloat16, form: str = 'activated',
                       num_warps: Optional[int] = None, num_stages: Optional[int] = None, specialise: bool = True,
                       **shape) -> Dict[str, Any]:
    """Compile the ``form`` kernel for an NVIDIA GPU of this compute capability (90: H100/H200, 80:
    A100), no GPU needed, for maps and v of ``dtype`` at ``shape`` (:func:`launch_arguments`'
    keywords; default Refiner-ViT-S's), specialised as a launch would be (:func:`compile_kernel`)."""
    kernel, args, constants = launch_arguments(form, dtype, **shape)
    usage = compile_kernel(kernel, args, constants, capability, num_warps or T.NUM_WARPS[form],
                           num_stages or T.num_stages(form, capability), specialise)
    usage.update(dtype=str(dtype).replace('torch.', ''), form=form)
    return usage


_INSTRUCTION = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);')


def sass_loops(sass: str) -> Tuple[List[Tuple[int, str, str]], List[Tuple[int, int]]]:
    """The instructions of a SASS listing as (address, opcode, operands), and its loops as
    (first, last) instruction indices: a branch back to an earlier address closes a loop that
    starts there (nested loops nest as intervals)."""
    instructions = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(sass)]
    index = {addr: i for i, (addr, _, _) in enumerate(instructions)}
    loops = []
    for i, (addr, op, operands) in enumerate(instructions):
        if op.startswith('BRA'):
            target = re.search(r'0x([0-9a-f]+)', operands)
            if target and int(target.group(1), 16) <= addr and int(target.group(1), 16) in index:
                loops.append((index[int(target.group(1), 16)], i))
    return instructions, sorted(set(loops))
