"""Triton kernels of ``imer_fast::rgcn_conv`` and ``imer_fast::rgcn_conv_backward``.

Forward is one fused gather-GEMM: every program owns a ``BLOCK_M x BLOCK_N`` tile of the output and,
for each relation ``r`` and ``BLOCK_K`` chunk of the input features, builds the aggregated neighbour
tile ``A[m, k] = sum_{e in seg(m, r)} scale[e] * x[col[e], k]`` in registers (one masked gather per
degree step) and multiplies it with the matching tile of ``weight[r]``. The root weight is one more
"relation" whose ``A`` tile is ``x`` itself; the bias is added in the epilogue. Neither the
``[N, R * Fin]`` aggregate nor any per-edge weight copy is ever materialised.

Backward:

- ``grad_x`` runs the same kernel on the transposed CSR with ``weight^T`` / ``root^T`` (strides only)
  and the edge scales read through ``t_eid``;
- ``grad_weight`` has one program per ``(Fin tile, Fout tile, relation, node split)`` that gathers
  ``A`` as in forward and accumulates ``A^T @ grad_out``; splits write separate partial buffers
  that are summed in a fixed order, so results are bitwise repeatable (no atomics);
- ``grad_scale[e] = <x[col[e]], grad_out[i] @ weight[r]^T>`` has one program per
  ``(target block, relation)`` that forms ``grad_out @ weight[r]^T`` tile by tile and dots it with the
  gathered source rows; ``Fin`` chunks write separate partials (again no atomics);
- ``grad_root = x^T @ grad_out`` is a plain ``torch.mm``.

Every loop over neighbours is bounded by the largest segment of the current row block (read from
``seg_ptr``), so one kernel binary serves every graph and skewed graphs do not pay the global
``max_degree`` on every tile. fp32 inputs use exact (``ieee``) dot products unless
``torch.backends.cuda.matmul.allow_tf32`` is set; fp16/bf16 inputs accumulate in fp32; float64 is
computed in float64 with broadcast multiply-and-sum (no fp64 ``tl.dot`` needed).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiles import zeros_acc

__all__ = ["rgcn_conv_forward", "rgcn_conv_backward"]

_OP = "imer_fast::rgcn_conv (triton): "


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, IS_FP64: tl.constexpr, PREC: tl.constexpr):
    """a [M, K] @ b [K, N] in the accumulation dtype (fp64 for fp64 inputs, else fp32)."""
    if IS_FP64:
        out = tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    else:
        out = tl.dot(a.to(b.dtype), b, input_precision=PREC)
    return out


@triton.jit
def _gather_tile(x_ptr, stride_xm, stride_xk, col_ptr, scale_ptr, sidx_ptr, start, deg, tile_deg, ks, kmask,
                 HAS_SCALE: tl.constexpr, HAS_SIDX: tl.constexpr, IS_FP64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[m, k] = sum_{d < deg[m]} scale[sidx[start[m] + d]] * x[col[start[m] + d], ks[k]]."""
    a = zeros_acc(BLOCK_M, BLOCK_K, IS_FP64)
    for d in range(tile_deg):
        valid = d < deg
        e = start + d
        src = tl.load(col_ptr + e, mask=valid, other=0)
        xv = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                     mask=valid[:, None] & kmask[None, :], other=0.0).to(a.dtype)
        if HAS_SCALE:
            if HAS_SIDX:
                sid = tl.load(sidx_ptr + e, mask=valid, other=0)
            else:
                sid = e
            s = tl.load(scale_ptr + sid, mask=valid, other=0.0).to(a.dtype)
            xv = xv * s[:, None]
        a += xv
    return a


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rgcn_fwd_kernel(
    x_ptr, w_ptr, root_ptr, bias_ptr, seg_ptr, col_ptr, scale_ptr, sidx_ptr, out_ptr,
    N, R, K, NOUT,
    stride_xm, stride_xk,
    stride_wr, stride_wk, stride_wn,
    stride_rk, stride_rn,
    stride_om, stride_on,
    HAS_ROOT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SIDX: tl.constexpr,
    IS_FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # n-tiles of one row block are adjacent program ids: they re-gather the same source rows.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(NOUT, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < N
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < NOUT
    offs_k = tl.arange(0, BLOCK_K)

    acc = zeros_acc(BLOCK_M, BLOCK_N, IS_FP64)

    if HAS_ROOT:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            kmask = ks < K
            a = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=mask_m[:, None] & kmask[None, :], other=0.0)
            w = tl.load(root_ptr + ks[:, None] * stride_rk + cols[None, :] * stride_rn,
                        mask=kmask[:, None] & mask_n[None, :], other=0.0)
            acc += _mm(a, w, IS_FP64, PREC)

    for r in range(R):
        seg = rows64 * R + r
        start = tl.load(seg_ptr + seg, mask=mask_m, other=0)
        deg = tl.load(seg_ptr + seg + 1, mask=mask_m, other=0) - start
        tile_deg = tl.max(deg, axis=0)
        if tile_deg > 0:
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                kmask = ks < K
                a = _gather_tile(x_ptr, stride_xm, stride_xk, col_ptr, scale_ptr, sidx_ptr, start, deg, tile_deg,
                                 ks, kmask, HAS_SCALE, HAS_SIDX, IS_FP64, BLOCK_M, BLOCK_K)
                w = tl.load(w_ptr + r * stride_wr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                            mask=kmask[:, None] & mask_n[None, :], other=0.0)
                acc += _mm(a, w, IS_FP64, PREC)

    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=mask_n, other=0.0)
        acc += b.to(acc.dtype)[None, :]

    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _rgcn_grad_weight_kernel(
    x_ptr, g_ptr, seg_ptr, col_ptr, scale_ptr, part_ptr,
    N, R, K, NOUT, BLOCKS_PER_SPLIT,
    stride_xm, stride_xk,
    stride_gm, stride_gn,
    stride_ps, stride_pr, stride_pk, stride_pn,
    HAS_SCALE: tl.constexpr, IS_FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # part[s, r, k, n] = sum over the row blocks of split s of A_r[:, k]^T @ grad_out[:, n]
    pid = tl.program_id(0)
    r = tl.program_id(1)
    split = tl.program_id(2)
    num_pid_n = tl.cdiv(NOUT, BLOCK_N)
    pid_k = pid // num_pid_n
    pid_n = pid % num_pid_n

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < NOUT
    offs_m = tl.arange(0, BLOCK_M)

    acc = zeros_acc(BLOCK_K, BLOCK_N, IS_FP64)

    block0 = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT):
        rows = (block0 + i) * BLOCK_M + offs_m
        mask_m = rows < N
        rows64 = rows.to(tl.int64)
        seg = rows64 * R + r
        start = tl.load(seg_ptr + seg, mask=mask_m, other=0)
        deg = tl.load(seg_ptr + seg + 1, mask=mask_m, other=0) - start
        tile_deg = tl.max(deg, axis=0)
        if tile_deg > 0:
            a = _gather_tile(x_ptr, stride_xm, stride_xk, col_ptr, scale_ptr, scale_ptr, start, deg, tile_deg,
                             ks, kmask, HAS_SCALE, False, IS_FP64, BLOCK_M, BLOCK_K)
            g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            acc += _mm(tl.trans(a), g, IS_FP64, PREC)

    tl.store(part_ptr + split * stride_ps + r * stride_pr + ks[:, None] * stride_pk + cols[None, :] * stride_pn,
             acc, mask=kmask[:, None] & mask_n[None, :])


