"""GroupNorm + FiLM + SiLU in one pass: ``imer_fast::group_norm_film_silu`` and the public
:func:`group_norm_film_silu`.

The block prologue of both diffusion denoisers of this family: FedDISC's U-Net ``Block`` (GroupNorm
of 8 groups → time scale-shift ``x·(1 + scale) + shift`` → SiLU → Conv1d), its attention blocks and
output head (GroupNorm of 32 groups, with or without SiLU), and IMDer's ScoreNet (``h += Dense(t)``
→ GroupNorm(4 or 32) → swish). Eager PyTorch runs these as 4–6 kernels with as many round trips
through memory; here one pass reads x once per statistic and writes y once.

Semantics, for x [B, C, *spatial] (S = spatial size) in G = ``num_groups`` groups of C/G channels:

    xi = x + input_bias[b, c]                                (input_bias [B, C], optional)
    xn = (xi − mean_{b,g}) / sqrt(var_{b,g} + eps)           (biased variance over the C/G · S group)
    a  = xn · weight[c] + bias[c]                            (weight / bias [C], optional)
    f  = a · (1 + scale[b, c]) + shift[b, c]                 (scale / shift [B, C] or [B, C, 1], optional)
    y  = silu(f) if apply_silu else f

Statistics are float32 (float64 for float64 x); half types are computed in float32. The operator
returns ``(y, mean [B, G], rstd [B, G])``, y (and the backward's dx) channels-last when x is a 3-D
channels-last tensor (:func:`is_channels_last`; the C++ kernel then streams rows of channels), contiguous
otherwise; ``group_norm_film_silu_backward`` returns gradients for
(x, weight, bias, input_bias, scale, shift), reduced in a fixed order (bitwise-repeatable), and
distinct empty tensors for the ones not asked for or absent. Double backward is not supported.

Backends (:func:`select_group_norm_film_silu_backend`): Triton on CUDA (``kernels/group_norm.py``:
one program per (sample, group) holding the group in registers, up to 16,384 elements), C++ on CPU
(``csrc/cpu/group_norm_film_silu.cpp``), and the pure-torch :func:`group_norm_film_silu_ref`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _runtime

_runtime.require_cpp()

_OP = "imer_fast.group_norm_film_silu: "
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MAX_GROUP = 16384  # kernels/group_norm.py MAX_GROUP


def group_norm_film_silu_ref(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                             bias: Optional[Tensor] = None, *, input_bias: Optional[Tensor] = None,
                             scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, eps: float = 1e-5,
                             apply_silu: bool = True) -> Tensor:
    """The eager sequence (module doc) with torch ops: add, group norm, FiLM, F.silu.

    The group norm is aten's (what ``F.group_norm`` runs) with three edge cases made to agree with the
    kernels: a group of one element normalises to 0 with ``eps > 0`` (``F.group_norm`` refuses it in
    training), a bias without a weight gets a ones weight (torch 2.13's CPU backward of
    ``group_norm(x, G, None, bias)`` fails), and empty groups (no spatial positions) give zero parameter
    gradients (aten's are NaN)."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    h = x.to(compute)
    extra = (1,) * (x.dim() - 2)
    if input_bias is not None:
        h = h + input_bias.to(compute).reshape(*input_bias.shape[:2], *extra)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    if w is None and b is not None:
        w = torch.ones_like(b)
    if h.numel() == 0:
        h = h * (0 if w is None else w.reshape(-1, *extra)) + (0 if b is None else b.reshape(-1, *extra))
    else:
        h = torch.group_norm(h, num_groups, w, b, eps)
    if scale is not None:
        h = h * (scale.to(compute).reshape(*scale.shape[:2], *extra) + 1)
    if shift is not None:
        h = h + shift.to(compute).reshape(*shift.shape[:2], *extra)
    if apply_silu:
        h = F.silu(h)
    return h.to(x.dtype).contiguous()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: Tensor) -> bool:
    """x [B, C, S] stored as [B, S, C] (strides (C·S, 1, C)), C > 1 and S > 1: the layout the U-Nets use
    on the CPU. y and dx come out in it; every other input layout gives contiguous outputs."""
    return (x.dim() == 3 and x.shape[1] > 1 and x.shape[2] > 1
            and x.stride() == (x.shape[1] * x.shape[2], 1, x.shape[1]))


