"""Triton kernels of ``imer_fast::winograd_conv1d`` (semantics: imer_fast/ops/winograd_conv.py).

The two transforms around the batched GEMM (cuBLAS through ``torch.bmm``): the input transform
writes m [4, B·T, C] from x [B, C, L] of any strides (tiles of BLOCK_R pairs of positions ×
BLOCK_C channels; positions outside [0, L) read as zeros), the output transform writes y
(channels-last [B, L, Co]) from M [4, B·T, Co] plus the bias, in the dtype of x (float32 or float64).
"""
import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_C = 64


@triton.jit
def _input_transform_kernel(x_ptr, m_ptr, n_tiles, tiles_per_sample, length, channels,
                            stride_b, stride_c, stride_l,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < n_tiles, cols < channels
    b = (rows // tiles_per_sample).to(tl.int64)
    p = 2 * (rows % tiles_per_sample) - 1
    base = x_ptr + b[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_c
    ok = row_ok[:, None] & col_ok[None, :]
    d0 = tl.load(base + p[:, None].to(tl.int64) * stride_l, mask=ok & (p[:, None] >= 0), other=0)
    d1 = tl.load(base + (p[:, None] + 1).to(tl.int64) * stride_l, mask=ok & (p[:, None] + 1 < length), other=0)
    d2 = tl.load(base + (p[:, None] + 2).to(tl.int64) * stride_l, mask=ok & (p[:, None] + 2 < length), other=0)
    d3 = tl.load(base + (p[:, None] + 3).to(tl.int64) * stride_l, mask=ok & (p[:, None] + 3 < length), other=0)
    out = m_ptr + rows[:, None].to(tl.int64) * channels + cols[None, :]
    plane = n_tiles.to(tl.int64) * channels
    tl.store(out, d0 - d2, mask=ok)
    tl.store(out + plane, d1 + d2, mask=ok)
    tl.store(out + 2 * plane, d2 - d1, mask=ok)
    tl.store(out + 3 * plane, d1 - d3, mask=ok)


@triton.jit
def _output_transform_kernel(M_ptr, bias_ptr, y_ptr, n_tiles, tiles_per_sample, length, channels,
                             HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
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
    even = (M0 + M1) + M2
    odd = (M1 - M2) - M3
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0)
        even += bias[None, :]
        odd += bias[None, :]
    b = (rows // tiles_per_sample).to(tl.int64)
    pos = 2 * (rows % tiles_per_sample)
    dst = y_ptr + (b * length + pos)[:, None] * channels + cols[None, :]
    tl.store(dst, even, mask=ok)
    tl.store(dst + channels, odd, mask=ok & (pos[:, None] + 1 < length))


def winograd_conv1d(x, weight_tf, bias):
    batch, channels, length = x.shape
    out_channels = weight_tf.shape[2]
    tiles_per_sample = (length + 1) // 2
    n_tiles = batch * tiles_per_sample
    y_rows = torch.empty((batch, length, out_channels), device=x.device, dtype=x.dtype)
    if y_rows.numel() == 0:
        return y_rows.transpose(1, 2)
    m = torch.empty((4, n_tiles, channels), device=x.device, dtype=x.dtype)
    if m.numel():
        grid = (triton.cdiv(n_tiles, BLOCK_R), triton.cdiv(channels, BLOCK_C))
        _input_transform_kernel[grid](x, m, n_tiles, tiles_per_sample, length, channels,
                                      x.stride(0), x.stride(1), x.stride(2), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    M = torch.bmm(m, weight_tf.contiguous())
    bias_arg = bias.contiguous() if bias is not None else M
    grid = (triton.cdiv(n_tiles, BLOCK_R), triton.cdiv(out_channels, BLOCK_C))
    _output_transform_kernel[grid](M, bias_arg, y_rows, n_tiles, tiles_per_sample, length, out_channels,
                                   HAS_BIAS=bias is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return y_rows.transpose(1, 2)
