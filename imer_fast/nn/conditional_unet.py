"""Conditional 1-D U-Net denoiser: drop-in for FedDISC's ``UNetModel`` on imer_fast's fused ops.

Same constructor arguments and defaults as the release (wdqdp/FedDISC ``conditional_ddim.py``:
``in_channels=32, model_channels=128, out_channels=32, num_res_blocks=2, attention_resolutions=(8, 16),
dropout=0, channel_mult=(1, 2, 2, 2), conv_resample=True, num_heads=4, label_num=4,
num_time_tokens=2``), same ``forward(x [B, C, L], t long [B], y [B, label_num])``, the same module
tree and parameter names (a release state_dict loads with ``strict=True`` both ways), parameters
created in the release's order (same initial values under the same seed), and the same outputs
within fp32 rounding — quirks included (see :mod:`imer_fast.testing.reference_feddisc`).

Where the time goes instead:

- every GroupNorm → (time scale-shift) → SiLU prologue is one ``group_norm_film_silu`` pass;
- the condition cross-attention of every residual block is :class:`CondCrossAttention` (fused
  attention over the null token + condition tokens, fused stable LayerNorms);
- the self-attention blocks run the fused attention op on strided views of the qkv convolution
  (the release's legacy head split is a view, not a copy);
- on the CPU activations run channels-last ([B, L, C] in memory) with channels-last convolution
  weights: oneDNN's NWC convolutions, the fused GroupNorm streaming rows of channels, and the
  cross-attention reading [B, L, C] without transposing copies;
- the sinusoidal time features are one fused op; SiLU of the time embedding is computed once per
  forward instead of once per block;
- inside the samplers (:func:`reuse_transformed_weights`) the CPU 3-tap convolutions run as
  Winograd convolutions on kernels transformed once per sampler loop (see :class:`Conv1d`).

Inputs are checked (shape, dtype, the length the U-Net can downsample, NaN in x and y; an empty batch
gives an empty output); the NaN check is skipped while a CUDA graph is being captured or under
``torch.compile`` (it would synchronise).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import attention
from ..ops.group_norm import group_norm_film_silu
from ..ops.timestep_embedding import sinusoidal_timestep_embedding
from ..ops.winograd_conv import fewest_rows_tile, winograd_conv1d, winograd_weight
from ._checks import require_ints
from .cond_cross_attention import CondCrossAttention


def _channels_last(x: Tensor) -> Tensor:
    """[B, C, L] stored as [B, L, C] (a no-op when it already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


_reuse = {"depth": 0, "generation": 0}
_modules_with_copies: "weakref.WeakSet[Conv1d]" = weakref.WeakSet()


@contextlib.contextmanager
def reuse_transformed_weights() -> Iterator[None]:
    """Let the CPU convolutions of :class:`ConditionalUNet1d` keep their Winograd-transformed 3-tap
    kernels between calls inside this block (a sampler calls the same denoiser 50–1,000 times with
    fixed weights; transforming every weight per call would cost what Winograd saves). The samplers
    of :class:`imer_fast.diffusion.GaussianDiffusion` enter it around their loops. A weight updated in
    place by torch ops (its version changes) or replaced is transformed again; writes through
    ``weight.data`` bypass that check, so do not make them inside the block. The copies are dropped
    when the outermost block exits."""
    if _reuse["depth"] == 0:
        _reuse["generation"] += 1
    _reuse["depth"] += 1
    try:
        yield
    finally:
        _reuse["depth"] -= 1
        if _reuse["depth"] == 0:
            for module in list(_modules_with_copies):
                module._winograd_copy = None
            _modules_with_copies.clear()


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters and init) with CPU paths for channels-last inputs:

    - inside :func:`reuse_transformed_weights`, when no gradient is needed, 3-tap convolutions
      between at least 64 channels run as Winograd F(6, 3), F(4, 3) or F(2, 3), whichever needs the
      fewest GEMM rows for the length (:func:`imer_fast.ops.winograd_conv1d`: 4/9, 1/2 or 2/3 of the
      multiply-adds, on MKL's GEMM);
      narrower ones lose to oneDNN's direct convolution;
    - 1-tap convolutions run as one GEMM over the [B·L, C] rows (``F.linear``);
    - the rest run as 2-D convolutions over [B, C, 1, L] channels-last views: ATen's 1-D path would
      first copy them to channels-first.

    Elsewhere it is ``nn.Conv1d``."""

    _winograd_copy = None  # (key, transformed weight, the weight it came from), see _transformed_weight

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """The convolution of x, plus ``residual`` (a block's shortcut, of the output's shape) when given:
        the Winograd path adds it in its output transform, saving the separate pass of the add."""
        if self._winograd_applies(x):
            weight_tf = self._transformed_weight(fewest_rows_tile(x.shape[2]))
            if residual is None or (residual.dtype == x.dtype and residual.is_cpu):
                return winograd_conv1d(x, weight_tf, self.bias, residual)
            return winograd_conv1d(x, weight_tf, self.bias) + residual  # type promotion, as the plain add
        out = self._convolve(x)
        return out if residual is None else out + residual

    def _convolve(self, x: Tensor) -> Tensor:
        if not x.is_cpu or x.dim() != 3 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        if self.kernel_size == (1,) and self.stride == (1,) and self.padding == (0,) and self.groups == 1:
            return F.linear(x.transpose(1, 2), self.weight.squeeze(2), self.bias).transpose(1, 2)
        out = F.conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias, (1, self.stride[0]), (0, self.padding[0]),
                       (1, self.dilation[0]), self.groups)
        return out.squeeze(2)

    def _winograd_applies(self, x: Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (_reuse["depth"] > 0 and not needs_grad and not torch.compiler.is_compiling() and x.is_cpu
                and x.dim() == 3 and self.padding_mode == "zeros" and self.kernel_size == (3,) and self.stride == (1,)
                and self.padding == (1,) and self.dilation == (1,) and self.groups == 1
                and min(self.in_channels, self.out_channels) >= 64
                and x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype)

    def _transformed_weight(self, outputs_per_tile: int) -> Tensor:
        weight = self.weight
        key = (_reuse["generation"], weight._version, weight.data_ptr(), weight.dtype, outputs_per_tile)
        if self._winograd_copy is None or self._winograd_copy[0] != key:
            # Holding the source weight keeps its storage alive: no other tensor gets its address.
            self._winograd_copy = (key, winograd_weight(weight.detach(), outputs_per_tile), weight.detach())
            _modules_with_copies.add(self)
        return self._winograd_copy[1]


def _cat_channels(a: Tensor, b: Tensor) -> Tensor:
    """torch.cat([a, b], dim=1) that keeps (does not drop) a channels-last layout."""
    if a.is_cpu:
        return torch.cat([a.transpose(1, 2), b.transpose(1, 2)], dim=2).transpose(1, 2)
    return torch.cat([a, b], dim=1)


def _group_norm(norm: nn.GroupNorm, x: Tensor, *, silu: bool, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
    return group_norm_film_silu(x, norm.num_groups, norm.weight, norm.bias, scale=scale, shift=shift, eps=norm.eps,
                                apply_silu=silu)


class Block(nn.Module):
    """GroupNorm → optional scale-shift → SiLU → Conv1d(k=3) (the release's ``Block``)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, dim)
        self.activation = nn.SiLU()  # kept for the module tree; the fused prologue applies it
        self.project = Conv1d(dim, dim_out, kernel_size=3, padding=1)

    def forward(self, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None) -> Tensor:
        return self.project(_group_norm(self.groupnorm, x, silu=True, scale=scale, shift=shift), residual)


class ResidualBlock(nn.Module):
    """block1 → + cross-attention to the condition tokens → block2 with the time scale-shift → + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, dropout: float = 0.0, groups: int = 8):
        super().__init__()
        self.block1 = Block(in_channels, out_channels, groups=groups)
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(time_channels, out_channels * 2))
        self.block2 = Block(out_channels, out_channels, groups=groups)
        self.shortcut = Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.cross_attn = CondCrossAttention(out_channels, context_dim=time_channels)

    def forward(self, x: Tensor, t_silu: Tensor, y: Tensor) -> Tensor:
        h = self.block1(x)
        h = h + self.cross_attn(h.transpose(1, 2), y).transpose(1, 2)
        scale, shift = self.time_emb[1](t_silu).expand(x.shape[0], -1).chunk(2, dim=1)  # t_silu may be one shared row
        return self.block2(h, scale, shift, residual=self.shortcut(x))


class AttentionBlock(nn.Module):
    """Self-attention over the length axis with the release's legacy head split, plus the residual."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: channels = {channels} must be divisible by num_heads = {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = Conv1d(channels, channels * 3, kernel_size=1, bias=False)
        self.proj = Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, length = x.shape
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(_group_norm(self.norm, x, silu=False)).view(b, heads, 3 * d, length).transpose(2, 3)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]  # [b, heads, L, d] views
        out = attention(q, k, v, scale=1.0 / math.sqrt(d))  # the release's d^-1/4 on q and on k
        if x.is_cpu:  # back to channels-last [b, L, heads·d] for the projection
            merged = out.transpose(1, 2).reshape(b, length, c).transpose(1, 2)
        else:
            merged = out.transpose(2, 3).reshape(b, c, length)
        return self.proj(merged) + x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv1d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cpu:  # nearest ×2 as a repeat along L, keeping the channels-last layout
            x = x.transpose(1, 2).repeat_interleave(2, dim=1).transpose(1, 2)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = Conv1d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool1d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """Runs its layers in order, handing the time features and condition tokens to residual blocks."""

    def forward(self, x: Tensor, t_silu: Tensor, y: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, t_silu, y) if isinstance(layer, ResidualBlock) else layer(x)
        return x


class _Tokens(nn.Module):
    """[B, r·d] → [B, r, d] (the release's parameter-free einops Rearrange)."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.r, -1)


class ConditionalUNet1d(nn.Module):
    """FedDISC's conditional 1-D U-Net denoiser (module doc)."""

    def __init__(self, in_channels: int = 32, model_channels: int = 128, out_channels: int = 32, num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (8, 16), dropout: float = 0, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 conv_resample: bool = True, num_heads: int = 4, label_num: int = 4, num_time_tokens: int = 2):
        super().__init__()
        require_ints("ConditionalUNet1d", 1, in_channels=in_channels, model_channels=model_channels,
                     out_channels=out_channels, num_heads=num_heads, label_num=label_num,
                     num_time_tokens=num_time_tokens)
        require_ints("ConditionalUNet1d", 0, num_res_blocks=num_res_blocks)
        if not channel_mult:
            raise ValueError("ConditionalUNet1d: channel_mult must list at least one level multiplier; got ()")
        require_ints("ConditionalUNet1d", 1, **{f"channel_mult[{i}]": m for i, m in enumerate(channel_mult)})
        if model_channels % 32:
            raise ValueError(f"ConditionalUNet1d: model_channels must be a multiple of 32 (GroupNorm(32) heads "
                             f"the output); got {model_channels}")
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, tuple(attention_resolutions)
        self.dropout, self.channel_mult, self.conv_resample = dropout, tuple(channel_mult), conv_resample
        self.num_heads, self.label_num = num_heads, label_num
        time_embed_dim = model_channels * 2
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.label_embedding = nn.Linear(label_num, time_embed_dim)
        self.to_time_tokens = nn.Sequential(nn.Linear(time_embed_dim, num_time_tokens * time_embed_dim),
                                            _Tokens(num_time_tokens))
        self.down_blocks = nn.ModuleList([TimestepSequential(Conv1d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResidualBlock(ch, mult * model_channels, time_embed_dim, dropout)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads))
                self.down_blocks.append(TimestepSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.down_blocks.append(TimestepSequential(Downsample(ch, conv_resample)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(ResidualBlock(ch, ch, time_embed_dim, dropout),
                                               AttentionBlock(ch, num_heads=num_heads),
                                               ResidualBlock(ch, ch, time_embed_dim, dropout))
        self.up_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResidualBlock(ch + chans.pop(), model_channels * mult, time_embed_dim, dropout)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.up_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), Conv1d(model_channels, out_channels, 3, padding=1))
        self._lay_out_convolutions()

    def _lay_out_convolutions(self) -> None:
        """Convolution weights channels-last ([out, k, in] in memory) on the CPU, contiguous elsewhere.

        With channels-last activations and weights oneDNN runs its NWC convolutions, markedly faster
        on the CPU than NCW; values, shapes and state_dict keys are unchanged (only strides)."""
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                weight = module.weight
                wanted = _channels_last(weight.data) if weight.is_cpu else weight.data.contiguous()
                if wanted.stride() != weight.stride():
                    weight.data = wanted

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._lay_out_convolutions()  # after .to(device) / .cpu() / .cuda() / dtype casts
        return module

    @property
    def length_multiple(self) -> int:
        """Latent lengths must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(self.channel_mult) - 1)

    def _check(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ConditionalUNet1d: x must be [B, in_channels={self.in_channels}, L]; got {got}")
        b, length = x.shape[0], x.shape[2]
        if length % self.length_multiple:
            raise ValueError(f"ConditionalUNet1d: the length of x (L = {length}) must be divisible by "
                             f"2^(len(channel_mult) - 1) = {self.length_multiple} to be downsampled")
        if not isinstance(t, Tensor) or t.shape != (b,) or t.is_floating_point() or t.is_complex():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"ConditionalUNet1d: t must be an integer tensor of shape [B = {b}]; got {got}")
        if not isinstance(y, Tensor) or y.shape != (b, self.label_num):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"ConditionalUNet1d: y must be [B = {b}, label_num = {self.label_num}]; got {got}")
        if length < 1:
            raise ValueError(f"ConditionalUNet1d: x must have a length L >= 1; got {tuple(x.shape)}")
        weight = self.out[-1].weight
        if not torch.is_autocast_enabled(x.device.type):
            for name, value in (("x", x), ("y", y)):
                if value.dtype != weight.dtype:
                    raise ValueError(f"ConditionalUNet1d: {name} is {value.dtype} but the model's parameters are "
                                     f"{weight.dtype} (cast one to the other, or run under torch.autocast)")
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling() and x.numel():
            nan_x, nan_y = torch.stack([torch.isnan(x).any(), torch.isnan(y).any()]).tolist()  # one host sync
            if nan_x or nan_y:
                raise ValueError(f"ConditionalUNet1d: {'x' if nan_x else 'y'} contains NaN")

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self._check(x, t, y)
        if x.shape[0] == 0:  # an empty sampler batch (the release fails on it)
            return x.new_empty((0, self.out_channels, x.shape[2]))
        if x.is_cpu and t.numel() > 1 and not torch.compiler.is_compiling() and bool((t == t[:1]).all()):
            # A sampler step: one timestep for the whole batch, so the time MLP and every block's FiLM
            # projection run on one row, broadcast over the batch (a [B, 2 * model_channels] x
            # [2 * model_channels, 2C] GEMM per residual block saved; the rows were equal anyway).
            t = t[:1]
        t_emb = self.time_embed(sinusoidal_timestep_embedding(t, self.model_channels).to(x.dtype))
        t_silu = F.silu(t_emb)
        tokens = self.to_time_tokens(self.label_embedding(y))
        skips = []
        h = _channels_last(x) if x.is_cpu else x
        for module in self.down_blocks:
            h = module(h, t_silu, tokens)
            skips.append(h)
        h = self.middle_block(h, t_silu, tokens)
        for module in self.up_blocks:
            h = module(_cat_channels(h, skips.pop()), t_silu, tokens)
        return self.out[2](_group_norm(self.out[0], h, silu=True)).contiguous()