@triton.jit
def _rgcn_grad_scale_kernel(
    x_ptr, g_ptr, w_ptr, seg_ptr, col_ptr, part_ptr,
    N, R, K, NOUT,
    stride_xm, stride_xk,
    stride_gm, stride_gn,
    stride_wr, stride_wk, stride_wn,
    stride_pc,
    IS_FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # part[c, e] = <x[col[e], chunk c], (grad_out[i] @ weight[r]^T)[chunk c]> for e in seg(i, r)
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < N
    rows64 = rows.to(tl.int64)
    seg = rows64 * R + r
    start = tl.load(seg_ptr + seg, mask=mask_m, other=0)
    deg = tl.load(seg_ptr + seg + 1, mask=mask_m, other=0) - start
    tile_deg = tl.max(deg, axis=0)
    if tile_deg > 0:
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            kmask = ks < K
            # P[m, k] = sum_n grad_out[m, n] * weight[r, k, n]
            p = zeros_acc(BLOCK_M, BLOCK_K, IS_FP64)
            for n0 in range(0, NOUT, BLOCK_N):
                ns = n0 + offs_n
                nmask = ns < NOUT
                g = tl.load(g_ptr + rows64[:, None] * stride_gm + ns[None, :] * stride_gn,
                            mask=mask_m[:, None] & nmask[None, :], other=0.0)
                wt = tl.load(w_ptr + r * stride_wr + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
                             mask=nmask[:, None] & kmask[None, :], other=0.0)
                p += _mm(g, wt, IS_FP64, PREC)
            for d in range(tile_deg):
                valid = d < deg
                e = start + d
                src = tl.load(col_ptr + e, mask=valid, other=0)
                xv = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=valid[:, None] & kmask[None, :], other=0.0)
                val = tl.sum(xv.to(p.dtype) * p, axis=1)
                tl.store(part_ptr + (k0 // BLOCK_K) * stride_pc + e, val, mask=valid)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products unless torch allows TF32 matmuls (NVIDIA only;
    "ieee" is accepted by every backend). fp16/bf16 products are exact either way."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and torch.version.hip is None:
        return "tf32"
    return "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gemm_blocks(dtype: torch.dtype, rows: int, k: int, n: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of a gather-GEMM with `rows` output rows, reduction
    width `k` and `n` output columns. Every block is a power of two >= 16 (tl.dot's minimum)."""
    if dtype == torch.float64:  # broadcast-multiply products: keep the [M, K, N] product small
        return 16, _pow2(n, 16, 32), 16, 4
    half = dtype in (torch.float16, torch.bfloat16)
    block_n = _pow2(n, 16, 128 if half else 64)
    block_m = 64 if rows > 2048 else 32
    block_k = _pow2(k, 16, 64 if half else 32)
    num_warps = 8 if block_m * block_n >= 8192 else 4
    return block_m, block_n, block_k, num_warps


def _check(x: Tensor, weight: Tensor, root: Optional[Tensor], bias: Optional[Tensor], seg_ptr: Tensor, col: Tensor,
           scale: Optional[Tensor], max_degree: int) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{_OP}x must be a 2-D floating tensor [num_nodes, in_channels]; got {x.dtype} {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{_OP}unsupported dtype {x.dtype}")
    if weight.dim() != 3 or weight.shape[1] != x.shape[1] or weight.dtype != x.dtype:
        raise ValueError(f"{_OP}weight must be a {x.dtype} tensor [num_relations, {x.shape[1]}, out_channels]; "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    fin, fout = weight.shape[1], weight.shape[2]
    if root is not None and (tuple(root.shape) != (fin, fout) or root.dtype != x.dtype):
        raise ValueError(f"{_OP}root must be a {x.dtype} tensor [{fin}, {fout}]; got {root.dtype} {tuple(root.shape)}")
    if bias is not None and (tuple(bias.shape) != (fout,) or bias.dtype != x.dtype):
        raise ValueError(f"{_OP}bias must be a {x.dtype} tensor [{fout}]; got {bias.dtype} {tuple(bias.shape)}")
    num_seg = x.shape[0] * weight.shape[0] + 1
    if seg_ptr.dtype != torch.long or seg_ptr.shape != (num_seg,):
        raise ValueError(f"{_OP}seg_ptr must be int64 [num_nodes * num_relations + 1 = {num_seg}]; "
                         f"got {seg_ptr.dtype} {tuple(seg_ptr.shape)}")
    if col.dtype != torch.long or col.dim() != 1:
        raise ValueError(f"{_OP}col must be a 1-D int64 tensor; got {col.dtype} {tuple(col.shape)}")
    if scale is not None and (scale.shape != col.shape or scale.dtype != x.dtype):
        raise ValueError(f"{_OP}scale must be a {x.dtype} tensor [E = {col.numel()}]; got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if int(max_degree) < 0:
        raise ValueError(f"{_OP}max_degree must be >= 0; got {max_degree}")


def _gather_gemm(x: Tensor, w: Tensor, w_strides: Tuple[int, int, int], root: Optional[Tensor],
                 root_strides: Tuple[int, int], bias: Optional[Tensor], seg_ptr: Tensor, col: Tensor,
                 scale: Optional[Tensor], sidx: Optional[Tensor], num_relations: int, nout: int) -> Tensor:
    """out[i] = x[i] @ root + bias + sum_r sum_{e in seg(i, r)} scale[sidx[e]] * x[col[e]] @ W_r where
    W_r[k, n] = w[r * s_r + k * s_k + n * s_n] for (s_r, s_k, s_n) = w_strides."""
    n, k = x.shape
    out = torch.empty((n, nout), dtype=x.dtype, device=x.device)
    if n == 0 or nout == 0:
        return out
    block_m, block_n, block_k, num_warps = _gemm_blocks(x.dtype, n, k, nout)
    dummy = x
    grid = (triton.cdiv(n, block_m) * triton.cdiv(nout, block_n),)
    _rgcn_fwd_kernel[grid](
        x, w if w.numel() else dummy, root if root is not None else dummy, bias if bias is not None else dummy,
        seg_ptr, col if col.numel() else seg_ptr, scale if scale is not None else dummy,
        sidx if sidx is not None else seg_ptr, out,
        n, num_relations, k, nout,
        x.stride(0), x.stride(1),
        *w_strides,
        *root_strides,
        out.stride(0), out.stride(1),
        HAS_ROOT=root is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SIDX=sidx is not None, IS_FP64=x.dtype == torch.float64, PREC=_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _unit_inner_stride(t: Tensor) -> Tensor:
    """``t`` with stride 1 along its features: triton 3.6 fails to compile the gathered loads of the
    tensor-core path (fp32 / fp16 / bf16) when that stride is a runtime value (a transposed view, or the
    stride-0 gradient of ``out.sum()``); triton 3.2 and 3.9 compile it."""
    return t if t.stride(1) == 1 or t.numel() == 0 else t.contiguous()


def rgcn_conv_forward(x: Tensor, weight: Tensor, root: Optional[Tensor], bias: Optional[Tensor], seg_ptr: Tensor,
                      col: Tensor, scale: Optional[Tensor], max_degree: int) -> Tensor:
    """out[i] = x[i] @ root + bias + sum_r sum_{e in seg(i, r)} scale[e] * x[col[e]] @ weight[r]; [N, Fout]
    in the dtype of x. Inputs may be non-contiguous (weights are read through their strides)."""
    _check(x, weight, root, bias, seg_ptr, col, scale, max_degree)
    x = _unit_inner_stride(x)
    seg_ptr, col = seg_ptr.contiguous(), col.contiguous()
    scale = scale.contiguous() if scale is not None else None
    bias = bias.contiguous() if bias is not None else None
    w_strides = (weight.stride(0), weight.stride(1), weight.stride(2))
    root_strides = (root.stride(0), root.stride(1)) if root is not None else (0, 0)
    return _gather_gemm(x, weight, w_strides, root, root_strides, bias, seg_ptr, col, scale, None, weight.shape[0],
                        weight.shape[2])


def _grad_weight(grad_out: Tensor, x: Tensor, seg_ptr: Tensor, col: Tensor, scale: Optional[Tensor],
                 num_relations: int, fout: int) -> Tensor:
    n, fin = x.shape
    acc_dtype = _acc_dtype(x.dtype)
    if n == 0 or num_relations == 0 or fin == 0 or fout == 0:
        return torch.zeros((num_relations, fin, fout), dtype=x.dtype, device=x.device)
    if x.dtype == torch.float64:
        block_m, block_k, block_n, num_warps = 16, 16, _pow2(fout, 16, 32), 4
    else:
        half = x.dtype in (torch.float16, torch.bfloat16)
        block_m = 32
        block_k = _pow2(fin, 16, 64)
        block_n = _pow2(fout, 16, 128 if half else 64)
        num_warps = 8 if block_k * block_n >= 8192 else 4
    tiles = triton.cdiv(fin, block_k) * triton.cdiv(fout, block_n)
    row_blocks = triton.cdiv(n, block_m)
    # Split the node range so that small weight grids still fill the GPU; each split owns a partial
    # buffer and the partials are summed in a fixed order (deterministic, no atomics).
    splits = max(1, min(triton.cdiv(row_blocks, 8), triton.cdiv(512, tiles * num_relations)))
    blocks_per_split = triton.cdiv(row_blocks, splits)
    splits = triton.cdiv(row_blocks, blocks_per_split)
    part = torch.empty((splits, num_relations, fin, fout), dtype=acc_dtype, device=x.device)
    grid = (tiles, num_relations, splits)
    _rgcn_grad_weight_kernel[grid](
        x, grad_out, seg_ptr, col if col.numel() else seg_ptr, scale if scale is not None else x, part,
        n, num_relations, fin, fout, blocks_per_split,
        x.stride(0), x.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        HAS_SCALE=scale is not None, IS_FP64=x.dtype == torch.float64, PREC=_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    out = part[0] if splits == 1 else part.sum(0)
    return out.to(x.dtype)


def _grad_scale(grad_out: Tensor, x: Tensor, weight: Tensor, seg_ptr: Tensor, col: Tensor) -> Tensor:
    n, fin = x.shape
    num_relations, fout = weight.shape[0], weight.shape[2]
    num_edges = col.numel()
    if num_edges == 0 or fin == 0 or fout == 0:
        return torch.zeros((num_edges,), dtype=x.dtype, device=x.device)
    if x.dtype == torch.float64:
        block_m, block_k, block_n, num_warps = 16, _pow2(fin, 16, 32), 16, 4
    else:
        half = x.dtype in (torch.float16, torch.bfloat16)
        block_m = 32
        block_k = _pow2(fin, 16, 128 if half else 64)
        block_n = _pow2(fout, 16, 64 if half else 32)
        num_warps = 8 if block_m * block_k >= 4096 else 4
    chunks = triton.cdiv(fin, block_k)
    part = torch.empty((chunks, num_edges), dtype=_acc_dtype(x.dtype), device=x.device)
    grid = (triton.cdiv(n, block_m), num_relations)
    _rgcn_grad_scale_kernel[grid](
        x, grad_out, weight, seg_ptr, col, part,
        n, num_relations, fin, fout,
        x.stride(0), x.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        part.stride(0),
        IS_FP64=x.dtype == torch.float64, PREC=_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    out = part[0] if chunks == 1 else part.sum(0)
    return out.to(x.dtype)


def rgcn_conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, root: Optional[Tensor], seg_ptr: Tensor,
                       col: Tensor, scale: Optional[Tensor], t_seg_ptr: Tensor, t_col: Tensor, t_eid: Tensor,
                       max_degree: int, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_root, grad_scale) of :func:`rgcn_conv_forward`; outputs that
    ``output_mask`` does not ask for (and grad_root / grad_scale without root / scale) are empty."""
    _check(x, weight, root, None, seg_ptr, col, scale, max_degree)
    num_nodes, fin = x.shape
    num_relations, fout = weight.shape[0], weight.shape[2]
    if tuple(grad_out.shape) != (num_nodes, fout):
        raise ValueError(f"{_OP}grad_out must have shape [{num_nodes}, {fout}]; got {tuple(grad_out.shape)}")
    if t_seg_ptr.shape != seg_ptr.shape or t_col.shape != col.shape or t_eid.shape != col.shape:
        raise ValueError(f"{_OP}t_seg_ptr, t_col and t_eid must match seg_ptr and col in shape")
    mask = [bool(m) for m in output_mask]
    if len(mask) != 4:
        raise ValueError(f"{_OP}output_mask must hold 4 booleans; got {output_mask}")
    grad_out = _unit_inner_stride(grad_out.to(x.dtype))
    x = _unit_inner_stride(x)
    seg_ptr, col = seg_ptr.contiguous(), col.contiguous()
    scale = scale.contiguous() if scale is not None else None
    # Outputs not asked for are distinct empty tensors (one shared tensor would alias the outputs).
    grad_x, grad_weight, grad_root, grad_scale = (x.new_empty(0) for _ in range(4))

    if mask[0]:
        # grad_x[j] = grad_out[j] @ root^T + sum_r sum_{k in t_seg(j, r)} scale[t_eid[k]] * grad_out[t_col[k]] @ W_r^T
        w_strides = (weight.stride(0), weight.stride(2), weight.stride(1))
        root_strides = (root.stride(1), root.stride(0)) if root is not None else (0, 0)
        grad_x = _gather_gemm(grad_out, weight, w_strides, root, root_strides, None, t_seg_ptr.contiguous(),
                              t_col.contiguous(), scale, t_eid.contiguous() if scale is not None else None,
                              num_relations, fin)
    if mask[1]:
        grad_weight = _grad_weight(grad_out, x, seg_ptr, col, scale, num_relations, fout)
    if mask[2] and root is not None:
        grad_root = torch.mm(x.t(), grad_out)
    if mask[3] and scale is not None:
        grad_scale = _grad_scale(grad_out, x, weight, seg_ptr, col)
    return grad_x, grad_weight, grad_root, grad_scale
