"""A refining block's map and its aggregation: out = (s · BN_a(DLA(A))) @ v, in training and in eval.

The reference is :meth:`refiner.layers.RefinedAttention.refined_map` with the authors' inverted-
residual DLA (1×1 expansion, BN, ReLU6, k×k depthwise, BN, ReLU6, 1×1 reduction, BN, + A), whose
stages are :mod:`refiner.functional`'s; this kernel calls those stages tile by tile
(:mod:`refiner.kernels.tiling`), reading the k×k kernel's halo of rows around a slab.

Training BatchNorms use batch statistics, which couple all samples: the forward takes one
cache-sized pass per statistic, and the backward applies BatchNorm's backward in closed form from
per-channel sums, in three passes that recompute the chain from the input map (no expanded map is
stored): the post norm's and the reduction's BatchNorms share the first (the reduction's input
gradient is affine in that pass's quantities); its backward recomputes two rows of halo and counts
the local kernel's weight gradient once per row. The expansion's statistics need no pass over the
expanded maps: for q = W·a, mean(q) = W·μ_a and var(q) = diag(W·Σ_a·Wᵀ). Only the inputs, the
handed-over map (or its recipe, :mod:`refiner.kernels.handover`) and per-channel
statistics are saved.
"""
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import functional as RF
from . import tiling
from .handover import Recipe, recipe_of
from .tiling import float32, halo, result_dtype, without_autocast

__all__ = ['BatchNormState', 'refine_aggregate_eval', 'refine_aggregate_train']

Tensor = torch.Tensor


class BatchNormState(NamedTuple):
    """A training BatchNorm as the kernel uses it: its affine, running estimates (updated in place) and settings."""
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    momentum: float
    eps: float


