"""FedDISC's conditional cross-attention and its stable LayerNorm on imer_fast's fused operators.

:class:`CondCrossAttention` is a drop-in for ``CrossAttention`` of wdqdp/FedDISC
(``conditional_ddim.py``; the Imagen-style block its diffusion UNet conditions on): same constructor
``(dim, *, context_dim=None, dim_head=4, heads=8, norm_context=False, cosine_sim_attn=False)``, same
parameters (``norm.g``, ``norm_context.g`` when ``norm_context``, ``null_kv`` [2, dim_head], ``to_q``,
``to_kv``, ``to_out.0`` (Linear, no bias), ``to_out.1.g``), created in the release's order (the same
seed gives the same initial values), and the same math, quirks included:

- queries are stable-LayerNormed (each row divided by its detached maximum first; a row whose
  maximum is negative flips sign, see :func:`imer_fast.ops.layer_norm.stable_layer_norm`); the
  epsilon is the release's: 1e-5 for float32 inputs, 1e-3 for every other dtype (float64 included);
- one learned null key and one null value (``null_kv[0]``, ``null_kv[1]``), shared by every head and
  every sequence, are prepended to the context's keys and values, so a query always has a key;
- scores are ``q . k * dim_head ** -0.5``; with ``cosine_sim_attn=True`` the release sets that scale to
  1 and multiplies the scores by 16 *without* l2-normalising q and k, so the effective scale is 16;
- the output is ``to_out`` = Linear then a stable LayerNorm (gain only).

The release's softmax runs in float32 even for float64 inputs; here it runs in the inputs' precision
(fp32 accumulation for half types): equal within float32 rounding, and exact enough for gradcheck.

Extension: ``forward(x, context, context_mask=None)`` with ``context_mask`` [b, m] bool, True where a
context token may be attended (False for padding or a missing modality); the null token is always
attended, so no row is left empty.

Fast path: one ``imer_fast.ops.attention`` call on permuted views of the q and packed k/v projections,
the null token handed to the op as ``null_kv[i].expand(heads, 1, dim_head)`` (autograd sums its
gradient over heads), the output read back as a free view of [b, n, heads * dim_head], and both
LayerNorms on the fused ``stable_layer_norm`` operator.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._runtime import under_autocast
from ._checks import require_ints
from ..ops.attention import attention
from ..ops.layer_norm import stable_layer_norm


def release_eps(dtype: torch.dtype) -> float:
    """The FedDISC LayerNorm's epsilon rule: 1e-5 for float32, 1e-3 otherwise."""
    return 1e-5 if dtype == torch.float32 else 1e-3


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


class StableLayerNorm(nn.Module):
    """Drop-in for FedDISC's ``LayerNorm(feats, stable=True, dim=-1)``: gain ``g`` (shape ``[feats]``
    for ``dim=-1``, ``[feats, 1, ..]`` for ``dim=-2, ..``, as the release), no bias, the release's
    epsilon rule, normalising along ``dim`` (a negative dim; other dims are moved last and back)."""

    def __init__(self, feats: int, stable: bool = True, dim: int = -1):
        super().__init__()
        if not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"StableLayerNorm: dim must be a negative int (counted from the end, as the release's "
                             f"gain shape assumes); got {dim!r}")
        self.stable = stable
        self.dim = dim
        self.g = nn.Parameter(torch.ones(feats, *((1,) * (-dim - 1))))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < -self.dim:
            raise ValueError(f"StableLayerNorm: x must have at least {-self.dim} dimensions (dim={self.dim}); got "
                             f"{_describe(x)}")
        feats = self.g.shape[0]
        if x.shape[self.dim] != feats:
            raise ValueError(f"StableLayerNorm: x has {x.shape[self.dim]} features along dim {self.dim} but the "
                             f"module was built with feats={feats}; got {_describe(x)}")
        gain = self.g.reshape(feats).to(x.dtype)
        eps = release_eps(x.dtype)
        if self.dim == -1:
            return stable_layer_norm(x, gain, None, eps, self.stable)
        moved = x.movedim(self.dim, -1)
        return stable_layer_norm(moved, gain, None, eps, self.stable).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"{self.g.shape[0]}, stable={self.stable}, dim={self.dim}"


