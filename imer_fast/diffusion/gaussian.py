"""Gaussian (DDPM-trained) diffusion: schedules, noising, the ε- (or v-) prediction loss and three samplers.

:class:`GaussianDiffusion` is a drop-in for the FedDISC release's ``GaussianDiffusion``
(wdqdp/FedDISC ``conditional_ddim.py``): same constructor (``timesteps``, ``beta_schedule``), same
schedule buffers (float64), same methods and numerics — ``q_sample``, ``train_losses``,
``p_sample``, ``sample`` (ancestral DDPM over every step), ``ddim_sample`` (``ddim_timesteps``,
``ddim_discr_method`` "uniform" | "quad", ``ddim_eta``, ``clip_denoised``). Differences:

- the sampler updates run as one fused kernel per step (``imer_fast.ops.sampler_steps``) instead of
  a dozen elementwise launches;
- every sampler takes ``noise`` (an explicit x_T), ``generator`` (a torch.Generator) or ``seed``:

  * default / ``generator``: noise is drawn with ``torch.randn`` in exactly the release's order
    (x_T, then one draw per step, even where the step does not use it), so with the same torch
    seed the result equals the release's and the RNG stream is left where the release leaves it;
  * ``seed`` (an int): noise comes from the in-kernel counter generator
    (``imer_fast.ops.counter_rng``), x_T at offset 0 and step ``i``'s noise at offset ``i + 1`` —
    no host RNG work per step, which is what a captured CUDA graph (:mod:`.graphed`) needs;

- ``train_losses(..., prediction="v")`` + :meth:`GaussianDiffusion.noise_predictor`: an opt-in
  v-prediction parameterisation (the release predicts ε only); samplers are unchanged;
- :meth:`GaussianDiffusion.dpm_solver_sample`: DPM-Solver++(2M), an opt-in deterministic sampler
  that needs 10–20 model calls instead of DDIM's 50. Its quality is a separate question from kernel
  speed (``bench/sampler_quality.py`` reports it); never fold its step reduction into speed-ups.

The release evaluates its coefficients as float32 tensors; the fused steps take them as Python
floats rounded through float32 the same way, so deterministic runs agree within fp32 tolerance.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn._checks import as_int
from ..nn.conditional_unet import reuse_transformed_weights
from ..ops.counter_rng import counter_normal
from ..ops.sampler_steps import ddim_step, ddpm_step

BETA_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
DDIM_DISCRETIZATIONS = ("uniform", "quad")
DPM_SOLVER_SPACINGS = ("time_uniform", "logSNR")

# A denoiser: (x [B, C, L], t long [B], y condition) -> predicted noise like x.
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def linear_beta_schedule(timesteps: int) -> Tensor:
    """β from 1e-4·s to 0.02·s (s = 1000 / timesteps), float64 — the release's linear schedule. Its last β
    is 20 / timesteps, so it needs more than 20 steps (at 20 or fewer, ᾱ reaches 0 or turns negative)."""
    if not isinstance(timesteps, int) or timesteps <= 20:
        raise ValueError(f"timesteps must be an int > 20 for the linear schedule (its β rises to 20 / timesteps); "
                         f"got {timesteps!r} — use more steps or beta_schedule='cosine'")
    scale = 1000 / timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine schedule (β clipped to [0, 0.999]), float64."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def ddim_timestep_sequence(timesteps: int, ddim_timesteps: int, method: str) -> Tuple[np.ndarray, np.ndarray]:
    """The release's DDIM timesteps and their predecessors (int64 arrays; the samplers use their first
    ``ddim_timesteps`` entries — "uniform" can give one more, as the release's ``range`` does).

    "uniform": 1, 1 + c, 1 + 2c, ... with c = timesteps // ddim_timesteps; "quad": 1 + floor of
    linspace(0, sqrt(0.8·timesteps), n)²; the predecessor of the first step is 0. Quad sequences can
    repeat a timestep (a step from t to t is then the identity on x apart from the x0 clip). The +1
    shift means a sequence can run past the last trained step (``ddim_timesteps == timesteps``, or "quad"
    over very few timesteps): that is an error here (the release indexes out of range).
    """
    if method not in DDIM_DISCRETIZATIONS:
        raise ValueError(f"ddim_discr_method must be one of {DDIM_DISCRETIZATIONS}; got {method!r}")
    ddim_timesteps = as_int("ddim_timesteps", ddim_timesteps)
    if not 1 <= ddim_timesteps <= timesteps:
        raise ValueError(f"ddim_timesteps must be in [1, timesteps={timesteps}]; got {ddim_timesteps}")
    if method == "uniform":
        seq = np.asarray(list(range(0, timesteps, timesteps // ddim_timesteps)))
    else:
        seq = (np.linspace(0, np.sqrt(timesteps * 0.8), ddim_timesteps) ** 2).astype(int)
    seq = seq + 1
    last = int(seq[ddim_timesteps - 1])
    if last >= timesteps:
        raise ValueError(f"ddim_timesteps={ddim_timesteps} with {method!r} spacing over timesteps={timesteps} reaches "
                         f"t={last}, past the last trained step {timesteps - 1} (the sequence starts at 1); use fewer "
                         f"steps")
    prev = np.append(np.array([0]), seq[:-1])
    return seq.astype(np.int64), prev.astype(np.int64)


def dpm_solver_timesteps(alphas_cumprod: Tensor, steps: int, spacing: str) -> List[int]:
    """Integer timesteps from T − 1 down to 0 for DPM-Solver++: ``steps + 1`` points uniform in time
    or in log-SNR λ = log(α/σ), each rounded to the nearest trained timestep (duplicates dropped)."""
    if spacing not in DPM_SOLVER_SPACINGS:
        raise ValueError(f"spacing must be one of {DPM_SOLVER_SPACINGS}; got {spacing!r}")
    T = alphas_cumprod.numel()
    steps = as_int("steps", steps)
    if not 1 <= steps < T:
        raise ValueError(f"steps must be in [1, timesteps - 1 = {T - 1}]; got {steps}")
    if spacing == "time_uniform":
        ts = np.round(np.linspace(T - 1, 0, steps + 1)).astype(int)
    else:
        lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod)).numpy()
        targets = np.linspace(lam[T - 1], lam[0], steps + 1)
        ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    out: List[int] = []
    for t in ts.tolist():
        if not out or t != out[-1]:
            out.append(int(t))
    return out


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


def _f32(value: float) -> float:
    """A float64 schedule value rounded through float32, as the release's ``_extract(...).float()``."""
    return float(np.float32(value))


