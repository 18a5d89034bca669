"""Dialogue Graph Network: drop-in for GCNet's ``GraphModel`` (zeroQiaoba/GCNet ``gcnet/model.py``),
which FedDISC reuses as its Dialogue Graph Network.

Same constructor arguments, same ``forward(inputfeats, qmask, umask, seq_lengths)`` returning
``(log_prob, [reconstruction], hidden)`` in ``[seq_len, batch, ...]`` layout, and the same parameter
names and shapes, so a ``GraphModel`` state_dict loads unchanged. Differences, all deliberate:

- graphs are built by the vectorised ``imer_fast::build_dialogue_graph`` (no per-edge Python) and
  convolved by the fused ``imer_fast::rgcn_conv``;
- relation ids are explicit. GCNet numbers relations by iterating a Python ``set``, so they change
  with ``PYTHONHASHSEED``; ours default to the canonical order of
  :func:`imer_fast.ops.relation_names` and take ``temporal_relation_map`` / ``speaker_relation_map``
  (the release's ``edge_type_mapping`` dicts, or canonical -> id tensors) to reproduce a run;
- the per-utterance matching-attention loop is one batched computation (same math);
- ``base_model="GRU"`` works (the release's GRU branch references an undefined name).

Like the release, the recurrent layers run over zero-padded sequences (not packed), so outputs
depend on the batch's longest dialogue exactly as the release's do.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import RelationalGraph, build_dialogue_graph, relation_map_from_names
from ._checks import require_ints
from .conv import GraphConv, RGCNConv

RelationMap = Union[None, Dict[str, int], Sequence[int], Tensor]


class MatchingAttention(nn.Module):
    """GCNet's ``general2`` matching attention over a padded dialogue, all query steps at once:
    ``alpha[t] = masked_softmax_k(tanh(transform(M[t]) . (M[k] * mask[k])))`` and
    ``pool[t] = sum_k alpha[t, k] M[k]`` (the release's rescaled softmax equals a masked softmax)."""

    def __init__(self, mem_dim: int, cand_dim: int):
        super().__init__()
        self.transform = nn.Linear(cand_dim, mem_dim, bias=True)

    def forward(self, memory: Tensor, mask: Tensor) -> Tensor:
        """memory [L, B, D], mask [B, L] (1 = utterance) -> pooled [L, B, D]."""
        mem = memory.transpose(0, 1)  # [B, L, D]
        mask = mask.to(mem.dtype)
        scores = self.transform(mem) @ (mem * mask.unsqueeze(-1)).transpose(1, 2)  # [B, Lq, Lk]
        scores = torch.tanh(scores * mask.unsqueeze(1))
        alpha = torch.softmax(scores, dim=-1) * mask.unsqueeze(1)
        alpha = alpha / alpha.sum(-1, keepdim=True)
        return (alpha @ mem).transpose(0, 1)


class GraphNetwork(nn.Module):
    """One relational graph branch of GCNet: RGCNConv -> GraphConv -> [input, graph] -> biLSTM ->
    optional matching attention -> ReLU(Linear). Parameter names follow the release."""

    def __init__(self, num_features: int, num_relations: int, time_attn: bool, hidden_size: int = 64,
                 dropout: float = 0.5, no_cuda: bool = False):
        super().__init__()
        self.time_attn, self.hidden_size, self.no_cuda = time_attn, hidden_size, no_cuda
        self.conv1 = RGCNConv(num_features, hidden_size, num_relations)
        self.conv2 = GraphConv(hidden_size, hidden_size)
        d_h = num_features + hidden_size
        self.grufusion = nn.LSTM(input_size=d_h, hidden_size=d_h, num_layers=2, bidirectional=True, dropout=dropout)
        self.matchatt = MatchingAttention(2 * d_h, 2 * d_h)
        self.linear = nn.Linear(2 * d_h, d_h)

    def forward(self, features: Tensor, graph: RelationalGraph, node_slots: Tensor, umask: Tensor) -> Tensor:
        """features [N, F] packed utterances; node_slots [B, L] bool, True where a node sits in the
        padded layout; umask [B, L] -> hidden [L, B, F + hidden_size]."""
        out = self.conv1(features, graph)
        out = self.conv2(out, graph)
        nodes = torch.cat([features, out], dim=-1)
        padded = nodes.new_zeros(*node_slots.shape, nodes.shape[-1])
        padded[node_slots] = nodes
        outputs = self.grufusion(padded.transpose(0, 1))[0]  # [L, B, 2 D_h]
        if self.time_attn:
            outputs = self.matchatt(outputs, umask)
        return torch.relu(self.linear(outputs))


GCNET_ORDER = ("audio", "text", "video")
"""The order in which GCNet (and so FedDISC's DGN) concatenates the modalities: ``adim``, ``tdim``, ``vdim``."""


class DialogueGraphNetwork(nn.Module):
    """Drop-in for GCNet's ``GraphModel`` (see module doc). ``forward`` returns the classifier logits
    (named ``log_prob`` in the release), the reconstruction list and the hidden states."""

    def __init__(self, base_model: str, adim: int, tdim: int, vdim: int, D_e: int, graph_hidden_size: int,
                 n_speakers: int, window_past: int, window_future: int, n_classes: int, dropout: float = 0.5,
                 time_attn: bool = True, no_cuda: bool = False, *, temporal_relation_map: RelationMap = None,
                 speaker_relation_map: RelationMap = None):
        super().__init__()
        if base_model not in ("LSTM", "GRU"):
            raise ValueError(f"DialogueGraphNetwork: base_model must be 'LSTM' or 'GRU'; got {base_model!r}")
        require_ints("DialogueGraphNetwork", 1, n_speakers=n_speakers, n_classes=n_classes, D_e=D_e,
                     graph_hidden_size=graph_hidden_size)
        require_ints("DialogueGraphNetwork", 0, adim=adim, tdim=tdim, vdim=vdim)
        self.base_model, self.no_cuda, self.time_attn = base_model, no_cuda, time_attn
        self.n_speakers, self.window_past, self.window_future = n_speakers, window_past, window_future
        self.input_dim = adim + tdim + vdim
        self.lstm = nn.LSTM(self.input_dim, D_e, num_layers=2, bidirectional=True, dropout=dropout)
        self.gru = nn.GRU(self.input_dim, D_e, num_layers=2, bidirectional=True, dropout=dropout)
        self.graph_net_temporal = GraphNetwork(2 * D_e, 3, time_attn, graph_hidden_size, dropout, no_cuda)
        self.graph_net_speaker = GraphNetwork(2 * D_e, n_speakers**2, time_attn, graph_hidden_size, dropout, no_cuda)
        d_h = 2 * D_e + graph_hidden_size
        self.smax_fc = nn.Linear(d_h, n_classes)
        self.linear_rec = nn.Linear(d_h, self.input_dim)
        self.temporal_relation_map = self._relation_map(temporal_relation_map, "temporal")
        self.speaker_relation_map = self._relation_map(speaker_relation_map, "speaker")

    def _relation_map(self, mapping: RelationMap, relations: str) -> Optional[Tensor]:
        if mapping is None:
            return None
        if isinstance(mapping, dict):
            return relation_map_from_names(mapping, relations, self.n_speakers)
        return torch.as_tensor(mapping, dtype=torch.long)

    def build_graphs(self, lengths: Tensor, speakers: Tensor) -> Tuple[RelationalGraph, RelationalGraph]:
        """The temporal and speaker graphs of a batch (lengths [B], speakers padded [B, L])."""
        common = dict(window_past=self.window_past, window_future=self.window_future, num_speakers=self.n_speakers)
        temporal = build_dialogue_graph(lengths, speakers, relations="temporal",
                                        relation_map=self.temporal_relation_map, **common)
        speaker = build_dialogue_graph(lengths, speakers, relations="speaker",
                                       relation_map=self.speaker_relation_map, **common)
        return temporal.graph, speaker.graph

    def forward(self, inputfeats: Union[Tensor, List[Tensor]], qmask: Tensor, umask: Tensor,
                seq_lengths: Sequence[int]) -> Tuple[Tensor, List[Tensor], Tensor]:
        """inputfeats: ``[x]`` or x, x [L, B, adim + tdim + vdim] (audio, text, visual concatenated as in
        GCNet); qmask [B, L] speaker ids; umask [B, L] utterance mask; seq_lengths: B ints."""
        feats = inputfeats[0] if isinstance(inputfeats, (list, tuple)) else inputfeats
        lengths, speakers = self._check_inputs(feats, qmask, umask, seq_lengths)
        rnn = self.lstm if self.base_model == "LSTM" else self.gru
        outputs = rnn(feats)[0]  # [L, B, 2 D_e]
        max_len = int(lengths.max()) if lengths.numel() else 0
        node_slots = torch.arange(max_len, device=feats.device) < lengths.unsqueeze(1)  # [B, max_len]
        nodes = outputs[:max_len].transpose(0, 1)[node_slots]  # dialogue-major packed utterances
        temporal, speaker = self.build_graphs(lengths, speakers[:, :max_len])
        umask = umask[:, :max_len]
        hidden = (self.graph_net_temporal(nodes, temporal, node_slots, umask)
                  + self.graph_net_speaker(nodes, speaker, node_slots, umask))
        return self.smax_fc(hidden), [self.linear_rec(hidden)], hidden

    def _check_inputs(self, feats: Tensor, qmask: Tensor, umask: Tensor, seq_lengths) -> Tuple[Tensor, Tensor]:
        name = "DialogueGraphNetwork.forward"
        if not isinstance(feats, Tensor) or feats.dim() != 3 or feats.shape[-1] != self.input_dim:
            got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(f"{name}: inputfeats must be [seq_len, batch, adim + tdim + vdim = {self.input_dim}]; "
                             f"got {got}")
        seq_len, batch = feats.shape[:2]
        lengths = torch.as_tensor(list(seq_lengths), dtype=torch.long, device=feats.device)
        if lengths.numel() != batch:
            raise ValueError(f"{name}: seq_lengths must have batch = {batch} entries; got {lengths.numel()}")
        if batch and (int(lengths.max()) > seq_len or int(lengths.min()) < 0):
            raise ValueError(f"{name}: seq_lengths must lie in [0, seq_len = {seq_len}]; got {lengths.tolist()}")
        for arg, t in (("qmask", qmask), ("umask", umask)):
            if t.dim() != 2 or t.shape[0] != batch or t.shape[1] < (int(lengths.max()) if batch else 0):
                raise ValueError(f"{name}: {arg} must be [batch = {batch}, seq_len]; got {tuple(t.shape)}")
        speakers = qmask.to(feats.device)
        if speakers.is_floating_point():
            if not torch.equal(speakers, speakers.round()):
                raise ValueError(f"{name}: qmask must hold integer speaker ids; got non-integer values")
            speakers = speakers.long()
        return lengths, speakers.long()
