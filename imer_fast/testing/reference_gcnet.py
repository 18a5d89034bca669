"""GCNet's dialogue graph model as its release computes it, re-implemented plainly for parity tests
and benchmarks: a per-edge Python graph builder (a ``set`` of edge tuples, one relation lookup per
edge, relation ids from iterating a set of names), PyG ``RGCNConv``/``GraphConv``, and a per-time-
step matching-attention loop. Slow on purpose: it is the baseline imer_fast is measured against.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def window_edges(length: int, window_past: int, window_future: int) -> List[Tuple[int, int]]:
    """(source, target) pairs of one dialogue: source j reaches targets j - window_past .. j + window_future."""
    edges = set()
    for j in range(length):
        lo = 0 if window_past == -1 else max(0, j - window_past)
        hi = length if window_future == -1 else min(length, j + window_future + 1)
        for i in range(lo, hi):
            edges.add((j, i))
    return list(edges)


def python_graph_builder(
    speakers: Sequence[Sequence[int]], lengths: Sequence[int], window_past: int, window_future: int, graph_type: str,
    relation_ids: Dict[str, int] | None = None,
) -> Tuple[Tensor, Tensor, Dict[str, int]]:
    """Per-edge builder in the style of GCNet's ``batch_graphify``: returns edge_index [2, E]
    (row 0 source), edge_type [E] and the name -> id mapping (from a set, unless given). ``graph_type``
    ``"temporal"`` or ``"speaker"`` (GCNet's two graphs), or ``"dialoguegcn"`` (DialogueGCN's relation
    names, ``f"{s_j}{s_i}{0 if j < i else 1}"``, in the same per-edge style)."""
    if relation_ids is None:
        names = {"temporal": {"past", "now", "future"}, "speaker": {"00", "01", "10", "11"},
                 "dialoguegcn": {f"{a}{b}{d}" for a in "01" for b in "01" for d in "01"}}[graph_type]
        relation_ids = {name: k for k, name in enumerate(names)}
    pairs, types, offset = [], [], 0
    for b, length in enumerate(lengths):
        for j, i in window_edges(length, window_past, window_future):
            pairs.append([j + offset, i + offset])
            if graph_type == "temporal":
                name = "past" if i > j else ("now" if i == j else "future")
            elif graph_type == "dialoguegcn":
                name = f"{int(speakers[b][j])}{int(speakers[b][i])}{0 if j < i else 1}"
            else:
                name = f"{int(speakers[b][i])}{int(speakers[b][j])}"
            types.append(relation_ids[name])
        offset += length
    edge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t().contiguous()
    return edge_index, torch.tensor(types, dtype=torch.long), relation_ids


class ReferenceMatchingAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.transform = nn.Linear(dim, dim, bias=True)

    def step(self, memory: Tensor, query: Tensor, mask: Tensor) -> Tensor:
        """memory [L, B, D], query [B, D], mask [B, L]: masked tanh-softmax pooling for one step."""
        keys = memory.permute(1, 2, 0) * mask.unsqueeze(1)  # [B, D, L]
        scores = torch.tanh(torch.bmm(self.transform(query).unsqueeze(1), keys) * mask.unsqueeze(1))
        alpha = F.softmax(scores, dim=2) * mask.unsqueeze(1)
        alpha = alpha / alpha.sum(dim=2, keepdim=True)
        return torch.bmm(alpha, memory.transpose(0, 1))[:, 0, :]


class ReferenceGraphNetwork(nn.Module):
    def __init__(self, num_features: int, num_relations: int, time_attn: bool, hidden_size: int, dropout: float):
        super().__init__()
        from torch_geometric.nn import GraphConv, RGCNConv

        self.time_attn = time_attn
        self.conv1 = RGCNConv(num_features, hidden_size, num_relations)
        self.conv2 = GraphConv(hidden_size, hidden_size)
        d_h = num_features + hidden_size
        self.grufusion = nn.LSTM(d_h, d_h, num_layers=2, bidirectional=True, dropout=dropout)
        self.matchatt = ReferenceMatchingAttention(2 * d_h)
        self.linear = nn.Linear(2 * d_h, d_h)

    def forward(self, features, edge_index, edge_type, lengths, umask):
        out = self.conv2(self.conv1(features, edge_index, edge_type), edge_index)
        nodes = torch.cat([features, out], dim=-1)
        max_len, starts = max(lengths), [sum(lengths[:b]) for b in range(len(lengths))]
        padded = [torch.cat([nodes[s:s + n], nodes.new_zeros(max_len - n, nodes.shape[1])]) for s, n in zip(starts, lengths)]
        outputs = self.grufusion(torch.stack(padded, 1))[0]
        if self.time_attn:
            outputs = torch.stack([self.matchatt.step(outputs, outputs[t], umask) for t in range(outputs.shape[0])])
        return F.relu(self.linear(outputs))


class ReferenceGraphModel(nn.Module):
    """GCNet ``GraphModel`` semantics with the same parameter names (LSTM base model)."""

    def __init__(self, adim, tdim, vdim, D_e, graph_hidden_size, n_speakers, window_past, window_future, n_classes,
                 dropout=0.5, time_attn=True):
        super().__init__()
        self.window_past, self.window_future, self.n_speakers = window_past, window_future, n_speakers
        dim = adim + tdim + vdim
        self.lstm = nn.LSTM(dim, D_e, num_layers=2, bidirectional=True, dropout=dropout)
        self.gru = nn.GRU(dim, D_e, num_layers=2, bidirectional=True, dropout=dropout)
        self.graph_net_temporal = ReferenceGraphNetwork(2 * D_e, 3, time_attn, graph_hidden_size, dropout)
        self.graph_net_speaker = ReferenceGraphNetwork(2 * D_e, n_speakers**2, time_attn, graph_hidden_size, dropout)
        d_h = 2 * D_e + graph_hidden_size
        self.smax_fc = nn.Linear(d_h, n_classes)
        self.linear_rec = nn.Linear(d_h, dim)
        self.relation_ids = {"temporal": None, "speaker": None}

    def forward(self, inputfeats, qmask, umask, seq_lengths):
        outputs = self.lstm(inputfeats[0])[0]
        nodes = torch.cat([outputs[:n, b] for b, n in enumerate(seq_lengths)])
        speakers = qmask.tolist()
        hidden = 0
        for kind, net in (("temporal", self.graph_net_temporal), ("speaker", self.graph_net_speaker)):
            edge_index, edge_type, ids = python_graph_builder(speakers, seq_lengths, self.window_past,
                                                              self.window_future, kind, self.relation_ids[kind])
            self.relation_ids[kind] = ids
            hidden = hidden + net(nodes, edge_index, edge_type, list(seq_lengths), umask)
        return self.smax_fc(hidden), [self.linear_rec(hidden)], hidden