class GaussianDiffusion:
    """DDPM forward process and samplers; drop-in for the FedDISC release's ``GaussianDiffusion``."""

    def __init__(self, timesteps: int = 1000, beta_schedule: str = "linear"):
        timesteps = as_int("timesteps", timesteps, minimum=1)
        if beta_schedule == "linear":
            betas = linear_beta_schedule(timesteps)
        elif beta_schedule == "cosine":
            betas = cosine_beta_schedule(timesteps)
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}; got {beta_schedule!r}")
        self.timesteps = timesteps
        self.beta_schedule = beta_schedule
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(self.posterior_variance.clamp(min=1e-20))
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    # ---- forward process and loss ---------------------------------------------------------------

    def _check_t(self, t: Tensor, batch: int, name: str = "t") -> None:
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or t.shape != (batch,):
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an integer tensor of shape ({batch},); got {got}")
        if t.numel() and not torch.compiler.is_compiling():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.timesteps:
                raise ValueError(f"{name} must lie in [0, {self.timesteps - 1}]; got values in [{lo}, {hi}]")

    def _extract(self, a: Tensor, t: Tensor, x_shape: Sequence[int]) -> Tensor:
        """``a[t]`` as float32, shaped [B, 1, ...] to broadcast over x (the release's ``_extract``)."""
        out = a.to(t.device).gather(0, t.long()).float()
        return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None, *,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """x_t ~ q(x_t | x_0) = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·noise."""
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        elif not isinstance(noise, Tensor) or noise.shape != x_start.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must have x_start's shape {tuple(x_start.shape)}; got {got}")
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        self._check_t(t, x_start.shape[0])
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        self._check_t(t, x_t.shape[0])
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t.shape),
                self._extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        self._check_t(t, x_t.shape[0])
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def train_losses(self, model: Denoiser, x_start: Tensor, t: Tensor, y: Tensor, *,
                     noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                     prediction: str = "eps") -> Tensor:
        """ε-prediction MSE: mse(noise, model(q_sample(x_start, t, noise), t, y)) — the release's loss;
        ``prediction="v"``: the model predicts v = sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·x_start instead
        (Salimans & Ho 2022; see :meth:`noise_predictor`)."""
        _check_prediction(prediction)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_noisy = self.q_sample(x_start, t, noise=noise)
        if prediction == "eps":
            return F.mse_loss(noise, model(x_noisy, t, y))
        target = (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                  - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)
        return F.mse_loss(target, model(x_noisy, t, y))

    def noise_predictor(self, model: Denoiser, prediction: str = "eps") -> Denoiser:
        """``model`` as the ε-predictor every sampler expects: itself for ``"eps"``; for ``"v"``,
        ε = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t.

        Why v: an ε-predictor's x_0 estimate (x_t − sqrt(1 − ᾱ_t)·ε)/sqrt(ᾱ_t) multiplies its error
        by 1/sqrt(ᾱ_t) — 25× at the first step of a DDIM "quad" sequence — so a denoiser trained for a
        few hundred steps (FedDISC's generators on one client's data) samples latents several times
        the data's scale; a v-predictor's x_0 estimate has bounded error at every t.
        """
        _check_prediction(prediction)
        if prediction == "eps":
            return model
        return _EpsFromV(self, model)

    # ---- DDPM -----------------------------------------------------------------------------------

    def p_mean_variance(self, model: Denoiser, x_t: Tensor, t: Tensor, y: Tensor,
                        clip_denoised: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        x_recon = self.predict_start_from_noise(x_t, t, model(x_t, t, y))
        if clip_denoised:
            x_recon = torch.clamp(x_recon, min=-1.0, max=1.0)
        return self.q_posterior_mean_variance(x_recon, x_t, t)

    @torch.no_grad()
    def p_sample(self, model: Denoiser, x_t: Tensor, t: Tensor, y: Tensor, clip_denoised: bool = True, *,
                 noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """One ancestral step x_t → x_{t−1}; ``t`` may differ across the batch (this general path runs
        on the eager schedule gathers; :meth:`sample` uses the fused step)."""
        self._check_t(t, x_t.shape[0])
        if noise is not None and (not isinstance(noise, Tensor) or noise.shape != x_t.shape):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"p_sample: noise must have x_t's shape {tuple(x_t.shape)}; got {got}")
        mean, _, log_variance = self.p_mean_variance(model, x_t, t, y, clip_denoised=clip_denoised)
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * (0.5 * log_variance).exp() * noise

    @torch.no_grad()
    @reuse_transformed_weights()
    def sample(self, model: Denoiser, y: Tensor, seq_len: int, batch_size: int = 8, channels: int = 32, *,
               clip_denoised: bool = True, noise: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               num_steps: Optional[int] = None) -> Tensor:
        """Ancestral DDPM sampling over all ``timesteps`` steps from x_T ~ N(0, I); ``num_steps`` stops
        after that many reverse steps (t = T − 1 … T − num_steps), e.g. to profile a step."""
        sampler = _NoiseSource(self, model, y, (batch_size, channels, seq_len), noise, generator, seed)
        steps = self.timesteps if num_steps is None else as_int("num_steps", num_steps)
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"num_steps must be in [1, timesteps={self.timesteps}]; got {num_steps}")
        x = sampler.start()
        for i in reversed(range(self.timesteps - steps, self.timesteps)):
            eps = model(x, sampler.timestep(i), y)
            x = ddpm_step(
                x, eps,
                sqrt_recip_alphas_cumprod=_f32(self.sqrt_recip_alphas_cumprod[i]),
                sqrt_recipm1_alphas_cumprod=_f32(self.sqrt_recipm1_alphas_cumprod[i]),
                posterior_mean_coef1=_f32(self.posterior_mean_coef1[i]),
                posterior_mean_coef2=_f32(self.posterior_mean_coef2[i]),
                posterior_log_variance_clipped=_f32(self.posterior_log_variance_clipped[i]),
                clip_denoised=clip_denoised, add_noise=i != 0, **sampler.step_noise(self.timesteps - i))
        return x

    # ---- DDIM -----------------------------------------------------------------------------------

    @reuse_transformed_weights()
    def ddim_sample(self, model: Denoiser, y: Tensor, seq_len: int, batch_size: int = 8, channels: int = 32,
                    ddim_timesteps: int = 50, ddim_discr_method: str = "quad", ddim_eta: float = 0.0,
                    clip_denoised: bool = True, *, noise: Optional[Tensor] = None,
                    generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                    differentiable: bool = False) -> Tensor:
        """DDIM sampling over the release's timestep sequence (eta = 0: deterministic given x_T).

        Runs without gradient, as the release's, unless ``differentiable``: then the result carries the
        graph of every denoiser call and step, so a loss on it trains the denoiser (and whatever built
        ``y``) through the sampler, as RoHyDR's DiT release does; memory grows with the step count."""
        seq, prev = ddim_timestep_sequence(self.timesteps, ddim_timesteps, ddim_discr_method)
        ddim_timesteps = int(ddim_timesteps)
        if not 0.0 <= ddim_eta <= 1.0:  # eta > 1: sigma^2 > 1 - alpha_bar_prev, no DDIM process (NaN in the release)
            raise ValueError(f"ddim_eta must be in [0, 1]; got {ddim_eta}")
        with torch.set_grad_enabled(bool(differentiable)):
            sampler = _NoiseSource(self, model, y, (batch_size, channels, seq_len), noise, generator, seed)
            x = sampler.start()
            for i in reversed(range(ddim_timesteps)):
                eps = model(x, sampler.timestep(int(seq[i])), y)
                x = ddim_step(x, eps, alpha_bar=_f32(self.alphas_cumprod[seq[i]]),
                              alpha_bar_prev=_f32(self.alphas_cumprod[prev[i]]), eta=float(ddim_eta),
                              clip_denoised=clip_denoised, **sampler.step_noise(ddim_timesteps - i))
        return x

    # ---- DPM-Solver++(2M) -----------------------------------------------------------------------

    @torch.no_grad()
    @reuse_transformed_weights()
    def dpm_solver_sample(self, model: Denoiser, y: Tensor, seq_len: int, batch_size: int = 8, channels: int = 32,
                          steps: int = 20, *, spacing: str = "logSNR", clip_denoised: bool = True,
                          lower_order_final: bool = True, noise: Optional[Tensor] = None,
                          generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022), data-prediction form, from t = T − 1 to t = 0.

        With x0_i = (x − σ_i·ε)/α_i (clipped to [−1, 1] if ``clip_denoised``), λ = log(α/σ),
        h_i = λ_i − λ_{i−1}: x_i = (σ_i/σ_{i−1})·x_{i−1} − α_i·(e^{−h_i} − 1)·D_i, where D_i = x0_{i−1}
        on the first step (and on the last when ``lower_order_final`` and fewer than 15 steps, which
        keeps very short runs stable) and (1 + 1/(2r))·x0_{i−1} − 1/(2r)·x0_{i−2} otherwise,
        r = h_{i−1}/h_i. The update is evaluated as x_i = α_i·(e^{−h_i}·x0_{i−1} + (1 − e^{−h_i})·D_i) +
        σ_i·ε_{i−1} (the same value when nothing is clipped, since x_{i−1} = α·x0 + σ·ε): clipping then
        acts as in the release's DDIM, which clips x0 but keeps the model's ε, so the first-order step
        is exactly clipped DDIM. Written as (σ_i/σ_{i−1})·x_{i−1} + …, the part of x0 that the clip cut
        off would ride along in x_{i−1}, and the solver converges to another, saturated, result.
        Deterministic given x_T; ``steps`` model calls, or fewer where two spacing points round to the
        same trained timestep (the duplicate is dropped). The default ``spacing`` is
        uniform in log-SNR: on Gaussian data with the exact ε, 10 steps recover the data's spread within
        a few percent, while time-uniform steps are far off (tests/test_gaussian_diffusion.py).
        """
        ts = dpm_solver_timesteps(self.alphas_cumprod, steps, spacing)
        ab = self.alphas_cumprod
        alpha = [math.sqrt(float(ab[t])) for t in ts]
        sigma = [math.sqrt(1.0 - float(ab[t])) for t in ts]
        lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
        sampler = _NoiseSource(self, model, y, (batch_size, channels, seq_len), noise, generator, seed)
        x = sampler.start()
        x0_prev: Optional[Tensor] = None
        h_prev = 0.0
        last = len(ts) - 1
        for i in range(1, len(ts)):
            s = i - 1
            eps = model(x, sampler.timestep(ts[s]), y)
            x0 = (x - sigma[s] * eps) / alpha[s]
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            h = lam[i] - lam[s]
            first_order = x0_prev is None or (lower_order_final and i == last and last < 15)
            if first_order:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            decay = math.exp(-h)
            x = alpha[i] * (decay * x0 + (1.0 - decay) * d) + sigma[i] * eps
            x0_prev, h_prev = x0, h
        return x


class _EpsFromV:
    """A v-predictor called as an ε-predictor (:meth:`GaussianDiffusion.noise_predictor`). It exposes the
    model's ``parameters`` because the samplers take their device and dtype from them."""

    def __init__(self, diffusion: GaussianDiffusion, model: Denoiser):
        self.diffusion, self.model = diffusion, model

    def parameters(self):
        return self.model.parameters() if hasattr(self.model, "parameters") else iter(())

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        d = self.diffusion
        v = self.model(x_t, t, y)
        return d._extract(d.sqrt_alphas_cumprod, t, x_t.shape) * v + d._extract(d.sqrt_one_minus_alphas_cumprod, t,
                                                                                 x_t.shape) * x_t


