"""MulT's cross-modal transformer encoder on the fused ``imer_fast.ops.attention`` operator.

:class:`CrossModalTransformer` is a drop-in for the ``TransformerEncoder`` of MulT as IMDer ships it
(mdswyz/IMDer ``trains/subNets/transformers_encoder``): same constructor, same ``forward(x_in,
x_in_k=None, x_in_v=None)`` on (seq_len, batch, embed_dim) tensors, same parameter and buffer names
(a release state_dict loads with ``strict=True`` and back), same initial distributions (and, for the
same seed, the same initial values: parameters are created and drawn in the release's order), and
the same outputs within floating-point rounding, quirks included:

- the input is scaled by ``sqrt(embed_dim)`` and a sinusoidal position embedding is added (the
  tensor2tensor layout: sines then cosines, a zero column for an odd ``embed_dim``); step ``t`` gets
  position ``t + 1`` unless ``x_in[t, b, 0]`` is exactly zero (either sign), in which case it gets the
  all-zero padding row. The zero test reads the original, unscaled ``x_in``; keys and values get
  their own positions from ``x_in_k`` / ``x_in_v``;
- each layer is pre-norm, and in cross mode keys and values are normalised with the query's
  ``layer_norms[0]``;
- ``attn_mask=True`` is MulT's future mask ``triu(-inf, 1 + |Lk - Lq|)`` (the op's ``mask="future"``);
- q is scaled by ``head_dim ** -0.5`` after its projection (bias included), which the op's ``scale``
  does on the scores;
- cross mode needs both ``x_in_k`` and ``x_in_v``; with only one of them the encoder runs self-
  attention, as the release does.

Differences from the release, all within rounding: the softmax is computed in the input's precision
with fp32 accumulation (the release runs it in float32 even for float64 inputs, and in fp16 inputs'
case rounds the probabilities back to fp16), and the fast path never materialises the attention
probabilities (the release's head-averaged weights, which the encoder discards anyway, are not
available).

Dropout (training) draws from the same distributions as the release: embedding, residual and ReLU
dropout are ``F.dropout``; attention dropout is the op's ``dropout_p`` (each probability is kept with
probability ``1 - p`` and scaled by ``1 / (1 - p)``, from a counter-based hash seeded from torch's
default generator, so ``torch.manual_seed`` makes runs repeatable; the release's exact masks cannot
be reproduced). As in the release, keys and values get independent embedding-dropout masks even
when ``x_in_k is x_in_v``.

Extensions the release lacks (keyword-only): ``key_padding_mask`` [B, Lk] bool, True at padded keys
(as ``nn.MultiheadAttention``), or ``lengths`` [B] integer key lengths (key ``j`` of sequence ``b`` is
valid when ``j < lengths[b]``; in self-attention keys are the queries, so they are also the query
lengths). Padded keys are never attended. Padded query positions are computed like any other (they
attend to the valid keys, so their outputs are finite but meaningless, and they receive whatever
gradient the loss gives them); mask them out downstream. A query row left with no valid key (all
keys padded, or padding combined with the future mask) gets a zero attention output (and zero
gradients) where an additive ``-inf`` mask would give NaN.

Fast path: the sinusoidal table is a cached non-persistent buffer (not in the state_dict; it
follows the module's device and dtype and is rebuilt for a longer input), and positions are one
gather fused with the scaling (``torch.add(pos, x, alpha=sqrt(E))``). Each layer is one call of
:func:`imer_fast.ops.mult_layer` on the [L * B, E] rows: on a CPU that is one autograd node with a
hand-written C++ backward (LayerNorms, packed projections, the fused attention, residuals); on a GPU
it composes the Triton attention with cuBLAS GEMMs. Residual and ReLU dropout factors are drawn here
(``_keep``) and handed to the op, and are skipped when p == 0 or not training.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._runtime import under_autocast
from ..ops.attention import MASK_KINDS, attention
from ..ops.mult_layer import MultLayerWeights, mult_layer

_NAME = "CrossModalTransformer"


# ---- sinusoidal positions ------------------------------------------------------------------------


def _sinusoid_rows(num_rows: int, embed_dim: int) -> Tensor:
    """Float32 tensor2tensor table [num_rows, embed_dim]: sines then cosines of p * 10000 ** (-i / (h - 1)),
    h = embed_dim // 2, a zero column for an odd embed_dim, row 0 (the padding position) all zeros."""
    half = embed_dim // 2
    if half == 1:
        raise ValueError(f"{_NAME}: sinusoidal positions are undefined for embed_dim = {embed_dim} (their frequency "
                         f"step divides by embed_dim // 2 - 1 = 0; the release fails the same way)")
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = torch.arange(num_rows, dtype=torch.float32)[:, None] * freqs[None, :]
    rows = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embed_dim % 2:
        rows = torch.cat([rows, torch.zeros(num_rows, 1)], dim=1)
    rows[0] = 0
    return rows


