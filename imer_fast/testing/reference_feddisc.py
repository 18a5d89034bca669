"""The eager baseline of FedDISC's diffusion generator, restated plainly from its public release
(wdqdp/FedDISC ``FedDISC/trains/singleTask/model/conditional_ddim.py``): :class:`ReferenceUNetModel`
(``UNetModel``) and :class:`ReferenceGaussianDiffusion` (``GaussianDiffusion``).

It follows the release op for op and at the release's cost, so tests compare imer_fast's
:class:`~imer_fast.nn.ConditionalUNet1d` and :class:`~imer_fast.diffusion.GaussianDiffusion` against
it and benchmarks time it as the eager baseline. Module names, parameter shapes and the order in
which parameters are created (hence the initial values under a seed) are the release's, so a
state_dict moves unchanged between the release, this module and ours. Release quirks kept:

- ``ResidualBlock``: block1 (GroupNorm 8 → SiLU → Conv1d k3) → ``h += cross_attn(h, y tokens)`` →
  block2 with the time scale-shift ``x·(scale + 1) + shift`` between its GroupNorm and SiLU →
  ``h + shortcut(x)``; its ``dropout`` argument and ``gca`` (a constant 1) do nothing;
- ``AttentionBlock`` splits heads the legacy way (``qkv.reshape(B·heads, −1, L).chunk(3, dim=1)``,
  so each head's q, k, v are consecutive channel groups) and scales q and k by d^(−1/4) each;
- attention blocks sit where the running downsample factor is in ``attention_resolutions``;
- the DDIM timestep sequence is shifted by one, and the step from the first DDIM timestep uses
  ``alphas_cumprod[0]`` (not 1) as its previous value.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference_mult import ReferenceCrossAttention


def release_timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding [N, dim]: [cos(t·f), sin(t·f)], f_i = exp(−ln(max_period)·i/half), zero-padded."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ReferenceAttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, kernel_size=1, bias=False)
        self.proj = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, L = x.shape
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.reshape(B * self.num_heads, -1, L).chunk(3, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(C // self.num_heads))
        attn = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
        h = torch.einsum("bts,bcs->bct", attn, v).reshape(B, -1, L)
        return self.proj(h) + x


class ReferenceUpsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ReferenceDownsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv1d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool1d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8, norm: bool = True):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, dim) if norm else nn.Identity()
        self.activation = nn.SiLU()
        self.project = nn.Conv1d(dim, dim_out, kernel_size=3, padding=1)

    def forward(self, x: Tensor, scale_shift=None) -> Tensor:
        x = self.groupnorm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.project(self.activation(x))


class ReferenceResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_channels: int, dropout: float, groups: int = 8):
        super().__init__()
        self.block1 = ReferenceBlock(in_channels, out_channels, groups=groups)
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(time_channels, out_channels * 2))
        self.block2 = ReferenceBlock(out_channels, out_channels, groups=groups)
        self.shortcut = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.cross_attn = ReferenceCrossAttention(dim=out_channels, context_dim=time_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h = self.block1(x)
        attn = self.cross_attn(h.transpose(1, 2), y).transpose(1, 2)
        h += attn
        scale_shift = self.time_emb(t)[:, :, None].chunk(2, dim=1)
        h = self.block2(h, scale_shift=scale_shift)
        h *= 1  # the release's gca = Always(1)
        return h + self.shortcut(x)


class ReferenceTimestepSequential(nn.Sequential):
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, t, y) if isinstance(layer, ReferenceResidualBlock) else layer(x)
        return x


class _Tokens(nn.Module):
    """'b (r d) -> b r d' (the release's einops Rearrange, which has no parameters)."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.r, -1)


class ReferenceUNetModel(nn.Module):
    """FedDISC's conditional 1-D U-Net denoiser: forward(x [B, C, L], t long [B], y [B, label_num])."""

    def __init__(self, in_channels=32, model_channels=128, out_channels=32, num_res_blocks=2,
                 attention_resolutions=(8, 16), dropout=0, channel_mult=(1, 2, 2, 2), conv_resample=True,
                 num_heads=4, label_num=4, num_time_tokens=2):
        super().__init__()
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, attention_resolutions
        self.dropout, self.channel_mult, self.conv_resample, self.num_heads = dropout, channel_mult, conv_resample, num_heads
        time_embed_dim = model_channels * 2
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        cond_dim = time_embed_dim
        self.label_embedding = nn.Linear(label_num, time_embed_dim)
        self.to_time_tokens = nn.Sequential(nn.Linear(time_embed_dim, num_time_tokens * cond_dim), _Tokens(num_time_tokens))
        self.down_blocks = nn.ModuleList([ReferenceTimestepSequential(nn.Conv1d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ReferenceResidualBlock(ch, mult * model_channels, time_embed_dim, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(ReferenceAttentionBlock(ch, num_heads=num_heads))
                self.down_blocks.append(ReferenceTimestepSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.down_blocks.append(ReferenceTimestepSequential(ReferenceDownsample(ch, conv_resample)))
                chans.append(ch)
                ds *= 2
        self.middle_block = ReferenceTimestepSequential(
            ReferenceResidualBlock(ch, ch, time_embed_dim, dropout), ReferenceAttentionBlock(ch, num_heads=num_heads),
            ReferenceResidualBlock(ch, ch, time_embed_dim, dropout))
        self.up_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ReferenceResidualBlock(ch + chans.pop(), model_channels * mult, time_embed_dim, dropout)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(ReferenceAttentionBlock(ch, num_heads=num_heads))
                if level and i == num_res_blocks:
                    layers.append(ReferenceUpsample(ch, conv_resample))
                    ds //= 2
                self.up_blocks.append(ReferenceTimestepSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv1d(model_channels, out_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        t = self.time_embed(release_timestep_embedding(t, self.model_channels))
        y = self.to_time_tokens(self.label_embedding(y))
        hs = []
        h = x
        for module in self.down_blocks:
            h = module(h, t, y)
            hs.append(h)
        h = self.middle_block(h, t, y)
        for module in self.up_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), t, y)
        return self.out(h)


def _linear_betas(timesteps: int) -> Tensor:
    scale = 1000 / timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=torch.float64)


def _cosine_betas(timesteps: int, s: float = 0.008) -> Tensor:
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.clip(1 - (ac[1:] / ac[:-1]), 0, 0.999)


class ReferenceGaussianDiffusion:
    """FedDISC's ``GaussianDiffusion``: float64 schedules, float32 gathers, global-RNG noise."""

    def __init__(self, timesteps: int = 1000, beta_schedule: str = "linear"):
        self.timesteps = timesteps
        if beta_schedule == "linear":
            betas = _linear_betas(timesteps)
        elif beta_schedule == "cosine":
            betas = _cosine_betas(timesteps)
        else:
            raise ValueError(f"unknown beta schedule {beta_schedule}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, axis=0)
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

    def _extract(self, a: Tensor, t: Tensor, x_shape) -> Tensor:
        out = a.to(t.device).gather(0, t).float()
        return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))

    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t, t, noise):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t.shape),
                self._extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def p_mean_variance(self, model, x_t, t, y, clip_denoised=True):
        x_recon = self.predict_start_from_noise(x_t, t, model(x_t, t, y))
        if clip_denoised:
            x_recon = torch.clamp(x_recon, min=-1.0, max=1.0)
        return self.q_posterior_mean_variance(x_recon, x_t, t)

    @torch.no_grad()
    def p_sample(self, model, x_t, t, y, clip_denoised=True):
        mean, _, log_variance = self.p_mean_variance(model, x_t, t, y, clip_denoised=clip_denoised)
        noise = torch.randn_like(x_t)
        nonzero = (t != 0).float().view(-1, *([1] * (len(x_t.shape) - 1)))
        return mean + nonzero * (0.5 * log_variance).exp() * noise

    @torch.no_grad()
    def sample(self, model, y, seq_len, batch_size=8, channels=32):
        device = next(model.parameters()).device
        img = torch.randn((batch_size, channels, seq_len), device=device)
        for i in reversed(range(0, self.timesteps)):
            t = torch.full((batch_size,), i, device=device, dtype=torch.long)
            img = self.p_sample(model, img, t, y)
        return img

    def train_losses(self, model, x_start, t, y):
        noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start, t, noise=noise)
        return F.mse_loss(noise, model(x_noisy, t, y))

    @torch.no_grad()
    def ddim_sample(self, model, y, seq_len, batch_size=8, channels=32, ddim_timesteps=50, ddim_discr_method="quad",
                    ddim_eta=0.0, clip_denoised=True):
        if ddim_discr_method == "uniform":
            seq = np.asarray(list(range(0, self.timesteps, self.timesteps // ddim_timesteps)))
        elif ddim_discr_method == "quad":
            seq = ((np.linspace(0, np.sqrt(self.timesteps * 0.8), ddim_timesteps)) ** 2).astype(int)
        else:
            raise NotImplementedError(ddim_discr_method)
        seq = seq + 1
        prev_seq = np.append(np.array([0]), seq[:-1])
        device = next(model.parameters()).device
        img = torch.randn((batch_size, channels, seq_len), device=device)
        for i in reversed(range(0, ddim_timesteps)):
            t = torch.full((batch_size,), seq[i], device=device, dtype=torch.long)
            prev_t = torch.full((batch_size,), prev_seq[i], device=device, dtype=torch.long)
            a_t = self._extract(self.alphas_cumprod, t, img.shape)
            a_prev = self._extract(self.alphas_cumprod, prev_t, img.shape)
            pred_noise = model(img, t, y)
            pred_x0 = (img - torch.sqrt((1.0 - a_t)) * pred_noise) / torch.sqrt(a_t)
            if clip_denoised:
                pred_x0 = torch.clamp(pred_x0, min=-1.0, max=1.0)
            sigmas_t = ddim_eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            pred_dir_xt = torch.sqrt(1 - a_prev - sigmas_t ** 2) * pred_noise
            img = torch.sqrt(a_prev) * pred_x0 + pred_dir_xt + sigmas_t * torch.randn_like(img)
        return img
