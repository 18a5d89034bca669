"""One pre-norm MulT encoder layer: ``imer_fast::mult_layer`` and the public :func:`mult_layer`.

Semantics (the contract every backend implements), on rows ``x [N = Lq * B, E]`` in (L, B) order (MulT's
``(seq_len, batch, embed)`` layout flattened) and, in cross mode, ``xk``/``xv [Nk = Lk * B, E]``:

    ln0(t)  = layer_norm(t; ln0_weight, ln0_bias, ln0_eps)          (queries, keys and values alike)
    q       = ln0(x) @ Wq^T + bq                                    (W_in = [Wq; Wk; Wv], b_in likewise)
    k, v    = ln0(x) @ Wk^T + bk, ln0(x) @ Wv^T + bv                self-attention (xk and xv absent)
              ln0(xk) @ Wk^T + bk, ln0(xk) @ Wv^T + bv              shared keys/values (xv absent)
              ln0(xk) @ Wk^T + bk, ln0(xv) @ Wv^T + bv              separate keys and values
    a       = attention(q, k, v; heads of [L, B, H, D], key_mask, scale, mask_kind, dropout_p, dropout_seed)
    x1      = x + attn_res_keep * (a @ Wo^T + bo)
    hidden  = relu(ln1(x1) @ W1^T + b1) * relu_keep
    out     = x1 + ffn_res_keep * (hidden @ W2^T + b2)

with :func:`imer_fast.ops.attention`'s semantics for ``a`` (key_mask ``[B, Lk]``, True = may be attended;
``mask_kind`` 0 none, 1 causal, 2 MulT's future mask; its seeded dropout). The ``*_keep`` tensors are the
dropout factors of the residual and ReLU dropouts (each entry 0 or ``1 / (1 - p)``; absent = 1), drawn by
the caller, so every backend computes the same function of the same draws.

Why an op: at MulT's sizes on a CPU (1,600 rows of 32 features) the layer's arithmetic is ~1.3 ms but
its autograd graph of ~15 nodes and ~40 small calls doubled that. ``csrc/cpu/mult_layer.cpp`` runs the
whole layer as one autograd node with a hand-written backward (ATen GEMMs and LayerNorms, the fused
attention through the dispatcher, no reshape copies).

Backends (:func:`select_mult_layer_backend`):

- ``"triton"`` (CUDA): the layer composed from the Triton attention kernel and cuBLAS GEMMs under
  autograd (no whole-layer GPU kernel: the GPU target has not been measured on a GPU yet);
- ``"cpp"`` (CPU, float32/float64): ``imer_fast::mult_layer`` / ``mult_layer_backward``;
- ``"reference"``: :func:`mult_layer_ref`, the same math with :func:`attention_ref`.

Double backward is not supported.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _runtime
from .attention import MASK_KINDS, MAX_HEAD_DIM, attention, attention_ref

_runtime.require_cpp()

_OP = "imer_fast.mult_layer"


class MultLayerWeights(NamedTuple):
    """A MulT layer's parameters in the op's order (the release's ``layer_norms[0]``, ``self_attn``
    ``in_proj_*`` / ``out_proj``, ``layer_norms[1]``, ``fc1``, ``fc2``)."""

    ln0_weight: Tensor
    ln0_bias: Tensor
    in_proj_weight: Tensor
    in_proj_bias: Tensor
    out_proj_weight: Tensor
    out_proj_bias: Tensor
    ln1_weight: Tensor
    ln1_bias: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor


def _compose(attend, x, xk, xv, w: MultLayerWeights, key_mask, attn_res_keep, relu_keep, ffn_res_keep, batch,
             num_heads, ln0_eps, ln1_eps, scale, mask_kind, dropout_p, dropout_seed) -> Tensor:
    """The layer's math with ``attend`` as its attention (``attention_ref`` or the fused ``attention``)."""
    e = x.shape[1]
    mask = {v: k for k, v in MASK_KINDS.items()}[mask_kind]

    def ln0(t):
        return F.layer_norm(t, (e,), w.ln0_weight, w.ln0_bias, ln0_eps)

    def heads(rows):  # [L * B, E] -> [B, H, L, D]
        return rows.view(-1, batch, num_heads, e // num_heads).permute(1, 2, 0, 3)

    def kept(t, keep):
        return t if keep is None else t * keep

    (w_q, w_k, w_v), (b_q, b_k, b_v) = w.in_proj_weight.split(e), w.in_proj_bias.split(e)
    hq = ln0(x)
    hk = hq if xk is None else ln0(xk)
    hv = hk if xv is None else ln0(xv)
    a = attend(heads(F.linear(hq, w_q, b_q)), heads(F.linear(hk, w_k, b_k)), heads(F.linear(hv, w_v, b_v)),
               key_mask=key_mask, scale=scale, mask=mask, dropout_p=dropout_p, dropout_seed=dropout_seed)
    a_rows = a.permute(2, 0, 1, 3).reshape(x.shape[0], e)
    x1 = x + kept(F.linear(a_rows, w.out_proj_weight, w.out_proj_bias), attn_res_keep)
    h1 = F.layer_norm(x1, (e,), w.ln1_weight, w.ln1_bias, ln1_eps)
    hidden = kept(F.linear(h1, w.fc1_weight, w.fc1_bias).relu(), relu_keep)
    return x1 + kept(F.linear(hidden, w.fc2_weight, w.fc2_bias), ffn_res_keep)


def mult_layer_ref(x: Tensor, xk: Optional[Tensor], xv: Optional[Tensor], weights: MultLayerWeights, *,
                   batch: int, num_heads: int, ln0_eps: float = 1e-5, ln1_eps: float = 1e-5,
                   scale: Optional[float] = None, mask_kind: int = 0, key_mask: Optional[Tensor] = None,
                   attn_res_keep: Optional[Tensor] = None, relu_keep: Optional[Tensor] = None,
                   ffn_res_keep: Optional[Tensor] = None, dropout_p: float = 0.0,
                   dropout_seed: Optional[Tensor] = None) -> Tensor:
    """Pure-torch twin written from the math (module doc), with :func:`attention_ref`."""
    scale = (x.shape[1] // num_heads) ** -0.5 if scale is None else scale
    return _compose(attention_ref, x, xk, xv, MultLayerWeights(*weights), key_mask, attn_res_keep, relu_keep,
                    ffn_res_keep, batch, num_heads, ln0_eps, ln1_eps, scale, mask_kind, dropout_p, dropout_seed)


# ---- operator registration: fake, autograd -----------------------------------------------------


@torch.library.register_fake("imer_fast::mult_layer")
def _mult_layer_fake(x, xk, xv, ln0_weight, ln0_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     ln1_weight, ln1_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, key_mask, attn_res_keep,
                     relu_keep, ffn_res_keep, batch, num_heads, ln0_eps, ln1_eps, scale, mask_kind, dropout_p,
                     dropout_seed):
    n, e = x.shape
    lq = n // batch
    nk = xk.shape[0] if xk is not None else n
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32

    def normed(rows, present):  # layer_norm output and its [rows] statistics, or three empties
        if not present:
            return [x.new_empty(0) for _ in range(3)]
        return [x.new_empty(rows, e), x.new_empty(rows, dtype=stat), x.new_empty(rows, dtype=stat)]

    separate = xv is not None
    saved = (normed(n, True) + normed(nk, xk is not None) + normed(nk, separate)
             + [x.new_empty(n, e), x.new_empty(nk, e if separate else 2 * e),
                x.new_empty(nk, e) if separate else x.new_empty(0),
                x.new_empty(lq, batch, num_heads, e // num_heads).permute(1, 2, 0, 3),
                x.new_empty(batch, num_heads, lq, dtype=stat),
                x.new_empty(n, e), x.new_empty(n, dtype=stat), x.new_empty(n, dtype=stat), x.new_empty(n, e),
                x.new_empty(n, fc1_weight.shape[0])])
    return x.new_empty(n, e), saved


@torch.library.register_fake("imer_fast::mult_layer_backward")
def _mult_layer_backward_fake(grad_out, saved, x, xk, xv, ln0_weight, ln0_bias, in_proj_weight, out_proj_weight,
                              ln1_weight, ln1_bias, fc1_weight, fc2_weight, key_mask, attn_res_keep, relu_keep,
                              ffn_res_keep, batch, num_heads, scale, mask_kind, dropout_p, dropout_seed):
    e = x.shape[1]
    like = [x, xk, xv, ln0_weight, ln0_bias, in_proj_weight, None, out_proj_weight, None, ln1_weight, ln1_bias,
            fc1_weight, None, fc2_weight, None]
    sizes = {6: (3 * e,), 8: (e,), 12: (fc1_weight.shape[0],), 14: (e,)}
    return [x.new_empty(sizes[i]) if i in sizes else (torch.empty_like(t) if t is not None else x.new_empty(0))
            for i, t in enumerate(like)]


# Autograd of imer_fast::mult_layer is registered in C++ (csrc/cpu/mult_layer.cpp): the Python
# register_autograd wrapper of an op this wide cost as much as the layer's GEMMs.


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"{_OP}: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("imer_fast::mult_layer_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- backend selection, input checks and the public function -----------------------------------


@backends.register_selector("mult_layer")
def select_mult_layer_backend(x: Tensor, num_heads: int) -> backends.Choice:
    """Priority: Triton attention + cuBLAS (CUDA), C++ (CPU float32/float64), reference."""
    on, dtype, head_dim = x.device, x.dtype, x.shape[-1] // max(num_heads, 1)

    def cpp_limits():
        if _runtime.cpp_error():
            return _runtime.cpp_error()
        if on.type != "cpu":
            return f"tensors are on {on.type}, not cpu"
        if dtype not in (torch.float32, torch.float64):
            return f"dtype {dtype} is not float32 or float64"
        return f"head dim {head_dim} is above {MAX_HEAD_DIM}" if head_dim > MAX_HEAD_DIM else None

    return backends.choose(
        "mult_layer",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on)),
            ("cpp", cpp_limits),
            ("reference", lambda: None),
        ],
    )


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__


