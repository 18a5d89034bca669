"""3-tap 1-D convolution as Winograd F(n, 3): ``imer_fast::winograd_conv1d`` and the public
:func:`winograd_conv1d` / :func:`winograd_weight`.

Semantics (the contract every backend implements). For x [B, C, L] and a convolution weight
w [Co, C, 3] (stride 1, zero padding 1: the U-Nets' ``Conv1d(C, Co, 3, padding=1)``), with
``g_k = w[:, :, k]ᵀ`` [C, Co] and n = 2, 4 or 6 output positions per tile (R = n + 2 transformed rows):

    weight_tf = winograd_weight(w, n)[k] = Σ_j G[k, j] g_j                  [R, C, Co]
    tile t reads d_j = x[:, :, n·t − 1 + j], j < R (zero outside [0, L))
    m_k = Σ_j BT[k, j] d_j,   M_k = m_k @ weight_tf[k]
    y[:, :, n·t + i] = (Σ_k AT[i, k] M_k + bias) + residual[:, :, n·t + i]
                       (positions past L dropped; bias and residual optional)

with Lavin & Gray's matrices (``TRANSFORMS``; F(2, 3): points 0, ±1, ∞; F(4, 3): 0, ±1, ±2, ∞;
F(6, 3): 0, ±1, ±2, ±1/2, ∞, Toom-Cook matrices derived for this module). This equals
``F.conv1d(x, w, bias, padding=1)`` exactly in real arithmetic (checked in float64 in the tests). Per
output position F(2, 3) runs 2 GEMM rows, F(4, 3) 1.5 and F(6, 3) 4/3, against 3 for the direct
convolution: 2/3, 1/2 and 4/9 of its multiply-adds. The transforms add and scale by small integers
and powers of two, so in float32 the rounding stays within a few units of 1e-6 relative (F(6, 3)
about 1.2x F(4, 3)'s; the tests bound it against the direct convolution's); the U-Net's output moves
by about 1e-6 (ConditionalUNet1d tests).

The operator takes the transformed weight (its first dimension picks n), so a sampler that calls
the same denoiser 50–1,000 times transforms each weight once (:class:`imer_fast.nn.conditional_unet.Conv1d`
caches it inside :func:`imer_fast.nn.conditional_unet.reuse_transformed_weights`). It returns
[B, Co, L] stored channels-last ([B, L, Co] in memory), as oneDNN's convolution does for
channels-last input. float32 and float64 kernels; :func:`winograd_conv1d` computes float16 / bfloat16 in
float32 and rounds the result once.

Gradients (written with torch ops, so they are differentiable again): ``dM_k = Σ_i AT[i, k] gy_i``,
``dm_k = dM_k @ weight_tf[k]ᵀ``, ``dd_j = Σ_k BT[k, j] dm_k`` added back to the tile's input rows
(neighbouring tiles overlap by two rows), ``dweight_tf[k] = m_kᵀ @ dM_k``, dbias the sum of grad_y
over batch and positions, dresidual = grad_y.

Backends (:func:`select_winograd_conv1d_backend`): C++ on CPU (``csrc/cpu/winograd_conv1d.cpp``: the
transforms in threaded row loops around MKL's batched GEMM), Triton on CUDA
(``kernels/winograd_conv.py``: the transforms around cuBLAS), and :func:`winograd_conv1d_ref`. On a
GPU the U-Net itself keeps cuDNN's convolution, which picks its own algorithm (Winograd included).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _runtime

_runtime.require_cpp()

_KERNEL_DTYPES = (torch.float32, torch.float64)

# n -> (BT [R, R], G [R, 3], AT [n, R]) as nested lists: tensors are made per call on the input's
# device and dtype (module-level tensors would leak into fake-tensor tracing of the backward).
_TABLES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
    # points 0, ±1, ±2, ±1/2, ∞; each BT row scaled to small integers, its G row by the inverse
    6: ([[-4, 0, 21, 0, -21, 0, 4, 0], [0, 4, 4, -17, -17, 4, 4, 0], [0, -4, 4, 17, -17, -4, 4, 0],
         [0, 2, 1, -10, -5, 8, 4, 0], [0, -2, 1, 10, -5, -8, 4, 0], [0, 4, 8, -5, -10, 1, 2, 0],
         [0, -4, 8, 5, -10, -1, 2, 0], [0, -4, 0, 21, 0, -21, 0, 4]],
        [[-1 / 4, 0, 0], [-1 / 18, -1 / 18, -1 / 18], [-1 / 18, 1 / 18, -1 / 18],
         [1 / 360, 1 / 180, 1 / 90], [1 / 360, -1 / 180, 1 / 90], [16 / 45, 8 / 45, 4 / 45],
         [16 / 45, -8 / 45, 4 / 45], [0, 0, 1 / 4]],
        [[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0], [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0],
         [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0], [0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0],
         [0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1]]),
}


def _matrices(outputs_per_tile: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.tensor(table, dtype=dtype, device=device) for table in _TABLES[outputs_per_tile])


# The float64 matrices, n -> (BT, G, AT), for reference and tests.
TRANSFORMS: Dict[int, Tuple[Tensor, Tensor, Tensor]] = {
    n: _matrices(n, torch.float64, torch.device("cpu")) for n in _TABLES}


def winograd_weight(weight: Tensor, outputs_per_tile: int = 4) -> Tensor:
    """The transformed kernel [n + 2, C, Co] of a Conv1d weight [Co, C, 3] for F(n, 3), n = 2, 4 or 6
    (module doc), in the weight's dtype; differentiable."""
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[2] != 3:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"winograd_weight: weight must be a Conv1d weight [Co, C, 3]; got {got}")
    if outputs_per_tile not in _TABLES:
        raise ValueError(f"winograd_weight: outputs_per_tile must be one of {sorted(_TABLES)}; got "
                         f"{outputs_per_tile!r}")
    _, G, _ = _matrices(outputs_per_tile, weight.dtype, weight.device)
    taps = weight.permute(2, 1, 0).reshape(3, -1)  # [3, C·Co]
    with torch.autocast(weight.device.type, enabled=False):  # the weight's dtype also under autocast
        return (G @ taps).view(G.shape[0], weight.shape[1], weight.shape[0])


