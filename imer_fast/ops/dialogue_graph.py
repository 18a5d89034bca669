"""``imer_fast::build_dialogue_graph``: the utterance graph of a batch of conversations.

Nodes are the utterances of all dialogues, packed (dialogue b's utterance t is node
``sum(lengths[:b]) + t``). Following GCNet's ``edge_perms``, source utterance j sends an edge to every
target i of the same dialogue with ``i in [j - window_past, j + window_future]`` (self-loops
included; ``-1`` = unbounded on that side); no edge crosses dialogues. Edges come sorted by target,
then source, with ``rowptr`` the target CSR. Vectorised on device: the only host sync is the edge
count.

Relation ids (``relations=``; j the source, i the target, s the speakers, S = num_speakers):

- ``"temporal"`` (GCNet, 3): ``past`` 0 (j < i), ``now`` 1 (j == i), ``future`` 2 (j > i);
- ``"speaker"`` (GCNet, S*S): ``s_i * S + s_j``, named ``f"{s_i}{s_j}"`` as GCNet names them;
- ``"dialoguegcn"`` (DialogueGCN, 2*S*S): ``(s_j * S + s_i) * 2 + (0 if j < i else 1)``, named
  ``f"{s_j}{s_i}{0 or 1}"``;
- ``"none"`` (1): every edge has type 0.

GCNet numbers its relations by iterating a Python ``set`` of these names, so its ids change with
the interpreter's hash seed. To reproduce a given run pass ``relation_map`` (canonical id -> that
run's id), e.g. from :func:`relation_map_from_names` with the release's ``edge_type_mapping``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backends
from . import _runtime
from .relational_csr import RelationalGraph

_runtime.require_cpp()

RELATION_KINDS = ("temporal", "speaker", "dialoguegcn", "none")


def num_relations_of(relations: str, num_speakers: int) -> int:
    _check_relations(relations, "num_relations_of")
    return {"temporal": 3, "speaker": num_speakers**2, "dialoguegcn": 2 * num_speakers**2, "none": 1}[relations]


def relation_names(relations: str, num_speakers: int) -> List[str]:
    """Names of the canonical relation ids, in id order (see module doc)."""
    _check_relations(relations, "relation_names")
    speakers = range(num_speakers)
    if relations == "temporal":
        return ["past", "now", "future"]
    if relations == "speaker":
        return [f"{t}{s}" for t in speakers for s in speakers]
    if relations == "dialoguegcn":
        return [f"{s}{t}{d}" for s in speakers for t in speakers for d in "01"]
    return ["edge"]


def relation_map_from_names(edge_type_mapping: Dict[str, int], relations: str, num_speakers: int) -> Tensor:
    """Canonical id -> id in a release's ``edge_type_mapping`` (name -> id) dict."""
    _check_relations(relations, "relation_map_from_names")
    names = relation_names(relations, num_speakers)
    if sorted(edge_type_mapping) != sorted(names) or sorted(edge_type_mapping.values()) != list(range(len(names))):
        raise ValueError(
            f"relation_map_from_names: edge_type_mapping must map exactly the names {names} to the ids "
            f"0..{len(names) - 1}; "
            f"got {edge_type_mapping}"
        )
    return torch.tensor([edge_type_mapping[name] for name in names], dtype=torch.long)


def _check_relations(relations: str, op: str) -> None:
    if relations not in RELATION_KINDS:
        raise ValueError(f"{op}: relations must be one of {RELATION_KINDS}; got {relations!r}")


