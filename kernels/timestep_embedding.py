"""Triton kernel of ``imer_fast::timestep_embedding`` (semantics: imer_fast/ops/timestep_embedding.py).

One program per (BLOCK_N rows, BLOCK_H frequencies) tile: angle = (t · freqs) · scale, sin and cos
written to the two halves of the row, and the zero padding columns (one column, odd dim) written by
the programs of the first frequency block. Half types are computed in float32, float64 in float64 apart
from the scalar scale, which Triton passes as a float32 argument (about 1e-7 relative error on the GPU).
"""
import torch
import triton
import triton.language as tl

BLOCK_N = 16
BLOCK_H = 64


@triton.jit
def _timestep_embedding_kernel(t_ptr, f_ptr, out_ptr, n, half, dim, scale,
                               SIN_FIRST: tl.constexpr, PAD: tl.constexpr, COMPUTE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < n, cols < half
    t = tl.load(t_ptr + rows, mask=row_ok, other=0).to(COMPUTE)
    f = tl.load(f_ptr + cols, mask=col_ok, other=0).to(COMPUTE)
    angle = (t[:, None] * f[None, :]) * scale
    sn, cs = tl.sin(angle), tl.cos(angle)
    if SIN_FIRST:
        first, second = sn, cs
    else:
        first, second = cs, sn
    ok = row_ok[:, None] & col_ok[None, :]
    base = out_ptr + rows[:, None].to(tl.int64) * dim
    tl.store(base + cols[None, :], first.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(base + half + cols[None, :], second.to(out_ptr.dtype.element_ty), mask=ok)
    if PAD:
        if tl.program_id(1) == 0:
            zeros = tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows.to(tl.int64) * dim + 2 * half, zeros, mask=row_ok)


def timestep_embedding(t, freqs, scale, sin_first, dim):
    freqs = freqs.contiguous()
    t = t.to(freqs.dtype).contiguous()
    n, half = t.shape[0], freqs.shape[0]
    if dim not in (2 * half, 2 * half + 1):
        raise ValueError(f"imer_fast::timestep_embedding (triton): dim must be 2 * freqs.numel() = {2 * half} or one "
                         f"more; got {dim}")
    out = torch.empty((n, dim), device=freqs.device, dtype=freqs.dtype)
    if n == 0 or dim == 0:
        return out
    compute = tl.float64 if freqs.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(n, BLOCK_N), max(1, triton.cdiv(half, BLOCK_H)))
    _timestep_embedding_kernel[grid](t, freqs, out, n, half, dim, float(scale), SIN_FIRST=bool(sin_first),
                                     PAD=dim > 2 * half, COMPUTE=compute, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H)
    return out
