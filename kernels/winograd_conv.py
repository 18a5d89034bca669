"""Triton kernels of ``imer_fast::winograd_conv1d`` (semantics and matrices: imer_fast/ops/winograd_conv.py).

The two transforms around the batched GEMM (cuBLAS through ``torch.bmm``), for F(2, 3) (R = 4),
F(4, 3) (R = 6) and F(6, 3) (R = 8): the input transform writes m [R, B·T, C] from x [B, C, L] of any
strides (tiles of BLOCK_R tiles × BLOCK_C channels; positions outside [0, L) read as zeros), the
output transform writes y (channels-last [B, L, Co]) from M [R, B·T, Co] plus the bias and the
optional residual, in the dtype of x (float32 or float64). The formulas are the C++ kernel's
(csrc/cpu/winograd_conv1d.cpp).
"""
import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_C = 64


@triton.jit
def _row(base, p, j, length, stride_l, ok):
    return tl.load(base + (p[:, None] + j).to(tl.int64) * stride_l,
                   mask=ok & (p[:, None] + j >= 0) & (p[:, None] + j < length), other=0)


@triton.jit
def _store_output_row(y_ptr, res_ptr, offset, row, channels, value, bias, pos, length, ok, HAS_RES: tl.constexpr):
    """Output row ``row`` of each tile: (value + bias), plus the residual's row when HAS_RES; rows past
    the length are dropped."""
    mask = ok & (pos[:, None] + row < length)
    out = value + bias
    if HAS_RES:
        out = out + tl.load(res_ptr + offset + row * channels, mask=mask, other=0)
    tl.store(y_ptr + offset + row * channels, out, mask=mask)


