"""The eager baseline of IMDer's score model, restated plainly from its public release (mdswyz/IMDer
``trains/singleTask/model/scoremodel.py`` and the VE-SDE helpers of ``imder.py``):
:class:`ReferenceScoreNet` (``ScoreNet``), :func:`reference_loss_fn` (``loss_fn``),
:func:`reference_euler_maruyama_sampler` (``Euler_Maruyama_sampler``), :func:`marginal_prob_std` and
:func:`diffusion_coeff`.

It follows the release op for op and at the release's cost, so tests compare imer_fast's
:class:`~imer_fast.nn.score_net.ScoreNet` and :mod:`imer_fast.diffusion.ve_sde` against it and
benchmarks time it as the eager baseline. Module names, parameter shapes and the order in which
parameters are created (hence the initial values under a seed) are the release's, so a state_dict
moves unchanged between the release, this module and ours. The condition injectors are the eager
MulT encoder :class:`~imer_fast.testing.reference_mult.ReferenceTransformerEncoder`.

Release behaviour kept:

- time features: ``[sin(2π·t·W), cos(2π·t·W)]`` with a fixed ``W ~ N(0, 30²)`` (a parameter that does
  not require grad, saved in the state_dict), then ``Linear`` and swish ``x·sigmoid(x)``;
- every level: convolution (no bias, except the last transposed one) → ``+=`` the MulT encoder's
  output with the features as queries and the level's condition as keys and values (the condition is
  carried down and up by its own convolutions) → ``+=`` the level's ``Dense`` time bias → GroupNorm
  (4 groups at the first level, 32 elsewhere) → swish; the decoder concatenates the encoder's
  activations; the last level has no time bias, norm or activation; the output is divided by
  ``marginal_prob_std(t)``. The first level's injector works on the raw condition, so the condition
  must have ``channels[0]`` channels;
- ``loss_fn`` perturbs the condition with the same noise ``z`` as the data;
- the sampler steps from t = 1 to ``eps`` on ``linspace(1, eps, num_steps)`` with step size equal to
  the grid spacing (so it takes ``num_steps`` steps of that size), draws, per step, the condition's
  perturbation noise, then (after the model call) the step noise — also on the last step — and
  returns the last mean.

Differences, none of which changes a computed value: ``marginal_prob_std`` and ``diffusion_coeff``
keep the device of ``t`` (the release moves everything to CUDA); the sampler's ``device`` defaults
to the score model's device and it takes a ``dtype`` (default: torch's default dtype, which the
release uses implicitly).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .reference_mult import ReferenceTransformerEncoder


def marginal_prob_std(t, sigma: float) -> Tensor:
    """Standard deviation of p_0t(x(t) | x(0)) of the VE-SDE dx = sigma^t dw:
    sqrt((sigma^(2t) − 1) / (2 ln sigma)), evaluated in the release's operation order."""
    t = torch.as_tensor(t)
    return torch.sqrt((sigma ** (2 * t) - 1.0) / 2.0 / math.log(sigma))


def diffusion_coeff(t, sigma: float) -> Tensor:
    """Diffusion coefficient g(t) = sigma^t of the VE-SDE."""
    return torch.as_tensor(sigma ** t)


class ReferenceGaussianFourierProjection(nn.Module):
    """Fixed random Fourier features of a scalar time: [sin(2π t W), cos(2π t W)], W ~ N(0, scale²)."""

    def __init__(self, embed_dim: int, scale: float = 30.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embed_dim // 2) * scale, requires_grad=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ReferenceDense(nn.Module):
    """``Linear`` whose output gets a trailing length axis of size 1 (a per-channel bias map)."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.dense = nn.Linear(input_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)[..., None]


def _injector(embed_dim: int) -> ReferenceTransformerEncoder:
    """The release's condition injector: a 2-layer, 8-head MulT encoder with the future mask, no dropout."""
    return ReferenceTransformerEncoder(embed_dim=embed_dim, num_heads=8, layers=2, attn_dropout=0.0,
                                       relu_dropout=0.0, res_dropout=0.0, embed_dropout=0.0, attn_mask=True)


def _down(cin: int, cout: int) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, 3, stride=2, padding=1, bias=False)


