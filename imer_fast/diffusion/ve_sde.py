"""The variance-exploding SDE of IMDer: its schedule, the score-matching loss and the Euler–Maruyama
sampler, on imer_fast's fused sampler steps.

Drop-ins for the release's (mdswyz/IMDer ``imder.py`` / ``scoremodel.py``) ``marginal_prob_std``,
``diffusion_coeff``, ``loss_fn`` and ``Euler_Maruyama_sampler``, with the same semantics (restated in
:mod:`imer_fast.testing.reference_imder`):

- :class:`VESDE` ``(sigma=25.0)``: ``dx = sigma^t dw``; ``marginal_prob_std(t) = sqrt((sigma^(2t) − 1) /
  (2 ln sigma))`` (evaluated in the release's operation order, so the values are the release's bit for
  bit, including its fp32 cancellation near t = 0) and ``diffusion_coeff(t) = sigma^t``, on t's device
  and dtype (the release moves everything to CUDA);
- :func:`ve_sde_loss`: t ~ U(eps, 1) (torch's default dtype, as the release), z ~ N(0, I), the model
  sees ``x + std(t)·z`` and, when given, the condition perturbed with the SAME z; the loss is the batch
  mean of ``sum((score·std + z)²)``. With the same torch seed it equals the release's loss;
- :func:`euler_maruyama_sampler`: ``num_steps`` steps of size ``(1 − eps) / (num_steps − 1)`` over
  ``linspace(1, eps, num_steps)``, starting from ``x ~ N(0, std(1)²)``; each step perturbs the
  condition with fresh noise scaled by ``std(t)``, calls the model and takes
  ``mean = x + g²·score·dt``, ``x = mean + sqrt(dt)·g·z``; returns the last ``mean``. The std and
  diffusion functions are arguments, as in the release.

The sampler's schedule (time grid, step size, g(t) and std(t) per step) is evaluated once on the
host, in the sampling dtype (the release's float32 grid for float32 models), and handed to the fused
steps as Python floats. Each step is then: a fill of the time tensor, one fused ``add_scaled_noise``
for the condition, the model, one fused ``ve_em_step`` — instead of the release's dozen elementwise
launches. Noise, two modes:

- ``generator`` (a ``torch.Generator``, default the global one): noise is drawn with ``torch.randn`` in
  the release's order (x_T; then per step the condition's noise, and after the model call the step
  noise — also on the last step), so with the same torch seed the samples equal the release's (within
  fp32 rounding of the step arithmetic) and the RNG stream is left where the release leaves it;
- ``seed`` (an int, or a 0-d int64 tensor on the device, which a captured CUDA graph reads at
  replay): noise comes from the in-kernel counter generator (:mod:`imer_fast.ops.counter_rng`): x_T at
  offset 0, step i's condition noise at offset 2i + 1 and its step noise at 2i + 2. No host RNG work
  per step, so the whole loop can be captured (:class:`imer_fast.diffusion.graphed.GraphedSampler`).

``init_x`` replaces the random start (it is used as given: already scaled by std(1)).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.counter_rng import counter_normal
from ..ops.sampler_steps import add_scaled_noise, ve_em_step
from .gaussian import _seed_tensor

_SAMPLE_SHAPE = (32, 48)  # the release's latent: 32 channels x 48 steps

TimeFn = Callable[[Tensor], Tensor]


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


class VESDE:
    """IMDer's variance-exploding SDE ``dx = sigma^t dw`` (module doc). Pass ``sde.marginal_prob_std`` and
    ``sde.diffusion_coeff`` wherever the release passes its ``functools.partial`` functions."""

    def __init__(self, sigma: float = 25.0):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf or sigma == 1:
            raise ValueError(f"VESDE: sigma must be a finite positive number other than 1; got {sigma!r}")
        self.sigma = float(sigma)
        self._log_sigma = math.log(self.sigma)

    def __repr__(self) -> str:
        return f"VESDE(sigma={self.sigma})"

    def marginal_prob_std(self, t) -> Tensor:
        """Standard deviation of p_0t(x(t) | x(0)): sqrt((sigma^(2t) − 1) / (2 ln sigma)), on t's device and
        dtype (a Python number gives a tensor of torch's default dtype)."""
        t = torch.as_tensor(t)
        return torch.sqrt((self.sigma ** (2 * t) - 1.0) / 2.0 / self._log_sigma)

    def diffusion_coeff(self, t) -> Tensor:
        """g(t) = sigma^t, on t's device and dtype."""
        return torch.as_tensor(self.sigma ** t)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcasting over ``like``'s other dims."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def ve_sde_loss(model: Callable[..., Tensor], x: Tensor, marginal_prob_std: TimeFn, condition: Optional[Tensor] = None,
                eps: float = 1e-5, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Denoising score-matching loss of the VE-SDE (the release's ``loss_fn``; module doc).

    x: [B, C, L]; condition: None or x's shape (it is perturbed with the same noise as x)."""
    name = "ve_sde_loss"
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 3:
        raise ValueError(f"{name}: x must be a floating tensor [B, C, L]; got {_describe(x)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: x has no samples (B = 0); the mean loss of an empty batch is undefined")
    if condition is not None:
        if not isinstance(condition, Tensor) or condition.shape != x.shape:
            raise ValueError(f"{name}: condition must have x's shape {tuple(x.shape)} (it is perturbed with the "
                             f"same noise); got {_describe(condition)}")
        if condition.dtype != x.dtype or condition.device != x.device:
            raise ValueError(f"{name}: condition is {condition.dtype} on {condition.device} but x is {x.dtype} on "
                             f"{x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{name}: eps must be a number in (0, 1); got {eps!r}")
    random_t = torch.rand(x.shape[0], device=x.device, generator=generator) * (1.0 - eps) + eps
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    std = _per_sample(marginal_prob_std(random_t), x)
    perturbed_x = x + z * std
    if condition is not None:
        score = model(perturbed_x, random_t, condition + z * std)
    else:
        score = model(perturbed_x, random_t)
    return torch.addcmul(z, score, std).square().sum(dim=(1, 2)).mean()


def _host_floats(values, count: int, name: str) -> list:
    """A schedule function's output over the time grid as ``count`` Python floats (one host copy)."""
    flat = torch.as_tensor(values).reshape(-1)
    if flat.numel() != count:
        raise ValueError(f"euler_maruyama_sampler: {name} must return one value per time; got {flat.numel()} values "
                         f"for {count} times")
    return flat.tolist()


def _sampling_device_dtype(score_model, examples, device, dtype) -> Tuple[torch.device, torch.dtype]:
    """``device`` / ``dtype`` as given, else those of the score model's first parameter, else of the first
    example tensor (condition, init_x), else the CPU and torch's default dtype."""
    param = next(iter(score_model.parameters()), None) if isinstance(score_model, nn.Module) else None
    like = param if param is not None and param.is_floating_point() else next(
        (t for t in examples if isinstance(t, Tensor) and t.is_floating_point()), None)
    if device is None:
        device = like.device if like is not None else "cpu"
    if dtype is None:
        dtype = like.dtype if like is not None else torch.get_default_dtype()
    # The device tensors report ("cuda" -> "cuda:0", "cpu:0" -> "cpu"), so that comparisons with the
    # condition's device hold for every spelling of the same device.
    return torch.empty(0, device=device).device, dtype


@torch.no_grad()
def euler_maruyama_sampler(score_model: Callable[..., Tensor], marginal_prob_std: TimeFn, diffusion_coeff: TimeFn,
                           batch_size: int = 64, num_steps: int = 100, device=None,
                           condition: Optional[Tensor] = None, eps: float = 1e-3, *, dtype: Optional[torch.dtype] = None,
                           init_x: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                           seed=None) -> Tensor:
    """Euler–Maruyama sampling of the reverse VE-SDE (the release's ``Euler_Maruyama_sampler``; module doc).

    The release's positional arguments and defaults, except that ``device`` defaults to the score
    model's (the release's default is ``'cuda'``). Returns the last step's mean, [batch_size, 32, 48]
    (or init_x's shape). ``dtype`` defaults to the score model's parameters'."""
    name = "euler_maruyama_sampler"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name}: batch_size must be a positive int; got {batch_size!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"{name}: num_steps must be an int >= 2 (the step size is the spacing of "
                         f"linspace(1, eps, num_steps)); got {num_steps!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{name}: eps must be a number in (0, 1); got {eps!r}")
    if generator is not None and seed is not None:
        raise ValueError(f"{name}: pass generator (torch RNG noise) or seed (in-kernel counter noise), not both")
    device, dtype = _sampling_device_dtype(score_model, (condition, init_x), device, dtype)
    if condition is not None:
        if not isinstance(condition, Tensor) or condition.dim() < 1 or condition.shape[0] != batch_size:
            raise ValueError(f"{name}: condition must be a tensor with batch_size = {batch_size} rows; got "
                             f"{_describe(condition)}")
        if condition.dtype != dtype or condition.device != device:
            raise ValueError(f"{name}: condition is {condition.dtype} on {condition.device} but sampling runs in "
                             f"{dtype} on {device}")
    if init_x is not None and (not isinstance(init_x, Tensor) or init_x.dim() < 1 or init_x.shape[0] != batch_size):
        raise ValueError(f"{name}: init_x must be a tensor with batch_size = {batch_size} rows; got "
                         f"{_describe(init_x)}")
    seed = _seed_tensor(seed, device)

    grid = torch.linspace(1.0, eps, num_steps, dtype=dtype)  # the release's grid, on the host
    times = grid.tolist()
    step_size = float(grid[0] - grid[1])
    g = _host_floats(diffusion_coeff(grid), num_steps, "diffusion_coeff")
    cond_std = _host_floats(marginal_prob_std(grid), num_steps, "marginal_prob_std") if condition is not None else None

    def noise(like_shape, offset: int) -> dict:
        if seed is not None:
            return {"seed": seed, "offset": offset}
        return {"noise": torch.randn(like_shape, generator=generator, device=device, dtype=dtype)}

    if init_x is not None:
        x = init_x.to(device=device, dtype=dtype)
    else:
        shape = (batch_size, *_SAMPLE_SHAPE)
        start_std = float(torch.as_tensor(marginal_prob_std(torch.ones(1, dtype=dtype))).reshape(()))
        if seed is not None:
            x = counter_normal(seed, 0, shape, dtype=dtype, device=device).mul_(start_std)
        else:
            x = torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(start_std)
    for i, time in enumerate(times):
        t = torch.full((batch_size,), time, device=device, dtype=dtype)
        if condition is not None:
            perturbed = add_scaled_noise(condition, cond_std[i], **noise(condition.shape, 2 * i + 1))
            score = score_model(x, t, perturbed)
        else:
            score = score_model(x, t)
        x, mean = ve_em_step(x, score, g=g[i], step_size=step_size, **noise(x.shape, 2 * i + 2))
    return mean
