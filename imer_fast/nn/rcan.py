"""RCAN's residual channel-attention group (Zhang et al. 2018) on 1-D latents: RoHyDR's refiner.

RoHyDR refines a generated ``C × L`` latent with ``1×1 conv (C → 2C) → residual group → 1×1 conv
(2C → C)``, the group being 20 residual channel-attention blocks (reduction 16) and a 3-tap
convolution under one long skip (``docs/releases/rohydr.md``). Written from the RCAN paper:

- channel attention: ``s = σ(W₂ · ReLU(W₁ · mean_L(x) + b₁) + b₂)`` (W₁: C → C / r, W₂: C / r → C,
  1×1 convolutions), output ``x · s`` (one gate per channel);
- residual channel-attention block: ``x + res_scale · CA(conv₃(ReLU(conv₃(x))))``;
- residual group: ``x + conv₃(RCAB_n(… RCAB_1(x)))``.

Module names (``body.i``, ``conv_du.0`` / ``conv_du.2``) are the RCAN code's, which the RoHyDR
release uses too.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._checks import require_ints


class ChannelAttention(nn.Module):
    """Squeeze (mean over L) → 1×1 conv C → C/r → ReLU → 1×1 conv C/r → C → sigmoid; rescales x's channels."""

    def __init__(self, num_channels: int, reduction: int = 16):
        super().__init__()
        require_ints("ChannelAttention", 1, num_channels=num_channels, reduction=reduction)
        if num_channels < reduction or num_channels % reduction:
            raise ValueError(f"ChannelAttention: num_channels ({num_channels}) must be a positive multiple of "
                             f"reduction ({reduction})")
        hidden = num_channels // reduction
        self.conv_du = nn.Sequential(nn.Conv1d(num_channels, hidden, 1), nn.ReLU(),
                                     nn.Conv1d(hidden, num_channels, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(x.mean(dim=2, keepdim=True))


class ResidualChannelAttentionBlock(nn.Module):
    """``x + res_scale · CA(conv₃(ReLU(conv₃(x))))``."""

    def __init__(self, num_channels: int, reduction: int = 16, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.body = nn.Sequential(nn.Conv1d(num_channels, num_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(num_channels, num_channels, 3, padding=1),
                                  ChannelAttention(num_channels, reduction))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.body(x)


class ResidualGroup(nn.Module):
    """``num_blocks`` RCABs then a 3-tap convolution, under one skip connection."""

    def __init__(self, num_channels: int, num_blocks: int = 20, reduction: int = 16, res_scale: float = 1.0):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"ResidualGroup: num_blocks must be >= 1; got {num_blocks}")
        blocks = [ResidualChannelAttentionBlock(num_channels, reduction, res_scale) for _ in range(num_blocks)]
        self.body = nn.Sequential(*blocks, nn.Conv1d(num_channels, num_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def rcan_refiner(channels: int, num_blocks: int = 20, reduction: int = 16) -> nn.Sequential:
    """RoHyDR's refiner ``Conv1d(C → 2C, 1) → ResidualGroup(2C) → Conv1d(2C → C, 1)`` on [N, C, L]."""
    return nn.Sequential(nn.Conv1d(channels, 2 * channels, 1), ResidualGroup(2 * channels, num_blocks, reduction),
                         nn.Conv1d(2 * channels, channels, 1))


__all__ = ["ChannelAttention", "ResidualChannelAttentionBlock", "ResidualGroup", "rcan_refiner"]
