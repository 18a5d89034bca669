"""Triton kernels of ``imer_fast::stable_layer_norm`` and ``imer_fast::stable_layer_norm_backward``.

LayerNorm over the last dimension of ``x`` viewed as ``[M, N]`` rows, optionally "stable" (each row
first divided by its row maximum ``a``, a constant for the backward; ``a = 1`` when not stable):

- forward: one program per ``BLOCK_M`` rows, ``BLOCK_N = next_power_of_2(N)`` so a whole row sits in
  registers; row max, two-pass mean / variance, normalise, affine, and the statistics
  ``(mean, rstd, row_max)`` stored for the backward;
- backward: each program walks ``BLOCKS_PER_PROGRAM`` row blocks, writes ``dx`` row by row and keeps
  running column sums of ``grad_y * xn`` (dweight) and ``grad_y`` (dbias) that it stores into its own
  row of a partial buffer; the partials are then summed by ``torch.sum`` over a fixed shape, so the
  results are bitwise repeatable (no atomics).

``x`` and ``grad_y`` are read through their strides (any layout that flattens to ``[M, N]`` without a
copy; other layouts are copied by ``reshape``); ``y`` and ``dx`` are fresh contiguous tensors of x's
shape and dtype; statistics are contiguous ``[x.shape[:-1]]`` float32 (float64 for float64 x).
fp16 / bf16 / fp32 are computed in fp32 (IEEE-rounded division and square root), fp64 in fp64.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["stable_layer_norm_forward", "stable_layer_norm_backward", "MAX_N"]

_OP = "imer_fast::stable_layer_norm (triton): "
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Largest row held in registers by one program; wider rows go to another backend.
MAX_N = 65536
_MAX_BACKWARD_PROGRAMS = 1024


@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    if IS_FP64:
        out = a / b
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def _rsqrt(v, IS_FP64: tl.constexpr):
    if IS_FP64:
        out = 1.0 / tl.sqrt(v)
    else:
        out = tl.div_rn(1.0, tl.sqrt_rn(v))
    return out


@triton.jit
def _stable_layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, amax_ptr,
    M, N, stride_xm, stride_xn, eps_hi, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STABLE: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    if IS_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    if STABLE:
        a = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        # NaN propagates into the maximum, as in torch.amax, whatever tl.max does with it.
        row_has_nan = tl.max(tl.where(mask & (x != x), 1, 0), axis=1) > 0
        a = tl.where(row_has_nan, float("nan"), a)
        xh = _div(x, a[:, None], IS_FP64)
    else:
        a = tl.full((BLOCK_M,), 1.0, x.dtype)
        xh = x
    mean = tl.sum(tl.where(mask, xh, 0.0), axis=1) / N
    d = tl.where(mask, xh - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    if IS_FP64:
        var_eps = (var + eps_hi) + eps_lo
    else:
        var_eps = var + eps_hi
    rstd = _rsqrt(tl.where(rmask, var_eps, 1.0), IS_FP64)  # padding rows: no 1 / 0
    y = d * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(x.dtype)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(x.dtype)
        y = y + b[None, :]
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows64, mean, mask=rmask)
    tl.store(rstd_ptr + rows64, rstd, mask=rmask)
    tl.store(amax_ptr + rows64, a, mask=rmask)


@triton.jit
def _stable_layer_norm_bwd_kernel(
    gy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, amax_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    M, N, BLOCKS_PER_PROGRAM,
    stride_gm, stride_gn, stride_xm, stride_xn,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if IS_FP64:
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(dw_acc.dtype)
    for i in range(0, BLOCKS_PER_PROGRAM):
        rows = (pid * BLOCKS_PER_PROGRAM + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask,
                    other=0.0).to(dw_acc.dtype)
        gy = tl.load(gy_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask,
                     other=0.0).to(dw_acc.dtype)
        mean = tl.load(mean_ptr + rows64, mask=rmask, other=0.0).to(dw_acc.dtype)
        rstd = tl.load(rstd_ptr + rows64, mask=rmask, other=0.0).to(dw_acc.dtype)
        a = tl.load(amax_ptr + rows64, mask=rmask, other=1.0).to(dw_acc.dtype)
        xn = tl.where(mask, (_div(x, a[:, None], IS_FP64) - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DX:
            if HAS_W:
                g = gy * w[None, :]
            else:
                g = gy
            mean_g = tl.sum(g, axis=1) / N
            mean_gxn = tl.sum(g * xn, axis=1) / N
            scale = _div(rstd, a, IS_FP64)
            dx = scale[:, None] * (g - mean_g[:, None] - xn * mean_gxn[:, None])
            tl.store(dx_ptr + rows64[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(gy * xn, axis=0)
        if NEED_DB:
            db_acc += tl.sum(gy, axis=0)
    if NEED_DW:
        tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=cmask)
    if NEED_DB:
        tl.store(db_part_ptr + pid * N + cols, db_acc, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(n: int) -> Tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = 8 if block_n >= 4096 else 4
    return block_m, block_n, num_warps


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.dtype not in _DTYPES:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{_OP}x must be a float16/bfloat16/float32/float64 tensor with at least 1 dimension; "
                         f"got {got}")
    n = x.shape[-1]
    if n < 1 or n > MAX_N:
        raise ValueError(f"{_OP}the normalised (last) dimension of x must lie in [1, {MAX_N}]; got {n}")


def _check_affine(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != (x.shape[-1],) or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{_OP}{name} must be a {x.dtype} tensor of shape [N = {x.shape[-1]}] on {x.device}; got "
                         f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")


def stable_layer_norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                              stable: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, rstd, row_max)`` (see module doc)."""
    _check_x(x)
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    n = x.shape[-1]
    m = x.numel() // n
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stat_dtype = _stat_dtype(x.dtype)
    mean, rstd, amax = (torch.empty(x.shape[:-1], dtype=stat_dtype, device=x.device) for _ in range(3))
    if m == 0:
        return y, mean, rstd, amax
    x2 = x.reshape(m, n)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    block_m, block_n, num_warps = _blocks(n)
    # eps travels as two fp32 scalars so the fp64 kernel sees it to ~48 bits.
    eps = float(eps)
    eps_hi = float(torch.tensor(eps, dtype=torch.float32))
    eps_lo = eps - eps_hi
    grid = (triton.cdiv(m, block_m),)
    _stable_layer_norm_fwd_kernel[grid](
        x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd, amax,
        m, n, x2.stride(0), x2.stride(1), eps_hi, eps_lo,
        HAS_W=weight is not None, HAS_B=bias is not None, STABLE=bool(stable), IS_FP64=x.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, mean, rstd, amax


def stable_layer_norm_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                               row_max: Tensor, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; outputs ``output_mask`` does not ask for (dweight without weight) are empty."""
    _check_x(x)
    _check_affine("weight", weight, x)
    if tuple(grad_y.shape) != tuple(x.shape) or not grad_y.is_floating_point():
        raise ValueError(f"{_OP}grad_y must be a floating tensor of x's shape {tuple(x.shape)}; got {grad_y.dtype} "
                         f"of shape {tuple(grad_y.shape)}")
    mask = [bool(v) for v in output_mask]
    if len(mask) != 3:
        raise ValueError(f"{_OP}output_mask must hold 3 booleans; got {output_mask}")
    n = x.shape[-1]
    m = x.numel() // n
    stat_dtype = _stat_dtype(x.dtype)
    for name, t in (("mean", mean), ("rstd", rstd), ("row_max", row_max)):
        if t.numel() != m or t.dtype != stat_dtype:
            raise ValueError(f"{_OP}{name} must be a {stat_dtype} tensor of {m} elements (x.shape[:-1]); got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    need_x, need_w, need_b = mask[0], mask[1] and weight is not None, mask[2]
    # Outputs not asked for are distinct empty tensors (one shared tensor would alias the outputs).
    dx, dweight, dbias = (x.new_empty(0) for _ in range(3))
    if not (need_x or need_w or need_b):
        return dx, dweight, dbias
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        if need_w:
            dweight = torch.zeros(n, dtype=weight.dtype, device=x.device)
        if need_b:
            dbias = torch.zeros(n, dtype=x.dtype, device=x.device)
        return dx, dweight, dbias
    x2 = x.reshape(m, n)
    g2 = grad_y.to(x.dtype).reshape(m, n)
    weight = weight.contiguous() if weight is not None else None
    mean, rstd, row_max = mean.contiguous(), rstd.contiguous(), row_max.contiguous()
    block_m, block_n, num_warps = _blocks(n)
    row_blocks = triton.cdiv(m, block_m)
    blocks_per_program = triton.cdiv(row_blocks, min(row_blocks, _MAX_BACKWARD_PROGRAMS))
    programs = triton.cdiv(row_blocks, blocks_per_program)
    dw_part = torch.empty((programs, n), dtype=stat_dtype, device=x.device) if need_w else x2
    db_part = torch.empty((programs, n), dtype=stat_dtype, device=x.device) if need_b else x2
    _stable_layer_norm_bwd_kernel[(programs,)](
        g2, x2, weight if weight is not None else x2, mean, rstd, row_max, dx if need_x else x2, dw_part, db_part,
        m, n, blocks_per_program,
        g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1),
        HAS_W=weight is not None, NEED_DX=need_x, NEED_DW=need_w, NEED_DB=need_b, IS_FP64=x.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    if need_w:
        dweight = dw_part.sum(0).to(weight.dtype)
    if need_b:
        dbias = db_part.sum(0).to(x.dtype)
    return dx, dweight, dbias