class CondCrossAttention(nn.Module):
    """Drop-in for FedDISC's ``CrossAttention`` (module doc): ``forward(x [b, n, dim], context [b, m,
    context_dim], context_mask=None)`` -> [b, n, dim]."""

    def __init__(self, dim: int, *, context_dim: Optional[int] = None, dim_head: int = 4, heads: int = 8,
                 norm_context: bool = False, cosine_sim_attn: bool = False):
        super().__init__()
        require_ints("CondCrossAttention", 1, dim=dim, dim_head=dim_head, heads=heads)
        if context_dim is not None:
            require_ints("CondCrossAttention", 1, context_dim=context_dim)
        self.scale = dim_head ** -0.5 if not cosine_sim_attn else 1.0
        self.cosine_sim_attn = cosine_sim_attn
        self.cosine_sim_scale = 16 if cosine_sim_attn else 1
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = dim_head * heads
        context_dim = dim if context_dim is None else context_dim
        self.dim, self.context_dim = dim, context_dim
        self.norm = StableLayerNorm(dim)
        self.norm_context = StableLayerNorm(context_dim) if norm_context else nn.Identity()
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), StableLayerNorm(dim))

    def _check(self, x: Tensor, context: Tensor, context_mask: Optional[Tensor]) -> None:
        who = "CondCrossAttention"
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point() or x.shape[2] != self.dim:
            raise ValueError(f"{who}: x must be a floating tensor [batch, seq_len, dim={self.dim}]; got {_describe(x)}")
        if (not isinstance(context, Tensor) or context.dim() != 3 or not context.is_floating_point()
                or context.shape[2] != self.context_dim):
            raise ValueError(f"{who}: context must be a floating tensor [batch, context_len, context_dim="
                             f"{self.context_dim}]; got {_describe(context)}")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"{who}: context has batch size {context.shape[0]} (dim 0) but x has {x.shape[0]}")
        if context.dtype != x.dtype or context.device != x.device:
            raise TypeError(f"{who}: context is {context.dtype} on {context.device} but x is {x.dtype} on {x.device}")
        if context_mask is not None:
            expected = (context.shape[0], context.shape[1])
            if (not isinstance(context_mask, Tensor) or context_mask.dtype != torch.bool
                    or tuple(context_mask.shape) != expected):
                raise ValueError(f"{who}: context_mask must be a bool tensor [batch, context_len] = {list(expected)} "
                                 f"(True = may be attended); got {_describe(context_mask)}")
            if context_mask.device != x.device:
                raise ValueError(f"{who}: context_mask is on {context_mask.device} but x is on {x.device}")

    def forward(self, x: Tensor, context: Tensor, context_mask: Optional[Tensor] = None) -> Tensor:
        x, context = under_autocast(x, context)  # one dtype for the checks (float32 under autocast)
        self._check(x, context, context_mask)
        b, n, m = x.shape[0], x.shape[1], context.shape[1]
        h, d = self.heads, self.dim_head
        q = F.linear(self.norm(x), self.to_q.weight).view(b, n, h, d).permute(0, 2, 1, 3)
        kv = F.linear(self.norm_context(context), self.to_kv.weight).view(b, m, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        null_k, null_v = self.null_kv.to(x.dtype).view(2, 1, 1, d).expand(2, h, 1, d).unbind(0)
        out = attention(q, k, v, key_mask=context_mask, null_k=null_k, null_v=null_v,
                        scale=self.scale * self.cosine_sim_scale)
        out = out.permute(0, 2, 1, 3).reshape(b, n, h * d)  # a view: out is laid out like q, [b, n, h, d]
        return self.to_out[1](F.linear(out, self.to_out[0].weight))
