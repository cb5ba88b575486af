"""Fused, cache-blocked forward and backward passes of refined attention.

:mod:`refiner.layers.attention` and :mod:`refiner.layers.dla` hold the readable reference of the
method; this module computes the same thing faster and in less memory, and the tests hold the
two equal. Two observations drive it:

- On a CPU, a pass over a batch of N×N attention maps streams through memory, while the same pass
  over one sample's maps stays in cache and runs 3-4× faster. So every pass here walks the batch
  a few samples at a time (``CHUNK_BYTES`` of temporaries) and never builds a whole-batch temporary map;
  where one sample's maps outgrow that (large inputs), the passes walk its query rows in slabs.
  Refinement reads the k×k kernel's halo of rows around a slab; its backward recomputes two rows
  of halo and counts the local kernel's weight gradient once per row.
- Autograd would keep every intermediate map. Here the backward passes recompute what they need
  from the inputs, chunk by chunk, and only the inputs, the handed-over map and per-channel
  BatchNorm statistics are saved.
- Even the handed-over maps are kept only every other block. A map whose own input map is kept
  (or that has none) carries a recipe, its block's q, k and that input map; its consumers save the
  recipe instead of the map, and rebuild it in backward with the same kernel, bit for bit. In
  Refiner-ViT that halves the maps kept for backward (8 × 256 MB at batch 16 and 384²).

Operations:

``attention_handover(q, k, v, prev, scale)``: an attention block of Refiner-ViT,
    A = softmax(q·kᵀ·s) [+ s·prev],  out = A @ v;  returns (out, A). A is handed on (it must exist
    anyway); softmax(q·kᵀ·s) is recomputed in backward instead of being stored, and so is A's
    contribution to dL/dv where A is a recomputed map (above).

``refine_aggregate(attn, v, refine, norm, scale)``: a refining block's map and its aggregation,
    out = (scale · norm(DLA(attn))) @ v, with the authors' inverted-residual DLA
    (1×1 expansion, BN, ReLU6, k×k depthwise, BN, ReLU6, 1×1 reduction, BN, + attn). Training
    BatchNorms use batch statistics, which couple all samples: the forward takes one cache-sized
    pass per statistic, and the backward applies BatchNorm's backward in closed form from
    per-channel sums, in three passes: the post norm's and the reduction's BatchNorms share the
    first (the reduction's input gradient is affine in that pass's quantities). The expansion's
    statistics need no pass over the expanded maps: for q = W·a, mean(q) = W·μ_a and
    var(q) = diag(W·Σ_a·Wᵀ).

``gelu_linear(h, w, b)``: the end of an MLP, fc2(gelu(h)), saving h but not gelu(h).

Everything else (other DLA forms, dropout on the maps, TorchScript, torch.compile) takes the plain
autograd path.
"""
import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .norm import recomputing

__all__ = ['CHUNK_BYTES', 'attention_handover', 'eager_mode', 'forget_recipe', 'gelu_linear', 'kernels_apply',
           'refine_aggregate']

# Work is split into chunks of whole samples whose largest temporary (for a refining block, its
# expanded maps, r·H·N²·4 bytes per sample) stays near CHUNK_BYTES. On a CPU that keeps each pass
# in cache: one Refiner-ViT-S sample at 224² (5.6 MB) measured fastest, against 2, 4 and 16; small
# models take many samples per chunk, so that per-operation overhead does not dominate. A GPU wants
# large launches; chunks there only bound the temporary memory.
CHUNK_BYTES = {'cpu': 6 << 20}
DEFAULT_CHUNK_BYTES = 1 << 30

Tensor = torch.Tensor


