"""Triton kernels of ``imer_fast::attention`` and ``imer_fast::attention_backward`` (FlashAttention-2 style).

The contract (layouts, masks, null tokens, the lse conventions and the dropout hash) is the module
docstring of ``imer_fast/ops/attention.py``; the kernels here implement it without ever building the
``Lq x (Nn + Lk)`` score matrix.

Columns. Every sequence sees ``Nn + Lk`` columns: column ``c < Nn`` is null token ``c`` (``null_k`` /
``null_v``, shared by every sequence, always valid) and column ``c >= Nn`` is key ``j = c - Nn``. A
key/value tile of ``BLOCK_N`` columns is read with two masked loads (one from ``null_*`` for the
columns below ``Nn``, one from ``k`` / ``v`` for the others) and merged with ``tl.where``, so no
concatenated copy of the keys exists and the null tokens cost one extra (mostly predicated-off) load.
Validity is computed in registers: column in range, ``key_mask[j]``, and for ``mask_kind`` 1/2
``j <= i + off`` with ``off = 0`` (causal) or ``|Lk_b - Lq_b|`` (MulT future mask, per sequence).

Layouts. One kernel serves both layouts: a program reads ``(start, length)`` of its sequence from
``cu_seqlens`` (int32 or int64, loaded in-kernel, so the host never syncs) in the varlen layout, or
uses ``start = 0`` and the fixed lengths with a batch stride in the padded one; all tensors are read
through their strides (a view of a packed projection is read in place). The grid is
``(cdiv(max_seqlen, BLOCK), heads, batch)``; programs past their sequence's end return at once.

Forward: one program per (query block, head, batch) keeps its ``BLOCK_M x D`` query tile, the running
row max ``m``, the running sum ``l`` and the output accumulator in registers and loops over the key
blocks with the online softmax. The loop stops at the last column that the causal / future mask lets
any row of the block see. Rows that see no valid column keep ``m = -inf``; the exponentials are taken
against ``max(m, 0-if--inf)`` so they never form ``-inf - -inf``, and the epilogue writes ``out = 0``
and ``lse = +inf`` for them (the backward then gets ``exp(s - lse) = 0``: zero gradients, no NaN).
Dropout multiplies ``p`` by the keep mask (``l`` is the undropped sum) and ``1 / (1 - p)`` in the
epilogue.

Backward (``P = exp(scale * q k^T - lse)``, ``Z`` the keep mask, ``r = 1 / (1 - p)``):

- ``_attn_bwd_delta_kernel``: ``delta = rowsum(dO * O)`` (equal to ``rowsum(P * dP_dropped)``);
- ``_attn_bwd_dkdv_kernel``: one program per key block loops over the query blocks that can see it
  (from the block's first query under a causal / future mask) and accumulates
  ``dV = (P Z r)^T dO`` and ``dK = scale * dS^T Q`` with ``dS = P (dP Z r - delta)``,
  ``dP = dO V^T``. Rows of a null-token column go to per-(batch, head) partial buffers
  ``[B, H, Nn, D]`` that torch sums over the batch afterwards (fixed order);
- ``_attn_bwd_dq_kernel``: one program per query block loops over key blocks like the forward and
  accumulates ``dQ = scale * dS K``.

Every output element is written by exactly one program (no atomics), so results are bitwise
repeatable.

Products. Head dims 4..128 are padded to a power of two ``BLOCK_D`` with masked loads. ``tl.dot``
needs every dimension >= 16 and has no fp64 form, so for ``BLOCK_D < 16`` (the 4- and 8-wide heads of
IMDer / FedDISC) and for float64 a ``BCAST`` constexpr selects a CUDA-core variant (broadcast multiply
and ``tl.sum``), with smaller tiles. fp32 uses ``tf32x3`` dot products (three TF32
tensor-core products, a few fp32 ulps from exact; exact ``ieee`` ones spill registers, see
``_precision``), or ``tf32`` when ``torch.backends.cuda.matmul.allow_tf32`` is set; fp16/bf16
accumulate in fp32; float64 computes in
float64 (the Python-float ``scale`` and ``1 / (1 - p)`` are passed as fp32 hi + lo pairs, since
Triton types float arguments as fp32).

Dropout regenerates the counter-based hash of the contract in-kernel with wrapping ``tl.uint32``
arithmetic; the int64 seed is loaded from its device tensor (no host sync) and split into its low and
high 32 bits, so forward, backward and every other backend draw identical masks.

Block sizes come from a table per kernel, dtype and head dim (clamped for short sequences), chosen from
sm_90 compiles as the largest tiles that do not (or barely) spill registers (``_blocks``; ``@triton.autotune`` with
several configs does not run under the interpreter used by the tests, and no GPU has timed them).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiles import zeros_acc

__all__ = ["attention_forward", "attention_backward"]

_OP = "imer_fast::attention (triton): "
_MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot_nt(a, b, BCAST: tl.constexpr, IS_FP64: tl.constexpr, PREC: tl.constexpr):
    """a [M, K] @ b[N, K]^T -> [M, N] in the accumulation dtype."""
    if BCAST:
        if IS_FP64:
            out = tl.sum(a.to(tl.float64)[:, None, :] * b.to(tl.float64)[None, :, :], axis=2)
        else:
            out = tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    else:
        out = tl.dot(a.to(b.dtype), tl.trans(b), input_precision=PREC)
    return out


@triton.jit
def _dot_nn(a, b, BCAST: tl.constexpr, IS_FP64: tl.constexpr, PREC: tl.constexpr):
    """a [M, K] @ b [K, N] -> [M, N] in the accumulation dtype (a is cast to b's dtype for tl.dot)."""
    if BCAST:
        if IS_FP64:
            out = tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
        else:
            out = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        out = tl.dot(a.to(b.dtype), b, input_precision=PREC)
    return out


@triton.jit
def _full_vec(N: tl.constexpr, value: tl.constexpr, IS_FP64: tl.constexpr):
    if IS_FP64:
        out = tl.full((N,), value, dtype=tl.float64)
    else:
        out = tl.full((N,), value, dtype=tl.float32)
    return out


@triton.jit
def _scalar(hi, lo, IS_FP64: tl.constexpr):
    """A Python float passed as fp32 hi + lo: their fp64 sum for fp64 kernels, else hi."""
    if IS_FP64:
        out = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        out = hi
    return out


@triton.jit
def _seq_bounds(cu_ptr, b, L, IS_VARLEN: tl.constexpr):
    """(start row as int64, length as int32) of sequence b: from cu_seqlens, or (0, L) when padded."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = (tl.load(cu_ptr + b + 1).to(tl.int64) - start).to(tl.int32)
    else:
        start = b.to(tl.int64) * 0
        length = b * 0 + L
    return start, length


@triton.jit
def _mask_offset(q_len, k_len, MASK_KIND: tl.constexpr):
    """Key j is hidden from query i when j > i + off (mask kinds 1 and 2)."""
    if MASK_KIND == 2:
        diff = k_len - q_len
        off = tl.where(diff > 0, diff, -diff)
    else:
        off = q_len * 0
    return off


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _seed_halves(seed_ptr):
    seed = tl.load(seed_ptr).to(tl.int64)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def _row_keys(seed_lo, seed_hi, rows, h, H):
    """fmix(s_lo ^ fmix(row * H + h + s_hi)) for global query rows (int64) of head h."""
    rh = rows.to(tl.uint32) * H + h.to(tl.uint32) + seed_hi  # H (int32) promotes to uint32
    return _fmix32(seed_lo ^ _fmix32(rh))


@triton.jit
def _col_hash(cols):
    return cols.to(tl.uint32) * 0x9E3779B9


@triton.jit
def _load_kv_tile(k_base, nk_base, cols, j_rows, offs_d, mask_d, s_kn, s_kd, s_nkn, s_nkd, NN, k_len,
                  HAS_NULL: tl.constexpr):
    """Rows of the [null; keys] matrix for columns `cols`: null token c for c < NN, key c - NN else."""
    is_key = (cols >= NN) & (cols < NN + k_len)
    t = tl.load(k_base + j_rows[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=is_key[:, None] & mask_d[None, :], other=0.0)
    if HAS_NULL:
        is_null = cols < NN
        tn = tl.load(nk_base + cols.to(tl.int64)[:, None] * s_nkn + offs_d[None, :] * s_nkd,
                     mask=is_null[:, None] & mask_d[None, :], other=0.0)
        t = tl.where(is_null[:, None], tn, t)
    return t


@triton.jit
def _valid_cols(km_base, s_mn, cols, j_rows, NN, k_len, HAS_KEY_MASK: tl.constexpr, HAS_NULL: tl.constexpr):
    """Columns valid for every row before the causal / future mask: keys in range (and in key_mask),
    null tokens always."""
    ok = (cols >= NN) & (cols < NN + k_len)
    if HAS_KEY_MASK:
        km = tl.load(km_base + j_rows * s_mn, mask=ok, other=0)
        ok = ok & (km != 0)
    if HAS_NULL:
        ok = ok | (cols < NN)
    return ok


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, nk_ptr, nv_ptr, cuq_ptr, cuk_ptr, seed_ptr, out_ptr, lse_ptr,
    H, LQ, LK, NN, D,
    scale_hi, scale_lo, rdrop_hi, rdrop_lo, drop_threshold,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    s_nkh, s_nkn, s_nkd,
    s_nvh, s_nvn, s_nvd,
    s_ob, s_oh, s_om, s_od,
    s_lb, s_lh,
    IS_VARLEN: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_NULL: tl.constexpr, MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr, BCAST: tl.constexpr, IS_FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(cuq_ptr, b, LQ, IS_VARLEN)
    k_start, k_len = _seq_bounds(cuk_ptr, b, LK, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < D
    q_rows = q_start + offs_m.to(tl.int64)

    q = tl.load(q_ptr + b64 * s_qb + h64 * s_qh + q_rows[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b64 * s_kb + h64 * s_kh
    v_base = v_ptr + b64 * s_vb + h64 * s_vh
    km_base = km_ptr + b64 * s_mb
    nk_base = nk_ptr + h64 * s_nkh
    nv_base = nv_ptr + h64 * s_nvh
    sc = _scalar(scale_hi, scale_lo, IS_FP64)

    off = _mask_offset(q_len, k_len, MASK_KIND)
    c_end = NN + k_len
    if MASK_KIND != 0:  # the last column any row of this block may see
        c_end = tl.minimum(c_end, NN + m0 + BLOCK_M + off)

    if DROPOUT:
        seed_lo, seed_hi = _seed_halves(seed_ptr)
        if IS_VARLEN:
            g_rows = q_rows
        else:
            g_rows = b64 * LQ + offs_m
        row_key = _row_keys(seed_lo, seed_hi, g_rows, h, H)

    m_i = _full_vec(BLOCK_M, float("-inf"), IS_FP64)
    l_i = _full_vec(BLOCK_M, 0.0, IS_FP64)
    acc = zeros_acc(BLOCK_M, BLOCK_D, IS_FP64)

    for c0 in range(0, c_end, BLOCK_N):
        cols = c0 + offs_n
        j = cols - NN
        j_rows = k_start + j.to(tl.int64)
        kt = _load_kv_tile(k_base, nk_base, cols, j_rows, offs_d, mask_d, s_kn, s_kd, s_nkn, s_nkd, NN, k_len,
                           HAS_NULL)
        vt = _load_kv_tile(v_base, nv_base, cols, j_rows, offs_d, mask_d, s_vn, s_vd, s_nvn, s_nvd, NN, k_len,
                           HAS_NULL)
        ok = _valid_cols(km_base, s_mn, cols, j_rows, NN, k_len, HAS_KEY_MASK, HAS_NULL)
        valid = ok[None, :] & mask_m[:, None]
        if MASK_KIND != 0:
            valid = valid & (j[None, :] <= offs_m[:, None] + off)

        s = _dot_nt(q, kt, BCAST, IS_FP64, PREC) * sc
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf for rows without columns yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            bits = _fmix32(row_key[:, None] ^ _col_hash(cols)[None, :])
            p = tl.where((bits >> 8) >= drop_threshold, p, 0.0)
        acc = acc * alpha[:, None] + _dot_nn(p, vt, BCAST, IS_FP64, PREC)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DROPOUT:
        o = o * _scalar(rdrop_hi, rdrop_lo, IS_FP64)
    lse = tl.where(has, m_i + tl.log(l_safe), float("inf"))
    tl.store(out_ptr + b64 * s_ob + h64 * s_oh + q_rows[:, None] * s_om + offs_d[None, :] * s_od,
             o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + b64 * s_lb + h64 * s_lh + q_rows, lse.to(lse_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, cuq_ptr, delta_ptr,
    LQ, D,
    s_ob, s_oh, s_om, s_od,
    s_gb, s_gh, s_gm, s_gd,
    s_lb, s_lh,
    IS_VARLEN: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(cuq_ptr, b, LQ, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    q_rows = q_start + offs_m.to(tl.int64)
    o = tl.load(o_ptr + b64 * s_ob + h64 * s_oh + q_rows[:, None] * s_om + offs_d[None, :] * s_od,
                mask=mask, other=0.0)
    do = tl.load(do_ptr + b64 * s_gb + h64 * s_gh + q_rows[:, None] * s_gm + offs_d[None, :] * s_gd,
                 mask=mask, other=0.0)
    if IS_FP64:
        delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), axis=1)
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + b64 * s_lb + h64 * s_lh + q_rows, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, nk_ptr, nv_ptr, cuq_ptr, cuk_ptr, seed_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dnk_ptr, dnv_ptr,
    H, LQ, LK, NN, D,
    scale_hi, scale_lo, rdrop_hi, rdrop_lo, drop_threshold,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    s_nkh, s_nkn, s_nkd,
    s_nvh, s_nvn, s_nvd,
    s_gb, s_gh, s_gm, s_gd,
    s_lb, s_lh,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    s_pb, s_ph, s_pn,
    IS_VARLEN: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_NULL: tl.constexpr, MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr, BCAST: tl.constexpr, IS_FP64: tl.constexpr, PREC: tl.constexpr,
    STORE_DK: tl.constexpr, STORE_DV: tl.constexpr, STORE_DNK: tl.constexpr, STORE_DNV: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(cuq_ptr, b, LQ, IS_VARLEN)
    k_start, k_len = _seq_bounds(cuk_ptr, b, LK, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= NN + k_len:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    cols = n0 + tl.arange(0, BLOCK_N)
    j = cols - NN
    j_rows = k_start + j.to(tl.int64)
    k_base = k_ptr + b64 * s_kb + h64 * s_kh
    v_base = v_ptr + b64 * s_vb + h64 * s_vh
    nk_base = nk_ptr + h64 * s_nkh
    nv_base = nv_ptr + h64 * s_nvh
    kt = _load_kv_tile(k_base, nk_base, cols, j_rows, offs_d, mask_d, s_kn, s_kd, s_nkn, s_nkd, NN, k_len, HAS_NULL)
    vt = _load_kv_tile(v_base, nv_base, cols, j_rows, offs_d, mask_d, s_vn, s_vd, s_nvn, s_nvd, NN, k_len, HAS_NULL)
    ok = _valid_cols(km_ptr + b64 * s_mb, s_mn, cols, j_rows, NN, k_len, HAS_KEY_MASK, HAS_NULL)
    sc = _scalar(scale_hi, scale_lo, IS_FP64)
    off = _mask_offset(q_len, k_len, MASK_KIND)
    q_base = q_ptr + b64 * s_qb + h64 * s_qh
    do_base = do_ptr + b64 * s_gb + h64 * s_gh
    l_base = b64 * s_lb + h64 * s_lh
    if DROPOUT:
        seed_lo, seed_hi = _seed_halves(seed_ptr)
        col_hash = _col_hash(cols)
        rdrop = _scalar(rdrop_hi, rdrop_lo, IS_FP64)

    dk = zeros_acc(BLOCK_N, BLOCK_D, IS_FP64)
    dv = zeros_acc(BLOCK_N, BLOCK_D, IS_FP64)

    m_lo = q_len * 0
    if MASK_KIND != 0:  # query i sees key j only when i >= j - off; null columns are seen by every row
        m_lo = tl.maximum(n0 - NN - off, 0)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    for m0 in range(m_lo, q_len, BLOCK_M):
        rows = m0 + offs_m
        mask_m = rows < q_len
        q_rows = q_start + rows.to(tl.int64)
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + q_rows[:, None] * s_qm + offs_d[None, :] * s_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + q_rows[:, None] * s_gm + offs_d[None, :] * s_gd, mask=mask_md, other=0.0)
        lse = tl.load(lse_ptr + l_base + q_rows, mask=mask_m, other=float("inf"))
        delta = tl.load(delta_ptr + l_base + q_rows, mask=mask_m, other=0.0)

        valid = ok[:, None] & mask_m[None, :]
        if MASK_KIND != 0:
            valid = valid & (j[:, None] <= rows[None, :] + off)
        s = _dot_nt(kt, q, BCAST, IS_FP64, PREC) * sc  # [BLOCK_N, BLOCK_M], the transposed scores
        p = tl.where(valid, tl.exp(s - lse[None, :]), 0.0)
        dp = _dot_nt(vt, do, BCAST, IS_FP64, PREC)
        if DROPOUT:
            if IS_VARLEN:
                g_rows = q_rows
            else:
                g_rows = b64 * LQ + rows
            row_key = _row_keys(seed_lo, seed_hi, g_rows, h, H)
            keep = (_fmix32(row_key[None, :] ^ col_hash[:, None]) >> 8) >= drop_threshold
            pd = tl.where(keep, p * rdrop, 0.0)
            dp = tl.where(keep, dp * rdrop, 0.0)
        else:
            pd = p
        if NEED_DV:
            dv += _dot_nn(pd, do, BCAST, IS_FP64, PREC)
        if NEED_DK:
            ds = p * (dp - delta[None, :])
            dk += _dot_nn(ds, q, BCAST, IS_FP64, PREC)
    dk = dk * sc

    is_key = (cols >= NN) & (cols < NN + k_len)
    key_md = is_key[:, None] & mask_d[None, :]
    if STORE_DK:
        tl.store(dk_ptr + b64 * s_dkb + h64 * s_dkh + j_rows[:, None] * s_dkn + offs_d[None, :] * s_dkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=key_md)
    if STORE_DV:
        tl.store(dv_ptr + b64 * s_dvb + h64 * s_dvh + j_rows[:, None] * s_dvn + offs_d[None, :] * s_dvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=key_md)
    if HAS_NULL:
        null_md = (cols < NN)[:, None] & mask_d[None, :]
        p_off = b64 * s_pb + h64 * s_ph + cols.to(tl.int64)[:, None] * s_pn + offs_d[None, :]
        if STORE_DNK:
            tl.store(dnk_ptr + p_off, dk, mask=null_md)
        if STORE_DNV:
            tl.store(dnv_ptr + p_off, dv, mask=null_md)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, nk_ptr, nv_ptr, cuq_ptr, cuk_ptr, seed_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, LQ, LK, NN, D,
    scale_hi, scale_lo, rdrop_hi, rdrop_lo, drop_threshold,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    s_nkh, s_nkn, s_nkd,
    s_nvh, s_nvn, s_nvd,
    s_gb, s_gh, s_gm, s_gd,
    s_lb, s_lh,
    s_dqb, s_dqh, s_dqm, s_dqd,
    IS_VARLEN: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_NULL: tl.constexpr, MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr, BCAST: tl.constexpr, IS_FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(cuq_ptr, b, LQ, IS_VARLEN)
    k_start, k_len = _seq_bounds(cuk_ptr, b, LK, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q_rows = q_start + offs_m.to(tl.int64)
    q = tl.load(q_ptr + b64 * s_qb + h64 * s_qh + q_rows[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=mask_md, other=0.0)
    do = tl.load(do_ptr + b64 * s_gb + h64 * s_gh + q_rows[:, None] * s_gm + offs_d[None, :] * s_gd,
                 mask=mask_md, other=0.0)
    l_off = b64 * s_lb + h64 * s_lh + q_rows
    lse = tl.load(lse_ptr + l_off, mask=mask_m, other=float("inf"))
    delta = tl.load(delta_ptr + l_off, mask=mask_m, other=0.0)
    k_base = k_ptr + b64 * s_kb + h64 * s_kh
    v_base = v_ptr + b64 * s_vb + h64 * s_vh
    km_base = km_ptr + b64 * s_mb
    nk_base = nk_ptr + h64 * s_nkh
    nv_base = nv_ptr + h64 * s_nvh
    sc = _scalar(scale_hi, scale_lo, IS_FP64)

    off = _mask_offset(q_len, k_len, MASK_KIND)
    c_end = NN + k_len
    if MASK_KIND != 0:
        c_end = tl.minimum(c_end, NN + m0 + BLOCK_M + off)

    if DROPOUT:
        seed_lo, seed_hi = _seed_halves(seed_ptr)
        if IS_VARLEN:
            g_rows = q_rows
        else:
            g_rows = b64 * LQ + offs_m
        row_key = _row_keys(seed_lo, seed_hi, g_rows, h, H)
        rdrop = _scalar(rdrop_hi, rdrop_lo, IS_FP64)

    dq = zeros_acc(BLOCK_M, BLOCK_D, IS_FP64)
    for c0 in range(0, c_end, BLOCK_N):
        cols = c0 + offs_n
        j = cols - NN
        j_rows = k_start + j.to(tl.int64)
        kt = _load_kv_tile(k_base, nk_base, cols, j_rows, offs_d, mask_d, s_kn, s_kd, s_nkn, s_nkd, NN, k_len,
                           HAS_NULL)
        vt = _load_kv_tile(v_base, nv_base, cols, j_rows, offs_d, mask_d, s_vn, s_vd, s_nvn, s_nvd, NN, k_len,
                           HAS_NULL)
        ok = _valid_cols(km_base, s_mn, cols, j_rows, NN, k_len, HAS_KEY_MASK, HAS_NULL)
        valid = ok[None, :] & mask_m[:, None]
        if MASK_KIND != 0:
            valid = valid & (j[None, :] <= offs_m[:, None] + off)
        s = _dot_nt(q, kt, BCAST, IS_FP64, PREC) * sc
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot_nt(do, vt, BCAST, IS_FP64, PREC)
        if DROPOUT:
            keep = (_fmix32(row_key[:, None] ^ _col_hash(cols)[None, :]) >> 8) >= drop_threshold
            dp = tl.where(keep, dp * rdrop, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot_nn(ds, kt, BCAST, IS_FP64, PREC)
    dq = dq * sc
    tl.store(dq_ptr + b64 * s_dqb + h64 * s_dqh + q_rows[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32: "tf32x3" (three TF32 tensor-core products, a few fp32 ulps from
    exact) unless torch allows TF32 matmuls ("tf32"). Exact "ieee" fp32 products lower to CUDA-core FMAs
    that hold their operands in registers: compiled for sm_90, the forward at head dim 64 spilled 7.8 KB
    per thread with 64 x 64 tiles, and every fp32 tile from head dim 32 up spilled
    (bench/results/sm90-compile). fp16/bf16 products are exact either way; ROCm keeps "ieee"."""
    if dtype != torch.float32 or torch.version.hip is not None:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# (BLOCK_M, BLOCK_N, num_warps) per kernel kind, for tensor-core products (head dim >= 16) in fp16 /
# bf16 and in fp32 ("tf32x3"), and for the CUDA-core broadcast products (head dims 4 and 8, any dtype
# but fp64). Chosen from sm_90 compiles (imer_fast.testing.triton_aot) as the largest tiles whose code
# keeps every value in registers (no stack bytes) with key masks, null tokens and the future mask on
# (fp32 at head dim 128: none does; these spill 8-24 bytes). Other flag combinations (dropout, varlen)
# spill at most 80 bytes per thread with them (184 for fp32 dq at head dim 128), where exact fp32
# products with the earlier 64 x 64 tiles spilled up to 9.4 KB. "dkdv": BLOCK_M queries streamed past
# BLOCK_N keys held.
_HALF_TILES = {
    "fwd": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 8), 128: (64, 32, 8)},
    "dq": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 8), 128: (32, 32, 8)},
    "dkdv": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 8), 128: (32, 32, 8)},
}
_FP32_TILES = {
    "fwd": {16: (64, 64, 4), 32: (64, 32, 4), 64: (32, 32, 8), 128: (16, 16, 8)},
    "dq": {16: (64, 32, 4), 32: (64, 32, 4), 64: (32, 16, 8), 128: (16, 16, 4)},
    "dkdv": {16: (32, 64, 4), 32: (32, 64, 8), 64: (32, 16, 8), 128: (32, 16, 8)},
}
_BCAST_TILES = {
    "fwd": {4: (64, 32, 8), 8: (32, 32, 8)},
    "dq": {4: (64, 32, 8), 8: (32, 32, 8)},
    "dkdv": {4: (64, 32, 4), 8: (32, 32, 8)},
}