class SinusoidalPositionalEmbedding(nn.Module):
    """MulT's sinusoidal positions (padding index 0, right padding) with the release's ``_float_tensor``
    buffer. The table is a non-persistent buffer ``_table`` (not in the state_dict; it follows the
    module's device and dtype as the release's ``type_as(_float_tensor)`` table does, and is rebuilt
    when a longer input arrives).

    ``forward(tokens [B, L])`` returns the release's [B, L, E]; the encoder uses :meth:`embed`."""

    def __init__(self, embedding_dim: int, padding_idx: int = 0, left_pad: int = 0, init_size: int = 128):
        super().__init__()
        if padding_idx != 0 or left_pad:
            raise NotImplementedError(f"{_NAME}: only padding_idx=0 and left_pad=0 (MulT's settings) are supported")
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.left_pad = left_pad
        self.register_buffer("_float_tensor", torch.zeros(1))
        defined = embedding_dim // 2 != 1  # embed_dim 2 and 3 fail on first use, as in the release
        rows = _sinusoid_rows(init_size + 1, embedding_dim) if defined else torch.zeros(0, embedding_dim)
        self.register_buffer("_table", rows, persistent=False)

    def table(self, length: int, dtype: torch.dtype) -> Tensor:
        """At least ``length + 1`` rows (float32 values rounded through the ``_float_tensor`` dtype, as the
        release's table), in ``dtype``."""
        table = self._table
        if table.shape[0] < length + 1:
            rows = 1 << (length + 1).bit_length()
            table = _sinusoid_rows(rows, self.embedding_dim).to(self._float_tensor.dtype).to(self._float_tensor.device)
            self._table = table
        return table if table.dtype == dtype else table.to(dtype)

    def embed(self, x_in: Tensor, scale: float) -> Tensor:
        """``scale * x_in + positions(x_in[:, :, 0])`` for x_in [L, B, E]; a fresh contiguous tensor."""
        length = x_in.shape[0]
        table = self.table(length, x_in.dtype)
        steps = torch.arange(1, length + 1, device=x_in.device)[:, None]  # [L, 1]
        index = x_in[:, :, 0].ne(0) * steps  # [L, B]: t + 1, or 0 (the zero row) where x == 0 exactly
        return torch.add(F.embedding(index, table), x_in, alpha=scale).contiguous()

    def forward(self, tokens: Tensor) -> Tensor:
        seq_len = tokens.shape[1]
        index = tokens.ne(0) * torch.arange(1, seq_len + 1, device=tokens.device)
        return F.embedding(index, self.table(seq_len, self._float_tensor.dtype)).detach()

    def max_positions(self) -> int:
        return int(1e5)


# ---- input checks ------------------------------------------------------------------------------


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _autocast_sequences(x, k, v) -> tuple:
    """The inputs in one dtype under autocast (float32, as the fused layers compute there), so the
    dtype checks below compare like with like; keys that are the values stay one tensor."""
    if not isinstance(x, Tensor):
        return x, k, v
    shared = v is k
    x, k, v = under_autocast(x, k, v)
    return x, k, (k if shared else v)