def _spans(t: Tensor, n: int, per_item_elements: int) -> List[Tuple[int, int]]:
    """[start, end) ranges over n items, each with ``per_item_elements`` values of t's dtype in
    temporaries, that keep those temporaries near the chunk budget of t's device."""
    budget = CHUNK_BYTES.get(t.device.type, DEFAULT_CHUNK_BYTES)
    step = max(1, budget // max(per_item_elements * t.element_size(), 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _chunks(t: Tensor, per_sample_elements: Optional[int] = None) -> List[Tuple[int, int]]:
    """Sample ranges of a batch ``t`` whose per-sample temporaries hold ``per_sample_elements``
    values (default: one sample of t)."""
    return _spans(t, t.shape[0], per_sample_elements or t[0].numel())


def _blocks(t: Tensor, per_row_elements: int) -> List[Tuple[int, int, int, int]]:
    """``(i, j, r0, r1)``: samples i..j and query rows r0..r1 of maps t (B, H, N, ·) whose work
    holds ``per_row_elements`` values of temporaries per sample and row: chunks of whole samples,
    cut into slabs of rows only where one sample outgrows the budget (larger inputs)."""
    N = t.shape[2]
    return [(i, j, r0, r1) for i, j in _chunks(t, per_row_elements * N)
            for r0, r1 in _spans(t, N, (j - i) * per_row_elements)]


def _halo(r0: int, r1: int, pad: int, n: int) -> Tuple[int, int]:
    """The rows a k×k convolution (k = 2·pad + 1) reads to produce rows r0..r1 of n."""
    return max(r0 - pad, 0), min(r1 + pad, n)


def _without_autocast(backward):
    """Run a Function's backward in the float32 its forward computed in, even when ``backward()``
    is called inside an autocast region (whose casts would mix dtypes in the kernels)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next(g.device.type for g in grads if g is not None)
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return run


_is_fx_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


def eager_mode(*tensors: Optional[Tensor]) -> bool:
    """Not under TorchScript, tracing, torch.compile / torch.export or torch.fx (which take the modules'
    reference code)."""
    return (not torch.jit.is_scripting() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not _is_fx_tracing()
            and not any(isinstance(t, torch.fx.Proxy) for t in tensors))


def kernels_apply(*tensors: Optional[Tensor]) -> bool:
    """Whether the eager kernels can run: in eager mode, on floating-point inputs."""
    return eager_mode(*tensors) and all(t is None or t.is_floating_point() for t in tensors)


def _float32(*tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    """The kernels compute in float32 or float64 (BatchNorm statistics need it); under autocast,
    half-precision inputs are cast up and the outputs stay float32."""
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


# --------------------------------------------------------------------------------------------
# attention block: A = softmax(q·kᵀ·s) [+ s·prev], out = A @ v
# --------------------------------------------------------------------------------------------

def attention_handover(q: Tensor, k: Tensor, v: Optional[Tensor], prev: Optional[Tensor], scale: float
                       ) -> Tuple[Optional[Tensor], Tensor]:
    """Returns ``(A @ v, A)`` with A = softmax(q·kᵀ·scale) + scale·prev (no hand-over when prev is
    None); q, k, v (B, H, N, d). With ``v=None`` only A is computed."""
    q, k, v, prev = _float32(q, k, v, prev)
    with torch.autocast(q.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, prev)):
            # maps alternate between kept and recomputed along a chain of hand-overs
            recompute = prev is None or _recipe(prev) is None
            if v is None:
                out, attn = None, _AttentionMap.apply(q, k, prev, scale)
            else:
                out, attn = _AttentionHandover.apply(q, k, v, prev, scale, recompute)
            if recompute:
                setattr(attn, _RECIPE, _Recipe(q.detach(), k.detach(), None if prev is None else prev.detach(), scale,
                                               attn._version))
            return out, attn
        with torch.no_grad():
            return _attention_forward(q, k, v, prev, scale)


_RECIPE = '_refiner_recipe'  # attribute of a handed-over map that its consumers may rebuild


class _Recipe(NamedTuple):
    """How to rebuild a handed-over map A = softmax(q·kᵀ·scale) [+ scale·prev] in backward."""
    q: Tensor
    k: Tensor
    prev: Optional[Tensor]
    scale: float
    version: int  # A's version counter when it was made

    def rebuild(self) -> Tensor:
        return _attention_forward(self.q, self.k, None, self.prev, self.scale)[1]


def _recipe(attn: Tensor) -> Optional[_Recipe]:
    recipe = getattr(attn, _RECIPE, None)
    # a map changed in place since it was made is no longer what its recipe rebuilds: keep it instead
    return recipe if recipe is not None and recipe.version == attn._version else None


def forget_recipe(attn: Tensor) -> None:
    """Drop the recipe of a handed-over map, for callers that keep the map anyway (a checkpointed
    block keeps its inputs); there the recipe would only hold its block's q and k."""
    if hasattr(attn, _RECIPE):
        delattr(attn, _RECIPE)


def _attention_forward(q: Tensor, k: Tensor, v: Optional[Tensor], prev: Optional[Tensor], scale: float
                       ) -> Tuple[Optional[Tensor], Tensor]:
    B, H, N, d = q.shape
    M = k.shape[2]
    attn = q.new_empty(B, H, N, M)
    out = q.new_empty(B, H, N, v.shape[3]) if v is not None else None
    for i, j, r0, r1 in _blocks(q, H * M):
        rows = (slice(i, j), slice(None), slice(r0, r1))
        logits = torch.matmul(q[rows] * scale, k[i:j].transpose(-2, -1))  # (b, H, rows, M)
        if prev is None and r1 - r0 == N:
            torch._softmax(logits, -1, False, out=attn[rows])  # straight into the handed-on map
        else:  # in place, then one write of A (_softmax's out= ignores a slab's strides, pytorch#75923)
            p = torch._softmax(logits, -1, False, out=logits)
            if prev is None:
                attn[rows] = p
            else:
                torch.add(p, prev[rows], alpha=scale, out=attn[rows])
        if out is not None:
            torch.matmul(attn[rows], v[i:j], out=out[rows])
    return out, attn


def _attention_backward(q: Tensor, k: Tensor, v: Optional[Tensor], prev: Optional[Tensor], attn: Optional[Tensor],
                        has_prev: bool, scale: float, grad_out: Optional[Tensor], grad_attn: Optional[Tensor]):
    """Gradients of A = softmax(q·kᵀ·s) [+ s·prev] and A @ v. dL/dv reads A's rows from ``attn``, or
    where it was not kept, from the recomputed softmax and ``prev``; ``has_prev``: A had a prev."""
    B, H, N, d = q.shape
    M = k.shape[2]
    # dL/dk and dL/dv sum over row slabs: the first slab writes them (beta=0), later ones add
    grad_q, grad_k = torch.empty_like(q), k.new_empty(k.shape)
    grad_v = v.new_empty(v.shape) if v is not None and grad_out is not None else None
    grad_prev = q.new_empty(B, H, N, M) if has_prev else None
    for i, j, r0, r1 in _blocks(q, 2 * H * M):
        b = j - i
        rows, R, beta = (slice(i, j), slice(None), slice(r0, r1)), r1 - r0, int(r0 > 0)
        qs = q[rows] * scale  # (b, H, R, d)
        p = torch.matmul(qs, k[i:j].transpose(-2, -1)).softmax(dim=-1)  # recomputed, not stored
        if grad_v is not None:
            g_out = grad_out[rows].reshape(b * H, R, -1)
            v_c = v[i:j].reshape(b * H, M, -1)
            if grad_attn is not None:  # dL/dA: from the blocks A was handed to, and from A @ v
                g = torch.baddbmm(grad_attn[rows].reshape(b * H, R, M), g_out, v_c.transpose(1, 2))
            else:
                g = torch.bmm(g_out, v_c.transpose(1, 2))
            g = g.view(b, H, R, M)
            if attn is not None:
                a_rows = attn[rows]
            else:  # A's rows, rebuilt
                a_rows = p if prev is None else torch.add(p, prev[rows], alpha=scale)
            grad_v[i:j].view(b * H, M, -1).baddbmm_(a_rows.reshape(b * H, R, M).transpose(1, 2), g_out, beta=beta)
        else:
            g = grad_attn[rows] if grad_attn is not None else p.new_zeros(b, H, R, M)
        if grad_prev is not None:
            torch.mul(g, scale, out=grad_prev[rows])
        g = torch._softmax_backward_data(g, p, -1, p.dtype)  # dL/dlogits
        torch.matmul(g, k[i:j], out=grad_q[rows]).mul_(scale)
        grad_k[i:j].view(b * H, M, d).baddbmm_(g.view(b * H, R, M).transpose(1, 2), qs.reshape(b * H, R, d),
                                               beta=beta)
    return grad_q, grad_k, grad_v, grad_prev


class _AttentionHandover(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, prev, scale, recompute):
        out, attn = _attention_forward(q, k, v, prev, scale)
        ctx.scale, ctx.has_prev = scale, prev is not None
        # dL/dv needs A: kept where A is, else rebuilt from prev (a kept map) row by row
        ctx.save_for_backward(q, k, v, prev if recompute else None, None if recompute else attn)
        return out, attn

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out, grad_attn):
        q, k, v, prev, attn = ctx.saved_tensors
        gq, gk, gv, gp = _attention_backward(q, k, v, prev, attn, ctx.has_prev, ctx.scale, grad_out, grad_attn)
        return gq, gk, gv, gp, None, None


