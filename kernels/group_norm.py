"""Triton kernels of imer_fast::group_norm_film_silu and its backward (semantics:
imer_fast/ops/group_norm.py).

One program per (sample, group). x is made contiguous [B, C, S], so a group is a contiguous
[C/G, S] tile, held in registers as a [CPG, SB] block (powers of two, masked): statistics are
block reductions and the per-channel sums of the backward are row reductions — no atomics, and
dweight / dbias are reduced over the batch afterwards in index order (bitwise-repeatable).
"""
import torch
import triton
import triton.language as tl

MAX_GROUP = 16384


@triton.jit
def _tile(b, g, C, S, CPG: tl.constexpr, SB: tl.constexpr, cpg):
    rows = tl.arange(0, CPG)
    cols = tl.arange(0, SB)
    chan = g * cpg + rows
    mask = (rows[:, None] < cpg) & (cols[None, :] < S)
    offs = (b * C + chan)[:, None].to(tl.int64) * S + cols[None, :]
    return chan, mask, offs


@triton.jit
def _channel_params(w_ptr, bias_ptr, ib_ptr, sc_ptr, sh_ptr, b, chan, cmask, C,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr, HAS_SC: tl.constexpr,
                    HAS_SH: tl.constexpr, COMPUTE: tl.constexpr):
    w = tl.load(w_ptr + chan, mask=cmask, other=1.0).to(COMPUTE) if HAS_W else tl.full(chan.shape, 1.0, COMPUTE)
    bb = tl.load(bias_ptr + chan, mask=cmask, other=0.0).to(COMPUTE) if HAS_B else tl.zeros(chan.shape, COMPUTE)
    ib = tl.load(ib_ptr + b * C + chan, mask=cmask, other=0.0).to(COMPUTE) if HAS_IB else tl.zeros(chan.shape, COMPUTE)
    film = 1.0 + tl.load(sc_ptr + b * C + chan, mask=cmask, other=0.0).to(COMPUTE) if HAS_SC \
        else tl.full(chan.shape, 1.0, COMPUTE)
    sft = tl.load(sh_ptr + b * C + chan, mask=cmask, other=0.0).to(COMPUTE) if HAS_SH else tl.zeros(chan.shape, COMPUTE)
    return w, bb, ib, film, sft


@triton.jit
def _forward_kernel(x_ptr, w_ptr, bias_ptr, ib_ptr, sc_ptr, sh_ptr, y_ptr, mean_ptr, rstd_ptr, C, S, G, cpg, eps,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr, HAS_SC: tl.constexpr,
                    HAS_SH: tl.constexpr, SILU: tl.constexpr, COMPUTE: tl.constexpr, CPG: tl.constexpr,
                    SB: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    chan, mask, offs = _tile(b, g, C, S, CPG, SB, cpg)
    cmask = tl.arange(0, CPG) < cpg
    w, bb, ib, film, sft = _channel_params(w_ptr, bias_ptr, ib_ptr, sc_ptr, sh_ptr, b, chan, cmask, C, HAS_W, HAS_B,
                                           HAS_IB, HAS_SC, HAS_SH, COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE) + ib[:, None]
    n = cpg * S
    mu = tl.sum(tl.sum(tl.where(mask, x, 0.0), axis=1), axis=0) / n
    d = tl.where(mask, x - mu, 0.0)
    r = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / n + eps)
    f = (d * r * w[:, None] + bb[:, None]) * film[:, None] + sft[:, None]
    if SILU:
        f = f * (1.0 / (1.0 + tl.exp(-f)))
    tl.store(y_ptr + offs, f.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + bg, mu)
    tl.store(rstd_ptr + bg, r)


