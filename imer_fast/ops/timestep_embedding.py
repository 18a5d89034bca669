"""Timestep embeddings of the diffusion denoisers: ``imer_fast::timestep_embedding`` and the public
:func:`sinusoidal_timestep_embedding` (FedDISC's U-Net, after guided-diffusion) and
:func:`gaussian_fourier_embedding` (IMDer's score network).

Semantics (the contract every backend implements), for times ``t`` [N] (integer or floating) and
frequencies ``freqs`` [H], computed in freqs' dtype (float32 for half types):

    angle[i, j] = (t[i] * freqs[j]) * scale              (t cast to freqs' dtype first)
    out[i, :H]  = sin(angle[i])  if sin_first else cos(angle[i])
    out[i, H:2H] = the other one
    out[i, 2H]  = 0                                      (only when dim = 2H + 1)

- sinusoidal (``sinusoidal_timestep_embedding(t, dim, max_period)``): ``freqs_j = exp(−ln(max_period)·j/H)``,
  H = dim // 2, computed in float32 on the CPU (as the release does, so the frequencies are
  bit-identical on every device) and cached per device; cos first; scale 1; float32 output;
- Gaussian Fourier (``gaussian_fourier_embedding(t, W)``): ``[sin(2π·t·W), cos(2π·t·W)]``; the release
  rounds ``((t·W)·2)·π``, which equals ``(t·(2W))·π`` exactly (doubling is exact), so the operator gets
  ``freqs = 2W`` and ``scale = π``.

One fused pass replaces the eager ``arange``/``exp``/``mul``/``cos``/``sin``/``cat``/``pad`` chain.
Gradients flow to a floating ``t`` and to ``freqs`` (``d angle = g_sin·cos − g_cos·sin``,
``dt = scale·(d angle @ freqs)``, ``dfreqs = scale·(tᵀ @ d angle)``), written with torch ops so
they are themselves differentiable. Integer times get no gradient.

Backends (:func:`select_timestep_embedding_backend`): Triton on CUDA (``kernels/timestep_embedding.py``),
C++ on CPU (``csrc/cpu/timestep_embedding.cpp``), and the pure-torch :func:`timestep_embedding_ref`.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import Tensor

from .. import backends
from . import _runtime

_runtime.require_cpp()

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def timestep_embedding_ref(t: Tensor, freqs: Tensor, scale: float, sin_first: bool, dim: int) -> Tensor:
    """Pure-torch twin written from the math (module doc)."""
    compute = _compute_dtype(freqs.dtype)
    angle = (t.to(freqs.dtype).to(compute)[:, None] * freqs.to(compute)[None, :]) * scale
    first, second = (torch.sin(angle), torch.cos(angle)) if sin_first else (torch.cos(angle), torch.sin(angle))
    parts = [first, second]
    if dim > 2 * freqs.shape[0]:
        parts.append(angle.new_zeros(angle.shape[0], dim - 2 * freqs.shape[0]))
    return torch.cat(parts, dim=-1).to(freqs.dtype)


# ---- operator registration: fake, autograd, CUDA (Triton) ------------------------------------


@torch.library.register_fake("imer_fast::timestep_embedding")
def _timestep_embedding_fake(t, freqs, scale, sin_first, dim):
    return freqs.new_empty((t.shape[0], dim))


def _setup_context(ctx, inputs, output):
    t, freqs, scale, sin_first, dim = inputs
    ctx.save_for_backward(t, freqs)
    ctx.scale, ctx.sin_first = scale, sin_first


def _backward(ctx, grad_out):
    t, freqs = ctx.saved_tensors
    needs_t = ctx.needs_input_grad[0] and t.is_floating_point()
    if grad_out is None or not (needs_t or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    half = freqs.shape[0]
    compute = _compute_dtype(freqs.dtype)
    tc, fc = t.to(freqs.dtype).to(compute), freqs.to(compute)
    angle = (tc[:, None] * fc[None, :]) * ctx.scale
    g = grad_out.to(compute)
    g_sin, g_cos = (g[:, :half], g[:, half:2 * half]) if ctx.sin_first else (g[:, half:2 * half], g[:, :half])
    d_angle = (g_sin * torch.cos(angle) - g_cos * torch.sin(angle)) * ctx.scale
    grad_t = (d_angle @ fc).to(t.dtype) if needs_t else None
    grad_f = (tc @ d_angle).to(freqs.dtype) if ctx.needs_input_grad[1] else None
    return grad_t, grad_f, None, None, None


torch.library.register_autograd("imer_fast::timestep_embedding", _backward, setup_context=_setup_context)


def _timestep_embedding_triton(t, freqs, scale, sin_first, dim):
    from imer_fast._kernels import timestep_embedding as kernels

    return kernels.timestep_embedding(t, freqs, scale, sin_first, dim)


torch.library.register_kernel("imer_fast::timestep_embedding", "cuda", _timestep_embedding_triton)
_runtime.register_triton_cpu_route("timestep_embedding", _timestep_embedding_triton)


# ---- backend selection and the public functions -----------------------------------------------


@backends.register_selector("timestep_embedding")
def select_timestep_embedding_backend(t: Tensor, freqs: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA), C++ (CPU), reference. Other devices run the reference."""
    on, dtype = freqs.device, freqs.dtype

    def dtype_error():
        return None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}"

    return backends.choose(
        "timestep_embedding",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on) or dtype_error()),
            ("cpp", lambda: _runtime.cpp_error()
             or (None if on.type == "cpu" else f"tensors are on {on.type}, not cpu") or dtype_error()),
            ("reference", lambda: None),
        ],
    )