class _AttentionMap(torch.autograd.Function):
    """A alone (its block aggregates a refined map): its backward needs neither A nor prev."""

    @staticmethod
    def forward(ctx, q, k, prev, scale):
        _, attn = _attention_forward(q, k, None, prev, scale)
        ctx.scale, ctx.has_prev = scale, prev is not None
        ctx.save_for_backward(q, k)
        return attn

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_attn):
        q, k = ctx.saved_tensors
        gq, gk, _, gp = _attention_backward(q, k, None, None, None, ctx.has_prev, ctx.scale, None, grad_attn)
        return gq, gk, gp, None


# --------------------------------------------------------------------------------------------
# refining block: out = (scale · norm(DLA(attn))) @ v
# --------------------------------------------------------------------------------------------

def refine_aggregate(attn: Tensor, v: Tensor, refine: nn.Module, norm: nn.Module, scale: float
                     ) -> Optional[Tensor]:
    """``(scale · norm(refine(attn))) @ v`` for attn (B, H, N, N) and v (B, H, N, d), or None where
    no kernel applies (then the caller computes it plainly)."""
    if torch.is_grad_enabled() and (attn.requires_grad or v.requires_grad or refine.training):
        if not _training_kernel_applies(refine, norm):
            return None
        attn, v = _float32(attn, v)
        with torch.autocast(attn.device.type, enabled=False):
            return _refine_aggregate_train(attn, v, refine, norm, scale)
    if refine.training or (isinstance(norm, nn.BatchNorm2d) and norm.training):
        return None  # training-mode batch statistics couple the samples
    with torch.no_grad():
        out = v.new_empty(v.shape)
        B, H, N, M = attn.shape
        E, halo = refine.expanded_heads, refine.kernel_size // 2
        v = v * scale if scale != 1.0 else v  # (s·R) @ v = R @ (s·v): scale the small operand
        for i, j, r0, r1 in _blocks(attn, E * M):
            # rows r0..r1 of the refined map, from the input rows its k×k convolution reaches
            lo, hi = _halo(r0, r1, halo, N)
            refined = norm(refine(attn[i:j, :, lo:hi]))[:, :, r0 - lo:r1 - lo]  # (b, H, r1 - r0, M)
            out[i:j, :, r0:r1] = torch.matmul(refined, v[i:j])
        return out


