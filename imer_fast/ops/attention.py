"""Masked multi-head attention: ``imer_fast::attention`` and the public :func:`attention`.

Semantics (the contract every backend implements). For one sequence, head ``h`` and query ``i``:

    keys     = [null_k[h, 0..Nn), k[0..Lk)]        values = [null_v[h, 0..Nn), v[0..Lk)]
    s[i, c]  = scale * <q[i], keys[c]>             for the valid columns c of row i
    p[i, c]  = softmax_c(s[i, c])                  lse[i] = log sum_c exp(s[i, c])
    out[i]   = sum_c p[i, c] * keep(i, c) / (1 - dropout_p) * values[c]

Column ``c = n < Nn`` is the n-th null token (always valid); column ``c = Nn + j`` is key ``j``, valid
unless ``key_mask[j]`` is False, or ``mask_kind`` hides it:

- ``"none"`` (0): nothing hidden;
- ``"causal"`` (1): ``j > i`` hidden (top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``);
- ``"future"`` (2): MulT's ``triu(-inf, 1 + |Lk - Lq|)``, i.e. ``j > i + |Lk - Lq|`` hidden, with the
  lengths of the sequence (per sequence in the varlen layout).

A query row with no valid column returns zeros and zero gradients, never NaN; its ``lse`` is +inf
(so ``exp(s - lse) = 0`` in the backward).

Layouts: padded ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]``, ``key_mask [B, Lk]``; or packed varlen
when ``cu_seqlens_q`` / ``cu_seqlens_k`` ([B + 1], int32/int64, starting at 0, non-decreasing) are
given: ``q [Tq, H, D]``, ``k, v [Tk, H, D]``, ``key_mask [Tk]``, sequence b owning rows
``cu_seqlens[b]:cu_seqlens[b + 1]``, so padding costs nothing. Inputs may have any strides (a view of
a packed projection is read in place); ``out`` is allocated like ``torch.empty_like(q)`` (q's memory
layout when q is dense), ``lse`` is contiguous ``[B, H, Lq]`` (padded) or ``[H, Tq]`` (varlen) in
float32 (float64 for float64 inputs). fp16/bf16 accumulate in fp32.

Dropout (training) uses a counter-based hash, so the backward regenerates the forward's mask and
every backend drops the same entries for the same ``dropout_seed`` (one int64 on q's device). All
arithmetic is on uint32 (wrapping); ``fmix`` is MurmurHash3's finaliser:

    row      = b * Lq + i (padded) or the packed query index (varlen)
    s_lo, s_hi = low and high 32 bits of the seed (two's complement)
    row_key  = fmix(s_lo ^ fmix(row * H + h + s_hi))
    bits     = fmix(row_key ^ (c * 0x9E3779B9))
    keep     = (bits >> 8) >= floor(dropout_p * 2**24)

Since the seed's high half is added to ``row * H + h``, seeds that differ by a multiple of 2**32 shift
the masks by whole heads or rows (seed + 2**32 gives head h + 1's mask): derive seeds by hashing or
drawing them (the default draws from torch's generator), not as ``epoch << 32``. Under ``torch.compile``
a call without ``dropout_seed`` draws its seed from inductor's RNG, so compiled and eager runs under the
same ``torch.manual_seed`` drop different entries (each is repeatable).

Masked keys are skipped outright on the C++ few-keys path (at most 8 keys) but weighted by an exact 0
elsewhere (as SDPA does): NaN or inf stored in a masked key or value then reaches the output. Fill absent
modalities with zeros, not NaN.

Backends (:func:`select_attention_backend`): Triton on CUDA (``kernels/attention.py``: online-softmax
tiles, a CUDA-core variant for head dims below 16), C++ on CPU (``csrc/cpu/attention.cpp``), and the
pure-torch :func:`attention_ref`, which materialises the scores. Double backward is not supported.
On the CPU, float32 / float64 padded problems with a head dim >= 64 (of stride 1), both lengths >= 128
and no key mask that hides a key, no null tokens and no dropout (causal, or ``"future"`` with Lq == Lk, allowed) run ATen's flash kernel, which is faster
there (measured, see the C++ file); its gradients are bitwise repeatable for a given thread count but,
like MKL's GEMMs, not across thread counts. Every other CPU result is independent of the thread count.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from . import _runtime
from ._hash import GOLDEN as _GOLDEN
from ._hash import M32 as _M32
from ._hash import fmix32 as _fmix32
from ._hash import mul32 as _mul32

_runtime.require_cpp()

MASK_KINDS = {"none": 0, "causal": 1, "future": 2}


# ---- the dropout hash (imer_fast/ops/_hash.py), written with int64 tensors ---------------------


def dropout_keep_ref(seed: Tensor, rows: Tensor, heads: int, cols: int, dropout_p: float) -> Tensor:
    """Keep mask [len(rows), heads, cols] of the dropout hash (see module doc) for global query rows."""
    seed = seed.reshape(()).to(torch.int64).cpu()
    s_lo, s_hi = seed & _M32, (seed >> 32) & _M32
    rows = rows.to(torch.int64).cpu()
    h = torch.arange(heads, dtype=torch.int64)
    row_head = (_mul32(rows[:, None], heads) + h[None, :] + s_hi) & _M32
    row_key = _fmix32(s_lo ^ _fmix32(row_head))
    col_hash = _mul32(torch.arange(cols, dtype=torch.int64), _GOLDEN)
    bits = _fmix32(row_key[:, :, None] ^ col_hash[None, None, :])
    threshold = int(dropout_p * 16777216.0)
    return (bits >> 8) >= threshold


# ---- the pure-torch twin -----------------------------------------------------------------------


def _padded_ref(q, k, v, key_valid, null_k, null_v, rows, scale, mask_kind, dropout_p, dropout_seed):
    """q [B, H, Lq, D], k/v [B, H, Lk, D], key_valid [B, Lk] bool, rows [B, Lq] global query rows.

    Returns (out [B, H, Lq, D] in the compute dtype, lse [B, H, Lq])."""
    batch, heads, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    num_null = null_k.shape[1] if null_k is not None else 0
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if num_null:
        k = torch.cat([null_k.to(compute).expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([null_v.to(compute).expand(batch, -1, -1, -1), v], dim=2)
    scores = scale * (q @ k.transpose(-1, -2))  # [B, H, Lq, Nn + Lk]
    i = torch.arange(lq, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None, :]
    hidden = ~key_valid.to(q.device)[:, None, :].expand(batch, lq, lk)
    if mask_kind == MASK_KINDS["causal"]:
        hidden = hidden | (j > i)
    elif mask_kind == MASK_KINDS["future"]:
        hidden = hidden | (j > i + abs(lk - lq))
    hidden = torch.cat([hidden.new_zeros(batch, lq, num_null), hidden], dim=2)[:, None]  # [B, 1, Lq, Nn + Lk]
    any_valid = ~hidden.all(dim=-1, keepdim=True)
    scores = scores.masked_fill(hidden, float("-inf")).masked_fill(~any_valid, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * any_valid
    if dropout_p > 0.0:
        keep = dropout_keep_ref(dropout_seed, rows.reshape(-1), heads, num_null + lk, dropout_p)
        keep = keep.view(batch, lq, heads, num_null + lk).transpose(1, 2).to(q.device)
        probs = probs * keep.to(compute) / (1.0 - dropout_p)
    out = probs @ v
    lse = lse.squeeze(-1).masked_fill(~any_valid.squeeze(-1), float("inf"))
    return out, lse


def attention_ref_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, null_k: Optional[Tensor] = None,
    null_v: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    scale: Optional[float] = None, mask: str = "none", dropout_p: float = 0.0, dropout_seed: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`attention_ref` that also returns the log-sum-exp in the op's layout."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (scale, MASK_KINDS[mask], dropout_p, dropout_seed)
    if cu_seqlens_q is None:
        batch, lq, lk = q.shape[0], q.shape[2], k.shape[2]
        valid = key_mask if key_mask is not None else torch.ones(batch, lk, dtype=torch.bool, device=q.device)
        rows = torch.arange(batch * lq).view(batch, lq)
        out, lse = _padded_ref(q, k, v, valid, null_k, null_v, rows, *args)
        return torch.empty_like(q).copy_(out), lse  # the op's output layout (like q's)
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        valid = key_mask[k0:k1] if key_mask is not None else torch.ones(k1 - k0, dtype=torch.bool, device=q.device)
        seq = lambda t, a, z: t[a:z].transpose(0, 1)[None]  # noqa: E731  [1, H, L, D]
        o, l_ = _padded_ref(seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), valid[None], null_k, null_v,
                            torch.arange(q0, q1)[None], *args)
        outs.append(o[0].transpose(0, 1))
        lses.append(l_[0])
    if outs:
        out = torch.cat(outs)
    else:  # an empty batch: zeros still tied to every input, so backward gives zero gradients as the kernels do
        tied = [t.sum() for t in (q, k, v, null_k, null_v) if t is not None]
        out = q.new_zeros(q.shape) + 0 * torch.stack(tied).sum()
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=_lse_dtype(q.dtype))
    return out.to(q.dtype), lse


def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, null_k: Optional[Tensor] = None,
    null_v: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    scale: Optional[float] = None, mask: str = "none", dropout_p: float = 0.0, dropout_seed: Optional[Tensor] = None,
) -> Tensor:
    """Pure-torch twin written from the math (module doc): materialises the scores, one sequence at a time."""
    return attention_ref_with_lse(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, scale, mask,
                                  dropout_p, dropout_seed)[0]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- operator registration: fake, autograd, CUDA (Triton) --------------------------------------


def _lse_shape(q: Tensor, cu_seqlens_q: Optional[Tensor]):
    return (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else tuple(q.shape[:3])


@torch.library.register_fake("imer_fast::attention")
def _attention_fake(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, mask_kind, dropout_p, dropout_seed):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=_lse_dtype(q.dtype))


def key_value_gradient_buffers(k: Tensor, v: Tensor, need_dk: bool, need_dv: bool,
                               varlen: bool) -> Tuple[Tensor, Tensor]:
    """dk and dv laid out like k and v: when k and v are the two halves of one packed k|v projection
    ([Lk, B, 2, H, D] rows, viewed as [B, H, Lk, D]), so are dk and dv, and the projection's backward
    reads the pair as one matrix without a copy. The C++ kernel (``key_value_gradients`` in
    csrc/cpu/attention.cpp) applies the same rule, the Triton launcher calls this, and the fake
    implementation must give compiled graphs the strides the kernels return."""
    if not varlen and need_dk and need_dv and k.shape == v.shape and k.stride() == v.stride():
        batch, heads, lk, dim = k.shape
        row = 2 * heads * dim
        if (k.stride() == (row, dim, batch * row, 1) and torch._C._is_alias_of(k, v)
                and v.storage_offset() - k.storage_offset() == heads * dim):
            packed = k.new_empty((lk, batch, 2, heads, dim))
            return packed.select(2, 0).permute(1, 2, 0, 3), packed.select(2, 1).permute(1, 2, 0, 3)
    # distinct empty tensors for gradients not asked for (one shared tensor would alias two outputs)
    return (torch.empty_like(k) if need_dk else k.new_empty(0), torch.empty_like(v) if need_dv else k.new_empty(0))


@torch.library.register_fake("imer_fast::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, scale, mask_kind, dropout_p, dropout_seed, output_mask):
    has_null = null_k is not None
    dk, dv = key_value_gradient_buffers(k, v, output_mask[1], output_mask[2], cu_seqlens_q is not None)
    return (
        torch.empty_like(q) if output_mask[0] else q.new_empty(0),
        dk,
        dv,
        torch.empty_like(null_k) if output_mask[3] and has_null else q.new_empty(0),
        torch.empty_like(null_v) if output_mask[4] and has_null else q.new_empty(0),
    )


_DIFFERENTIABLE_SLOTS = (0, 1, 2, 4, 5)  # q, k, v, null_k, null_v among the op's 14 inputs


def _setup_context(ctx, inputs, output):
    (q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, mask_kind,
     dropout_p, dropout_seed) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, dropout_seed)
    ctx.scalars = (max_seqlen_q, max_seqlen_k, scale, mask_kind, dropout_p)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, dropout_seed = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, scale, mask_kind, dropout_p = ctx.scalars
    has_null = null_k is not None
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2], has_null and needs[4], has_null and needs[5]]
    grads = [None] * 14
    if any(mask):
        computed = torch.ops.imer_fast.attention_backward(
            grad_out, q, k, v, out, lse, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, scale, mask_kind, dropout_p, dropout_seed, mask,
        )
        for slot, flag, grad in zip(_DIFFERENTIABLE_SLOTS, mask, computed):
            grads[slot] = grad if flag else None
    return tuple(grads)


torch.library.register_autograd("imer_fast::attention", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("imer_fast.attention: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("imer_fast::attention_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _attention_triton(*args):
    from imer_fast._kernels import attention as kernels

    return kernels.attention_forward(*args)


def _attention_backward_triton(*args):
    from imer_fast._kernels import attention as kernels

    return kernels.attention_backward(*args)


for _name, _kernel in (("attention", _attention_triton), ("attention_backward", _attention_backward_triton)):
    torch.library.register_kernel(f"imer_fast::{_name}", "cuda", _kernel)
    _runtime.register_triton_cpu_route(_name, _kernel)


# ---- backend selection, input checks and the public function -----------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 128


@backends.register_selector("attention")
def select_attention_backend(q: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA), C++ (CPU), reference. Other devices and head dims above 128 run the reference."""
    on, dtype, head_dim = q.device, q.dtype, q.shape[-1]

    def kernel_limits():
        if dtype not in _KERNEL_DTYPES:
            return f"dtype {dtype} is not one of {_KERNEL_DTYPES}"
        if head_dim > MAX_HEAD_DIM:
            return f"head dim {head_dim} is above {MAX_HEAD_DIM}"
        return None

    return backends.choose(
        "attention",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on) or kernel_limits()),
            ("cpp", lambda: (_runtime.cpp_error() or (None if on.type == "cpu" else f"tensors are on {on.type}, not cpu"))
             or kernel_limits()),
            ("reference", lambda: None),
        ],
    )