def build_dialogue_graph_ref(
    lengths: Tensor, speakers: Tensor, window_past: int, window_future: int, relations: str, num_speakers: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Vectorised pure-torch twin of the op: packed speakers [N] -> (edge_index, edge_type, rowptr)."""
    device = lengths.device
    num_nodes = speakers.numel()
    starts = torch.cumsum(lengths, 0) - lengths
    dialogue = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=num_nodes)
    local = torch.arange(num_nodes, device=device) - starts[dialogue]
    last = lengths[dialogue] - 1
    first_src = (local - window_future).clamp(min=0) if window_future >= 0 else torch.zeros_like(local)
    last_src = torch.minimum(local + window_past, last) if window_past >= 0 else last
    degree = last_src - first_src + 1
    rowptr = torch.cat([degree.new_zeros(1), degree.cumsum(0)])
    num_edges = int(rowptr[-1])
    tgt = torch.repeat_interleave(torch.arange(num_nodes, device=device), degree, output_size=num_edges)
    src_local = first_src[tgt] + torch.arange(num_edges, device=device) - rowptr[tgt]
    src = tgt - local[tgt] + src_local
    tgt_local = local[tgt]
    if relations == "temporal":
        edge_type = torch.where(src_local < tgt_local, 0, torch.where(src_local == tgt_local, 1, 2))
    elif relations == "speaker":
        edge_type = speakers[tgt] * num_speakers + speakers[src]
    elif relations == "dialoguegcn":
        edge_type = (speakers[src] * num_speakers + speakers[tgt]) * 2 + (src_local >= tgt_local).long()
    else:
        edge_type = torch.zeros_like(tgt)
    return torch.stack([src, tgt]), edge_type.long(), rowptr


@torch.library.register_fake("imer_fast::build_dialogue_graph")
def _build_dialogue_graph_fake(lengths, speakers, window_past, window_future, relations, num_speakers):
    num_edges = torch.library.get_ctx().new_dynamic_size()
    return lengths.new_empty(2, num_edges), lengths.new_empty(num_edges), lengths.new_empty(speakers.shape[0] + 1)


def _build_dialogue_graph_triton(lengths, speakers, window_past, window_future, relations, num_speakers):
    from imer_fast._kernels import dialogue_graph as kernels

    return kernels.build_dialogue_graph(lengths, speakers, window_past, window_future, relations, num_speakers)


torch.library.register_kernel("imer_fast::build_dialogue_graph", "cuda", _build_dialogue_graph_triton)
_runtime.register_triton_cpu_route("build_dialogue_graph", _build_dialogue_graph_triton)


@backends.register_selector("build_dialogue_graph")
def select_build_dialogue_graph_backend(lengths: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA), C++ (CPU), reference (vectorised torch, any device)."""
    on = lengths.device
    return backends.choose(
        "build_dialogue_graph",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on)),
            ("cpp", lambda: _runtime.cpp_error() or (None if on.type == "cpu" else f"tensors are on {on.type}, not cpu")),
            ("reference", lambda: None),
        ],
    )


@dataclass(frozen=True)
class DialogueGraph:
    """Output of :func:`build_dialogue_graph`; ``graph`` is the sorted form the convolutions take."""

    rowptr: Tensor
    lengths: Tensor
    relations: str
    graph: RelationalGraph

    @property
    def edge_index(self) -> Tensor:
        return self.graph.edge_index

    @property
    def edge_type(self) -> Tensor:
        return self.graph.edge_type

    @property
    def num_relations(self) -> int:
        return self.graph.num_relations

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes


IntSequence = Union[Sequence[int], Tensor]