def _is_train_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and m.training and m.track_running_stats and m.affine
            and m.momentum is not None and m.running_mean is not None)


def _training_kernel_applies(refine: nn.Module, norm: nn.Module) -> bool:
    return (getattr(refine, 'mode', None) == 'inverted_residual' and not refine.fused and refine.training
            and refine.residual_scale is None and refine.expand.bias is None and refine.local.bias is None
            and refine.reduce.bias is None and isinstance(refine.act, nn.ReLU6)
            and all(_is_train_bn(m) for m in (refine.expand_norm, refine.local_norm, refine.reduce_norm))
            and (isinstance(norm, nn.Identity) or _is_train_bn(norm)))


class _BN:
    """One training BatchNorm: parameters, eps, momentum, running buffers."""

    def __init__(self, m: nn.BatchNorm2d) -> None:
        self.eps, self.momentum = m.eps, m.momentum
        self.running_mean, self.running_var = m.running_mean, m.running_var


def _refine_aggregate_train(attn: Tensor, v: Tensor, refine: nn.Module, norm: nn.Module, scale: float) -> Tensor:
    bns = [refine.expand_norm, refine.local_norm, refine.reduce_norm]
    if isinstance(norm, nn.BatchNorm2d):
        bns.append(norm)
    update = not recomputing()  # a checkpointed block's recomputation counts no batch twice
    if update:
        for m in bns:
            m.num_batches_tracked.add_(1)
    post_w = norm.weight if len(bns) == 4 else None
    post_b = norm.bias if len(bns) == 4 else None
    meta = (tuple(_BN(m) for m in bns), scale, refine.kernel_size // 2, update, _recipe(attn))
    return _RefineAggregate.apply(
        meta, attn, v, refine.expand.weight, refine.expand_norm.weight, refine.expand_norm.bias,
        refine.local.weight, refine.local_norm.weight, refine.local_norm.bias,
        refine.reduce.weight, refine.reduce_norm.weight, refine.reduce_norm.bias, post_w, post_b)


# chain pieces; expanded maps are channels-last, (b, E, N, M) with E the fastest dimension

def _expand(a: Tensor, w1: Tensor, s1: Tensor, h1: Tensor) -> Tensor:
    """BN1(W1·a) as the affine (s1, h1): (b, H, N, M) -> (b, E, N, M) channels-last."""
    b, H, N, M = a.shape
    z = F.linear(a.flatten(2).transpose(1, 2), w1 * s1[:, None], h1)  # (b, N·M, E)
    return z.view(b, N, M, -1).permute(0, 3, 1, 2)


def _rows(t: Tensor) -> Tensor:
    """A channels-last (b, C, N, M) map as a (b·N·M, C) matrix, a view."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _col_sums(x: Tensor) -> Tensor:
    """Per-channel sums of a (P, C) matrix, as a product with ones (faster than a reduction here)."""
    return torch.mv(x.t(), x.new_ones(x.shape[0])).double()


def _col_dots(x: Tensor, y: Tensor) -> Tensor:
    """Per-channel Σ x·y of two (P, C) matrices."""
    return _col_sums(x * y)


def _reduce_into(u: Tensor, w3: Tensor, out: Tensor) -> Tensor:
    """The 1×1 reduction (H, E) of channels-last u (b, E, N, M), written head-major into out (b, H, N, M)."""
    b, E, N, M = u.shape  # N: the rows of a slab
    x = u.permute(0, 2, 3, 1).reshape(b, N * M, E)
    return torch.bmm(w3.expand(b, -1, -1), x.transpose(1, 2), out=out.view(b, -1, N * M)).view(out.shape)


def _mean_var(s: Tensor, ss: Tensor, n: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance from float64 sums and sums of squares."""
    mean = s / n
    return mean.to(dtype), (ss / n - mean * mean).clamp_min(0).to(dtype)


def _input_stats(a: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-head mean μ (H,) and covariance Σ (H, H) of the input maps over batch and positions."""
    B, H = a.shape[:2]
    n = a.numel() // H
    total = torch.zeros(H, dtype=torch.float64, device=a.device)
    gram = torch.zeros(H, H, dtype=torch.float64, device=a.device)
    for i, j in _chunks(a):
        x = a[i:j].reshape(j - i, H, -1)
        total += x.sum((0, 2), dtype=torch.float64)
        gram += torch.matmul(x, x.transpose(1, 2)).sum(0, dtype=torch.float64)
    mu = total / n
    return mu.to(a.dtype), (gram / n - torch.outer(mu, mu)).to(a.dtype)


def _affine(gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with fixed statistics as y = s·x + h; also returns 1/σ."""
    inv_std = torch.rsqrt(var + eps)
    s = gamma * inv_std
    return s, beta - mean * s, inv_std


def _bn_backward_affine(s: Tensor, mean: Tensor, inv_std: Tensor, sum_g: Tensor, sum_gx: Tensor, n: int
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchNorm's backward in closed form. For y = γ·x̂ + β over n positions, with Σg and Σg·x:
    dβ = Σg, dγ = Σg·x̂ and dx = s·(g - Σg/n - x̂·dγ/n) = s·g + c1·x + c0. Returns dγ, dβ, c1, c0."""
    dgamma = (sum_gx - mean * sum_g) * inv_std
    c1 = -s * dgamma * inv_std / n
    c0 = -s * sum_g / n - c1 * mean
    return dgamma, sum_g, c1, c0


def _col(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _head_sums(x: Tensor, *ys: Tensor) -> Tensor:
    """Per-head Σx and Σx·y for each y (Σx² without ys) of head-major (b, H, N, M) maps, as a
    (1 + len(ys), H) float64 tensor (float32 within a chunk, float64 across chunks)."""
    x = x.flatten(2)
    return torch.stack([x.sum((0, 2))] + [(x * y.flatten(2)).sum((0, 2)) for y in ys or (x,)]).double()


class _RefineAggregate(torch.autograd.Function):
    """out = (s · BN_a(BN3(W3·relu6(BN2(dw(relu6(BN1(W1·a)))))) + a)) @ v, training BatchNorms.

    Symbols: z = BN1(W1·a) (pre-activation), t1 = relu6(z), p2 = dw(t1), y2 = BN2(p2), u = relu6(y2),
    o = W3·u, r = BN3(o) + a, refined = s·BN_a(r). E = r·H expanded heads.
    """

    @staticmethod
    def forward(ctx, meta, a, v, w1, g1, b1, w2, g2, b2, w3, g3, b3, ga, ba):
        bns, scale, pad, update, recipe = meta
        B, H, N, M = a.shape
        n = B * N * M
        E = w1.shape[0]
        w1m, w3m = w1.reshape(E, H), w3.reshape(H, E)
        chunks = _chunks(a, E * N * M)
        blocks = _blocks(a, E * M)  # chunks of samples, cut into slabs of rows at large inputs
        # BN1: statistics of W1·a from the input's covariance (no pass over expanded maps)
        mu, cov = _input_stats(a)
        mean1 = w1m @ mu
        var1 = ((w1m @ cov) * w1m).sum(1).clamp_min(0)
        s1, h1, _ = _affine(g1, b1, mean1, var1, bns[0].eps)
        # pass 1: BN2's statistics
        sums = torch.zeros(2, E, dtype=torch.float64, device=a.device)
        for i, j, r0, r1 in blocks:
            lo, hi = _halo(r0, r1, pad, N)  # input rows of output rows r0..r1
            t1 = F.hardtanh_(_expand(a[i:j, :, lo:hi], w1m, s1, h1), 0., 6.)
            p2 = _rows(F.conv2d(t1, w2, None, padding=pad, groups=E)[:, :, r0 - lo:r1 - lo])
            sums[0] += _col_sums(p2)
            sums[1] += _col_dots(p2, p2)
        mean2, var2 = _mean_var(sums[0], sums[1], n, a.dtype)
        s2, h2, _ = _affine(g2, b2, mean2, var2, bns[1].eps)
        # pass 2: the reduced maps o and BN3's statistics
        o = torch.empty_like(a)
        w2s = w2 * s2.view(-1, 1, 1, 1)
        sums = torch.zeros(2, H, dtype=torch.float64, device=a.device)
        for i, j, r0, r1 in blocks:
            lo, hi = _halo(r0, r1, pad, N)
            t1 = F.hardtanh_(_expand(a[i:j, :, lo:hi], w1m, s1, h1), 0., 6.)
            u = F.hardtanh_(F.conv2d(t1, w2s, h2, padding=pad, groups=E)[:, :, r0 - lo:r1 - lo], 0., 6.)
            sums += _head_sums(_reduce_into(u, w3m, o[i:j, :, r0:r1]))
        mean3, var3 = _mean_var(sums[0], sums[1], n, a.dtype)
        s3, h3, _ = _affine(g3, b3, mean3, var3, bns[2].eps)
        stats = [(mean1, var1), (mean2, var2), (mean3, var3)]
        # pass 3: r0 = s3·o + a = r - h3 (BN3's shift is folded into the constants below), in o's
        # memory, and the post norm's statistics
        sums = torch.zeros(2, H, dtype=torch.float64, device=a.device)
        for i, j in chunks:
            r0 = torch.addcmul(a[i:j], o[i:j], _col(s3), out=o[i:j])
            if ga is not None:
                sums += _head_sums(r0)
        if ga is not None:
            mean_r0, var_a = _mean_var(sums[0], sums[1], n, a.dtype)
            mean_a = mean_r0 + h3
            sa, ha, _ = _affine(ga, ba, mean_a, var_a, bns[3].eps)
            sa, ha = sa * scale, ha * scale
            stats.append((mean_a, var_a))
        else:
            sa, ha = torch.full_like(s3, scale), torch.zeros_like(h3)
        ha = ha + sa * h3  # refined = sa·r + ha = sa·r0 + (ha + sa·h3)
        # pass 4: aggregate v with the refined map
        out = v.new_empty(v.shape)
        for i, j, r0, r1 in _blocks(a, H * M):
            rows = (slice(i, j), slice(None), slice(r0, r1))
            torch.matmul(torch.addcmul(_col(ha), o[rows], _col(sa)), v[i:j], out=out[rows])
        del o
        if update:
            for bn, (mean, var) in zip(bns, stats):
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var * (n / max(n - 1, 1)), bn.momentum)
        # a map that carries a recipe is rebuilt in backward instead of being kept
        ctx.meta = meta[:3]
        ctx.recipe_args = None if recipe is None else (recipe.scale, recipe.version)
        kept = (a, None, None) if recipe is None else (None, recipe.q, recipe.k)
        ctx.save_for_backward(*kept, None if recipe is None else recipe.prev, v, w1, g1, b1, w2, g2, b2,
                              w3, g3, b3, ga, ba, mu, cov, *(t for pair in stats for t in pair))
        return out

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out):
        bns, scale, pad = ctx.meta
        a, q, k, prev, v, w1, g1, b1, w2, g2, b2, w3, g3, b3, ga, ba, mu, cov, *stats = ctx.saved_tensors
        if a is None:
            a = _Recipe(q, k, prev, *ctx.recipe_args).rebuild()
        mean1, var1, mean2, var2, mean3, var3 = stats[:6]
        B, H, N, M = a.shape
        n = B * N * M
        E = w1.shape[0]
        dt = a.dtype
        w1m, w3m = w1.reshape(E, H), w3.reshape(H, E)
        chunks = _chunks(a, E * N * M)
        blocks = _blocks(a, E * M)
        s1, h1, inv1 = _affine(g1, b1, mean1, var1, bns[0].eps)
        s2, h2, inv2 = _affine(g2, b2, mean2, var2, bns[1].eps)
        s3, h3, inv3 = _affine(g3, b3, mean3, var3, bns[2].eps)
        if ga is not None:
            mean_a, var_a = stats[6:8]
            sa, ha, inva = _affine(ga, ba, mean_a, var_a, bns[3].eps)
        else:
            sa, ha = torch.ones_like(s3), torch.zeros_like(h3)

        def chain(i: int, j: int, r0: int, r1: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
            """Recompute samples i..j: z = BN1(W1·a) and t1 = relu6(z) as channels-last maps of the
            rows lo.. that the local convolution reads, then p2 = dw(t1) and y2 = BN2(p2) of rows
            r0..r1 as (P, E) rows. Returns z, t1, p2, y2, lo."""
            lo, hi = _halo(r0, r1, pad, N)
            z = _expand(a[i:j, :, lo:hi], w1m, s1, h1)
            t1 = F.relu6(z)
            p2 = _rows(F.conv2d(t1, w2, None, padding=pad, groups=E)[:, :, r0 - lo:r1 - lo])
            return z, t1, p2, torch.addcmul(h2, p2, s2), lo

        def reduced(u: Tensor, i: int, j: int, r0: int, r1: int) -> Tuple[Tensor, Tensor]:
            """o = W3·u of rows (P, E) = ((j - i)·(r1 - r0)·M, E) as head-major (b, H, R, M) maps, and
            r - h3 = s3·o + a there (BN3's shift h3 is folded into the constants that use r)."""
            b, R = j - i, r1 - r0
            o = _reduce_into(u.view(b, R, M, E).permute(0, 3, 1, 2), w3m, a.new_empty(b, H, R, M))
            return o, torch.addcmul(a[i:j, :, r0:r1], o, _col(s3))

        # pass 1: dL/dv; g = dL/d(refined map); the post norm's sums, and BN3's: dL/dr = c0 + c1·r + s·g
        # is affine in quantities of this pass, so its sums Σ dL/dr and Σ dL/dr·o are too (o is not kept)
        g = torch.empty_like(a)  # dL/d(refined), then dL/do (pass 2), in place
        grad_v = v.new_empty(v.shape)  # contiguous: row slabs accumulate into it
        sums = torch.zeros(5, H, dtype=torch.float64, device=a.device)
        refined_shift, refined_scale = _col((ha + sa * h3) * scale), _col(sa * scale)  # refined = these·r0
        for i, j, r0, r1 in blocks:
            b, R = j - i, r1 - r0
            rows = (slice(i, j), slice(None), slice(r0, r1))
            o, r0_map = reduced(F.hardtanh_(chain(i, j, r0, r1)[3], 0., 6.), i, j, r0, r1)
            refined = torch.addcmul(refined_shift, r0_map, refined_scale)
            # dL/dv sums over row slabs: the first writes it (beta=0), later ones add
            grad_v[i:j].view(b * H, M, -1).baddbmm_(refined.view(b * H, R, M).transpose(1, 2),
                                                    grad_out[rows].reshape(b * H, R, -1), beta=int(r0 > 0))
            gm = torch.matmul(grad_out[rows], v[i:j].transpose(-2, -1), out=g[rows])
            sums[0:3] += _head_sums(gm, r0_map, o)  # Σg, Σg·r0, Σg·o
            sums[3:5] += _head_sums(o, r0_map)  # Σo, Σo·r0
        S_g, S_gr0, S_go, S_o, S_or0 = sums
        S_r0 = s3.double() * S_o + n * mu.double()  # Σr0 = s3·Σo + Σa
        # closed-form BatchNorm backward, see _bn_backward_affine: dx = s·g + c1·x + c0
        sum_g, sum_gr = S_g.to(dt), (S_gr0 + h3.double() * S_g).to(dt)  # Σg·r = Σg·r0 + h3·Σg
        if ga is not None:  # refined = scale·(sa·r + ha)
            grad_ga, grad_ba, c1a, c0a = _bn_backward_affine(sa, mean_a, inva, sum_g, sum_gr, n)
            grad_ga, grad_ba = grad_ga * scale, grad_ba * scale
            sa_, c1a, c0a = sa * scale, c1a * scale, c0a * scale
        else:
            grad_ga = grad_ba = None
            sa_, c1a, c0a = torch.full_like(s3, scale), torch.zeros_like(s3), torch.zeros_like(s3)
        # dL/dr = c0r + c1a·r0 + sa_·g with c0r = c0 + c1·h3; BN3's sums from pass 1's
        c0r = c0a + c1a * h3
        k0, k1, k2 = (t.double() for t in (c0r, c1a, sa_))
        sum_dr = k0 * n + k1 * S_r0 + k2 * S_g
        sum_dro = k0 * S_o + k1 * S_or0 + k2 * S_go
        grad_g3, grad_b3, c1_3, c0_3 = _bn_backward_affine(s3, mean3, inv3, sum_dr.to(dt), sum_dro.to(dt), n)

        # pass 2: dL/dr (dL/da's residual term) and dL/do; through the reduction and ReLU6 to BN2's
        # output; W3's gradient; BN2's sums
        grad_a = torch.empty_like(a)
        grad_w3 = torch.zeros(H, E, dtype=dt, device=a.device)
        sums = torch.zeros(2, E, dtype=torch.float64, device=a.device)
        for i, j, r0, r1 in blocks:
            b = j - i
            rows = (slice(i, j), slice(None), slice(r0, r1))
            _, _, p2, y2, _ = chain(i, j, r0, r1)
            u = F.relu6(y2)
            o, r0_map = reduced(u, i, j, r0, r1)
            gr = torch.addcmul(torch.addcmul(_col(c0r), r0_map, _col(c1a)), g[rows], _col(sa_), out=grad_a[rows])
            go = torch.addcmul(torch.addcmul(_col(c0_3), o, _col(c1_3)), gr, _col(s3), out=g[rows])
            go = go.view(b, H, -1)
            grad_w3 += torch.matmul(go, u.view(b, -1, E)).sum(0)
            gu = torch.matmul(go.transpose(1, 2), w3m).view(-1, E)  # (P, E)
            gy = torch.ops.aten.hardtanh_backward(gu, y2, 0., 6.)
            sums[0] += _col_sums(gy)
            sums[1] += _col_dots(gy, p2)
        grad_g2, grad_b2, c1_2, c0_2 = _bn_backward_affine(s2, mean2, inv2, sums[0].to(dt), sums[1].to(dt), n)

        # pass 3: through BN2, the local convolution and ReLU6 to z; sums for BN1; dL/da's direct term
        grad_w2 = torch.zeros_like(w2)
        gram = torch.zeros(E, H, dtype=torch.float64, device=a.device)  # Σ dL/dz · aᵀ
        sum1 = torch.zeros(E, dtype=torch.float64, device=a.device)
        w1s = w1m * s1[:, None]
        for i, j, r0, r1 in blocks:
            b, R = j - i, r1 - r0
            # dL/dt1 of rows r0..r1 needs dL/dp2 of the rows e0..e1 that the convolution reaches
            e0, e1 = _halo(r0, r1, pad, N)
            z, t1, p2, y2, lo = chain(i, j, e0, e1)
            gu = torch.matmul(g[i:j, :, e0:e1].reshape(b, H, -1).transpose(1, 2), w3m).view(-1, E)  # (P, E)
            gy = torch.ops.aten.hardtanh_backward(gu, y2, 0., 6.)
            gp2 = torch.addcmul(torch.addcmul(c0_2, p2, c1_2), gy, s2, out=gy)  # dL/dp2
            gp2 = gp2.view(b, e1 - e0, M, E).permute(0, 3, 1, 2)
            t1 = t1[:, :, e0 - lo:e1 - lo]  # the rows e0..e1 that the convolution's weight sees
            conv_args = (w2, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], E)
            if (e0, e1) == (r0, r1):  # the whole map
                gt1, gw2, _ = torch.ops.aten.convolution_backward(gp2, t1, *conv_args, [True, True, False])
            else:  # the halo rows' own weight gradient belongs to the neighbouring slabs
                gt1 = torch.ops.aten.convolution_backward(gp2, t1, *conv_args, [True, False, False])[0]
                gp2[:, :, :r0 - e0].zero_()
                gp2[:, :, r1 - e0:].zero_()
                gw2 = torch.ops.aten.convolution_backward(gp2, t1, *conv_args, [False, True, False])[1]
            grad_w2 += gw2
            zr = z[:, :, r0 - lo:r1 - lo]
            gz = _rows(torch.ops.aten.hardtanh_backward(gt1[:, :, r0 - e0:r1 - e0], zr, 0., 6.)).view(b, -1, E)
            ac = a[i:j, :, r0:r1].reshape(b, H, -1)  # (b, H, R·M)
            gram += torch.matmul(gz.transpose(1, 2), ac.transpose(1, 2)).sum(0, dtype=torch.float64)
            sum1 += _col_sums(gz.reshape(-1, E))
            grad_a[i:j, :, r0:r1] += torch.matmul(w1s.t(), gz.transpose(1, 2)).view(b, H, R, M)
        del g
        # BN1 in closed form through q = W1·a: dq = s1·(g - S1/n - q̂·T1/n), T1 = Σ g·q̂, where
        # Σ g·q = diag(G·W1ᵀ) with G = Σ g·aᵀ, and Σ q̂·aᵀ = (n/σ1)·W1·Σ_a
        gram, sum1 = gram.to(dt), sum1.to(dt)
        t1_sum = ((gram * w1m).sum(1) - mean1 * sum1) * inv1
        grad_g1, grad_b1 = t1_sum, sum1
        grad_w1 = s1[:, None] * (gram - torch.outer(sum1, mu) - (t1_sum * inv1)[:, None] * (w1m @ cov))
        c = s1 * t1_sum * inv1 / n
        m_corr = w1m.t() @ (c[:, None] * w1m)  # (H, H)
        k_corr = w1m.t() @ (c * mean1 - s1 * sum1 / n)  # (H,)
        for i, j in chunks:
            ac = a[i:j].reshape(j - i, H, -1)
            grad_a[i:j] += (k_corr.view(1, H, 1) - torch.matmul(m_corr, ac)).view(j - i, H, N, M)
        return (None, grad_a, grad_v, grad_w1.view_as(w1), grad_g1, grad_b1, grad_w2, grad_g2, grad_b2,
                grad_w3.view_as(w3), grad_g3, grad_b3, grad_ga, grad_ba)


# --------------------------------------------------------------------------------------------
# MLP tail: out = fc2(gelu(h)), keeping h only (the GELU output is recomputed in backward)
# --------------------------------------------------------------------------------------------

def gelu_linear(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` that saves h but not gelu(h) for backward."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _GeluLinear.apply(h, weight, bias)
    return F.linear(F.gelu(h), weight, bias)


class _GeluLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.device = h.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device)
        ctx.save_for_backward(h, weight, bias)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias = ctx.saved_tensors
        with torch.autocast(ctx.device, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            act = F.gelu(h)  # recomputed
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_w = (g2.t() @ act.reshape(-1, act.shape[-1])).to(weight.dtype)
            grad_act = g2 @ weight.to(g2.dtype)
        grad_b = g2.sum(0).to(bias.dtype) if bias is not None else None
        grad_h = torch.ops.aten.gelu_backward(grad_act.view(h.shape).to(h.dtype), h)
        return grad_h, grad_w, grad_b