_OP = "imer_fast.attention"


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__


def _check_cu_seqlens(name: str, cu: Tensor, total: int, batch: Optional[int]) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 1:
        raise ValueError(f"{_OP}: {name} must be a 1-D int32/int64 tensor [batch + 1]; got {_describe(cu)}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{_OP}: {name} has {cu.numel()} entries but cu_seqlens_q has {batch + 1}; both must "
                         f"be [batch + 1]")
    if torch.compiler.is_compiling():
        return
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{_OP}: {name} must start at 0 and never decrease; got {values[:8]}"
                         f"{' ...' if len(values) > 8 else ''}")
    if values[-1] != total:
        raise ValueError(f"{_OP}: {name} ends at {values[-1]} but the packed tensor has {total} rows")


def _check_inputs(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, mask, dropout_p, dropout_seed):
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "[total, heads, head_dim] (varlen)" if varlen else "[batch, heads, length, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != rank or not t.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be a floating tensor {layout}; got {_describe(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{_OP}: {name} must have q's dtype and device ({q.dtype} on {q.device}); got "
                            f"{t.dtype} on {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{_OP}: head dim mismatch: q has {q.shape[-1]} but k and v have {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"{_OP}: head_dim must be >= 1; got q of shape {tuple(q.shape)}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{_OP}: q has {q.shape[1]} heads but k and v have {k.shape[1]}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"{_OP}: q has batch {q.shape[0]} but k and v have batch {k.shape[0]}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{_OP}: the varlen layout needs both cu_seqlens_q and cu_seqlens_k")
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.numel() - 1)
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.device != q.device:
                raise ValueError(f"{_OP}: {name} is on {cu.device} but q is on {q.device}")
    if key_mask is not None:
        expected = (k.shape[0],) if varlen else (k.shape[0], k.shape[2])
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != expected:
            raise ValueError(f"{_OP}: key_mask must be a bool tensor of shape {list(expected)} (True = the key may "
                             f"be attended); got {_describe(key_mask)}")
        if key_mask.device != q.device:
            raise ValueError(f"{_OP}: key_mask is on {key_mask.device} but q is on {q.device}")
    if (null_k is None) != (null_v is None):
        raise ValueError(f"{_OP}: null_k and null_v must be given together")
    if null_k is not None:
        heads = q.shape[1]
        for name, t in (("null_k", null_k), ("null_v", null_v)):
            if (not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != heads or t.shape[2] != q.shape[-1]
                    or t.shape != null_k.shape):
                raise ValueError(f"{_OP}: {name} must have shape [heads = {heads}, num_null, head_dim = "
                                 f"{q.shape[-1]}]{' (the shape of null_k)' if name == 'null_v' else ''}; got "
                                 f"{_describe(t)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{_OP}: {name} must have q's dtype and device ({q.dtype} on {q.device}); got "
                                f"{t.dtype} on {t.device}")
    if mask not in MASK_KINDS:
        raise ValueError(f"{_OP}: mask must be one of {tuple(MASK_KINDS)}; got {mask!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_seed is not None and (not isinstance(dropout_seed, Tensor) or dropout_seed.numel() != 1
                                     or dropout_seed.dtype != torch.int64 or dropout_seed.device != q.device):
        raise ValueError(f"{_OP}: dropout_seed must be a one-element int64 tensor on {q.device}; got "
                         f"{_describe(dropout_seed)}")