@triton.jit
def _backward_kernel(gy_ptr, x_ptr, w_ptr, bias_ptr, ib_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr,
                     B, C, S, G, cpg, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr,
                     HAS_SC: tl.constexpr, HAS_SH: tl.constexpr, SILU: tl.constexpr, NEED_DX: tl.constexpr,
                     COMPUTE: tl.constexpr, CPG: tl.constexpr, SB: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    chan, mask, offs = _tile(b, g, C, S, CPG, SB, cpg)
    cmask = tl.arange(0, CPG) < cpg
    w, bb, ib, film, sft = _channel_params(w_ptr, bias_ptr, ib_ptr, sc_ptr, sh_ptr, b, chan, cmask, C, HAS_W, HAS_B,
                                           HAS_IB, HAS_SC, HAS_SH, COMPUTE)
    mu = tl.load(mean_ptr + bg).to(COMPUTE)
    r = tl.load(rstd_ptr + bg).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    gf = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    xn = tl.where(mask, (x + ib[:, None] - mu) * r, 0.0)
    a = xn * w[:, None] + bb[:, None]
    if SILU:
        f = a * film[:, None] + sft[:, None]
        sg = 1.0 / (1.0 + tl.exp(-f))
        gf = gf * (sg * (1.0 + f * (1.0 - sg)))
    gf = tl.where(mask, gf, 0.0)
    ga = gf * film[:, None]
    gw = ga * w[:, None]
    plane = B * C
    pofs = b * C + chan
    tl.store(part_ptr + pofs, tl.sum(ga * xn, axis=1), mask=cmask)
    tl.store(part_ptr + plane + pofs, tl.sum(ga, axis=1), mask=cmask)
    tl.store(part_ptr + 3 * plane + pofs, tl.sum(gf * a, axis=1), mask=cmask)
    tl.store(part_ptr + 4 * plane + pofs, tl.sum(gf, axis=1), mask=cmask)
    if NEED_DX:
        n = cpg * S
        mean_g = tl.sum(tl.sum(gw, axis=1), axis=0) / n
        mean_gxn = tl.sum(tl.sum(gw * xn, axis=1), axis=0) / n
        dx = tl.where(mask, r * (gw - mean_g - xn * mean_gxn), 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + 2 * plane + pofs, tl.sum(dx, axis=1), mask=cmask)


def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(cpg, S):
    return triton.next_power_of_2(max(cpg, 1)), triton.next_power_of_2(max(S, 1))


def _warps(CPG, SB):
    """One warp per 512 elements of the group's tile, 4 to 16: compiled for sm_90, a 64 x 64 tile (the
    U-Net's 512 channels in 8 groups at length 48) spilled 96-408 bytes per thread with 4 warps, none with 8
    (tests/test_triton_compile.py)."""
    return max(4, min(16, CPG * SB // 512))


def _flags(weight, bias, input_bias, scale, shift):
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_IB=input_bias is not None,
                HAS_SC=scale is not None, HAS_SH=shift is not None)


def _args(x, *ts):
    return [t.contiguous() if t is not None else x for t in ts]


def group_norm_film_silu_forward(x, weight, bias, input_bias, scale, shift, num_groups, eps, apply_silu):
    x = x.contiguous()
    B, C = x.shape[0], x.shape[1]
    S = x.numel() // (B * C) if B * C else 0
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_empty(x.shape)  # canonical strides, as the fake's (empty_like keeps a size-1 dim's odd stride)
    mean = torch.empty((B, num_groups), dtype=stat, device=x.device)
    rstd = torch.empty_like(mean)
    if B * C * S:
        cpg = C // num_groups
        CPG, SB = _blocks(cpg, S)
        _forward_kernel[(B * num_groups,)](x, *_args(x, weight, bias, input_bias, scale, shift), y, mean, rstd, C, S,
                                           num_groups, cpg, float(eps), SILU=bool(apply_silu),
                                           COMPUTE=_compute(x.dtype), CPG=CPG, SB=SB, num_warps=_warps(CPG, SB),
                                           **_flags(weight, bias, input_bias, scale, shift))
    return y, mean, rstd


def group_norm_film_silu_backward(grad_y, x, weight, bias, input_bias, scale, shift, mean, rstd, num_groups,
                                  apply_silu, output_mask):
    x, grad_y = x.contiguous(), grad_y.contiguous()
    B, C = x.shape[0], x.shape[1]
    S = x.numel() // (B * C) if B * C else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    present = [True] + [t is not None for t in (weight, bias, input_bias, scale, shift)]
    want = [bool(m) and p for m, p in zip(output_mask, present)]
    need_dx = want[0] or want[3]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    part = torch.zeros((5, B, C), dtype=acc, device=x.device)
    if B * C * S:
        cpg = C // num_groups
        CPG, SB = _blocks(cpg, S)
        _backward_kernel[(B * num_groups,)](grad_y, x, *_args(x, weight, bias, input_bias, scale, shift), mean.contiguous(),
                                            rstd.contiguous(), dx if need_dx else x, part, B, C, S, num_groups, cpg,
                                            SILU=bool(apply_silu), NEED_DX=need_dx, COMPUTE=_compute(x.dtype),
                                            CPG=CPG, SB=SB, **_flags(weight, bias, input_bias, scale, shift),
                                            num_warps=_warps(CPG, SB))
    empty = x.new_empty(0)
    return (dx if want[0] else empty,
            part[0].sum(0).to(x.dtype) if want[1] else empty,
            part[1].sum(0).to(x.dtype) if want[2] else empty,
            part[2].to(x.dtype, copy=True).view(input_bias.shape) if want[3] else x.new_empty(0),
            part[3].to(x.dtype, copy=True).view(scale.shape) if want[4] else x.new_empty(0),
            part[4].to(x.dtype, copy=True).view(shift.shape) if want[5] else x.new_empty(0))