def check_dropouts(who: str, **probabilities: float) -> None:
    """Dropout probabilities in [0, 1] (F.dropout's range); attention dropout in [0, 1): the fused
    attention rescales kept weights by 1 / (1 - p)."""
    for name, p in probabilities.items():
        if isinstance(p, Tensor) and p.numel() == 1 and p.is_floating_point():
            p = float(p)
        top_open = name == "attn_dropout"
        real = not isinstance(p, bool) and isinstance(p, numbers.Real)
        if not real or not (0.0 <= p < 1.0 if top_open else 0.0 <= p <= 1.0):
            raise ValueError(f"{who}: {name} must lie in [0, 1{')' if top_open else ']'}; got {p!r}")


def _check_sequence(who: str, name: str, t, embed_dim: int, like: Optional[Tensor] = None,
                    like_name: str = "") -> None:
    if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
        raise ValueError(f"{who}: {name} must be a floating tensor (seq_len, batch, embed_dim={embed_dim}); got "
                         f"{_describe(t)}")
    if t.shape[2] != embed_dim:
        raise ValueError(f"{who}: {name} has embed dim {t.shape[2]} (its last dimension) but the module was built "
                         f"with embed_dim={embed_dim}; inputs are (seq_len, batch, embed_dim)")
    if like is not None:
        if t.shape[1] != like.shape[1]:
            raise ValueError(f"{who}: {name} has batch size {t.shape[1]} (dim 1) but {like_name} has "
                             f"{like.shape[1]}; inputs are (seq_len, batch, embed_dim) - transpose a "
                             f"(batch, seq_len, embed_dim) tensor first")
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{who}: {name} is {t.dtype} on {t.device} but {like_name} is {like.dtype} on "
                            f"{like.device}")


def key_mask_from(who: str, key_padding_mask: Optional[Tensor], lengths: Optional[Tensor], batch: int,
                  key_len: int, device: torch.device) -> Optional[Tensor]:
    """The op's ``key_mask`` [B, Lk] (True = may be attended) from a padding mask or key lengths."""
    if key_padding_mask is not None and lengths is not None:
        raise ValueError(f"{who}: give key_padding_mask or lengths, not both")
    if key_padding_mask is not None:
        if (not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool
                or tuple(key_padding_mask.shape) != (batch, key_len)):
            raise ValueError(f"{who}: key_padding_mask must be a bool tensor [batch={batch}, key_len={key_len}] "
                             f"(True = padding); got {_describe(key_padding_mask)}")
        if key_padding_mask.device != device:
            raise ValueError(f"{who}: key_padding_mask is on {key_padding_mask.device} but the inputs are on {device}")
        return ~key_padding_mask
    if lengths is not None:
        if (not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch
                or lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.is_complex()):
            raise ValueError(f"{who}: lengths must be an integer tensor [batch={batch}] of key lengths; got "
                             f"{_describe(lengths)}")
        return torch.arange(key_len, device=device)[None, :] < lengths.to(device)[:, None]
    return None


# ---- modules -----------------------------------------------------------------------------------


def _xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)  # default init first: the release's RNG draws
    nn.init.xavier_uniform_(layer.weight)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def _heads(t: Tensor, length: int, batch: int, heads: int) -> Tensor:
    """[L * B, E] (or [L, B, E]) -> the op's [B, H, L, Dh] as a permuted view."""
    return t.view(length, batch, heads, -1).permute(1, 2, 0, 3)


