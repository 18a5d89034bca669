"""A randomly initialised BERT encoder over input vectors (DRKF's Knowledge Fusion module).

DRKF (arXiv 2508.01644) fuses audio and text with a Hugging Face ``BertModel`` built from a config (no
pretrained weights) and fed ``inputs_embeds``: ``[CLS] + audio tokens + [SEP] + text tokens + [SEP]``,
where ``[CLS]`` and ``[SEP]`` are zero vectors. :class:`FusionEncoder` computes the same function
without a vocabulary:

    e   = LayerNorm(x + position_embeddings[0..L) + token_type_embeddings[type])      (eps 1e-12)
    per layer (post-LN):
    a   = softmax(q kᵀ / sqrt(head_dim) over the valid keys) v,  q/k/v = Linear(h) split into heads
    h   = LayerNorm(h + Dropout(Linear(a)))
    h   = LayerNorm(h + Dropout(Linear(GELU(Linear(h)))))                            (exact erf GELU)

with dropout on the embeddings and on the attention probabilities (BERT's 0.1 defaults). The attention
runs through :func:`imer_fast.ops.attention` with a key mask, so padded keys are never attended (the
release passes no attention mask at all and its padding is attended; see ``docs/releases/drkf.md``).

Parameter names follow ``transformers.BertModel`` (``embeddings.position_embeddings``,
``encoder.layer.{i}.attention.self.query``, ``...attention.output.dense``, ``...attention.output.LayerNorm``,
``...intermediate.dense``, ``...output.dense``, ``...output.LayerNorm``), so the fusion entries of a
release checkpoint load with :meth:`FusionEncoder.load_bert_state_dict`; the unused vocabulary
(``embeddings.word_embeddings``), the pooler (DRKF reads the last hidden state at ``[CLS]``) and the
``position_ids`` buffer are skipped. Initialisation is BERT's: linear and embedding weights
N(0, 0.02²), biases zero, LayerNorm weight one and bias zero.

Release size: hidden 1,024, 6 layers, 8 heads, intermediate 4,096, max positions 2,800.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import attention

_NAME = "FusionEncoder"
BERT_EPS = 1e-12
SKIPPED_BERT_KEYS = ("embeddings.word_embeddings.", "embeddings.position_ids", "pooler.")


class BertSelfAttention(nn.Module):
    """``attention.self``: the query, key and value projections."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class BertDenseNorm(nn.Module):
    """``attention.output`` / ``output``: dense projection, dropout, residual add, LayerNorm."""

    def __init__(self, in_features: int, hidden: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=BERT_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden)
        self.output = BertDenseNorm(hidden, hidden, dropout)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class FusionLayer(nn.Module):
    """One post-LN BERT layer on the fused attention op."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.heads, self.attention_dropout = heads, attention_dropout
        self.attention = BertAttention(hidden, dropout)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertDenseNorm(intermediate, hidden, dropout)

    def forward(self, h: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        batch, length, hidden = h.shape
        qkv_proj = self.attention.self
        # One packed projection: the three HF-named linears share the input.
        weight = torch.cat([qkv_proj.query.weight, qkv_proj.key.weight, qkv_proj.value.weight])
        bias = torch.cat([qkv_proj.query.bias, qkv_proj.key.bias, qkv_proj.value.bias])
        qkv = F.linear(h, weight, bias).view(batch, length, 3, self.heads, hidden // self.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, Dh] views, no copies
        p = self.attention_dropout if self.training else 0.0
        context = attention(q, k, v, key_mask=key_mask, dropout_p=p)
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        h = self.attention.output(context, h)
        return self.output(self.intermediate(h), h)


class FusionEmbeddings(nn.Module):
    """BERT embeddings without the vocabulary: input vectors + positions + token types, LayerNorm, dropout."""

    def __init__(self, hidden: int, max_positions: int, type_vocab_size: int, dropout: float):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=BERT_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs_embeds: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        length = inputs_embeds.shape[1]
        x = inputs_embeds + self.position_embeddings.weight[:length]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # BERT's default: every token of type 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class FusionEncoderStack(nn.Module):
    """``encoder.layer.{i}``."""

    def __init__(self, layers: Sequence[FusionLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class FusionEncoder(nn.Module):
    """BERT encoder semantics over input vectors (module doc).

    Args:
        hidden: model width (release 1,024); must divide by ``heads``.
        layers, heads, intermediate: depth, attention heads and FFN width (release 6, 8, 4,096).
        max_positions: longest sequence (release 2,800).
        type_vocab_size: token types (BERT's 2).
        dropout, attention_dropout: hidden and attention-probability dropout (BERT's 0.1).

    ``forward(inputs_embeds [B, L, hidden], key_mask=None, token_type_ids=None)`` returns the last
    hidden state [B, L, hidden]; ``key_mask`` [B, L] bool is True at real tokens (padding False).
    """

    def __init__(self, hidden: int = 1024, layers: int = 6, heads: int = 8, intermediate: int = 4096,
                 max_positions: int = 2800, type_vocab_size: int = 2, dropout: float = 0.1,
                 attention_dropout: float = 0.1):
        super().__init__()
        for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads),
                            ("intermediate", intermediate), ("max_positions", max_positions),
                            ("type_vocab_size", type_vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_NAME}: {name} must be a positive int; got {value!r}")
        if hidden % heads:
            raise ValueError(f"{_NAME}: hidden ({hidden}) must be a multiple of heads ({heads})")
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{_NAME}: {name} must be in [0, 1); got {value!r}")
        self.hidden, self.heads, self.max_positions = hidden, heads, max_positions
        self.embeddings = FusionEmbeddings(hidden, max_positions, type_vocab_size, dropout)
        self.encoder = FusionEncoderStack(
            [FusionLayer(hidden, heads, intermediate, dropout, attention_dropout) for _ in range(layers)])
        self.apply(_bert_init)

    def forward(self, inputs_embeds: Tensor, key_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        if not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != self.hidden or not inputs_embeds.is_floating_point():
            got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"{_NAME}: inputs_embeds must be a floating tensor [batch, length, hidden="
                             f"{self.hidden}]; got {got}")
        batch, length, _ = inputs_embeds.shape
        if length > self.max_positions:
            raise ValueError(f"{_NAME}: the sequence has {length} tokens but max_positions is "
                             f"{self.max_positions} (the release silently truncates; shorten the inputs)")
        if key_mask is not None and (not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool
                                     or tuple(key_mask.shape) != (batch, length)):
            got = f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, Tensor) else type(key_mask).__name__
            raise ValueError(f"{_NAME}: key_mask must be a bool tensor [batch={batch}, length={length}] (True = real "
                             f"token); got {got}")
        if token_type_ids is not None and tuple(token_type_ids.shape) != (batch, length):
            raise ValueError(f"{_NAME}: token_type_ids must be [batch={batch}, length={length}]; got "
                             f"{tuple(token_type_ids.shape)}")
        h = self.embeddings(inputs_embeds, token_type_ids)
        for layer in self.encoder.layer:
            h = layer(h, key_mask)
        return h

    def load_bert_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
        """Load the entries of a ``BertModel`` state_dict found under ``prefix`` (``"bert."`` for the
        release's fusion model); the vocabulary, pooler and ``position_ids`` are skipped, anything
        else missing or unexpected is an error."""
        wanted = {}
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if not name.startswith(SKIPPED_BERT_KEYS):
                wanted[name] = value
        result = self.load_state_dict(wanted, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{_NAME}.load_bert_state_dict: missing {list(result.missing_keys)[:5]}, unexpected "
                             f"{list(result.unexpected_keys)[:5]} (prefix {prefix!r})")


def _bert_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = ["FusionEncoder", "FusionLayer", "FusionEmbeddings"]
