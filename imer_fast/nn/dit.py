"""A diffusion transformer (DiT, Peebles & Xie 2023) over 1-D latent sequences, written from the paper.

RoHyDR's December 2025 release generates a missing modality's ``C × L`` latent (32 × 48) with a DiT
whose "patches" are the L latent steps: every step is a token (patch size 1, no patchify), so the
network is a transformer over L tokens of C features. The release's settings (``docs/releases/
rohydr.md``): hidden 64, depth 6, 16 heads, MLP ratio 4, learned positions of shape (1, L, hidden),
the condition mean-pooled over its steps and linearly embedded, then added to the timestep
embedding. This module is our own implementation of that design from the DiT paper's math:

- tokens: ``x_embedder`` Linear(C → D) on every step, plus the position table ``pos_embed``
  (learned, the release's choice, initialised N(0, 1) as the release does; or the paper's fixed
  1-D sine–cosine table, ``positions="sinusoidal"``);
- conditioning vector ``c = t_embedder(t) + y_embedder(mean_steps(condition))``, where
  ``t_embedder`` is the paper's frequency embedding (256 sinusoidal features ``[cos, sin]``,
  max period 10,000) followed by Linear → SiLU → Linear;
- ``depth`` adaLN-Zero blocks. With ``(β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c))`` (six D-vectors)
  and ``modulate(h, β, γ) = h·(1 + γ) + β``::

      x = x + α₁ · Attention(modulate(LN(x), β₁, γ₁))
      x = x + α₂ · MLP(modulate(LN(x), β₂, γ₂))

  LN has no affine parameters (eps 1e-6); Attention is multi-head self-attention over the L tokens
  (no mask); MLP is Linear(D → ratio·D) → GELU(tanh) → Linear(ratio·D → D);
- the final adaLN layer: ``(β, γ) = Linear(SiLU(c))``, output ``Linear(modulate(LN(x), β, γ))``
  (D → C), back to [B, C, L].

Initialisation follows the paper: Xavier-uniform Linear weights with zero biases, N(0, 0.02²) for
the timestep MLP, and **zeros** for every adaLN modulation Linear and for the output Linear. So at
initialisation every block is the identity (its gates α are 0) and the network outputs exactly
zero — the "Zero" of adaLN-Zero.

Not carried over from the release: its DiT also predicts a variance (``learn_sigma``: the output has
2C channels, then a Linear maps them back to C and only the first C are kept); the ε-prediction loss
the release trains with never uses a variance, so this network predicts C channels only.

Hot path on imer_fast's fused ops: the LayerNorms are :func:`imer_fast.ops.stable_layer_norm`
(``stable=False``: a plain LayerNorm), the attention is :func:`imer_fast.ops.attention` on head
views of one packed qkv projection, the timestep features are
:func:`imer_fast.ops.sinusoidal_timestep_embedding`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import attention
from ..ops.layer_norm import stable_layer_norm
from ..ops.timestep_embedding import sinusoidal_timestep_embedding
from ._checks import require_positive

_NAME = "DiT1d"
POSITIONS = ("learned", "sinusoidal")
_LN_EPS = 1e-6


def _layer_norm(x: Tensor) -> Tensor:
    return stable_layer_norm(x, None, None, eps=_LN_EPS, stable=False)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x·(1 + scale) + shift`` with per-sample [B, D] shift / scale broadcast over the tokens of x [B, L, D]."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_positions(length: int, dim: int) -> Tensor:
    """The DiT paper's fixed 1-D table [length, dim]: ``[sin(p·ω_k), cos(p·ω_k)]``, ω_k = 10000^(−2k/dim)."""
    if dim % 2:
        raise ValueError(f"sincos_positions: dim must be even; got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency features of the (integer or real) diffusion step, then Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        features = sinusoidal_timestep_embedding(t, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (module doc)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, hidden_mlp)
        self.fc2 = nn.Linear(hidden_mlp, hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def attend(self, h: Tensor) -> Tensor:
        b, length, d = h.shape
        heads = self.qkv(h).view(b, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(heads[0], heads[1], heads[2])  # [B, H, L, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, length, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attend(modulate(_layer_norm(x), shift1, scale1)))
        mlp = self.fc2(F.gelu(self.fc1(modulate(_layer_norm(x), shift2, scale2)), approximate="tanh"))
        return torch.addcmul(x, gate2.unsqueeze(1), mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then Linear(D → C)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(_layer_norm(x), shift, scale))


class DiT1d(nn.Module):
    """Conditional DiT denoiser ``forward(x [B, C, L], t [B], condition [B, Cc, Lc]) -> [B, C, L]``
    (module doc); the signature of :class:`imer_fast.diffusion.GaussianDiffusion`'s denoisers.

    Args:
        in_channels, length: the latent (release 32 × 48).
        hidden_size, depth, num_heads, mlp_ratio: the transformer (release 64, 6, 16, 4).
        cond_channels: channels of the condition, mean-pooled over its steps (release 32).
        positions: "learned" (release) or "sinusoidal" (the paper's fixed table).
    """

    def __init__(self, in_channels: int = 32, length: int = 48, *, hidden_size: int = 64, depth: int = 6,
                 num_heads: int = 16, mlp_ratio: float = 4.0, cond_channels: int = 32, positions: str = "learned"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("length", length), ("hidden_size", hidden_size),
                            ("depth", depth), ("num_heads", num_heads), ("cond_channels", cond_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_NAME}: {name} must be a positive int; got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"{_NAME}: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        require_positive(_NAME, mlp_ratio=mlp_ratio)
        if positions not in POSITIONS:
            raise ValueError(f"{_NAME}: positions must be one of {POSITIONS}; got {positions!r}")
        self.in_channels, self.length, self.cond_channels = in_channels, length, cond_channels
        self.positions = positions
        self.x_embedder = nn.Linear(in_channels, hidden_size)
        if positions == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, length, hidden_size))
        else:
            self.register_buffer("pos_embed", sincos_positions(length, hidden_size)[None])
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Linear(cond_channels, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The DiT paper's initialisation (module doc); the learned position table is redrawn N(0, 1)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for linear in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.positions == "learned":
            with torch.no_grad():
                self.pos_embed.normal_()

    def conditioning(self, t: Tensor, condition: Tensor) -> Tensor:
        """``c = t_embedder(t) + y_embedder(mean over steps of condition)``, [B, D]."""
        return self.t_embedder(t) + self.y_embedder(condition.mean(dim=2))

    def forward(self, x: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        self._check(x, t, condition)
        c = self.conditioning(t, condition)
        h = self.x_embedder(x.transpose(1, 2)) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c).transpose(1, 2)

    def _check(self, x: Tensor, t: Tensor, condition: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 3 \
                or tuple(x.shape[1:]) != (self.in_channels, self.length):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{_NAME}: x must be a floating tensor [B, {self.in_channels}, {self.length}]; got {got}")
        batch = x.shape[0]
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != batch or t.dtype == torch.bool:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{_NAME}: t must be an integer or floating tensor [B = {batch}]; got {got}")
        if not isinstance(condition, Tensor) or condition.dim() != 3 or condition.shape[0] != batch \
                or condition.shape[1] != self.cond_channels or condition.shape[2] == 0:
            got = tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__
            raise ValueError(f"{_NAME}: condition must be [B = {batch}, cond_channels = {self.cond_channels}, Lc] "
                             f"(Lc >= 1); got {got}")
        if condition.dtype != x.dtype or condition.device != x.device or t.device != x.device:
            raise ValueError(f"{_NAME}: condition ({condition.dtype} on {condition.device}) and t (on {t.device}) must "
                             f"match x ({x.dtype} on {x.device})")
        weight = self.pos_embed
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{_NAME}: x is {x.dtype} but the model's parameters are {weight.dtype} (cast one to "
                             f"the other, or run under torch.autocast)")
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if x.numel() and not torch.compiler.is_compiling() and not capturing:
            bad_x, bad_c = torch.stack([~torch.isfinite(x).all(), ~torch.isfinite(condition).all()]).tolist()
            if bad_x or bad_c:
                raise ValueError(f"{_NAME}: {'x' if bad_x else 'condition'} contains NaN or inf")


__all__ = ["DiT1d", "DiTBlock", "FinalLayer", "POSITIONS", "TimestepEmbedder", "modulate", "sincos_positions"]