class PackedMultiheadAttention(nn.Module):
    """MulT's multi-head attention parameters (``in_proj_weight`` [3E, E], ``in_proj_bias`` [3E],
    ``out_proj``) on the fused op. ``forward(query [Lq, B, E], key=None, value=None, *, key_mask=None,
    future_mask=False)`` returns the output [Lq, B, E] (no attention weights); key and value default
    to the query (self-attention, one packed projection)."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"{_NAME}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.in_proj_bias, 0.0)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def attend(self, hq: Tensor, hk: Optional[Tensor], hv: Optional[Tensor], lq: int, lk: int, batch: int,
               key_mask: Optional[Tensor], mask: str) -> Tensor:
        """Attention before ``out_proj`` on [L * B, E] rows: self-attention when ``hk`` is None, one packed
        k/v projection when ``hk is hv``. Returns [Lq * B, E] (a free view of the op's output)."""
        e, h = self.embed_dim, self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        # Packed projections are split with unbind along the packing dim, so that its backward stacks
        # the op's gradients (laid out [L, B, H, Dh] like q, k, v) straight into the projection's
        # contiguous [L, B, n, H, Dh] layout: one copy, no reshape copies before the weight gradients.
        # The weight is split (not sliced) so that its gradient is one concatenation of the parts.
        if hk is None:
            q, k, v = (t.permute(1, 2, 0, 3) for t in F.linear(hq, w, b).view(lq, batch, 3, h, -1).unbind(2))
        elif hk is hv:
            (w_q, w_kv), (b_q, b_kv) = w.split((e, 2 * e)), b.split((e, 2 * e))
            q = _heads(F.linear(hq, w_q, b_q), lq, batch, h)
            k, v = (t.permute(1, 2, 0, 3) for t in F.linear(hk, w_kv, b_kv).view(lk, batch, 2, h, -1).unbind(2))
        else:
            (w_q, w_k, w_v), (b_q, b_k, b_v) = w.split(e), b.split(e)
            q = _heads(F.linear(hq, w_q, b_q), lq, batch, h)
            k = _heads(F.linear(hk, w_k, b_k), lk, batch, h)
            v = _heads(F.linear(hv, w_v, b_v), lk, batch, h)
        p = self.attn_dropout if self.training else 0.0
        out = attention(q, k, v, key_mask=key_mask, scale=self.scaling, mask=mask, dropout_p=p)
        return out.permute(2, 0, 1, 3).reshape(lq * batch, e)  # a view: out is laid out like q, [L, B, H, Dh]

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None, *,
                key_mask: Optional[Tensor] = None, future_mask: bool = False) -> Tensor:
        who = f"{_NAME}.self_attn"
        query, key, value = _autocast_sequences(query, key, value)
        _check_sequence(who, "query", query, self.embed_dim)
        if (key is None) != (value is None):
            raise ValueError(f"{who}: give both key and value, or neither (self-attention)")
        lq, batch, e = query.shape
        lk = lq
        if key is not None:
            _check_sequence(who, "key", key, e, query, "query")
            if key.shape != value.shape:
                raise ValueError(f"{who}: key and value must have the same shape; got {tuple(key.shape)} and "
                                 f"{tuple(value.shape)}")
            lk = key.shape[0]
            hk = key.reshape(lk * batch, e)
            hv = hk if value is key else value.reshape(lk * batch, e)
        else:
            hk = hv = None
        out = self.attend(query.reshape(lq * batch, e), hk, hv, lq, lk, batch, key_mask,
                          "future" if future_mask else "none")
        return F.linear(out, self.out_proj.weight, self.out_proj.bias).view(lq, batch, e)