def _as_lengths(lengths: IntSequence, device) -> Tensor:
    op = "imer_fast.build_dialogue_graph"
    if not isinstance(lengths, Tensor):
        values = list(lengths)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"{op}: lengths must hold integers; got {bad[0]!r} ({type(bad[0]).__name__})")
        lengths = torch.tensor(values, dtype=torch.long, device=device)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{op}: lengths must hold integers; got dtype {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"{op}: lengths must be 1-D [batch]; got shape {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"{op}: lengths must be >= 0; got {lengths.tolist()}")
    return lengths.long()


def _pack_speakers(speakers: Optional[Tensor], lengths: Tensor) -> Tensor:
    op = "imer_fast.build_dialogue_graph"
    num_nodes = int(lengths.sum())
    if speakers is None:
        return torch.zeros(num_nodes, dtype=torch.long, device=lengths.device)
    if not isinstance(speakers, Tensor):
        speakers = torch.as_tensor(speakers)
    if speakers.dtype.is_floating_point or speakers.dtype == torch.bool or speakers.is_complex():
        raise TypeError(f"{op}: speakers must hold integer speaker ids; got dtype {speakers.dtype}")
    if speakers.device != lengths.device:
        raise ValueError(f"{op}: speakers is on {speakers.device} but lengths on {lengths.device}")
    if speakers.dim() == 2:
        if speakers.shape[0] != lengths.numel() or (lengths.numel() and speakers.shape[1] < int(lengths.max())):
            raise ValueError(
                f"{op}: padded speakers must have shape [batch = {lengths.numel()}, >= max(lengths) = "
                f"{int(lengths.max()) if lengths.numel() else 0}]; got {tuple(speakers.shape)}"
            )
        valid = torch.arange(speakers.shape[1], device=speakers.device) < lengths.unsqueeze(1)
        return speakers[valid].long()
    if speakers.dim() == 1:
        if speakers.numel() != num_nodes:
            raise ValueError(f"{op}: packed speakers must have sum(lengths) = {num_nodes} entries; got {speakers.numel()}")
        return speakers.long()
    raise ValueError(f"{op}: speakers must be padded [batch, max_len] or packed [sum(lengths)]; got shape "
                     f"{tuple(speakers.shape)}")


def build_dialogue_graph(
    lengths: IntSequence, speakers: Optional[Tensor] = None, window_past: int = -1, window_future: int = -1,
    relations: str = "temporal", num_speakers: Optional[int] = None, relation_map: Optional[Tensor] = None,
) -> DialogueGraph:
    """Build the dialogue graph of a batch (see module doc).

    ``lengths``: dialogue lengths (list or 1-D int tensor); ``speakers``: integer speaker ids, padded
    ``[batch, max_len]`` or packed ``[sum(lengths)]`` (None: one speaker); ``num_speakers`` defaults to
    ``max(speakers) + 1``; ``relation_map``: optional canonical id -> output id permutation.
    """
    op = "imer_fast.build_dialogue_graph"
    device = speakers.device if isinstance(speakers, Tensor) else (lengths.device if isinstance(lengths, Tensor) else None)
    lengths = _as_lengths(lengths, device)
    packed = _pack_speakers(speakers, lengths)
    _check_relations(relations, op)
    for name, window in (("window_past", window_past), ("window_future", window_future)):
        if not isinstance(window, int) or isinstance(window, bool) or window < -1:
            raise ValueError(f"{op}: {name} must be an int >= -1 (-1: whole dialogue); got {window!r}")
    # A window reaching past the longest dialogue is the unbounded window (and must not overflow).
    longest = int(lengths.max()) if lengths.numel() else 0
    window_past = -1 if window_past >= longest else window_past
    window_future = -1 if window_future >= longest else window_future
    max_speaker = int(packed.max()) if packed.numel() else 0
    if num_speakers is None:
        num_speakers = max_speaker + 1
    if packed.numel() and (int(packed.min()) < 0 or max_speaker >= num_speakers):
        raise ValueError(f"{op}: speaker ids must lie in [0, num_speakers = {num_speakers}); got range "
                         f"[{int(packed.min())}, {max_speaker}]")
    num_relations = num_relations_of(relations, num_speakers)

    if select_build_dialogue_graph_backend(lengths).backend == "reference":
        edge_index, edge_type, rowptr = build_dialogue_graph_ref(lengths, packed, window_past, window_future,
                                                                 relations, num_speakers)
    else:
        edge_index, edge_type, rowptr = torch.ops.imer_fast.build_dialogue_graph(
            lengths, packed, window_past, window_future, relations, num_speakers)
    if relation_map is not None:
        relation_map = torch.as_tensor(relation_map, dtype=torch.long, device=edge_type.device)
        if sorted(relation_map.tolist()) != list(range(num_relations)):
            raise ValueError(f"{op}: relation_map must be a permutation of 0..{num_relations - 1}; got "
                             f"{relation_map.tolist()}")
        edge_type = relation_map[edge_type]
    graph = RelationalGraph.from_edges(edge_index, edge_type, packed.numel(), num_relations)
    return DialogueGraph(rowptr, lengths, relations, graph)
