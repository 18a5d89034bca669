"""Stable LayerNorm: ``imer_fast::stable_layer_norm`` and the public :func:`stable_layer_norm`.

Semantics (the contract every backend implements), for x of shape ``[..., N]`` normalised over the
last dimension, row by row:

    a    = amax(x, -1)                 if stable, else 1   (the row MAXIMUM, not the absolute maximum)
    xh   = x / a
    mean = mean(xh),  var = mean((xh - mean)^2)  (biased),  rstd = 1 / sqrt(var + eps)
    y    = (xh - mean) * rstd * weight + bias    (weight / bias optional, shape [N])

This is the "stable" LayerNorm of the FedDISC release (wdqdp/FedDISC ``conditional_ddim.py``,
``LayerNorm(feats, stable=True, dim=-1)``, after Imagen), whose forward is

    if stable: x = x / x.amax(dim, keepdim=True).detach()
    eps = 1e-5 if x.dtype == torch.float32 else 1e-3
    var = torch.var(x, dim, unbiased=False, keepdim=True); mean = x.mean(dim, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * g

(``g`` = ``weight``, no bias; pass the release's ``eps`` rule explicitly: this function's ``eps``
defaults to 1e-5 for every dtype). ``a`` is detached: the backward treats it as a constant, so

    dx = (rstd / a) * (g - mean(g) - xn * mean(g * xn)),  g = grad_y * weight,  xn = (xh - mean) * rstd
    dweight = sum over rows of grad_y * xn,  dbias = sum over rows of grad_y

Quirks kept for drop-in parity with the release (not "fixed"): a row whose maximum is negative is
divided by a negative number, which flips the sign of its output (before weight / bias); a row whose
maximum is 0 is divided by zero and comes out inf / nan, exactly as the release's does.

The operator returns ``(y, mean, rstd, row_max)``: ``y`` a fresh contiguous tensor of x's shape and
dtype, the statistics of ``xh`` (``row_max = a``, 1 when not stable) contiguous with shape
``x.shape[:-1]`` in float32 (float64 for float64 x). ``stable_layer_norm_backward`` returns
``(dx, dweight, dbias)`` (dx contiguous); outputs that ``output_mask`` does not ask for, and dweight
without a weight, are distinct empty tensors. fp16 / bf16 are computed in float32. dweight / dbias
are reduced in a fixed order on every backend (bitwise-repeatable, no atomics). The normalised size
N must be at least 1 (the release's ``amax`` rejects an empty row too). Double backward is not
supported.

Backends (:func:`select_stable_layer_norm_backend`): Triton on CUDA (``kernels/layer_norm.py``: a
row block per program with the whole row in registers, N <= 65536), C++ on CPU
(``csrc/cpu/stable_layer_norm.cpp``), and the pure-torch :func:`stable_layer_norm_ref`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _runtime

_runtime.require_cpp()

_OP = "imer_fast.stable_layer_norm: "
# Both kernels take every floating dtype (half types computed in float32).
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Widest row the Triton kernels hold in registers (kernels/layer_norm.py MAX_N).
_TRITON_MAX_N = 65536


def stable_layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                          eps: float = 1e-5, stable: bool = True) -> Tensor:
    """Pure-torch twin written from the math (module doc). Half types are computed in float32, like
    the kernels; the row maximum is detached, so autograd through it matches the operator."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(compute)
    if stable:
        xc = xc / xc.amax(dim=-1, keepdim=True).detach()
    mean = xc.mean(dim=-1, keepdim=True)
    var = ((xc - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xc - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).contiguous()


# ---- operator registration: fake, autograd, CUDA (Triton) ------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("imer_fast::stable_layer_norm")
def _stable_layer_norm_fake(x, weight, bias, eps, stable):
    stats = [x.new_empty(x.shape[:-1], dtype=_stat_dtype(x.dtype)) for _ in range(3)]
    return (x.new_empty(x.shape), *stats)


@torch.library.register_fake("imer_fast::stable_layer_norm_backward")
def _stable_layer_norm_backward_fake(grad_y, x, weight, mean, rstd, row_max, output_mask):
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] and weight is not None else x.new_empty(0),
        x.new_empty(x.shape[-1]) if output_mask[2] else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, stable = inputs
    _, mean, rstd, row_max = output
    ctx.save_for_backward(x, weight, mean, rstd, row_max)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, rstd, row_max)