class CrossModalTransformerLayer(nn.Module):
    """One pre-norm MulT encoder layer (the release's ``TransformerEncoderLayer``: ``self_attn``,
    ``fc1``, ``fc2``, ``layer_norms``), fused. ``forward(x [Lq, B, E], x_k=None, x_v=None, *,
    key_padding_mask=None, lengths=None)``; ``x_k`` and ``x_v`` ([Lk, B, E]) come together (cross-modal
    attention, both normalised by ``layer_norms[0]``) or not at all."""

    def __init__(self, embed_dim: int, num_heads: int = 4, attn_dropout: float = 0.1, relu_dropout: float = 0.1,
                 res_dropout: float = 0.1, attn_mask: bool = False):
        super().__init__()
        check_dropouts(f"{_NAME}Layer", attn_dropout=attn_dropout, relu_dropout=relu_dropout, res_dropout=res_dropout)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.self_attn = PackedMultiheadAttention(embed_dim, num_heads, attn_dropout=attn_dropout)
        self.attn_mask = attn_mask
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout
        self.normalize_before = True
        self.fc1 = _xavier_linear(embed_dim, 4 * embed_dim)
        self.fc2 = _xavier_linear(4 * embed_dim, embed_dim)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(2)])

    def weights(self) -> MultLayerWeights:
        attn, (ln0, ln1) = self.self_attn, self.layer_norms
        return MultLayerWeights(ln0.weight, ln0.bias, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                                attn.out_proj.bias, ln1.weight, ln1.bias, self.fc1.weight, self.fc1.bias,
                                self.fc2.weight, self.fc2.bias)

    def _keep(self, like: Tensor, width: int, p: float) -> Optional[Tensor]:
        """F.dropout's factors (0 with probability p, else 1 / (1 - p)) drawn from torch's generator;
        all zeros at p = 1, as F.dropout gives."""
        if not (self.training and p > 0.0):
            return None
        if p >= 1.0:
            return like.new_zeros(like.shape[0], width)
        return like.new_empty(like.shape[0], width).bernoulli_(1.0 - p).div_(1.0 - p)

    def forward_rows(self, x: Tensor, xk: Optional[Tensor], xv: Optional[Tensor], batch: int,
                     key_mask: Optional[Tensor]) -> Tensor:
        """The layer on row-major [L * B, E] tensors; ``xk is xv`` shares one k/v projection."""
        attn = self.self_attn
        return mult_layer(
            x, xk, None if xv is xk else xv, self.weights(), batch=batch, num_heads=self.num_heads,
            ln0_eps=self.layer_norms[0].eps, ln1_eps=self.layer_norms[1].eps, scale=attn.scaling,
            mask_kind=MASK_KINDS["future" if self.attn_mask else "none"], key_mask=key_mask,
            attn_res_keep=self._keep(x, self.embed_dim, self.res_dropout),
            relu_keep=self._keep(x, self.fc1.out_features, self.relu_dropout),
            ffn_res_keep=self._keep(x, self.embed_dim, self.res_dropout),
            dropout_p=attn.attn_dropout if self.training else 0.0)

    def forward(self, x: Tensor, x_k: Optional[Tensor] = None, x_v: Optional[Tensor] = None, *,
                key_padding_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        who = f"{_NAME}Layer"
        e = self.embed_dim
        x, x_k, x_v = _autocast_sequences(x, x_k, x_v)
        _check_sequence(who, "x", x, e)
        if (x_k is None) != (x_v is None):
            raise ValueError(f"{who}: give both x_k and x_v (cross-modal attention) or neither (self-attention); "
                             f"got only {'x_k' if x_v is None else 'x_v'}")
        lq, batch = x.shape[0], x.shape[1]
        lk = lq
        xk = xv = None
        if x_k is not None:
            _check_sequence(who, "x_k", x_k, e, x, "x")
            _check_sequence(who, "x_v", x_v, e, x, "x")
            if x_k.shape != x_v.shape:
                raise ValueError(f"{who}: x_k and x_v must have the same shape; got {tuple(x_k.shape)} and "
                                 f"{tuple(x_v.shape)}")
            lk = x_k.shape[0]
            xk = x_k.reshape(lk * batch, e)
            xv = xk if x_v is x_k else x_v.reshape(lk * batch, e)
        key_mask = key_mask_from(who, key_padding_mask, lengths, batch, lk, x.device)
        if batch == 0:
            return x.new_zeros(lq, 0, e)
        out = self.forward_rows(x.reshape(lq * batch, e).contiguous(), xk, xv, batch, key_mask)
        return out.view(lq, batch, e)


class CrossModalTransformer(nn.Module):
    """Drop-in for MulT's ``TransformerEncoder(embed_dim, num_heads, layers, attn_dropout=0.0,
    relu_dropout=0.0, res_dropout=0.0, embed_dropout=0.0, attn_mask=False)`` (module doc), and with
    ``position_embedding=False`` for RoHyDR's copy, which adds no positions (its default; no
    ``embed_positions`` entry in the state_dict then).

    ``forward(x_in [Lq, B, E], x_in_k=None, x_in_v=None, *, key_padding_mask=None, lengths=None)``
    returns [Lq, B, E]: self-attention layers, or cross-modal ones (queries from ``x_in``, keys from
    ``x_in_k``, values from ``x_in_v``, both [Lk, B, E]) when both are given."""

    def __init__(self, embed_dim: int, num_heads: int, layers: int, attn_dropout: float = 0.0,
                 relu_dropout: float = 0.0, res_dropout: float = 0.0, embed_dropout: float = 0.0,
                 attn_mask: bool = False, position_embedding: bool = True):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"{_NAME}: embed_dim ({embed_dim}) must be positive and divisible by num_heads "
                             f"({num_heads})")
        if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 0:
            raise ValueError(f"{_NAME}: layers must be an int >= 0; got {layers!r}")
        check_dropouts(_NAME, attn_dropout=attn_dropout, relu_dropout=relu_dropout, res_dropout=res_dropout,
                       embed_dropout=embed_dropout)
        self.dropout = embed_dropout
        self.attn_dropout = attn_dropout
        self.embed_dim = embed_dim
        self.embed_scale = math.sqrt(embed_dim)
        self.embed_positions = SinusoidalPositionalEmbedding(embed_dim) if position_embedding else None
        self.attn_mask = attn_mask
        self.layers = nn.ModuleList([
            CrossModalTransformerLayer(embed_dim, num_heads=num_heads, attn_dropout=attn_dropout,
                                       relu_dropout=relu_dropout, res_dropout=res_dropout, attn_mask=attn_mask)
            for _ in range(layers)
        ])
        self.register_buffer("version", torch.tensor([2.0]))
        self.normalize = True
        self.layer_norm = nn.LayerNorm(embed_dim)

    def _embed(self, x_in: Tensor) -> Tensor:
        if self.embed_positions is not None:
            x = self.embed_positions.embed(x_in, self.embed_scale)
        else:
            x = (x_in * self.embed_scale).contiguous()
        if self.training and self.dropout > 0.0:
            x = F.dropout(x, p=self.dropout, training=True)
        return x

    def forward(self, x_in: Tensor, x_in_k: Optional[Tensor] = None, x_in_v: Optional[Tensor] = None, *,
                key_padding_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        e = self.embed_dim
        x_in, x_in_k, x_in_v = _autocast_sequences(x_in, x_in_k, x_in_v)
        _check_sequence(_NAME, "x_in", x_in, e)
        lq, batch = x_in.shape[0], x_in.shape[1]
        cross = x_in_k is not None and x_in_v is not None
        lk = lq
        xk = xv = None
        if cross:
            _check_sequence(_NAME, "x_in_k", x_in_k, e, x_in, "x_in")
            _check_sequence(_NAME, "x_in_v", x_in_v, e, x_in, "x_in")
            if x_in_k.shape != x_in_v.shape:
                raise ValueError(f"{_NAME}: x_in_k and x_in_v must have the same shape; got {tuple(x_in_k.shape)} "
                                 f"and {tuple(x_in_v.shape)}")
            lk = x_in_k.shape[0]
            xk = self._embed(x_in_k).view(lk * batch, e)
            # One k/v projection per layer when keys and values are the same input (and no embedding
            # dropout gives them different masks, as the release does).
            shared = x_in_v is x_in_k and not (self.training and self.dropout > 0.0)
            xv = xk if shared else self._embed(x_in_v).view(lk * batch, e)
        key_mask = key_mask_from(_NAME, key_padding_mask, lengths, batch, lk, x_in.device)
        if batch == 0:  # nothing to attend; the fused layer needs a batch
            return x_in.new_zeros(lq, 0, e)
        x = self._embed(x_in).view(lq * batch, e)
        for layer in self.layers:
            x = layer.forward_rows(x, xk, xv, batch, key_mask)
        ln = self.layer_norm
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps).view(lq, batch, e)