def fewest_rows_tile(length: int) -> int:
    """The n of the F(n, 3) that runs the fewest GEMM rows, (n + 2)·ceil(L / n), over a length L (ties
    go to the smaller n, whose rounding is smaller): 6 for the FedDISC U-Net's 48, 24, 12 and 6."""
    return min(_TABLES, key=lambda n: ((n + 2) * -(-length // n), n))


def _geometry(x: Tensor, weight_tf: Tensor) -> Tuple[int, int]:
    """(outputs per tile n, tiles per sample T); n is a plain int even while tracing symbolic shapes."""
    n = int(weight_tf.shape[0]) - 2
    return n, (x.shape[2] + n - 1) // n


def _input_transform(x: Tensor, n: int, tiles: int) -> Tensor:
    """m [R, B·T, C] from x [B, C, L]."""
    BT, _, _ = _matrices(n, x.dtype, x.device)
    batch, channels, length = x.shape
    padded = F.pad(x.transpose(1, 2), (0, 0, 1, n * tiles + 1 - length))  # [B, n·T + 2, C]
    d = torch.stack([padded[:, j:j + n * tiles:n] for j in range(n + 2)])  # [R, B, T, C]
    return torch.einsum("kj,jbtc->kbtc", BT, d).reshape(n + 2, batch * tiles, channels)


def winograd_conv1d_ref(x: Tensor, weight_tf: Tensor, bias: Optional[Tensor] = None,
                        residual: Optional[Tensor] = None) -> Tensor:
    """Pure-torch twin written from the transforms (module doc)."""
    batch, _, length = x.shape
    n, tiles = _geometry(x, weight_tf)
    _, _, AT = _matrices(n, x.dtype, x.device)
    M = torch.bmm(_input_transform(x, n, tiles), weight_tf).view(n + 2, batch, tiles, weight_tf.shape[2])
    y = torch.einsum("ik,kbto->btio", AT, M).reshape(batch, n * tiles, weight_tf.shape[2])[:, :length]
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual.transpose(1, 2)
    return y.contiguous().transpose(1, 2)


# ---- operator registration: fake, autograd, CUDA (Triton) ------------------------------------


@torch.library.register_fake("imer_fast::winograd_conv1d")
def _fake(x, weight_tf, bias, residual):
    return x.new_empty((x.shape[0], x.shape[2], weight_tf.shape[2])).transpose(1, 2)


def _setup_context(ctx, inputs, output):
    x, weight_tf, bias, residual = inputs
    ctx.save_for_backward(x, weight_tf)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y):
    x, weight_tf = ctx.saved_tensors
    batch, channels, length = x.shape
    out_channels = weight_tf.shape[2]
    n, tiles = _geometry(x, weight_tf)
    BT, _, AT = _matrices(n, x.dtype, x.device)
    gy = F.pad(grad_y.transpose(1, 2), (0, 0, 0, n * tiles - length)).reshape(batch, tiles, n, out_channels)
    dM = torch.einsum("ik,btio->kbto", AT, gy).reshape(n + 2, batch * tiles, out_channels)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        dm = torch.bmm(dM, weight_tf.transpose(1, 2)).view(n + 2, batch, tiles, channels)
        dd = torch.einsum("kj,kbtc->jbtc", BT, dm)  # the tile's input rows, padded positions n·t + j
        padded = x.new_zeros(batch, n * tiles + 2, channels)
        for j in range(n + 2):
            padded[:, j:j + n * tiles:n] += dd[j]
        grad_x = padded[:, 1:length + 1].transpose(1, 2)
    if ctx.needs_input_grad[1]:
        grad_w = torch.bmm(_input_transform(x, n, tiles).transpose(1, 2), dM)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.sum(dim=(0, 2))
    grad_residual = grad_y if ctx.has_residual and ctx.needs_input_grad[3] else None
    return grad_x, grad_w, grad_b, grad_residual


torch.library.register_autograd("imer_fast::winograd_conv1d", _backward, setup_context=_setup_context)


def _winograd_conv1d_triton(x, weight_tf, bias, residual):
    from imer_fast._kernels import winograd_conv as kernels

    return kernels.winograd_conv1d(x, weight_tf, bias, residual)


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


def _check(x, weight_tf, bias, residual) -> None:
    op = "winograd_conv1d"
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating tensor [B, C, L]; got {_describe(x)}")
    if (not isinstance(weight_tf, Tensor) or weight_tf.dim() != 3 or weight_tf.shape[0] not in (4, 6, 8)
            or weight_tf.shape[1] != x.shape[1]):
        raise ValueError(f"{op}: weight_tf must be [R, C = {x.shape[1]}, Co] with R = 4, 6 or 8 (winograd_weight of a "
                         f"[Co, C, 3] weight); got {_describe(weight_tf)}")
    if weight_tf.dtype != x.dtype or weight_tf.device != x.device:
        raise ValueError(f"{op}: weight_tf must match x ({x.dtype} on {x.device}); got {_describe(weight_tf)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight_tf.shape[2],)
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{op}: bias must be a [Co = {weight_tf.shape[2]}] {x.dtype} tensor on {x.device}; "
                         f"got {_describe(bias)}")
    expected = (x.shape[0], weight_tf.shape[2], x.shape[2])
    if residual is not None and (not isinstance(residual, Tensor) or tuple(residual.shape) != expected
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"{op}: residual must be a [B, Co, L] = {list(expected)} {x.dtype} tensor on {x.device}; "
                         f"got {_describe(residual)}")


def winograd_conv1d(x: Tensor, weight_tf: Tensor, bias: Optional[Tensor] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
    """``F.conv1d(x, w, bias, padding=1) + residual`` for a 3-tap ``w`` given ``weight_tf =
    winograd_weight(w, n)`` (module doc); [B, Co, L] stored channels-last. The residual (a block's
    shortcut) is added in the output transform, in that order: the same floats as the separate add."""
    x, weight_tf, bias, residual = _runtime.under_autocast(x, weight_tf, bias, residual)
    _check(x, weight_tf, bias, residual)
    if x.dtype in (torch.float16, torch.bfloat16):  # computed in float32 and rounded once, as the other ops
        wide = (t.float() if t is not None else None for t in (x, weight_tf, bias, residual))
        return winograd_conv1d(*wide).to(x.dtype)
    if select_winograd_conv1d_backend(x).backend == "reference":
        return winograd_conv1d_ref(x, weight_tf, bias, residual)
    return torch.ops.imer_fast.winograd_conv1d(x, weight_tf, bias, residual)