def _describe(x) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_times(name: str, t) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: t must be a one-dimensional integer or floating tensor [N]; got {_describe(t)}")


def _embed(t: Tensor, freqs: Tensor, scale: float, sin_first: bool, dim: int) -> Tensor:
    if select_timestep_embedding_backend(t, freqs).backend == "reference":
        return timestep_embedding_ref(t, freqs, scale, sin_first, dim)
    return torch.ops.imer_fast.timestep_embedding(t, freqs, float(scale), sin_first, dim)


_SINUSOID_FREQS: Dict[Tuple[int, float, torch.device], Tensor] = {}


def _sinusoid_freqs(half: int, max_period: float, device: torch.device) -> Tensor:
    key = (half, float(max_period), device)
    freqs = _SINUSOID_FREQS.get(key)
    if freqs is None:
        # On the CPU then moved, as the release: the same bits on every device. Never an inference tensor
        # (a first call under torch.inference_mode()), which a later differentiable call could not save.
        with torch.inference_mode(False):
            cpu = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
            freqs = _SINUSOID_FREQS[key] = cpu.to(device)
    return freqs


def sinusoidal_timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """[N, dim] float32 ``[cos(t·f), sin(t·f)]`` with ``f_j = exp(−ln(max_period)·j/(dim//2))``, a zero
    last column when dim is odd (guided-diffusion's / FedDISC's ``timestep_embedding``)."""
    name = "sinusoidal_timestep_embedding"
    _check_times(name, t)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{name}: dim must be a positive int; got {dim!r}")
    if isinstance(max_period, bool) or not isinstance(max_period, (int, float)) or not max_period > 0:
        raise ValueError(f"{name}: max_period must be a positive number; got {max_period!r}")
    freqs = _sinusoid_freqs(dim // 2, max_period, t.device)
    return _embed(t, freqs, 1.0, False, dim)


def gaussian_fourier_embedding(t: Tensor, W: Tensor) -> Tensor:
    """[N, 2H] ``[sin(2π·t·W), cos(2π·t·W)]`` for fixed random frequencies ``W`` [H] (IMDer's
    ``GaussianFourierProjection``), in W's dtype; differentiable in a floating ``t`` and in ``W``."""
    name = "gaussian_fourier_embedding"
    _check_times(name, t)
    if not isinstance(W, Tensor) or W.dim() != 1 or not W.is_floating_point():
        raise ValueError(f"{name}: W must be a one-dimensional floating tensor [H]; got {_describe(W)}")
    if W.device != t.device:
        raise ValueError(f"{name}: W is on {W.device} but t is on {t.device}")
    return _embed(t, W * 2, math.pi, True, 2 * W.shape[0])