@triton.jit(do_not_specialize=["n_tiles"])  # n_tiles == 1 would become a constexpr int, which has no .to()
def _input_transform_kernel(x_ptr, m_ptr, n_tiles, tiles_per_sample, length, channels,
                            stride_b, stride_c, stride_l,
                            R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < n_tiles, cols < channels
    ok = row_ok[:, None] & col_ok[None, :]
    b = (rows // tiles_per_sample).to(tl.int64)
    p = (R - 2) * (rows % tiles_per_sample) - 1
    base = x_ptr + b[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_c
    out = m_ptr + rows[:, None].to(tl.int64) * channels + cols[None, :]
    plane = n_tiles.to(tl.int64) * channels
    d0 = _row(base, p, 0, length, stride_l, ok)
    d1 = _row(base, p, 1, length, stride_l, ok)
    d2 = _row(base, p, 2, length, stride_l, ok)
    d3 = _row(base, p, 3, length, stride_l, ok)
    if R == 4:
        tl.store(out, d0 - d2, mask=ok)
        tl.store(out + plane, d1 + d2, mask=ok)
        tl.store(out + 2 * plane, d2 - d1, mask=ok)
        tl.store(out + 3 * plane, d1 - d3, mask=ok)
    elif R == 6:
        d4 = _row(base, p, 4, length, stride_l, ok)
        d5 = _row(base, p, 5, length, stride_l, ok)
        a = d4 - 4 * d2
        c = d3 - 4 * d1
        e = d4 - d2
        f = 2 * (d3 - d1)
        tl.store(out, 4 * d0 - 5 * d2 + d4, mask=ok)
        tl.store(out + plane, a + c, mask=ok)
        tl.store(out + 2 * plane, a - c, mask=ok)
        tl.store(out + 3 * plane, e + f, mask=ok)
        tl.store(out + 4 * plane, e - f, mask=ok)
        tl.store(out + 5 * plane, 4 * d1 - 5 * d3 + d5, mask=ok)
    else:
        d4 = _row(base, p, 4, length, stride_l, ok)
        d5 = _row(base, p, 5, length, stride_l, ok)
        d6 = _row(base, p, 6, length, stride_l, ok)
        d7 = _row(base, p, 7, length, stride_l, ok)
        e12 = 4 * (d2 + d6) - 17 * d4
        o12 = 4 * (d1 + d5) - 17 * d3
        e34 = (d2 - 5 * d4) + 4 * d6
        o34 = 2 * (d1 - 5 * d3) + 8 * d5
        e56 = 2 * ((4 * d2 - 5 * d4) + d6)
        o56 = (4 * d1 - 5 * d3) + d5
        tl.store(out, 4 * (d6 - d0) + 21 * (d2 - d4), mask=ok)
        tl.store(out + plane, e12 + o12, mask=ok)
        tl.store(out + 2 * plane, e12 - o12, mask=ok)
        tl.store(out + 3 * plane, e34 + o34, mask=ok)
        tl.store(out + 4 * plane, e34 - o34, mask=ok)
        tl.store(out + 5 * plane, e56 + o56, mask=ok)
        tl.store(out + 6 * plane, e56 - o56, mask=ok)
        tl.store(out + 7 * plane, 4 * (d7 - d1) + 21 * (d3 - d5), mask=ok)


@triton.jit(do_not_specialize=["n_tiles"])
def _output_transform_kernel(M_ptr, bias_ptr, res_ptr, y_ptr, n_tiles, tiles_per_sample, length, channels,
                             HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < n_tiles, cols < channels
    ok = row_ok[:, None] & col_ok[None, :]
    src = M_ptr + rows[:, None].to(tl.int64) * channels + cols[None, :]
    plane = n_tiles.to(tl.int64) * channels
    M0 = tl.load(src, mask=ok, other=0)
    M1 = tl.load(src + plane, mask=ok, other=0)
    M2 = tl.load(src + 2 * plane, mask=ok, other=0)
    M3 = tl.load(src + 3 * plane, mask=ok, other=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0)[None, :]
    else:
        bias = tl.zeros((1, BLOCK_C), dtype=M0.dtype)
    b = (rows // tiles_per_sample).to(tl.int64)
    pos = (R - 2) * (rows % tiles_per_sample)
    offset = (b * length + pos)[:, None] * channels + cols[None, :]  # rows of y and of the residual, [B, L, Co]
    if R == 4:
        _store_output_row(y_ptr, res_ptr, offset, 0, channels, (M0 + M1) + M2, bias, pos, length, ok, HAS_RES)
        _store_output_row(y_ptr, res_ptr, offset, 1, channels, (M1 - M2) - M3, bias, pos, length, ok, HAS_RES)
    else:  # F(4, 3) and F(6, 3) share their first rows' sums and differences
        M4 = tl.load(src + 4 * plane, mask=ok, other=0)
        M5 = tl.load(src + 5 * plane, mask=ok, other=0)
        s12 = M1 + M2
        d12 = M1 - M2
        s34 = M3 + M4
        d34 = M3 - M4
        if R == 6:
            _store_output_row(y_ptr, res_ptr, offset, 0, channels, (M0 + s12) + s34, bias, pos, length, ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 1, channels, d12 + 2 * d34, bias, pos, length, ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 2, channels, s12 + 4 * s34, bias, pos, length, ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 3, channels, (d12 + 8 * d34) + M5, bias, pos, length, ok,
                              HAS_RES)
        else:
            M6 = tl.load(src + 6 * plane, mask=ok, other=0)
            M7 = tl.load(src + 7 * plane, mask=ok, other=0)
            s56 = M5 + M6
            d56 = M5 - M6
            # y_i = (M1 ± M2) + 2^i (M3 ± M4) + 2^-i (M5 ± M6), + for even i, - for odd i
            _store_output_row(y_ptr, res_ptr, offset, 0, channels, ((M0 + s12) + s34) + s56, bias, pos, length,
                              ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 1, channels, (d12 + 2 * d34) + 0.5 * d56, bias, pos, length,
                              ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 2, channels, (s12 + 4 * s34) + 0.25 * s56, bias, pos, length,
                              ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 3, channels, (d12 + 8 * d34) + 0.125 * d56, bias, pos,
                              length, ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 4, channels, (s12 + 16 * s34) + 0.0625 * s56, bias, pos,
                              length, ok, HAS_RES)
            _store_output_row(y_ptr, res_ptr, offset, 5, channels, ((d12 + 32 * d34) + 0.03125 * d56) + M7, bias,
                              pos, length, ok, HAS_RES)


def winograd_conv1d(x, weight_tf, bias, residual):
    batch, channels, length = x.shape
    transformed, out_channels = weight_tf.shape[0], weight_tf.shape[2]
    # The kernels index bias and residual unchecked: direct torch.ops calls get the C++ kernel's errors.
    if bias is not None and (tuple(bias.shape) != (out_channels,) or bias.dtype != x.dtype):
        raise RuntimeError(f"imer_fast::winograd_conv1d: bias must be a [Co = {out_channels}] {x.dtype} tensor; "
                           f"got {bias.dtype} of shape {tuple(bias.shape)}")
    if residual is not None and (tuple(residual.shape) != (batch, out_channels, length) or residual.dtype != x.dtype):
        raise RuntimeError(f"imer_fast::winograd_conv1d: residual must be a [B, Co, L] = [{batch}, {out_channels}, "
                           f"{length}] {x.dtype} tensor; got {residual.dtype} of shape {tuple(residual.shape)}")
    per_tile = transformed - 2
    tiles_per_sample = (length + per_tile - 1) // per_tile
    n_tiles = batch * tiles_per_sample
    y_rows = torch.empty((batch, length, out_channels), device=x.device, dtype=x.dtype)
    if y_rows.numel() == 0:
        return y_rows.transpose(1, 2)
    m = torch.empty((transformed, n_tiles, channels), device=x.device, dtype=x.dtype)
    if m.numel():
        grid = (triton.cdiv(n_tiles, BLOCK_R), triton.cdiv(channels, BLOCK_C))
        _input_transform_kernel[grid](x, m, n_tiles, tiles_per_sample, length, channels,
                                      x.stride(0), x.stride(1), x.stride(2),
                                      R=transformed, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    M = torch.bmm(m, weight_tf.contiguous())
    bias_arg = bias.contiguous() if bias is not None else M
    res_rows = residual.transpose(1, 2).contiguous() if residual is not None else M  # [B, L, Co]
    grid = (triton.cdiv(n_tiles, BLOCK_R), triton.cdiv(out_channels, BLOCK_C))
    _output_transform_kernel[grid](M, bias_arg, res_rows, y_rows, n_tiles, tiles_per_sample, length, out_channels,
                                   HAS_BIAS=bias is not None, HAS_RES=residual is not None, R=transformed,
                                   BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return y_rows.transpose(1, 2)