def _check_rows(name: str, t, like: Tensor, rows: Optional[int], cols: int, batch: int) -> None:
    ok = (isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == cols and (rows is None or t.shape[0] == rows)
          and t.shape[0] % batch == 0 and t.dtype == like.dtype and t.device == like.device)
    if not ok:
        want = f"[{rows if rows is not None else 'L * B'}, {cols}] with B = {batch}"
        raise ValueError(f"{_OP}: {name} must be a {like.dtype} tensor {want} on {like.device}; got {_describe(t)}")


def _check_inputs(x, xk, xv, w: MultLayerWeights, batch, num_heads, key_mask, keeps, mask_kind, dropout_p) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{_OP}: x must be a floating tensor [L * B, E]; got {_describe(x)}")
    n, e = x.shape
    if batch < 1 or n % batch:
        raise ValueError(f"{_OP}: batch ({batch}) must be >= 1 and divide x's {n} rows")
    if num_heads < 1 or e % num_heads:
        raise ValueError(f"{_OP}: num_heads ({num_heads}) must divide the embed dim {e}")
    if xv is not None and xk is None:
        raise ValueError(f"{_OP}: xv needs xk (give xk alone for shared keys and values)")
    if xk is not None:
        _check_rows("xk", xk, x, None, e, batch)
    if xv is not None:
        _check_rows("xv", xv, x, xk.shape[0], e, batch)
    hidden = w.fc1_weight.shape[0] if isinstance(w.fc1_weight, Tensor) else -1
    shapes = dict(ln0_weight=(e,), ln0_bias=(e,), in_proj_weight=(3 * e, e), in_proj_bias=(3 * e,),
                  out_proj_weight=(e, e), out_proj_bias=(e,), ln1_weight=(e,), ln1_bias=(e,),
                  fc1_weight=(hidden, e), fc1_bias=(hidden,), fc2_weight=(e, hidden), fc2_bias=(e,))
    for name, shape in shapes.items():
        t = getattr(w, name)
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{_OP}: {name} must be a {x.dtype} tensor of shape {shape} on {x.device}; got "
                             f"{_describe(t)}")
    for name, keep, cols in zip(("attn_res_keep", "relu_keep", "ffn_res_keep"), keeps, (e, hidden, e)):
        if keep is not None:
            _check_rows(name, keep, x, n, cols, batch)
    lk = (xk.shape[0] if xk is not None else n) // batch
    if key_mask is not None and (not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool
                                 or tuple(key_mask.shape) != (batch, lk) or key_mask.device != x.device):
        raise ValueError(f"{_OP}: key_mask must be a bool tensor [B = {batch}, Lk = {lk}] on {x.device} (True = may "
                         f"be attended); got {_describe(key_mask)}")
    if mask_kind not in MASK_KINDS.values():
        raise ValueError(f"{_OP}: mask_kind must be one of {sorted(MASK_KINDS.values())} ({MASK_KINDS}); got "
                         f"{mask_kind!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must lie in [0, 1); got {dropout_p}")