def _seed_tensor(seed, device: torch.device) -> Optional[Tensor]:
    """The counter generator's seed as an int64 0-d tensor on ``device``. A tensor is used as is (not
    copied), so a captured CUDA graph reads whatever value is written into it before a replay."""
    if seed is None:
        return None
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device != device:
            raise ValueError(f"seed tensor must be a 0-d int64 tensor on {device}; "
                             f"got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int or a 0-d int64 tensor; got {type(seed).__name__}")
    if not -2 ** 63 <= seed < 2 ** 63:
        raise ValueError(f"seed must fit in int64 [-2**63, 2**63); got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


class _NoiseSource:
    """Start noise, per-step noise and per-step timestep tensors for one sampling run (module doc)."""

    def __init__(self, diffusion: GaussianDiffusion, model, y: Tensor, shape: Tuple[int, int, int],
                 noise: Optional[Tensor], generator: Optional[torch.Generator], seed: Optional[int]):
        batch, channels, length = shape
        for name, value in (("batch_size", batch), ("channels", channels), ("seq_len", length)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator (torch RNG noise) or seed (in-kernel counter noise), not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != batch:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must be a tensor with batch_size={batch} rows; got {got}")
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        self.device = param.device if param is not None else y.device
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self.shape = shape
        self.explicit_start = noise
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (batch_size, channels, seq_len); got {tuple(noise.shape)}")
        self.generator = generator
        self.seed = _seed_tensor(seed, self.device)
        self.timesteps = diffusion.timesteps

    def start(self) -> Tensor:
        if self.explicit_start is not None:
            return self.explicit_start.to(self.device, self.dtype)
        if self.seed is not None:
            return counter_normal(self.seed, 0, self.shape, dtype=self.dtype, device=self.device)
        return torch.randn(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def timestep(self, t: int) -> Tensor:
        return torch.full((self.shape[0],), t, device=self.device, dtype=torch.long)

    def step_noise(self, step: int) -> dict:
        """Keyword arguments giving the fused step its noise for the ``step``-th update (1-based)."""
        if self.seed is not None:
            return {"seed": self.seed, "offset": step}
        return {"noise": torch.randn(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)}