def _up(cin: int, cout: int) -> nn.ConvTranspose1d:
    return nn.ConvTranspose1d(cin, cout, 3, stride=2, padding=1, bias=False, output_padding=1)


class ReferenceScoreNet(nn.Module):
    """IMDer's time-dependent score network: a 1-D U-Net on [B, 32, L] (module doc)."""

    def __init__(self, marginal_prob_std: Callable[[Tensor], Tensor], channels: Sequence[int] = (32, 64, 128, 256),
                 embed_dim: int = 256):
        super().__init__()
        c0, c1, c2, c3 = channels
        # Attribute order is the release's: it fixes the state_dict order and the initial RNG draws.
        self.embed = nn.Sequential(ReferenceGaussianFourierProjection(embed_dim=embed_dim),
                                   nn.Linear(embed_dim, embed_dim))
        self.conv1 = nn.Conv1d(32, c0, 3, stride=1, padding=1, bias=False)
        self.attention_1 = _injector(c0)
        self.dense1 = ReferenceDense(embed_dim, c0)
        self.gnorm1 = nn.GroupNorm(4, num_channels=c0)
        self.conv2 = _down(c0, c1)
        self.conv2_cond = _down(c0, c1)
        self.attention_2 = _injector(c1)
        self.dense2 = ReferenceDense(embed_dim, c1)
        self.gnorm2 = nn.GroupNorm(32, num_channels=c1)
        self.conv3 = _down(c1, c2)
        self.conv3_cond = _down(c1, c2)
        self.attention_3 = _injector(c2)
        self.dense3 = ReferenceDense(embed_dim, c2)
        self.gnorm3 = nn.GroupNorm(32, num_channels=c2)
        self.conv4 = _down(c2, c3)
        self.conv4_cond = _down(c2, c3)
        self.attention_4 = _injector(c3)
        self.dense4 = ReferenceDense(embed_dim, c3)
        self.gnorm4 = nn.GroupNorm(32, num_channels=c3)

        self.tconv4 = _up(c3, c2)
        self.tconv4_cond = _up(c3, c2)
        self.attention_t4 = _injector(c2)
        self.dense5 = ReferenceDense(embed_dim, c2)
        self.tgnorm4 = nn.GroupNorm(32, num_channels=c2)
        self.tconv3 = _up(c2 + c2, c1)
        self.tconv3_cond = _up(c2, c1)
        self.attention_t3 = _injector(c1)
        self.dense6 = ReferenceDense(embed_dim, c1)
        self.tgnorm3 = nn.GroupNorm(32, num_channels=c1)
        self.tconv2 = _up(c1 + c1, c0)
        self.tconv2_cond = _up(c1, c0)
        self.attention_t2 = _injector(c0)
        self.dense7 = ReferenceDense(embed_dim, c0)
        self.tgnorm2 = nn.GroupNorm(32, num_channels=c0)
        self.tconv1 = nn.ConvTranspose1d(c0 + c0, 32, 3, stride=1, padding=1)
        self.tconv1_cond = nn.ConvTranspose1d(c0, 32, 3, stride=1, padding=1)
        self.attention_t1 = _injector(32)
        self.marginal_prob_std = marginal_prob_std

    @staticmethod
    def act(x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)

    @staticmethod
    def _inject(h: Tensor, injector: nn.Module, condition: Tensor) -> None:
        """h += injector(h, condition, condition) in the encoder's (L, B, C) layout, in place."""
        out = injector(h.permute(2, 0, 1), condition.permute(2, 0, 1), condition.permute(2, 0, 1))
        h += out.permute(1, 2, 0)

    def forward(self, x: Tensor, t: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        embed = self.act(self.embed(t))
        cond = condition

        h1 = self.conv1(x)
        if cond is not None:
            self._inject(h1, self.attention_1, cond)
        h1 += self.dense1(embed)
        h1 = self.act(self.gnorm1(h1))

        h2 = self.conv2(h1)
        if cond is not None:
            cond = self.conv2_cond(cond)
            self._inject(h2, self.attention_2, cond)
        h2 += self.dense2(embed)
        h2 = self.act(self.gnorm2(h2))

        h3 = self.conv3(h2)
        if cond is not None:
            cond = self.conv3_cond(cond)
            self._inject(h3, self.attention_3, cond)
        h3 += self.dense3(embed)
        h3 = self.act(self.gnorm3(h3))

        h4 = self.conv4(h3)
        if cond is not None:
            cond = self.conv4_cond(cond)
            self._inject(h4, self.attention_4, cond)
        h4 += self.dense4(embed)
        h4 = self.act(self.gnorm4(h4))

        h = self.tconv4(h4)
        if cond is not None:
            cond = self.tconv4_cond(cond)
            self._inject(h, self.attention_t4, cond)
        h += self.dense5(embed)
        h = self.act(self.tgnorm4(h))

        h = self.tconv3(torch.cat([h, h3], dim=1))
        if cond is not None:
            cond = self.tconv3_cond(cond)
            self._inject(h, self.attention_t3, cond)
        h += self.dense6(embed)
        h = self.act(self.tgnorm3(h))

        h = self.tconv2(torch.cat([h, h2], dim=1))
        if cond is not None:
            cond = self.tconv2_cond(cond)
            self._inject(h, self.attention_t2, cond)
        h += self.dense7(embed)
        h = self.act(self.tgnorm2(h))

        h = self.tconv1(torch.cat([h, h1], dim=1))
        if cond is not None:
            cond = self.tconv1_cond(cond)
            self._inject(h, self.attention_t1, cond)
        return h / self.marginal_prob_std(t)[:, None, None]


def reference_loss_fn(model: nn.Module, x: Tensor, marginal_prob_std: Callable[[Tensor], Tensor],
                      condition: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Denoising score matching: t ~ U(eps, 1), z ~ N(0, I), x_t = x + std(t)·z (the condition gets the
    same z), loss = mean over the batch of sum((score·std + z)²)."""
    random_t = torch.rand(x.shape[0], device=x.device) * (1.0 - eps) + eps
    z = torch.randn_like(x)
    std = marginal_prob_std(random_t)
    perturbed_x = x + z * std[:, None, None]
    if condition is not None:
        perturbed_condition = condition + z * std[:, None, None]
        score = model(perturbed_x, random_t, perturbed_condition)
    else:
        score = model(perturbed_x, random_t)
    return torch.mean(torch.sum((score * std[:, None, None] + z) ** 2, dim=(1, 2)))


def reference_euler_maruyama_sampler(score_model: nn.Module, marginal_prob_std: Callable[[Tensor], Tensor],
                                     diffusion_coeff: Callable[[Tensor], Tensor], batch_size: int = 64,
                                     num_steps: int = 100, device=None, condition: Optional[Tensor] = None,
                                     eps: float = 1e-3, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Euler–Maruyama integration of the reverse VE-SDE from t = 1 (x ~ N(0, std(1)²)) towards ``eps``;
    returns the mean of the last step (module doc)."""
    if device is None:
        param = next(score_model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    t = torch.ones(batch_size, device=device, dtype=dtype)
    init_x = torch.randn(batch_size, 32, 48, device=device, dtype=dtype) * marginal_prob_std(t)[:, None, None]
    time_steps = torch.linspace(1.0, eps, num_steps, device=device, dtype=dtype)
    step_size = time_steps[0] - time_steps[1]
    x = init_x
    with torch.no_grad():
        for time_step in time_steps:
            batch_time_step = torch.ones(batch_size, device=device, dtype=dtype) * time_step
            g = diffusion_coeff(batch_time_step)
            if condition is not None:
                noise = torch.randn(batch_size, 32, 48, device=device, dtype=dtype)
                perturbed_condition = condition + noise * marginal_prob_std(batch_time_step)[:, None, None]
                score = score_model(x, batch_time_step, perturbed_condition)
            else:
                score = score_model(x, batch_time_step)
            mean_x = x + (g ** 2)[:, None, None] * score * step_size
            x = mean_x + torch.sqrt(step_size) * g[:, None, None] * torch.randn_like(x)
    return mean_x