def mult_layer(x: Tensor, xk: Optional[Tensor], xv: Optional[Tensor], weights: MultLayerWeights, *, batch: int,
               num_heads: int, ln0_eps: float = 1e-5, ln1_eps: float = 1e-5, scale: Optional[float] = None,
               mask_kind: int = 0, key_mask: Optional[Tensor] = None, attn_res_keep: Optional[Tensor] = None,
               relu_keep: Optional[Tensor] = None, ffn_res_keep: Optional[Tensor] = None, dropout_p: float = 0.0,
               dropout_seed: Optional[Tensor] = None) -> Tensor:
    """One MulT encoder layer (module doc) on ``x [Lq * B, E]`` rows; returns ``[Lq * B, E]``.

    ``xk`` alone gives shared keys and values (one k/v projection); ``scale`` defaults to
    ``head_dim ** -0.5``. With ``dropout_p > 0`` and no ``dropout_seed`` the attention-dropout seed is
    drawn from torch's default generator."""
    shared_kv = xv is xk
    x, xk, xv, *cast = _runtime.under_autocast(x, xk, xv, *weights, attn_res_keep, relu_keep, ffn_res_keep)
    xv = xk if shared_kv else xv  # one cast tensor for shared keys and values: one k/v projection
    w = MultLayerWeights(*cast[:len(MultLayerWeights._fields)])
    attn_res_keep, relu_keep, ffn_res_keep = keeps = tuple(cast[len(MultLayerWeights._fields):])
    _check_inputs(x, xk, xv, w, batch, num_heads, key_mask, keeps, mask_kind, dropout_p)
    scale = (x.shape[1] // num_heads) ** -0.5 if scale is None else float(scale)
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64).to(x.device)
    elif dropout_p == 0.0:
        dropout_seed = None
    args = (key_mask, attn_res_keep, relu_keep, ffn_res_keep, batch, num_heads, ln0_eps, ln1_eps, scale, mask_kind,
            dropout_p, dropout_seed)
    backend = select_mult_layer_backend(x, num_heads).backend
    if backend == "cpp":
        return torch.ops.imer_fast.mult_layer(x, xk, xv, *w, *args)[0]
    attend = attention if backend == "triton" else attention_ref
    return _compose(attend, x, xk, xv, w, *args)
