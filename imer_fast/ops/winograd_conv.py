"""3-tap 1-D convolution as Winograd F(2, 3): ``imer_fast::winograd_conv1d`` and the public
:func:`winograd_conv1d` / :func:`winograd_weight`.

Semantics (the contract every backend implements). For x [B, C, L] and a convolution weight
w [Co, C, 3] (stride 1, zero padding 1, the U-Nets' ``Conv1d(C, Co, 3, padding=1)``), with
``g_k = w[:, :, k]ᵀ`` [C, Co]:

    weight_tf = winograd_weight(w) = (g0, (g0 + g1 + g2) / 2, (g0 − g1 + g2) / 2, g2)   [4, C, Co]

and for each pair of output positions (2i, 2i + 1), with d_j = x[:, :, 2i − 1 + j] (zero outside
[0, L)):

    m = (d0 − d2, d1 + d2, d2 − d1, d1 − d3),   M_k = m_k @ weight_tf[k]
    y[:, :, 2i]     = M0 + M1 + M2 + bias
    y[:, :, 2i + 1] = M1 − M2 − M3 + bias        (dropped past the end of an odd L)

which equals ``F.conv1d(x, w, bias, padding=1)`` exactly in real arithmetic (the identity is
checked against it in the tests). Four GEMMs over half the positions replace three over all of
them: 2/3 of the multiply-adds. The transforms only add, subtract and halve, so the rounding is that
of a few more additions (within fp32 tolerance of the direct convolution; see the tests).

The operator takes the transformed weight, so a sampler that calls the same denoiser 50–1,000 times
transforms each weight once (:class:`imer_fast.nn.conditional_unet.Conv1d` caches it inside
:func:`imer_fast.nn.reuse_transformed_weights`). It returns [B, Co, L] stored channels-last
([B, L, Co] in memory), as oneDNN's convolution does for channels-last input. float32 and float64.

Gradients (written with torch ops, so they are differentiable again): with dM from the transposed
output transform (dM0 = gy_even, dM1 = gy_even + gy_odd, dM2 = gy_even − gy_odd, dM3 = −gy_odd),
``dm_k = dM_k @ weight_tfᵀ[k]``, ``dweight_tf[k] = m_kᵀ @ dM_k``, dx the transposed input transform of
dm (overlapping tiles add), dbias the sum of grad_y over batch and positions.

Backends (:func:`select_winograd_conv1d_backend`): C++ on CPU (``csrc/cpu/winograd_conv1d.cpp``: the
transforms in threaded row loops around MKL's batched GEMM), Triton on CUDA
(``kernels/winograd_conv.py``: the transforms around cuBLAS), and :func:`winograd_conv1d_ref`. On a
GPU the U-Net itself keeps cuDNN's convolution, which picks its own algorithm (Winograd included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _runtime

_runtime.require_cpp()

_KERNEL_DTYPES = (torch.float32, torch.float64)


def winograd_weight(weight: Tensor) -> Tensor:
    """The transformed kernel [4, C, Co] of a Conv1d weight [Co, C, 3] (module doc); differentiable."""
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[2] != 3:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"winograd_weight: weight must be a Conv1d weight [Co, C, 3]; got {got}")
    g0, g1, g2 = weight.permute(2, 1, 0).unbind(0)
    return torch.stack([g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]).contiguous()


def _tiles(x: Tensor) -> Tensor:
    """The four input rows d0..d3 of every tile: [4, B, T, C] from x [B, C, L] (zeros outside [0, L))."""
    length = x.shape[2]
    tiles = (length + 1) // 2
    padded = F.pad(x.transpose(1, 2), (0, 0, 1, 2 * tiles + 1 - length))  # [B, 2T + 2, C]
    return torch.stack([padded[:, j:j + 2 * tiles:2] for j in range(4)])


def _input_transform(x: Tensor) -> Tensor:
    d0, d1, d2, d3 = _tiles(x).unbind(0)
    m = torch.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3])
    return m.reshape(4, d0.shape[0] * d0.shape[1], x.shape[1])  # [4, B·T, C]


def winograd_conv1d_ref(x: Tensor, weight_tf: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Pure-torch twin written from the transforms (module doc)."""
    batch, _, length = x.shape
    out_channels, tiles = weight_tf.shape[2], (length + 1) // 2
    M = torch.bmm(_input_transform(x), weight_tf).view(4, batch, tiles, out_channels)
    even, odd = (M[0] + M[1]) + M[2], (M[1] - M[2]) - M[3]
    y = torch.stack([even, odd], dim=2).reshape(batch, 2 * tiles, out_channels)[:, :length]
    if bias is not None:
        y = y + bias
    return y.contiguous().transpose(1, 2)