def _blocks(dtype: torch.dtype, head_dim: int, rows: int, cols: int, kind: str) -> Tuple[int, int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, BCAST, num_warps) for `rows` queries and `cols` (null + key) columns.

    kind: "fwd" (forward), "dkdv" (key-side backward: BLOCK_N keys held, BLOCK_M queries streamed),
    "dq" (query-side backward)."""
    block_d = _pow2(head_dim, 4, _MAX_HEAD_DIM)
    bcast = dtype == torch.float64 or block_d < 16
    if dtype == torch.float64:  # broadcast products [M, N, D] in fp64 (gradcheck): keep them small
        bm = bn = 16 if block_d >= 64 else 32
        num_warps = 4
    elif bcast:
        bm, bn, num_warps = _BCAST_TILES[kind][block_d]
    elif dtype == torch.float32:
        bm, bn, num_warps = _FP32_TILES[kind][block_d]
    else:
        bm, bn, num_warps = _HALF_TILES[kind][block_d]
    # short sequences: no wider than needed (16 is tl.dot's minimum)
    bm = min(bm, _pow2(rows, 16, 128))
    bn = min(bn, _pow2(cols, 16, 128))
    return bm, bn, block_d, bcast, num_warps


def _hi_lo(x: float) -> Tuple[float, float]:
    """x as an fp32 pair hi + lo (Triton passes Python floats as fp32; fp64 kernels add them back)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