def _backward(ctx, grad_y, grad_mean, grad_rstd, grad_row_max):
    x, weight, mean, rstd, row_max = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], ctx.has_weight and needs[1], ctx.has_bias and needs[2]]
    grads = [None] * 5
    if grad_y is None or not any(mask):
        return tuple(grads)
    dx, dweight, dbias = torch.ops.imer_fast.stable_layer_norm_backward(grad_y, x, weight, mean, rstd, row_max, mask)
    for slot, flag, grad in ((0, mask[0], dx), (1, mask[1], dweight), (2, mask[2], dbias)):
        grads[slot] = grad if flag else None
    return tuple(grads)


torch.library.register_autograd("imer_fast::stable_layer_norm", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("imer_fast.stable_layer_norm: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("imer_fast::stable_layer_norm_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _stable_layer_norm_triton(x, weight, bias, eps, stable):
    from imer_fast._kernels import layer_norm as kernels

    return kernels.stable_layer_norm_forward(x, weight, bias, eps, stable)


def _stable_layer_norm_backward_triton(grad_y, x, weight, mean, rstd, row_max, output_mask):
    from imer_fast._kernels import layer_norm as kernels

    return kernels.stable_layer_norm_backward(grad_y, x, weight, mean, rstd, row_max, list(output_mask))


for _name, _kernel in (("stable_layer_norm", _stable_layer_norm_triton),
                       ("stable_layer_norm_backward", _stable_layer_norm_backward_triton)):
    torch.library.register_kernel(f"imer_fast::{_name}", "cuda", _kernel)
    _runtime.register_triton_cpu_route(_name, _kernel)


# ---- backend selection and the public function ------------------------------------------------


@backends.register_selector("stable_layer_norm")
def select_stable_layer_norm_backend(x: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA, N <= 65536), C++ (CPU), reference. Other devices run the reference."""
    on, dtype, n = x.device, x.dtype, (x.shape[-1] if x.dim() >= 1 else 0)

    def dtype_error():
        return None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}"

    return backends.choose(
        "stable_layer_norm",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on) or dtype_error()
             or (None if n <= _TRITON_MAX_N else f"rows of N = {n} > {_TRITON_MAX_N} do not fit the Triton kernels")),
            ("cpp", lambda: _runtime.cpp_error()
             or (None if on.type == "cpu" else f"tensors are on {on.type}, not cpu") or dtype_error()),
            ("reference", lambda: None),
        ],
    )


def _check_inputs(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, stable: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{_OP}x must be a floating tensor with at least 1 dimension; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{_OP}x must be a floating tensor with at least 1 dimension; got {x.dtype} of shape "
                        f"{tuple(x.shape)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{_OP}x must have at least 1 dimension and a last (normalised) dimension N >= 1; got "
                         f"shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}{name} must be a tensor of shape [N = {n}] or None; got {type(t).__name__}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"{_OP}{name} must have shape [N = {n}] (the last dimension of x); got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{_OP}{name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{_OP}{name} is on {t.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{_OP}eps must be a number >= 0; got {eps!r}")
    if not isinstance(stable, bool):
        raise TypeError(f"{_OP}stable must be a bool; got {type(stable).__name__}")


def stable_layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
                      stable: bool = True) -> Tensor:
    """LayerNorm over the last dimension of ``x``, first dividing each row by its (detached) maximum
    when ``stable`` (see module doc for the exact semantics and the release's quirks). ``weight`` and
    ``bias`` have shape ``[x.shape[-1]]``. Returns a contiguous tensor of x's shape and dtype (float32 under
    autocast)."""
    x, weight, bias = _runtime.under_autocast(x, weight, bias)
    _check_inputs(x, weight, bias, eps, stable)
    if select_stable_layer_norm_backend(x).backend == "reference":
        return stable_layer_norm_ref(x, weight, bias, eps, stable)
    return torch.ops.imer_fast.stable_layer_norm(x, weight, bias, float(eps), stable)[0]
