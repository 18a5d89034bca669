"""The eager baselines of two attention modules, restated plainly from their public releases:

- MulT's ``TransformerEncoder`` as IMDer ships it (mdswyz/IMDer,
  ``trains/subNets/transformers_encoder``): :class:`ReferenceTransformerEncoder`,
  :class:`ReferenceTransformerEncoderLayer`, :class:`ReferenceMultiheadAttention`,
  :class:`ReferenceSinusoidalPositionalEmbedding`;
- FedDISC's conditional cross-attention (wdqdp/FedDISC ``conditional_ddim.py``):
  :class:`ReferenceCrossAttention` and its :class:`ReferenceStableLayerNorm`.

Each follows the release op for op and at the release's cost, so tests compare imer_fast's fused
modules against it and benchmarks time it as the eager baseline: projections are sliced
``F.linear`` calls made per call (one per distinct q / k / v input), heads are laid out with
``contiguous().view().transpose()``, scores come from ``bmm``, the future mask is rebuilt on every
forward and added as ``-inf``, the softmax runs in float32 (also for float64 inputs, as in the
releases), attention dropout is ``F.dropout`` on the probabilities, and the positions of the
sinusoidal embedding are recomputed every call (``clone`` + ``masked_scatter_``). Parameter and
buffer names are the releases', so a state_dict moves unchanged between these modules, the releases
and ``imer_fast.nn.CrossModalTransformer`` / ``CondCrossAttention``.

Two optional arguments the releases lack, off by default (the default op sequence is unchanged):
``key_padding_mask`` [B, Lk] (True = padding) on the MulT modules and ``context_mask`` [b, m] (True =
valid) on the cross-attention; both are applied as an explicit additive ``-inf`` mask on the scores.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---- MulT (IMDer's transformers_encoder) --------------------------------------------------------


def sinusoidal_table(num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = 0) -> Tensor:
    """tensor2tensor's sinusoidal table in float32: row p = [sin(p * f_0..f_{h-1}), cos(p * f_0..f_{h-1})]
    with h = embedding_dim // 2 and f_i = 10000 ** (-i / (h - 1)); a zero column is appended for an odd
    embedding_dim and the ``padding_idx`` row is all zeros."""
    half = embedding_dim // 2
    if half == 1:
        raise ValueError(f"sinusoidal positions are undefined for embed_dim = {embedding_dim}: the frequency step "
                         f"divides by embed_dim // 2 - 1 = 0 (the release fails with ZeroDivisionError)")
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = torch.arange(num_embeddings, dtype=torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx] = 0
    return table


def release_positions(tokens: Tensor, padding_idx: int = 0) -> Tensor:
    """MulT's ``make_positions`` (right padding): [B, L] float tokens -> int64 positions, ``padding_idx + 1 + t``
    for step t unless the token equals ``padding_idx`` exactly (then ``padding_idx``)."""
    seq_len = tokens.size(1)
    steps = torch.arange(padding_idx + 1, padding_idx + 1 + seq_len, dtype=tokens.dtype, device=tokens.device)
    keep = tokens.ne(padding_idx)
    positions = steps[:seq_len].expand_as(tokens)
    return tokens.clone().masked_scatter_(keep, positions[keep]).long()


class ReferenceSinusoidalPositionalEmbedding(nn.Module):
    """Sinusoidal position embeddings of a [B, L] token tensor (MulT's ``SinusoidalPositionalEmbedding``)."""

    def __init__(self, embedding_dim: int, padding_idx: int = 0, left_pad: int = 0, init_size: int = 128):
        super().__init__()
        if left_pad:
            raise NotImplementedError("ReferenceSinusoidalPositionalEmbedding: only right padding (left_pad=0), as "
                                      "MulT uses")
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.left_pad = left_pad
        self.weights: Dict[torch.device, Tensor] = {}  # per-device table, grown on demand (not in state_dict)
        self.register_buffer("_float_tensor", torch.zeros(1))  # its dtype is the table's dtype

    def forward(self, tokens: Tensor) -> Tensor:
        bsz, seq_len = tokens.size()
        needed = self.padding_idx + 1 + seq_len
        device = tokens.device
        if device not in self.weights or needed > self.weights[device].size(0):
            self.weights[device] = sinusoidal_table(needed, self.embedding_dim, self.padding_idx)
        self.weights[device] = self.weights[device].type_as(self._float_tensor).to(device)
        positions = release_positions(tokens, self.padding_idx)
        return self.weights[device].index_select(0, positions.contiguous().view(-1)).view(bsz, seq_len, -1).detach()


def release_future_mask(tensor: Tensor, tensor2: Optional[Tensor] = None) -> Tensor:
    """MulT's ``buffered_future_mask``: float32 [Lq, Lk] with -inf strictly above diagonal 1 + |Lk - Lq|,
    built on the CPU and moved to the input's device, on every call."""
    dim1 = dim2 = tensor.size(0)
    if tensor2 is not None:
        dim2 = tensor2.size(0)
    mask = torch.triu(torch.ones(dim1, dim2).fill_(float("-inf")), 1 + abs(dim2 - dim1))
    if tensor.device.type != "cpu":
        mask = mask.to(tensor.device)
    return mask[:dim1, :dim2]


def _xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)  # default init first: same RNG draws as the release
    nn.init.xavier_uniform_(layer.weight)
    nn.init.constant_(layer.bias, 0.0)
    return layer


