"""Fused diffusion sampler updates: one kernel per step instead of a dozen elementwise launches.

Operators (their CPU kernels are ``csrc/cpu/sampler_steps.cpp``, Triton ``kernels/sampler_steps.py``):

- ``imer_fast::diffusion_step(x, eps, p, q, clip, r, s, u, sigma, noise, seed, offset)``:
  ``x0 = p·x − q·ε`` (clamped to [−1, 1] when ``clip``), ``out = r·x0 + s·x + u·ε + σ·z``;
  DDPM ancestral steps and DDIM steps are both this form (:func:`ddpm_step`, :func:`ddim_step`);
- ``imer_fast::ve_em_step(x, score, drift, diffusion, noise, seed, offset)``: VE-SDE Euler–Maruyama,
  ``mean = x + drift·score``, ``x_next = mean + diffusion·z``;
- ``imer_fast::add_scaled_noise(x, std, std_scalar, noise, seed, offset)``: ``x + std_b·z`` with one
  std per leading index (IMDer perturbs its condition with this every step).

``z`` is the explicit ``noise`` tensor when given (to reproduce a reference that calls
``torch.randn``), else the counter generator's draw ``offset`` under ``seed``
(:mod:`imer_fast.ops.counter_rng`), so no host RNG work is needed per step; no noise is drawn where
its coefficient is 0. Coefficients are Python floats, computed by the caller from the float64
schedule (they become constants of a captured CUDA graph; only the seed changes between replays).
Math is in the input precision (float32 for half types). Each op is differentiable in its tensor inputs
(x, eps / score, the noise tensor, a per-row std), so a sampler loop can be backpropagated through
(RoHyDR's DiT release trains its generators through 50 DDIM steps); the backward is a few elementwise
torch ops, since in such a loop it is dwarfed by the denoiser's own backward.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import backends
from . import _runtime
from .counter_rng import check_seed, counter_normal, counter_normal_ref

_runtime.require_cpp()

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- pure-torch twins ----------------------------------------------------------------------------


def _z_ref(x: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], offset: int) -> Tensor:
    if noise is not None:
        return noise.to(_compute(x.dtype))
    return counter_normal_ref(seed, offset, x.shape, torch.float64).to(_compute(x.dtype))


def _compute(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def diffusion_step_ref(x: Tensor, eps: Tensor, p: float, q: float, clip: bool, r: float, s: float, u: float,
                       sigma: float, noise: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                       offset: int = 0) -> Tensor:
    xc, ec = x.to(_compute(x.dtype)), eps.to(_compute(x.dtype))
    x0 = p * xc - q * ec
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    out = r * x0 + s * xc + u * ec
    if sigma != 0.0:
        out = out + sigma * _z_ref(x, noise, seed, offset)
    return out.to(x.dtype).contiguous()


def ve_em_step_ref(x: Tensor, score: Tensor, drift: float, diffusion: float, noise: Optional[Tensor] = None,
                   seed: Optional[Tensor] = None, offset: int = 0) -> Tuple[Tensor, Tensor]:
    mean = x.to(_compute(x.dtype)) + drift * score.to(_compute(x.dtype))
    nxt = mean + diffusion * _z_ref(x, noise, seed, offset) if diffusion != 0.0 else mean
    return nxt.to(x.dtype).contiguous(), mean.to(x.dtype).contiguous()


def add_scaled_noise_ref(x: Tensor, std: Optional[Tensor], std_scalar: float, noise: Optional[Tensor] = None,
                         seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    if std is None:
        scale = std_scalar
    else:
        scale = std.to(torch.float64).to(_compute(x.dtype)).reshape(-1, *([1] * (x.dim() - 1)))
    return (x.to(_compute(x.dtype)) + scale * _z_ref(x, noise, seed, offset)).to(x.dtype).contiguous()


# ---- registration: fake, Triton ------------------------------------------------------------------


@torch.library.register_fake("imer_fast::diffusion_step")
def _diffusion_step_fake(x, eps, p, q, clip, r, s, u, sigma, noise, seed, offset):
    return x.new_empty(x.shape)


@torch.library.register_fake("imer_fast::ve_em_step")
def _ve_em_step_fake(x, score, drift, diffusion, noise, seed, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("imer_fast::add_scaled_noise")
def _add_scaled_noise_fake(x, std, std_scalar, noise, seed, offset):
    return x.new_empty(x.shape)


# ---- autograd -----------------------------------------------------------------------------------


def _noise_of(x: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], offset: int) -> Tensor:
    """The z the forward added, in the compute dtype: the noise tensor, or the counter draw (recomputed)."""
    if noise is not None:
        return noise.to(_compute(x.dtype))
    return counter_normal(seed, offset, x.shape, dtype=_compute(x.dtype), device=x.device)


def _diffusion_step_setup(ctx, inputs, output):
    x, eps, p, q, clip, r, s, u, sigma, noise, seed, offset = inputs
    ctx.save_for_backward(x if clip else None, eps if clip else None)
    ctx.coefs, ctx.clip, ctx.sigma = (p, q, r, s, u), clip, sigma
    ctx.dtypes = (x.dtype, eps.dtype, None if noise is None else noise.dtype)


def _diffusion_step_backward(ctx, grad):
    p, q, r, s, u = ctx.coefs
    g = grad.to(_compute(grad.dtype))
    if ctx.clip:  # clamp passes the gradient where p·x − q·ε lies in [−1, 1] (torch.clamp's rule)
        x, eps = ctx.saved_tensors
        x0 = p * x.to(g.dtype) - q * eps.to(g.dtype)
        g_x0 = torch.where((x0 >= -1.0) & (x0 <= 1.0), r * g, torch.zeros_like(g))
    else:
        g_x0 = r * g
    x_dtype, eps_dtype, noise_dtype = ctx.dtypes
    grad_x = (p * g_x0 + s * g).to(x_dtype) if ctx.needs_input_grad[0] else None
    grad_eps = (u * g - q * g_x0).to(eps_dtype) if ctx.needs_input_grad[1] else None
    grad_noise = (ctx.sigma * g).to(noise_dtype) if ctx.needs_input_grad[9] and ctx.sigma != 0.0 else None
    return (grad_x, grad_eps) + (None,) * 7 + (grad_noise, None, None)


def _ve_em_step_setup(ctx, inputs, output):
    x, score, drift, diffusion, noise, seed, offset = inputs
    ctx.drift, ctx.diffusion = drift, diffusion
    ctx.dtypes = (x.dtype, score.dtype, None if noise is None else noise.dtype)


def _ve_em_step_backward(ctx, grad_next, grad_mean):
    # next = mean + diffusion·z and mean = x + drift·score: x and score reach both outputs.
    parts = [g.to(_compute(g.dtype)) for g in (grad_next, grad_mean) if g is not None]
    if not parts:
        return (None,) * 7
    g = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    x_dtype, score_dtype, noise_dtype = ctx.dtypes
    grad_x = g.to(x_dtype) if ctx.needs_input_grad[0] else None
    grad_score = (ctx.drift * g).to(score_dtype) if ctx.needs_input_grad[1] else None
    grad_noise = None
    if ctx.needs_input_grad[4] and grad_next is not None and ctx.diffusion != 0.0:
        grad_noise = (ctx.diffusion * grad_next.to(_compute(grad_next.dtype))).to(noise_dtype)
    return grad_x, grad_score, None, None, grad_noise, None, None


def _add_scaled_noise_setup(ctx, inputs, output):
    x, std, std_scalar, noise, seed, offset = inputs
    needs_z = ctx.needs_input_grad[1] and std is not None
    ctx.save_for_backward(x if needs_z else None, std, noise, seed)
    ctx.std_scalar, ctx.offset = std_scalar, offset


def _add_scaled_noise_backward(ctx, grad):
    x, std, noise, seed = ctx.saved_tensors
    g = grad.to(_compute(grad.dtype))
    grad_x = grad if ctx.needs_input_grad[0] else None
    grad_std = grad_noise = None
    if ctx.needs_input_grad[1] and std is not None:  # d/d std_b of std_b·z: the row sum of g·z
        grad_std = (g * _noise_of(x, noise, seed, ctx.offset)).flatten(1).sum(1).to(std.dtype)
    if ctx.needs_input_grad[3] and noise is not None:
        scale = ctx.std_scalar if std is None else std.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
        grad_noise = (scale * g).to(noise.dtype)
    return grad_x, grad_std, None, grad_noise, None, None


torch.library.register_autograd("imer_fast::diffusion_step", _diffusion_step_backward,
                                setup_context=_diffusion_step_setup)
torch.library.register_autograd("imer_fast::ve_em_step", _ve_em_step_backward, setup_context=_ve_em_step_setup)
torch.library.register_autograd("imer_fast::add_scaled_noise", _add_scaled_noise_backward,
                                setup_context=_add_scaled_noise_setup)


def _triton(name):
    def kernel(*args):
        from imer_fast._kernels import sampler_steps as kernels

        return getattr(kernels, name)(*args)

    return kernel


for _name in ("diffusion_step", "ve_em_step", "add_scaled_noise"):
    torch.library.register_kernel(f"imer_fast::{_name}", "cuda", _triton(_name))
    _runtime.register_triton_cpu_route(_name, _triton(_name))


@backends.register_selector("sampler_step")
def select_sampler_step_backend(x: Tensor) -> backends.Choice:
    """One selection for the three step ops. Priority: Triton (CUDA), C++ (CPU), reference."""
    on, dtype = x.device, x.dtype

    def dtype_error():
        return None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}"

    return backends.choose("sampler_step", [
        ("triton", lambda: _runtime.triton_cannot_run(on) or dtype_error()),
        ("cpp", lambda: _runtime.cpp_error() or (None if on.type == "cpu" else f"x is on {on.type}, not cpu")
         or dtype_error()),
        ("reference", lambda: None),
    ])


# ---- public functions ----------------------------------------------------------------------------


def _check(op: str, x: Tensor, others, noise: Optional[Tensor], seed: Optional[Tensor], offset: int,
           needs_noise: bool) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{op}x must be a floating tensor; got {got}")
    for name, t in others + (("noise", noise),):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.shape != x.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}{name} must be a tensor of x's shape {tuple(x.shape)}; got {got}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{op}{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if noise is None and seed is not None:
        check_seed(op, seed, offset, x.device)
    if needs_noise and noise is None and seed is None:
        raise ValueError(f"{op}this step adds noise: pass noise (a tensor like x) or seed (an int64 tensor)")


def _run(op_name: str, x: Tensor, ref, *args):
    if select_sampler_step_backend(x).backend == "reference":
        return ref(*args)
    return getattr(torch.ops.imer_fast, op_name)(*args)


def ddim_step(x: Tensor, eps: Tensor, *, alpha_bar: float, alpha_bar_prev: float, eta: float = 0.0,
              clip_denoised: bool = True, noise: Optional[Tensor] = None, seed: Optional[Tensor] = None,
              offset: int = 0) -> Tensor:
    """One DDIM update from ᾱ_t to ᾱ_prev (FedDISC ``ddim_sample``): x0 = (x − sqrt(1 − ᾱ_t)·ε)/sqrt(ᾱ_t)
    (clamped when ``clip_denoised``), σ = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)),
    x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ²)·ε + σ·z."""
    op = "imer_fast.ddim_step: "
    x, eps, noise = _runtime.under_autocast(x, eps, noise)
    for name, value in (("alpha_bar", alpha_bar), ("alpha_bar_prev", alpha_bar_prev)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{op}{name} must be in (0, 1]; got {value!r}")
    if not eta >= 0.0:
        raise ValueError(f"{op}eta must be >= 0; got {eta!r}")
    if eta == 0.0 or alpha_bar == 1.0:
        sigma = 0.0  # deterministic; also allows ᾱ_prev < ᾱ_t (a DDIM inversion step)
    elif alpha_bar_prev < alpha_bar:
        raise ValueError(f"{op}eta > 0 needs alpha_bar_prev >= alpha_bar (a step towards less noise); got "
                         f"alpha_bar={alpha_bar!r}, alpha_bar_prev={alpha_bar_prev!r}")
    else:
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    _check(op, x, (("eps", eps),), noise, seed, offset, sigma != 0.0)
    args = (x, eps, 1.0 / math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar) / math.sqrt(alpha_bar), bool(clip_denoised),
            math.sqrt(alpha_bar_prev), 0.0, math.sqrt(max(1.0 - alpha_bar_prev - sigma ** 2, 0.0)), sigma,
            noise, None if noise is not None else seed, offset)
    return _run("diffusion_step", x, diffusion_step_ref, *args)


def ddpm_step(x: Tensor, eps: Tensor, *, sqrt_recip_alphas_cumprod: float, sqrt_recipm1_alphas_cumprod: float,
              posterior_mean_coef1: float, posterior_mean_coef2: float, posterior_log_variance_clipped: float,
              clip_denoised: bool = True, add_noise: bool = True, noise: Optional[Tensor] = None,
              seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    """One ancestral DDPM update (FedDISC ``p_sample``) with the schedule values of step t:
    x0 = a·x − b·ε (clamped when ``clip_denoised``), mean = c1·x0 + c2·x, x_{t−1} = mean +
    exp(½·log σ²)·z when ``add_noise`` (the release adds none at t = 0)."""
    op = "imer_fast.ddpm_step: "
    x, eps, noise = _runtime.under_autocast(x, eps, noise)
    sigma = math.exp(0.5 * posterior_log_variance_clipped) if add_noise else 0.0
    _check(op, x, (("eps", eps),), noise, seed, offset, sigma != 0.0)
    args = (x, eps, float(sqrt_recip_alphas_cumprod), float(sqrt_recipm1_alphas_cumprod), bool(clip_denoised),
            float(posterior_mean_coef1), float(posterior_mean_coef2), 0.0, sigma,
            noise if sigma != 0.0 else None, None if noise is not None or sigma == 0.0 else seed, offset)
    return _run("diffusion_step", x, diffusion_step_ref, *args)


def ve_em_step(x: Tensor, score: Tensor, *, g: float, step_size: float, noise: Optional[Tensor] = None,
               seed: Optional[Tensor] = None, offset: int = 0) -> Tuple[Tensor, Tensor]:
    """One Euler–Maruyama step of the VE-SDE reverse process (IMDer ``Euler_Maruyama_sampler``):
    mean = x + g²·score·dt, x_next = mean + sqrt(dt)·g·z. Returns (x_next, mean)."""
    op = "imer_fast.ve_em_step: "
    x, score, noise = _runtime.under_autocast(x, score, noise)
    if not (step_size >= 0.0 and math.isfinite(step_size)):
        raise ValueError(f"{op}step_size must be finite and >= 0; got {step_size!r}")
    if not math.isfinite(g):
        raise ValueError(f"{op}g (the diffusion coefficient) must be finite; got {g!r}")
    diffusion = math.sqrt(step_size) * g
    _check(op, x, (("score", score),), noise, seed, offset, diffusion != 0.0)
    args = (x, score, float(g * g * step_size), float(diffusion), noise, None if noise is not None else seed, offset)
    return _run("ve_em_step", x, ve_em_step_ref, *args)


def add_scaled_noise(x: Tensor, std: Union[float, Tensor], *, noise: Optional[Tensor] = None,
                     seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    """x + std·z; ``std`` a float or a [B] tensor (B = x.shape[0]) broadcast over the other dims."""
    op = "imer_fast.add_scaled_noise: "
    x, std, noise = _runtime.under_autocast(x, std, noise)
    _check(op, x, (), noise, seed, offset, True)
    if isinstance(std, Tensor):
        if std.dim() != 1 or x.dim() < 1 or std.shape[0] != x.shape[0]:
            raise ValueError(f"{op}std must be a float or a [B] tensor with B = x.shape[0] = "
                             f"{x.shape[0] if x.dim() else 'n/a'}; got {tuple(std.shape)}")
        if std.device != x.device:
            raise ValueError(f"{op}std is on {std.device} but x is on {x.device}")
        if not std.is_floating_point():
            raise ValueError(f"{op}std must be a floating tensor; got {std.dtype}")
        args = (x, std, 0.0, noise, None if noise is not None else seed, offset)
    else:
        args = (x, None, float(std), noise, None if noise is not None else seed, offset)
    return _run("add_scaled_noise", x, add_scaled_noise_ref, *args)
