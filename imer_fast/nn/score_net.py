"""IMDer's score network on imer_fast's fused ops: a drop-in for the release's ``ScoreNet``.

Same constructor (``marginal_prob_std, channels=[32, 64, 128, 256], embed_dim=256``; mdswyz/IMDer
``trains/singleTask/model/scoremodel.py``), same ``forward(x [B, 32, L], t float [B], condition=None)``,
the same module tree and parameter names (a release state_dict loads with ``strict=True`` both ways;
the Fourier weights ``embed.0.W`` are a parameter that does not require grad, as in the release),
parameters created in the release's order (same initial values under the same seed), and the same
outputs and gradients within fp32 rounding. The release's semantics, restated in
:mod:`imer_fast.testing.reference_imder`, are kept: per level convolution → ``+`` the MulT injector's
output (features as queries, the level's condition as keys and values) → ``+`` the level's time bias →
GroupNorm → swish, U-Net skips by concatenation, the output divided by ``marginal_prob_std(t)``.

Where the time goes instead:

- every ``+= Dense(t)`` → GroupNorm → swish is one ``group_norm_film_silu`` pass (the time bias is its
  per-sample ``input_bias``; the ``nn.GroupNorm`` submodules hold the parameters);
- the injectors are :class:`~imer_fast.nn.CrossModalTransformer` (fused attention, one k/v
  projection per layer for the shared condition); features and condition enter as (L, B, C) views of
  the [B, C, L] maps, without copies, and the injector's output is added in place to the convolution's
  output;
- the Gaussian Fourier time features are one fused op; swish of the time embedding is computed once
  per forward.

Extension over the release: the condition may have a length other than x's (the injectors attend
across lengths; MulT's future mask is offset by the difference), and inputs are checked (shapes,
dtype, device, an x length the U-Net can halve three times).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.group_norm import group_norm_film_silu
from ..ops.timestep_embedding import gaussian_fourier_embedding
from ._checks import require_ints
from .cross_modal_transformer import CrossModalTransformer

_NAME = "ScoreNet"
_IN_CHANNELS = 32  # the release hard-codes the latent's channels (conv1 input, tconv1 output)
_LENGTH_MULTIPLE = 8  # three stride-2 halvings, undone by three transposed convolutions


class GaussianFourierProjection(nn.Module):
    """Fixed random Fourier features of the time: ``W ~ N(0, scale²)`` [embed_dim // 2], not trained."""

    def __init__(self, embed_dim: int, scale: float = 30.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embed_dim // 2) * scale, requires_grad=False)

    def forward(self, t: Tensor) -> Tensor:
        return gaussian_fourier_embedding(t, self.W)


class Dense(nn.Module):
    """``Linear`` with a trailing length axis on its output (the release's per-level time bias)."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.dense = nn.Linear(input_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)[..., None]


def _injector(embed_dim: int) -> CrossModalTransformer:
    return CrossModalTransformer(embed_dim=embed_dim, num_heads=8, layers=2, attn_dropout=0.0, relu_dropout=0.0,
                                 res_dropout=0.0, embed_dropout=0.0, attn_mask=True)


def _down(cin: int, cout: int) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, 3, stride=2, padding=1, bias=False)


def _up(cin: int, cout: int) -> nn.ConvTranspose1d:
    return nn.ConvTranspose1d(cin, cout, 3, stride=2, padding=1, bias=False, output_padding=1)


# (convolution, condition convolution or None, injector, time bias, GroupNorm) per level, in forward order.
_ENCODER = (("conv1", None, "attention_1", "dense1", "gnorm1"),
            ("conv2", "conv2_cond", "attention_2", "dense2", "gnorm2"),
            ("conv3", "conv3_cond", "attention_3", "dense3", "gnorm3"),
            ("conv4", "conv4_cond", "attention_4", "dense4", "gnorm4"))
_DECODER = (("tconv4", "tconv4_cond", "attention_t4", "dense5", "tgnorm4"),
            ("tconv3", "tconv3_cond", "attention_t3", "dense6", "tgnorm3"),
            ("tconv2", "tconv2_cond", "attention_t2", "dense7", "tgnorm2"))


class ScoreNet(nn.Module):
    """Drop-in for IMDer's ``ScoreNet`` (module doc): a time-dependent 1-D U-Net score model.

    ``forward(x [B, 32, L], t [B] float, condition [B, channels[0], Lc] or None)`` returns the score
    [B, 32, L]; L must be a multiple of 8."""

    def __init__(self, marginal_prob_std: Callable[[Tensor], Tensor], channels: Sequence[int] = (32, 64, 128, 256),
                 embed_dim: int = 256):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"{_NAME}: channels must list 4 level widths; got {list(channels)}")
        require_ints(_NAME, 1, **{f"channels[{i}]": c for i, c in enumerate(channels)})
        require_ints(_NAME, 2, embed_dim=embed_dim)
        if embed_dim % 2:
            raise ValueError(f"{_NAME}: embed_dim must be even (sine and cosine Fourier features); got {embed_dim}")
        c0, c1, c2, c3 = channels
        self.channels = tuple(channels)
        # Created in the release's order: it fixes the state_dict order and the initial RNG draws.
        self.embed = nn.Sequential(GaussianFourierProjection(embed_dim=embed_dim), nn.Linear(embed_dim, embed_dim))
        self.conv1 = nn.Conv1d(_IN_CHANNELS, c0, 3, stride=1, padding=1, bias=False)
        self.attention_1 = _injector(c0)
        self.dense1 = Dense(embed_dim, c0)
        self.gnorm1 = nn.GroupNorm(4, num_channels=c0)
        self.conv2 = _down(c0, c1)
        self.conv2_cond = _down(c0, c1)
        self.attention_2 = _injector(c1)
        self.dense2 = Dense(embed_dim, c1)
        self.gnorm2 = nn.GroupNorm(32, num_channels=c1)
        self.conv3 = _down(c1, c2)
        self.conv3_cond = _down(c1, c2)
        self.attention_3 = _injector(c2)
        self.dense3 = Dense(embed_dim, c2)
        self.gnorm3 = nn.GroupNorm(32, num_channels=c2)
        self.conv4 = _down(c2, c3)
        self.conv4_cond = _down(c2, c3)
        self.attention_4 = _injector(c3)
        self.dense4 = Dense(embed_dim, c3)
        self.gnorm4 = nn.GroupNorm(32, num_channels=c3)
        self.tconv4 = _up(c3, c2)
        self.tconv4_cond = _up(c3, c2)
        self.attention_t4 = _injector(c2)
        self.dense5 = Dense(embed_dim, c2)
        self.tgnorm4 = nn.GroupNorm(32, num_channels=c2)
        self.tconv3 = _up(c2 + c2, c1)
        self.tconv3_cond = _up(c2, c1)
        self.attention_t3 = _injector(c1)
        self.dense6 = Dense(embed_dim, c1)
        self.tgnorm3 = nn.GroupNorm(32, num_channels=c1)
        self.tconv2 = _up(c1 + c1, c0)
        self.tconv2_cond = _up(c1, c0)
        self.attention_t2 = _injector(c0)
        self.dense7 = Dense(embed_dim, c0)
        self.tgnorm2 = nn.GroupNorm(32, num_channels=c0)
        self.tconv1 = nn.ConvTranspose1d(c0 + c0, _IN_CHANNELS, 3, stride=1, padding=1)
        self.tconv1_cond = nn.ConvTranspose1d(c0, _IN_CHANNELS, 3, stride=1, padding=1)
        self.attention_t1 = _injector(_IN_CHANNELS)
        self.marginal_prob_std = marginal_prob_std

    def _check(self, x: Tensor, t: Tensor, condition: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 3 or x.shape[1] != _IN_CHANNELS:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{_NAME}: x must be a floating tensor [B, {_IN_CHANNELS}, L]; got {got}")
        batch, length = x.shape[0], x.shape[2]
        if length == 0 or length % _LENGTH_MULTIPLE:
            raise ValueError(f"{_NAME}: the length of x (L = {length}) must be a positive multiple of "
                             f"{_LENGTH_MULTIPLE} (the U-Net halves it three times and doubles it back)")
        if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != (batch,):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{_NAME}: t must be a floating tensor [B = {batch}] of diffusion times; got {got}")
        if t.device != x.device:
            raise ValueError(f"{_NAME}: t is on {t.device} but x is on {x.device}")
        weight = self.embed[1].weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{_NAME}: x is {x.dtype} but the model's parameters are {weight.dtype} (cast one to "
                             f"the other, or run under torch.autocast)")
        if condition is not None:
            c0 = self.channels[0]
            if (not isinstance(condition, Tensor) or condition.dim() != 3 or condition.shape[0] != batch
                    or condition.shape[1] != c0 or condition.shape[2] == 0):
                got = tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__
                raise ValueError(f"{_NAME}: condition must be [B = {batch}, channels[0] = {c0}, Lc] (Lc >= 1); "
                                 f"got {got}")
            if condition.dtype != x.dtype or condition.device != x.device:
                raise ValueError(f"{_NAME}: condition is {condition.dtype} on {condition.device} but x is {x.dtype} "
                                 f"on {x.device}")
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not x.numel() or torch.compiler.is_compiling() or capturing:
            return
        # One host sync for the value checks: the score divides by std(t), which is 0 at t = 0.
        nan_x, bad_t, nan_c = torch.stack([torch.isnan(x).any(), ((t <= 0) | (t > 1) | t.isnan()).any(),
                                           torch.isnan(condition).any() if condition is not None
                                           else torch.zeros((), dtype=torch.bool, device=x.device)]).tolist()
        if nan_x or nan_c:
            raise ValueError(f"{_NAME}: {'x' if nan_x else 'condition'} contains NaN")
        if bad_t:
            raise ValueError(f"{_NAME}: t must lie in (0, 1] (the score divides by the marginal std, 0 at t = 0); "
                             f"got values in [{float(t.min())}, {float(t.max())}]")

    @staticmethod
    def _inject(h: Tensor, injector: CrossModalTransformer, condition: Tensor) -> Tensor:
        """h += injector(h, condition, condition), in place; (L, B, C) views in, [L, B, C] out."""
        keys = condition.permute(2, 0, 1)
        return h.add_(injector(h.permute(2, 0, 1), keys, keys).permute(1, 2, 0))

    def _norm_act(self, h: Tensor, dense: str, norm: str, embed: Tensor) -> Tensor:
        """swish(GroupNorm(h + Dense(embed))) in one pass."""
        linear, gn = getattr(self, dense).dense, getattr(self, norm)
        bias = F.linear(embed, linear.weight, linear.bias)
        return group_norm_film_silu(h, gn.num_groups, gn.weight, gn.bias, input_bias=bias, eps=gn.eps)

    def forward(self, x: Tensor, t: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        self._check(x, t, condition)
        fourier, linear = self.embed[0], self.embed[1]
        embed = F.silu(F.linear(gaussian_fourier_embedding(t, fourier.W), linear.weight, linear.bias))
        cond = condition
        h = x
        skips = []
        for conv, cond_conv, injector, dense, norm in _ENCODER:
            h = getattr(self, conv)(h)
            if cond is not None:
                if cond_conv is not None:
                    cond = getattr(self, cond_conv)(cond)
                h = self._inject(h, getattr(self, injector), cond)
            h = self._norm_act(h, dense, norm, embed)
            skips.append(h)
        skips.pop()  # the bottom level feeds the decoder directly
        for conv, cond_conv, injector, dense, norm in _DECODER:
            h = getattr(self, conv)(h if conv == "tconv4" else torch.cat([h, skips.pop()], dim=1))
            if cond is not None:
                cond = getattr(self, cond_conv)(cond)
                h = self._inject(h, getattr(self, injector), cond)
            h = self._norm_act(h, dense, norm, embed)
        h = self.tconv1(torch.cat([h, skips.pop()], dim=1))
        if cond is not None:
            h = self._inject(h, self.attention_t1, self.tconv1_cond(cond))
        return h / self.marginal_prob_std(t)[:, None, None]