def _empty_in_layout(x: Tensor, channels_last: bool) -> Tensor:
    if channels_last:
        return x.new_empty((x.shape[0], x.shape[2], x.shape[1])).transpose(1, 2)
    return x.new_empty(x.shape)


def _in_layout(t: Tensor, channels_last: bool) -> Tensor:
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else t


@torch.library.register_fake("imer_fast::group_norm_film_silu")
def _fake(x, weight, bias, input_bias, scale, shift, num_groups, eps, apply_silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x.dtype))
    return _empty_in_layout(x, is_channels_last(x)), stats, torch.empty_like(stats)


@torch.library.register_fake("imer_fast::group_norm_film_silu_backward")
def _backward_fake(grad_y, x, weight, bias, input_bias, scale, shift, mean, rstd, num_groups, apply_silu, output_mask):
    def like(flag, t):
        return t.new_empty(t.shape) if flag and t is not None else x.new_empty(0)

    dx = _empty_in_layout(x, is_channels_last(x)) if output_mask[0] else x.new_empty(0)
    return (dx, like(output_mask[1], weight), like(output_mask[2], bias),
            like(output_mask[3], input_bias), like(output_mask[4], scale), like(output_mask[5], shift))


def _setup_context(ctx, inputs, output):
    x, weight, bias, input_bias, scale, shift, num_groups, eps, apply_silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, input_bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.apply_silu = num_groups, apply_silu
    ctx.present = [True] + [t is not None for t in (weight, bias, input_bias, scale, shift)]
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, input_bias, scale, shift, mean, rstd = ctx.saved_tensors
    mask = [bool(n and p) for n, p in zip(ctx.needs_input_grad[:6], ctx.present)]
    grads = [None] * 9
    if grad_y is None or not any(mask):
        return tuple(grads)
    out = torch.ops.imer_fast.group_norm_film_silu_backward(grad_y, x, weight, bias, input_bias, scale, shift, mean,
                                                            rstd, ctx.num_groups, ctx.apply_silu, mask)
    for i in range(6):
        grads[i] = out[i] if mask[i] else None
    return tuple(grads)