class ReferenceMultiheadAttention(nn.Module):
    """MulT's ``MultiheadAttention`` (packed ``in_proj_weight`` [3E, E], ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.scaling = self.head_dim ** -0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _in_proj(self, x: Tensor, start: int = 0, end: Optional[int] = None) -> Tensor:
        weight = self.in_proj_weight[start:end, :]
        bias = self.in_proj_bias[start:end] if self.in_proj_bias is not None else None
        return F.linear(x, weight, bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None):
        """query [Lq, B, E], key/value [Lk, B, E] -> (output [Lq, B, E], head-averaged weights [B, Lq, Lk])."""
        qkv_same = query.data_ptr() == key.data_ptr() == value.data_ptr()
        kv_same = key.data_ptr() == value.data_ptr()
        tgt_len, bsz, embed_dim = query.size()
        assert embed_dim == self.embed_dim
        assert key.size() == value.size()
        e = self.embed_dim
        if qkv_same:
            q, k, v = self._in_proj(query).chunk(3, dim=-1)
        elif kv_same:
            q = self._in_proj(query, end=e)
            k, v = self._in_proj(key, start=e).chunk(2, dim=-1)
        else:
            q = self._in_proj(query, end=e)
            k = self._in_proj(key, start=e, end=2 * e)
            v = self._in_proj(value, start=2 * e)
        q = q * self.scaling

        q = q.contiguous().view(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        src_len = k.size(1)

        attn_weights = torch.bmm(q, k.transpose(1, 2))
        if attn_mask is not None:
            attn_weights += attn_mask.unsqueeze(0)
        if key_padding_mask is not None:  # extension: explicit additive -inf on padded keys
            additive = torch.zeros(bsz, src_len, dtype=attn_weights.dtype, device=attn_weights.device)
            additive = additive.masked_fill(key_padding_mask, float("-inf"))
            attn_weights = (attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + additive[:, None, None, :])
            attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_weights = F.softmax(attn_weights.float(), dim=-1).type_as(attn_weights)
        attn_weights = F.dropout(attn_weights, p=self.attn_dropout, training=self.training)

        attn = torch.bmm(attn_weights, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        attn = self.out_proj(attn)

        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        attn_weights = attn_weights.sum(dim=1) / self.num_heads
        return attn, attn_weights


class ReferenceTransformerEncoderLayer(nn.Module):
    """One pre-norm MulT encoder layer: attention block and a 4x ReLU feed-forward block, each
    ``LayerNorm -> sublayer -> dropout -> + residual``; in cross mode key and value are normalised
    with the same ``layer_norms[0]`` as the query."""

    def __init__(self, embed_dim: int, num_heads: int = 4, attn_dropout: float = 0.1, relu_dropout: float = 0.1,
                 res_dropout: float = 0.1, attn_mask: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.self_attn = ReferenceMultiheadAttention(embed_dim, num_heads, attn_dropout=attn_dropout)
        self.attn_mask = attn_mask
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout
        self.normalize_before = True
        self.fc1 = _xavier_linear(embed_dim, 4 * embed_dim)
        self.fc2 = _xavier_linear(4 * embed_dim, embed_dim)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(2)])

    def forward(self, x: Tensor, x_k: Optional[Tensor] = None, x_v: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        residual = x
        x = self.layer_norms[0](x)
        mask = release_future_mask(x, x_k) if self.attn_mask else None
        if x_k is None and x_v is None:
            x, _ = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask)
        else:
            x_k = self.layer_norms[0](x_k)
            x_v = self.layer_norms[0](x_v)
            x, _ = self.self_attn(x, x_k, x_v, attn_mask=mask, key_padding_mask=key_padding_mask)
        x = F.dropout(x, p=self.res_dropout, training=self.training)
        x = residual + x

        residual = x
        x = self.layer_norms[1](x)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=self.relu_dropout, training=self.training)
        x = self.fc2(x)
        x = F.dropout(x, p=self.res_dropout, training=self.training)
        return residual + x


class ReferenceTransformerEncoder(nn.Module):
    """MulT's ``TransformerEncoder``: scale by sqrt(embed_dim), add sinusoidal positions (position of
    step t is t + 1 unless ``x[t, b, 0] == 0``), embedding dropout, ``layers`` pre-norm layers (cross-
    modal when both ``x_in_k`` and ``x_in_v`` are given) and a final LayerNorm. Inputs are (L, B, E)."""

    def __init__(self, embed_dim: int, num_heads: int, layers: int, attn_dropout: float = 0.0,
                 relu_dropout: float = 0.0, res_dropout: float = 0.0, embed_dropout: float = 0.0,
                 attn_mask: bool = False, position_embedding: bool = True):
        super().__init__()
        self.dropout = embed_dropout
        self.attn_dropout = attn_dropout
        self.embed_dim = embed_dim
        self.embed_scale = math.sqrt(embed_dim)
        # RoHyDR's copy of the encoder defaults to no positions
        self.embed_positions = ReferenceSinusoidalPositionalEmbedding(embed_dim) if position_embedding else None
        self.attn_mask = attn_mask
        self.layers = nn.ModuleList([
            ReferenceTransformerEncoderLayer(embed_dim, num_heads=num_heads, attn_dropout=attn_dropout,
                                             relu_dropout=relu_dropout, res_dropout=res_dropout, attn_mask=attn_mask)
            for _ in range(layers)
        ])
        self.register_buffer("version", torch.tensor([2.0]))
        self.normalize = True
        self.layer_norm = nn.LayerNorm(embed_dim)

    def _embed(self, x_in: Tensor) -> Tensor:
        x = self.embed_scale * x_in
        if self.embed_positions is not None:
            x += self.embed_positions(x_in.transpose(0, 1)[:, :, 0]).transpose(0, 1)
        return x

    def forward(self, x_in: Tensor, x_in_k: Optional[Tensor] = None, x_in_v: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = F.dropout(self._embed(x_in), p=self.dropout, training=self.training)
        cross = x_in_k is not None and x_in_v is not None
        if cross:
            x_k, x_v = self._embed(x_in_k), self._embed(x_in_v)
            x_k = F.dropout(x_k, p=self.dropout, training=self.training)
            x_v = F.dropout(x_v, p=self.dropout, training=self.training)
        intermediates = [x]
        for layer in self.layers:
            if cross:
                x = layer(x, x_k, x_v, key_padding_mask=key_padding_mask)
            else:
                x = layer(x, key_padding_mask=key_padding_mask)
            intermediates.append(x)
        return self.layer_norm(x)


# ---- FedDISC conditional cross-attention -------------------------------------------------------


def release_stable_eps(dtype: torch.dtype) -> float:
    """FedDISC's LayerNorm epsilon: 1e-5 for float32, 1e-3 for every other dtype (float64 included)."""
    return 1e-5 if dtype == torch.float32 else 1e-3