# ---- operator registration: fake, autograd, CUDA (Triton) ------------------------------------


@torch.library.register_fake("imer_fast::winograd_conv1d")
def _fake(x, weight_tf, bias):
    return x.new_empty((x.shape[0], x.shape[2], weight_tf.shape[2])).transpose(1, 2)


def _setup_context(ctx, inputs, output):
    x, weight_tf, bias = inputs
    ctx.save_for_backward(x, weight_tf)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight_tf = ctx.saved_tensors
    batch, channels, length = x.shape
    tiles = (length + 1) // 2
    gy = F.pad(grad_y.transpose(1, 2), (0, 0, 0, 2 * tiles - length))  # [B, 2T, Co]
    g_even, g_odd = gy[:, 0::2], gy[:, 1::2]
    dM = torch.stack([g_even, g_even + g_odd, g_even - g_odd, -g_odd]).reshape(4, batch * tiles, gy.shape[2])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        dm0, dm1, dm2, dm3 = torch.bmm(dM, weight_tf.transpose(1, 2)).view(4, batch, tiles, channels).unbind(0)
        # Tile i's rows d0..d3 sit at padded positions 2i .. 2i + 3 (x[p] at padded p + 1).
        on_even = F.pad(dm0, (0, 0, 0, 1)) + F.pad(-dm0 + dm1 + dm2, (0, 0, 1, 0))  # padded 2j
        on_odd = F.pad(dm1 - dm2 + dm3, (0, 0, 0, 1)) + F.pad(-dm3, (0, 0, 1, 0))   # padded 2j + 1
        padded = torch.stack([on_even, on_odd], dim=2).reshape(batch, 2 * tiles + 2, channels)
        grad_x = padded[:, 1:length + 1].transpose(1, 2)
    if ctx.needs_input_grad[1]:
        grad_w = torch.bmm(_input_transform(x).transpose(1, 2), dM)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.sum(dim=(0, 2))
    return grad_x, grad_w, grad_b


torch.library.register_autograd("imer_fast::winograd_conv1d", _backward, setup_context=_setup_context)


def _winograd_conv1d_triton(x, weight_tf, bias):
    from imer_fast._kernels import winograd_conv as kernels

    return kernels.winograd_conv1d(x, weight_tf, bias)


torch.library.register_kernel("imer_fast::winograd_conv1d", "cuda", _winograd_conv1d_triton)
_runtime.register_triton_cpu_route("winograd_conv1d", _winograd_conv1d_triton)


# ---- backend selection and the public function ------------------------------------------------


@backends.register_selector("winograd_conv1d")
def select_winograd_conv1d_backend(x: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA), C++ (CPU), reference. Other devices and dtypes run the reference."""
    on, dtype = x.device, x.dtype

    def dtype_error():
        return None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}"

    return backends.choose(
        "winograd_conv1d",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on) or dtype_error()),
            ("cpp", lambda: _runtime.cpp_error()
             or (None if on.type == "cpu" else f"tensors are on {on.type}, not cpu") or dtype_error()),
            ("reference", lambda: None),
        ],
    )


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__


def _check(x, weight_tf, bias) -> None:
    op = "winograd_conv1d"
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating tensor [B, C, L]; got {_describe(x)}")
    if (not isinstance(weight_tf, Tensor) or weight_tf.dim() != 3 or weight_tf.shape[0] != 4
            or weight_tf.shape[1] != x.shape[1]):
        raise ValueError(f"{op}: weight_tf must be [4, C = {x.shape[1]}, Co] (winograd_weight of a [Co, C, 3] "
                         f"weight); got {_describe(weight_tf)}")
    if weight_tf.dtype != x.dtype or weight_tf.device != x.device:
        raise ValueError(f"{op}: weight_tf must match x ({x.dtype} on {x.device}); got {_describe(weight_tf)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight_tf.shape[2],)
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{op}: bias must be a [Co = {weight_tf.shape[2]}] {x.dtype} tensor on {x.device}; "
                         f"got {_describe(bias)}")


def winograd_conv1d(x: Tensor, weight_tf: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv1d(x, w, bias, padding=1)`` for a 3-tap ``w`` given ``weight_tf = winograd_weight(w)``
    (module doc); [B, Co, L] stored channels-last."""
    _check(x, weight_tf, bias)
    if select_winograd_conv1d_backend(x).backend == "reference":
        return winograd_conv1d_ref(x, weight_tf, bias)
    return torch.ops.imer_fast.winograd_conv1d(x, weight_tf, bias)