class _LocalStage(NamedTuple):
    """The local convolution of the chain in the maps' token layout: raster order (``grid_size``
    None; it reads ``pad`` query rows around each row) or the keys' token grid."""
    grid_size: Optional[Tuple[int, int]]
    num_prefix_tokens: int
    pad: int

    def __call__(self, t: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if self.grid_size is None:
            return RF.local_conv(t, weight, bias)
        return RF.grid_conv(t, weight, bias, self.grid_size, self.num_prefix_tokens, dim=-1)

    def backward(self, grad: Tensor, t: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
        """dL/dt and dL/dweight of the grid convolution of one tile, by autograd on the tile."""
        with torch.enable_grad():
            t, weight = t.detach().requires_grad_(), weight.detach().requires_grad_()
            gt, gw = torch.autograd.grad(self(t, weight), (t, weight), grad)
        return gt, gw


def refine_aggregate_train(attn: Tensor, v: Tensor, expand_weight: Tensor, local_weight: Tensor,
                           reduce_weight: Tensor, norms: Sequence[BatchNormState], scale: float,
                           update_stats: bool = True, grid_size: Optional[Tuple[int, int]] = None,
                           num_prefix_tokens: int = 1) -> Tensor:
    """``(scale · BN_a(DLA(attn))) @ v`` with training BatchNorms, attn (B, H, N, N), v (B, H, N, d).

    ``norms``: the expansion's, the local stage's and the reduction's BatchNorms, then optionally
    the post norm BN_a. ``update_stats``: fold the batch statistics into the running estimates
    (False while a checkpointed forward is recomputed). ``grid_size``: the local convolution runs
    over the keys' token grid (spatial DLA, ``refiner.functional.grid_conv``) instead of in raster
    order; it mixes no query rows."""
    dtype = result_dtype(v)
    recipe = recipe_of(attn)
    # computed in float32 (or float64), half-precision parameters included; the statistics stay in their own dtype
    attn, v, expand_weight, local_weight, reduce_weight = float32(attn, v, expand_weight, local_weight, reduce_weight)
    affines = float32(*(t for bn in norms for t in (bn.weight, bn.bias)))
    pad = local_weight.shape[-1] // 2 if grid_size is None else 0  # query rows one output row reads around it
    local = _LocalStage(grid_size, num_prefix_tokens, pad)
    meta = (tuple(norms), scale, local, update_stats, recipe)
    post = affines[6:8] if len(norms) == 4 else (None, None)
    with torch.autocast(attn.device.type, enabled=False):
        out = _RefineAggregate.apply(meta, attn, v, expand_weight, *affines[0:2], local_weight, *affines[2:4],
                                     reduce_weight, *affines[4:6], *post)
    return out.to(dtype)


def refine_aggregate_eval(attn: Tensor, v: Tensor, refined_map: Callable[[Tensor], Tensor], halo_rows: int,
                          expanded_heads: int, scale: float) -> Tensor:
    """``(scale · refined_map(attn)) @ v`` without gradients, tile by tile: ``refined_map`` (any
    form of refinement, without training statistics) maps rows of attn to the same rows refined,
    reading ``halo_rows`` rows on either side; ``expanded_heads`` sizes its temporaries."""
    with torch.no_grad():
        out = v.new_empty(v.shape)
        B, H, N, M = attn.shape
        v = v * scale if scale != 1.0 else v  # (s·R) @ v = R @ (s·v): scale the small operand
        for i, j, r0, r1 in tiling.tiles(attn, expanded_heads * M):
            # rows r0..r1 of the refined map, from the input rows its k×k convolution reaches
            lo, hi = halo(r0, r1, halo_rows, N)
            refined = refined_map(attn[i:j, :, lo:hi])[:, :, r0 - lo:r1 - lo]  # (b, H, r1 - r0, M)
            out[i:j, :, r0:r1] = torch.matmul(refined, v[i:j])
        return out


class _RefineAggregate(torch.autograd.Function):
    """out = (s · BN_a(BN3(W3·relu6(BN2(dw(relu6(BN1(W1·a)))))) + a)) @ v, training BatchNorms.

    Symbols: z = BN1(W1·a) (pre-activation), t1 = relu6(z), p2 = dw(t1), y2 = BN2(p2), u = relu6(y2),
    o = W3·u, r = BN3(o) + a, refined = s·BN_a(r). E = r·H expanded heads.
    """

    @staticmethod
    def forward(ctx, meta, a, v, w1, g1, b1, w2, g2, b2, w3, g3, b3, ga, ba):
        bns, scale, local, update, recipe = meta
        pad = local.pad
        B, H, N, M = a.shape
        n = B * N * M
        E = w1.shape[0]
        w1m, w3m = w1.reshape(E, H), w3.reshape(H, E)
        sample_chunks = tiling.chunks(a, E * N * M)
        tiles = tiling.tiles(a, E * M)  # chunks of samples, cut into slabs of rows at large inputs
        # BN1: statistics of W1·a from the input's covariance (no pass over expanded maps)
        mu, cov = _input_stats(a)
        mean1 = w1m @ mu
        var1 = ((w1m @ cov) * w1m).sum(1).clamp_min(0)
        s1, h1, _ = _affine(g1, b1, mean1, var1, bns[0].eps)
        w1s = w1m * s1[:, None]  # BN1(W1·a) = (s1·W1)·a + h1
        # pass 1: BN2's statistics
        sums = torch.zeros(2, E, dtype=torch.float64, device=a.device)
        for i, j, r0, r1 in tiles:
            lo, hi = halo(r0, r1, pad, N)  # input rows of output rows r0..r1
            t1 = RF.activation(RF.expand(a[i:j, :, lo:hi], w1s, h1), inplace=True)
            p2 = _rows(local(t1, w2)[:, :, r0 - lo:r1 - lo])
            sums[0] += _col_sums(p2)
            sums[1] += _col_dots(p2, p2)
        mean2, var2 = _mean_var(sums[0], sums[1], n, a.dtype)
        s2, h2, _ = _affine(g2, b2, mean2, var2, bns[1].eps)
        # pass 2: the reduced maps o and BN3's statistics
        o = torch.empty_like(a)
        w2s = w2 * s2.view(-1, 1, 1, 1)
        sums = torch.zeros(2, H, dtype=torch.float64, device=a.device)
        for i, j, r0, r1 in tiles:
            lo, hi = halo(r0, r1, pad, N)
            t1 = RF.activation(RF.expand(a[i:j, :, lo:hi], w1s, h1), inplace=True)
            u = RF.activation(local(t1, w2s, h2)[:, :, r0 - lo:r1 - lo], inplace=True)
            sums += _head_sums(RF.reduce(u, w3m, out=o[i:j, :, r0:r1]))
        mean3, var3 = _mean_var(sums[0], sums[1], n, a.dtype)
        s3, h3, _ = _affine(g3, b3, mean3, var3, bns[2].eps)
        stats = [(mean1, var1), (mean2, var2), (mean3, var3)]
        # pass 3: r0 = s3·o + a = r - h3 (BN3's shift is folded into the constants below), in o's
        # memory, and the post norm's statistics
        sums = torch.zeros(2, H, dtype=torch.float64, device=a.device)
        for i, j in sample_chunks:
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
        for i, j, r0, r1 in tiling.tiles(a, H * M):
            rows = (slice(i, j), slice(None), slice(r0, r1))
            torch.matmul(torch.addcmul(_col(ha), o[rows], _col(sa)), v[i:j], out=out[rows])
        del o
        if update:
            for bn, (mean, var) in zip(bns, stats):
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), bn.momentum)
                bn.running_var.lerp_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), bn.momentum)
        # a map that carries a recipe is rebuilt in backward instead of being kept
        ctx.meta = meta[:3]
        ctx.recipe_args = None if recipe is None else (recipe.scale, recipe.version)
        kept = (a, None, None) if recipe is None else (None, recipe.q, recipe.k)
        ctx.save_for_backward(*kept, None if recipe is None else recipe.prev, v, w1, g1, b1, w2, g2, b2,
                              w3, g3, b3, ga, ba, mu, cov, *(t for pair in stats for t in pair))
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        bns, scale, local = ctx.meta
        pad = local.pad
        a, q, k, prev, v, w1, g1, b1, w2, g2, b2, w3, g3, b3, ga, ba, mu, cov, *stats = ctx.saved_tensors
        if a is None:
            a = Recipe(q, k, prev, *ctx.recipe_args).rebuild()
        mean1, var1, mean2, var2, mean3, var3 = stats[:6]
        B, H, N, M = a.shape
        n = B * N * M
        E = w1.shape[0]
        dt = a.dtype
        w1m, w3m = w1.reshape(E, H), w3.reshape(H, E)
        sample_chunks = tiling.chunks(a, E * N * M)
        tiles = tiling.tiles(a, E * M)
        s1, h1, inv1 = _affine(g1, b1, mean1, var1, bns[0].eps)
        w1s = w1m * s1[:, None]
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
            lo, hi = halo(r0, r1, pad, N)
            z = RF.expand(a[i:j, :, lo:hi], w1s, h1)
            t1 = RF.activation(z)
            p2 = _rows(local(t1, w2)[:, :, r0 - lo:r1 - lo])
            return z, t1, p2, torch.addcmul(h2, p2, s2), lo

        def reduced(u: Tensor, i: int, j: int, r0: int, r1: int) -> Tuple[Tensor, Tensor]:
            """o = W3·u of rows (P, E) = ((j - i)·(r1 - r0)·M, E) as head-major (b, H, R, M) maps, and
            r - h3 = s3·o + a there (BN3's shift h3 is folded into the constants that use r)."""
            b, R = j - i, r1 - r0
            o = RF.reduce(u.view(b, R, M, E).permute(0, 3, 1, 2), w3m, out=a.new_empty(b, H, R, M))
            return o, torch.addcmul(a[i:j, :, r0:r1], o, _col(s3))

        # pass 1: dL/dv; g = dL/d(refined map); the post norm's sums, and BN3's: dL/dr = c0 + c1·r + s·g
        # is affine in quantities of this pass, so its sums Σ dL/dr and Σ dL/dr·o are too (o is not kept)
        g = torch.empty_like(a)  # dL/d(refined), then dL/do (pass 2), in place
        grad_v = v.new_empty(v.shape)  # contiguous: row slabs accumulate into it
        sums = torch.zeros(5, H, dtype=torch.float64, device=a.device)
        refined_shift, refined_scale = _col((ha + sa * h3) * scale), _col(sa * scale)  # refined = these·r0
        for i, j, r0, r1 in tiles:
            b, R = j - i, r1 - r0
            rows = (slice(i, j), slice(None), slice(r0, r1))
            o, r0_map = reduced(RF.activation(chain(i, j, r0, r1)[3], inplace=True), i, j, r0, r1)
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
        for i, j, r0, r1 in tiles:
            b = j - i
            rows = (slice(i, j), slice(None), slice(r0, r1))
            _, _, p2, y2, _ = chain(i, j, r0, r1)
            u = RF.activation(y2)
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
        for i, j, r0, r1 in tiles:
            b, R = j - i, r1 - r0
            # dL/dt1 of rows r0..r1 needs dL/dp2 of the rows e0..e1 that the convolution reaches
            e0, e1 = halo(r0, r1, pad, N)
            z, t1, p2, y2, lo = chain(i, j, e0, e1)
            gu = torch.matmul(g[i:j, :, e0:e1].reshape(b, H, -1).transpose(1, 2), w3m).view(-1, E)  # (P, E)
            gy = torch.ops.aten.hardtanh_backward(gu, y2, 0., 6.)
            gp2 = torch.addcmul(torch.addcmul(c0_2, p2, c1_2), gy, s2, out=gy)  # dL/dp2
            gp2 = gp2.view(b, e1 - e0, M, E).permute(0, 3, 1, 2)
            t1 = t1[:, :, e0 - lo:e1 - lo]  # the rows e0..e1 that the convolution's weight sees
            conv_args = (w2, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], E)
            if local.grid_size is not None:  # the keys' grid: no halo rows
                gt1, gw2 = local.backward(gp2, t1, w2)
            elif (e0, e1) == (r0, r1):  # the whole map
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
        for i, j in sample_chunks:
            ac = a[i:j].reshape(j - i, H, -1)
            grad_a[i:j] += (k_corr.view(1, H, 1) - torch.matmul(m_corr, ac)).view(j - i, H, N, M)
        return (None, grad_a, grad_v, grad_w1.view_as(w1), grad_g1, grad_b1, grad_w2, grad_g2, grad_b2,
                grad_w3.view_as(w3), grad_g3, grad_b3, grad_ga, grad_ba)


# expanded maps are channels-last, (b, E, N, M) with E the fastest dimension

def _rows(t: Tensor) -> Tensor:
    """A channels-last (b, C, N, M) map as a (b·N·M, C) matrix, a view."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _col_sums(x: Tensor) -> Tensor:
    """Per-channel sums of a (P, C) matrix, as a product with ones (faster than a reduction here)."""
    return torch.mv(x.t(), x.new_ones(x.shape[0])).double()


def _col_dots(x: Tensor, y: Tensor) -> Tensor:
    """Per-channel Σ x·y of two (P, C) matrices."""
    return _col_sums(x * y)


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
    for i, j in tiling.chunks(a):
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