def _resolve_max_seqlen(name: str, given: Optional[int], cu: Tensor, total: int) -> int:
    """The longest sequence of ``cu``; a given bound is checked (kernels size their grids by it). Under
    ``torch.compile`` nothing can be read from ``cu``: a given bound is trusted (as FlashAttention's
    varlen API trusts it) and a missing one becomes the packed length ``total``, which bounds every
    sequence (a larger grid whose extra programs exit at once)."""
    if torch.compiler.is_compiling():
        return total if given is None else given
    actual = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if given is not None and int(given) < actual:
        raise ValueError(f"{_OP}: {name} = {given} is below the longest sequence in cu_seqlens ({actual})")
    return actual if given is None else int(given)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_mask: Optional[Tensor] = None, null_k: Optional[Tensor] = None,
    null_v: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, scale: Optional[float] = None,
    mask: str = "none", dropout_p: float = 0.0, dropout_seed: Optional[Tensor] = None,
) -> Tensor:
    """Masked multi-head attention (module doc), differentiable in q, k, v, null_k and null_v.

    ``scale`` defaults to ``head_dim ** -0.5``; ``mask`` is ``"none"``, ``"causal"`` or ``"future"``
    (MulT); ``key_mask`` is True where a key may be attended (padding and missing modalities False).
    With ``dropout_p > 0`` and no ``dropout_seed``, a seed is drawn from torch's default generator
    (so ``torch.manual_seed`` makes runs repeatable). ``max_seqlen_*`` (varlen only) are computed
    from ``cu_seqlens`` when omitted (one device-to-host copy); a given value is checked against them,
    except under ``torch.compile``, where it is trusted: one below the longest sequence then leaves
    rows of the GPU output unwritten (as with FlashAttention's varlen functions).
    """
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"{_OP}: scale must be a finite number; got {scale!r}")
    q, k, v, null_k, null_v = _runtime.under_autocast(q, k, v, null_k, null_v)
    _check_inputs(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, mask, dropout_p, dropout_seed)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64).to(q.device)
    if dropout_p == 0.0:
        dropout_seed = None
    if select_attention_backend(q).backend == "reference":
        return attention_ref(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, scale, mask, dropout_p,
                             dropout_seed)
    if cu_seqlens_q is not None:
        max_seqlen_q = _resolve_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, q.shape[0])
        max_seqlen_k = _resolve_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k, k.shape[0])
    else:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    out, _ = torch.ops.imer_fast.attention(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, scale, MASK_KINDS[mask], dropout_p,
                                           dropout_seed)
    return out