class _Problem:
    """Shapes, strides and flags shared by the launches of one call."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], null_k: Optional[Tensor],
                 null_v: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                 max_seqlen_q: int, max_seqlen_k: int, scale: float, mask_kind: int, dropout_p: float,
                 dropout_seed: Optional[Tensor]):
        self.varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
        rank = 3 if self.varlen else 4
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != rank:
                layout = "[total, heads, head_dim] (varlen)" if self.varlen else "[batch, heads, length, head_dim]"
                raise ValueError(f"{_OP}{name} must be {layout}; got shape {tuple(t.shape)}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{_OP}unsupported dtype {q.dtype}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"{_OP}q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
        if (k.shape != v.shape or k.shape[-1] != q.shape[-1] or k.shape[1] != q.shape[1]
                or (not self.varlen and k.shape[0] != q.shape[0])):
            raise ValueError(f"{_OP}incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        self.head_dim = q.shape[-1]
        if self.head_dim > _MAX_HEAD_DIM:
            raise ValueError(f"{_OP}head dim {self.head_dim} is above {_MAX_HEAD_DIM}")
        if mask_kind not in (0, 1, 2):
            raise ValueError(f"{_OP}mask_kind must be 0 (none), 1 (causal) or 2 (future); got {mask_kind}")
        if (null_k is None) != (null_v is None):
            raise ValueError(f"{_OP}null_k and null_v must be given together")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"{_OP}dropout_p must be in [0, 1); got {dropout_p}")
        self.dropout = dropout_p > 0.0
        if self.dropout and (dropout_seed is None or dropout_seed.numel() != 1):
            raise ValueError(f"{_OP}dropout_p > 0 needs a one-element int64 dropout_seed")

        if self.varlen:
            if cu_seqlens_q is None or cu_seqlens_k is None or cu_seqlens_q.numel() != cu_seqlens_k.numel():
                raise ValueError(f"{_OP}the varlen layout needs cu_seqlens_q and cu_seqlens_k of equal length")
            self.batch, self.heads = cu_seqlens_q.numel() - 1, q.shape[1]
            self.lq, self.lk = int(max_seqlen_q), int(max_seqlen_k)  # grid bounds; lengths come from cu_seqlens
            self.cu_q, self.cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
            # [T, H, D] read as (batch stride 0, head, row, dim)
            self.q_strides = (0, q.stride(1), q.stride(0), q.stride(2))
            self.k_strides = (0, k.stride(1), k.stride(0), k.stride(2))
            self.v_strides = (0, v.stride(1), v.stride(0), v.stride(2))
            self.lse_shape = (self.heads, q.shape[0])
            self.lse_strides = (0, q.shape[0])
        else:
            self.batch, self.heads, self.lq, self.lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            self.cu_q = self.cu_k = None
            self.q_strides, self.k_strides, self.v_strides = q.stride(), k.stride(), v.stride()
            self.lse_shape = tuple(q.shape[:3])
            self.lse_strides = (self.heads * self.lq, self.lq)
        self.num_null = null_k.shape[1] if null_k is not None else 0
        self.has_null = null_k is not None and self.num_null > 0
        self.null_k, self.null_v = null_k, null_v
        self.nk_strides = null_k.stride() if self.has_null else (0, 0, 0)
        self.nv_strides = null_v.stride() if self.has_null else (0, 0, 0)
        self.key_mask = key_mask.view(torch.uint8) if key_mask is not None else None
        if key_mask is None:
            self.km_strides = (0, 0)
        elif self.varlen:
            self.km_strides = (0, key_mask.stride(0))
        else:
            self.km_strides = key_mask.stride()
        self.mask_kind = int(mask_kind)
        self.scale = _hi_lo(float(scale))
        self.rdrop = _hi_lo(1.0 / (1.0 - dropout_p)) if self.dropout else (1.0, 0.0)
        self.threshold = int(dropout_p * 16777216.0)
        self.seed = dropout_seed.reshape(1) if self.dropout else None
        self.dtype = q.dtype
        self.acc = _acc_dtype(q.dtype)
        self.prec = _precision(q.dtype)

    def out_strides(self, t: Tensor) -> Tuple[int, int, int, int]:
        if self.varlen:
            return (0, t.stride(1), t.stride(0), t.stride(2))
        return tuple(t.stride())

    def pointers(self, q: Tensor) -> tuple:
        """(km, null_k, null_v, cu_q, cu_k, seed) with q standing in for absent tensors (never read)."""
        return (self.key_mask if self.key_mask is not None else q,
                self.null_k if self.has_null else q, self.null_v if self.has_null else q,
                self.cu_q if self.cu_q is not None else q, self.cu_k if self.cu_k is not None else q,
                self.seed if self.seed is not None else q)

    def common_args(self) -> tuple:
        return (self.heads, self.lq, self.lk, self.num_null, self.head_dim, *self.scale, *self.rdrop, self.threshold)

    def input_strides(self) -> tuple:
        return (*self.q_strides, *self.k_strides, *self.v_strides, *self.km_strides, *self.nk_strides,
                *self.nv_strides)

    def flags(self) -> dict:
        return dict(IS_VARLEN=self.varlen, HAS_KEY_MASK=self.key_mask is not None, HAS_NULL=self.has_null,
                    MASK_KIND=self.mask_kind, DROPOUT=self.dropout, IS_FP64=self.dtype == torch.float64,
                    PREC=self.prec)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], null_k: Optional[Tensor],
                      null_v: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                      max_seqlen_q: int, max_seqlen_k: int, scale: float, mask_kind: int, dropout_p: float,
                      dropout_seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out like ``torch.empty_like(q)``, lse [B, H, Lq] / [H, Tq] in fp32 (fp64 for fp64 q))."""
    pb = _Problem(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale, mask_kind, dropout_p, dropout_seed)
    out = torch.empty_like(q)
    lse = torch.empty(pb.lse_shape, dtype=pb.acc, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if pb.batch == 0 or pb.heads == 0 or pb.lq == 0:
        return out, lse
    bm, bn, bd, bcast, num_warps = _blocks(q.dtype, pb.head_dim, pb.lq, pb.num_null + pb.lk, "fwd")
    grid = (triton.cdiv(pb.lq, bm), pb.heads, pb.batch)
    _attn_fwd_kernel[grid](
        q, k, v, *pb.pointers(q), out, lse,
        *pb.common_args(),
        *pb.input_strides(),
        *pb.out_strides(out),
        *pb.lse_strides,
        **pb.flags(), BCAST=bcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps,
    )
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       key_mask: Optional[Tensor], null_k: Optional[Tensor], null_v: Optional[Tensor],
                       cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                       max_seqlen_k: int, scale: float, mask_kind: int, dropout_p: float,
                       dropout_seed: Optional[Tensor], output_mask: List[bool]
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dnull_k, dnull_v); outputs not asked for by ``output_mask`` (and the null-token
    gradients without null tokens) are distinct empty tensors."""
    pb = _Problem(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale, mask_kind, dropout_p, dropout_seed)
    mask = [bool(m) for m in output_mask]
    if len(mask) != 5:
        raise ValueError(f"{_OP}output_mask must hold 5 booleans; got {output_mask}")
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"{_OP}grad_out and out must have q's shape {tuple(q.shape)}; got "
                         f"{tuple(grad_out.shape)} and {tuple(out.shape)}")
    if tuple(lse.shape) != pb.lse_shape:
        raise ValueError(f"{_OP}lse must have shape {list(pb.lse_shape)}; got {tuple(lse.shape)}")
    has_null = null_k is not None
    want_dq, want_dk, want_dv = mask[0], mask[1], mask[2]
    want_dnk, want_dnv = mask[3] and has_null, mask[4] and has_null
    # Outputs not asked for are distinct empty tensors (one shared tensor would alias the outputs).
    dq = torch.empty_like(q) if want_dq else q.new_empty(0)
    # like k and v (one packed k|v buffer when they are halves of one): what the fake promises compile
    from imer_fast.ops.attention import key_value_gradient_buffers

    dk, dv = key_value_gradient_buffers(k, v, want_dk, want_dv, pb.varlen)
    dnk = torch.empty_like(null_k) if want_dnk else q.new_empty(0)
    dnv = torch.empty_like(null_v) if want_dnv else q.new_empty(0)
    if not any((want_dq, want_dk, want_dv, want_dnk, want_dnv)):
        return dq, dk, dv, dnk, dnv
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    lse = lse.to(pb.acc).contiguous()
    nn_ = pb.num_null if pb.has_null else 0
    run_queries = pb.batch > 0 and pb.heads > 0 and pb.lq > 0
    run_keys = pb.batch > 0 and pb.heads > 0 and nn_ + pb.lk > 0

    delta = torch.empty(pb.lse_shape, dtype=pb.acc, device=q.device)
    need_ds = want_dq or want_dk or want_dnk
    if need_ds and run_queries and lse.numel() > 0:
        bm, _, bd, _, num_warps = _blocks(q.dtype, pb.head_dim, pb.lq, 1, "fwd")
        _attn_bwd_delta_kernel[(triton.cdiv(pb.lq, bm), pb.heads, pb.batch)](
            out, grad_out, pb.cu_q if pb.cu_q is not None else q, delta,
            pb.lq, pb.head_dim,
            *pb.out_strides(out), *pb.out_strides(grad_out), *pb.lse_strides,
            IS_VARLEN=pb.varlen, IS_FP64=q.dtype == torch.float64, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps,
        )

    if want_dk or want_dv or want_dnk or want_dnv:
        # per-(batch, head) partial null-token gradients, summed over the batch below in a fixed order
        part_shape = (pb.batch, pb.heads, nn_, pb.head_dim)
        part_k = torch.empty(part_shape, dtype=pb.acc, device=q.device) if want_dnk else None
        part_v = torch.empty(part_shape, dtype=pb.acc, device=q.device) if want_dnv else None
        if run_keys and (dk.numel() > 0 or dv.numel() > 0 or want_dnk or want_dnv):
            bm, bn, bd, bcast, num_warps = _blocks(q.dtype, pb.head_dim, pb.lq, nn_ + pb.lk, "dkdv")
            grid = (triton.cdiv(nn_ + pb.lk, bn), pb.heads, pb.batch)
            ref = part_k if part_k is not None else part_v
            p_strides = ref.stride()[:3] if ref is not None else (0, 0, 0)
            _attn_bwd_dkdv_kernel[grid](
                q, k, v, *pb.pointers(q), grad_out, lse, delta,
                dk if want_dk else q, dv if want_dv else q,
                part_k if part_k is not None else q, part_v if part_v is not None else q,
                *pb.common_args(),
                *pb.input_strides(),
                *pb.out_strides(grad_out),
                *pb.lse_strides,
                *(pb.out_strides(dk) if want_dk else (0, 0, 0, 0)),
                *(pb.out_strides(dv) if want_dv else (0, 0, 0, 0)),
                *p_strides,
                **pb.flags(), BCAST=bcast, STORE_DK=want_dk, STORE_DV=want_dv, STORE_DNK=want_dnk,
                STORE_DNV=want_dnv, NEED_DK=want_dk or want_dnk, NEED_DV=want_dv or want_dnv,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps,
            )
        elif want_dk or want_dv:  # no key program runs: no key rows, or no (batch, head)
            for t in (dk, dv):
                if t.numel():
                    t.zero_()
        if want_dnk:
            dnk.copy_(part_k.sum(0) if pb.batch > 0 and run_keys else torch.zeros_like(null_k))
        if want_dnv:
            dnv.copy_(part_v.sum(0) if pb.batch > 0 and run_keys else torch.zeros_like(null_v))

    if want_dq and dq.numel() > 0:
        if run_queries:
            bm, bn, bd, bcast, num_warps = _blocks(q.dtype, pb.head_dim, pb.lq, nn_ + pb.lk, "dq")
            grid = (triton.cdiv(pb.lq, bm), pb.heads, pb.batch)
            _attn_bwd_dq_kernel[grid](
                q, k, v, *pb.pointers(q), grad_out, lse, delta, dq,
                *pb.common_args(),
                *pb.input_strides(),
                *pb.out_strides(grad_out),
                *pb.lse_strides,
                *pb.out_strides(dq),
                **pb.flags(), BCAST=bcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps,
            )
        else:
            dq.zero_()
    return dq, dk, dv, dnk, dnv