torch.library.register_autograd("imer_fast::group_norm_film_silu", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("imer_fast.group_norm_film_silu: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("imer_fast::group_norm_film_silu_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _check_parameters(op: str, x: Tensor, parameters) -> None:
    """The kernels' contract on the op's parameters (weight / bias [C], input_bias / scale / shift
    [B, C], x's dtype): the public function checks them already, a direct ``torch.ops`` call only here."""
    b, c = x.shape[0], x.shape[1]
    for name, t in zip(("weight", "bias", "input_bias", "scale", "shift"), parameters):
        expected = (c,) if name in ("weight", "bias") else (b, c)
        if t is not None and (tuple(t.shape) != expected or t.dtype != x.dtype):
            raise ValueError(f"imer_fast::{op}: {name} must be a {list(expected)} {x.dtype} tensor; got {t.dtype} "
                             f"of shape {tuple(t.shape)}")


def _forward_triton(x, *args):
    from imer_fast._kernels import group_norm as kernels

    _check_parameters("group_norm_film_silu", x, args[:5])

    # The kernels work on contiguous [B, C, S]; a channels-last x gets its y back in its layout.
    y, mean, rstd = kernels.group_norm_film_silu_forward(x, *args)
    return _in_layout(y, is_channels_last(x)), mean, rstd


def _backward_triton(grad_y, x, *args):
    from imer_fast._kernels import group_norm as kernels

    _check_parameters("group_norm_film_silu_backward", x, args[:5])

    dx, *rest = kernels.group_norm_film_silu_backward(grad_y, x, *args)
    return (_in_layout(dx, is_channels_last(x) and dx.numel() > 0), *rest)


for _name, _kernel in (("group_norm_film_silu", _forward_triton), ("group_norm_film_silu_backward", _backward_triton)):
    torch.library.register_kernel(f"imer_fast::{_name}", "cuda", _kernel)
    _runtime.register_triton_cpu_route(_name, _kernel)


@backends.register_selector("group_norm_film_silu")
def select_group_norm_film_silu_backend(x: Tensor, num_groups: int) -> backends.Choice:
    """Priority: Triton (CUDA, groups up to 16,384 elements), C++ (CPU), reference."""
    on, dtype = x.device, x.dtype
    group = (x.numel() // max(x.shape[0], 1)) // max(num_groups, 1) if x.dim() >= 2 else 0

    def dtype_error():
        return None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}"

    return backends.choose("group_norm_film_silu", [
        ("triton", lambda: _runtime.triton_cannot_run(on) or dtype_error()
         or (None if group <= _TRITON_MAX_GROUP else f"groups of {group} elements exceed {_TRITON_MAX_GROUP}")),
        ("cpp", lambda: _runtime.cpp_error() or (None if on.type == "cpu" else f"x is on {on.type}, not cpu")
         or dtype_error()),
        ("reference", lambda: None),
    ])


def _per_sample(name: str, t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A [B, C] (or [B, C, 1]) per-sample channel tensor as [B, C]."""
    if t is None:
        return None
    b, c = x.shape[0], x.shape[1]
    if not isinstance(t, Tensor) or not (tuple(t.shape) == (b, c) or tuple(t.shape) == (b, c, 1)):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{_OP}{name} must have shape [B, C] = [{b}, {c}] (or [B, C, 1]); got {got}")
    _same(name, t, x)
    return t.reshape(b, c)


def _same(name: str, t: Tensor, x: Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{_OP}{name} has dtype {t.dtype} but x has {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{_OP}{name} is on {t.device} but x is on {x.device}")


def group_norm_film_silu(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         *, input_bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                         shift: Optional[Tensor] = None, eps: float = 1e-5, apply_silu: bool = True) -> Tensor:
    """``silu((GroupNorm(x + input_bias)·weight + bias)·(1 + scale) + shift)`` in one pass (module doc).

    x: [B, C, *spatial], any strides; weight / bias: [C]; input_bias / scale / shift: [B, C] or
    [B, C, 1]. Returns a tensor of x's shape and dtype (float32 under autocast): contiguous, except that
    the C++ and Triton kernels keep a channels-last x channels-last (the reference returns contiguous)."""
    x, weight, bias, input_bias, scale, shift = _runtime.under_autocast(x, weight, bias, input_bias, scale, shift)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{_OP}x must be a floating tensor [B, C, *spatial]; got {got}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"{_OP}num_groups must be a positive int dividing C = {c}; got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if not isinstance(t, Tensor) or tuple(t.shape) != (c,):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{_OP}{name} must have shape [C] = [{c}]; got {got}")
            _same(name, t, x)
    input_bias = _per_sample("input_bias", input_bias, x)
    scale = _per_sample("scale", scale, x)
    shift = _per_sample("shift", shift, x)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{_OP}eps must be a number >= 0; got {eps!r}")
    if select_group_norm_film_silu_backend(x, num_groups).backend == "reference":
        return group_norm_film_silu_ref(x, num_groups, weight, bias, input_bias=input_bias, scale=scale, shift=shift,
                                        eps=eps, apply_silu=apply_silu)
    return torch.ops.imer_fast.group_norm_film_silu(x, weight, bias, input_bias, scale, shift, num_groups, float(eps),
                                                    bool(apply_silu))[0]