class ReferenceStableLayerNorm(nn.Module):
    """FedDISC's (Imagen's) ``LayerNorm(feats, stable=True, dim=-1)``: divide by the detached maximum
    along ``dim``, then a biased-variance LayerNorm with gain ``g`` (no bias)."""

    def __init__(self, feats: int, stable: bool = True, dim: int = -1):
        super().__init__()
        self.stable = stable
        self.dim = dim
        self.g = nn.Parameter(torch.ones(feats, *((1,) * (-dim - 1))))

    def forward(self, x: Tensor) -> Tensor:
        dtype, dim = x.dtype, self.dim
        if self.stable:
            x = x / x.amax(dim=dim, keepdim=True).detach()
        eps = release_stable_eps(x.dtype)
        var = torch.var(x, dim=dim, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=dim, keepdim=True)
        return (x - mean) * (var + eps).rsqrt().type(dtype) * self.g.type(dtype)


class ReferenceCrossAttention(nn.Module):
    """FedDISC's ``CrossAttention``: stable-LayerNormed queries attend over the (optionally normed)
    context plus one learned null key/value shared by every head (prepended), softmax in float32,
    output ``Linear(inner, dim, bias=False)`` then a stable LayerNorm. With ``cosine_sim_attn`` the
    release sets the scale to 1 and multiplies the scores by 16 without l2-normalising q and k."""

    def __init__(self, dim: int, *, context_dim: Optional[int] = None, dim_head: int = 4, heads: int = 8,
                 norm_context: bool = False, cosine_sim_attn: bool = False):
        super().__init__()
        self.scale = dim_head ** -0.5 if not cosine_sim_attn else 1.0
        self.cosine_sim_attn = cosine_sim_attn
        self.cosine_sim_scale = 16 if cosine_sim_attn else 1
        self.heads = heads
        inner_dim = dim_head * heads
        context_dim = dim if context_dim is None else context_dim
        self.norm = ReferenceStableLayerNorm(dim)
        self.norm_context = ReferenceStableLayerNorm(context_dim) if norm_context else nn.Identity()
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), ReferenceStableLayerNorm(dim))

    def forward(self, x: Tensor, context: Tensor, context_mask: Optional[Tensor] = None) -> Tensor:
        b, n = x.shape[:2]
        h = self.heads
        x = self.norm(x)
        context = self.norm_context(context)
        q, k, v = (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        # 'b n (h d) -> b h n d'
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        # 'd -> b h 1 d' for the null key and value
        nk, nv = (t.reshape(1, 1, 1, -1).expand(b, h, 1, t.shape[-1]) for t in self.null_kv.unbind(dim=-2))
        k = torch.cat((nk, k), dim=-2)
        v = torch.cat((nv, v), dim=-2)
        q = q * self.scale
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.cosine_sim_scale
        if context_mask is not None:  # extension: explicit additive -inf on masked context tokens
            valid = F.pad(context_mask, (1, 0), value=True)
            additive = torch.zeros(valid.shape, dtype=sim.dtype, device=sim.device).masked_fill(~valid, float("-inf"))
            sim = sim + additive[:, None, None, :]
        attn = sim.softmax(dim=-1, dtype=torch.float32)
        attn = attn.to(sim.dtype)
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)
