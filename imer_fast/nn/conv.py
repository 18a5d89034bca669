"""Graph convolution modules with PyG's parameter names and shapes (a PyG state_dict loads unchanged).

``forward`` takes PyG's arguments; pass an :class:`imer_fast.ops.RelationalGraph` (or a
``DialogueGraph``) instead of ``edge_index`` to reuse one sorted graph across layers and calls.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..ops import DialogueGraph, RelationalGraph, graph_conv, rgcn_conv
from ._checks import require_ints

GraphLike = Union[Tensor, RelationalGraph, DialogueGraph]


def _glorot_(tensor: Tensor) -> None:
    bound = math.sqrt(6.0 / (tensor.size(-2) + tensor.size(-1)))
    nn.init.uniform_(tensor, -bound, bound)


def _as_graph(edge_index: GraphLike, edge_type: Optional[Tensor], num_nodes: int, num_relations: int,
              layer: str) -> RelationalGraph:
    if isinstance(edge_index, DialogueGraph):
        edge_index = edge_index.graph
    if isinstance(edge_index, RelationalGraph):
        if edge_index.num_nodes != num_nodes:
            raise ValueError(f"{layer}: x has {num_nodes} rows but the graph has {edge_index.num_nodes} nodes")
        return edge_index
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{layer}: edge_index must be a [2, E] int64 tensor or a RelationalGraph; got "
                        f"{type(edge_index).__name__}")
    return RelationalGraph.from_edges(edge_index, edge_type, num_nodes, num_relations)


class RGCNConv(nn.Module):
    """Drop-in for ``torch_geometric.nn.RGCNConv`` (same arguments, parameters ``weight``, ``comp``,
    ``root``, ``bias``), on the fused ``imer_fast::rgcn_conv`` operator. Extra: ``edge_weight``
    per-edge factors (DialogueGCN's edge attention) and ``aggr="add"`` (DialogueGCN's old PyG)."""

    def __init__(self, in_channels: int, out_channels: int, num_relations: int, num_bases: Optional[int] = None,
                 num_blocks: Optional[int] = None, aggr: str = "mean", root_weight: bool = True,
                 is_sorted: bool = False, bias: bool = True):
        super().__init__()
        if not isinstance(in_channels, int):
            raise NotImplementedError("RGCNConv: bipartite (tuple) in_channels are not supported; got "
                                      f"{in_channels!r}")
        if num_bases is not None and num_blocks is not None:
            raise ValueError("RGCNConv: set at most one of num_bases and num_blocks; got both")
        require_ints("RGCNConv", 1, in_channels=in_channels, out_channels=out_channels, num_relations=num_relations,
                     **({"num_bases": num_bases} if num_bases is not None else {}),
                     **({"num_blocks": num_blocks} if num_blocks is not None else {}))
        if aggr not in ("mean", "add", "sum"):
            raise ValueError(f"RGCNConv: aggr must be 'mean' or 'add'; got {aggr!r}")
        self.in_channels, self.out_channels, self.num_relations = in_channels, out_channels, num_relations
        self.num_bases, self.num_blocks = num_bases, num_blocks
        self.aggr = "add" if aggr == "sum" else aggr
        self.is_sorted = is_sorted  # accepted for PyG compatibility; imer_fast always sorts once per graph
        if num_bases is not None:
            self.weight = nn.Parameter(torch.empty(num_bases, in_channels, out_channels))
            self.comp = nn.Parameter(torch.empty(num_relations, num_bases))
        elif num_blocks is not None:
            if in_channels % num_blocks or out_channels % num_blocks:
                raise ValueError(f"RGCNConv: in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                                 f"divisible by num_blocks ({num_blocks})")
            self.weight = nn.Parameter(torch.empty(num_relations, num_blocks, in_channels // num_blocks,
                                                   out_channels // num_blocks))
            self.register_parameter("comp", None)
        else:
            self.weight = nn.Parameter(torch.empty(num_relations, in_channels, out_channels))
            self.register_parameter("comp", None)
        self.root = nn.Parameter(torch.empty(in_channels, out_channels)) if root_weight else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _glorot_(self.weight)
        if self.comp is not None:
            _glorot_(self.comp)
        if self.root is not None:
            _glorot_(self.root)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def relation_weights(self) -> Tensor:
        """Dense [R, Fin, Fout] weights (bases combined, blocks laid on the diagonal)."""
        if self.num_bases is not None:
            return (self.comp @ self.weight.flatten(1)).view(self.num_relations, self.in_channels, self.out_channels)
        if self.num_blocks is not None:
            blocks = self.num_blocks
            eye = torch.eye(blocks, dtype=self.weight.dtype, device=self.weight.device)
            dense = torch.einsum("rbio,bc->rbico", self.weight, eye)
            return dense.reshape(self.num_relations, self.in_channels, self.out_channels)
        return self.weight

    def forward(self, x: Tensor, edge_index: GraphLike, edge_type: Optional[Tensor] = None,
                edge_weight: Optional[Tensor] = None) -> Tensor:
        if isinstance(edge_index, Tensor) and edge_type is None:
            raise ValueError("RGCNConv: edge_type [E] is required with an edge_index tensor (as in PyG); got None")
        graph = _as_graph(edge_index, edge_type, x.shape[0], self.num_relations, "RGCNConv")
        return rgcn_conv(x, graph, self.relation_weights(), self.root, self.bias, edge_weight, self.aggr)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, num_relations={self.num_relations}, aggr={self.aggr!r}"


class GraphConv(nn.Module):
    """Drop-in for ``torch_geometric.nn.GraphConv`` (``lin_rel``, ``lin_root``); edge types are ignored."""

    def __init__(self, in_channels: int, out_channels: int, aggr: str = "add", bias: bool = True):
        super().__init__()
        if not isinstance(in_channels, int):
            raise NotImplementedError(f"GraphConv: bipartite (tuple) in_channels are not supported; got {in_channels!r}")
        if aggr not in ("add", "sum", "mean"):
            raise ValueError(f"GraphConv: aggr must be 'add' or 'mean'; got {aggr!r}")
        require_ints("GraphConv", 1, in_channels=in_channels, out_channels=out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.aggr = "add" if aggr == "sum" else aggr
        self.lin_rel = nn.Linear(in_channels, out_channels, bias=bias)
        self.lin_root = nn.Linear(in_channels, out_channels, bias=False)

    def reset_parameters(self) -> None:
        self.lin_rel.reset_parameters()
        self.lin_root.reset_parameters()

    def forward(self, x: Tensor, edge_index: GraphLike, edge_weight: Optional[Tensor] = None,
                size=None) -> Tensor:
        if size is not None and tuple(size) != (x.shape[0], x.shape[0]):
            raise NotImplementedError(f"GraphConv: only square graphs are supported; got size={size}")
        graph = _as_graph(edge_index, None, x.shape[0], 1, "GraphConv")
        return graph_conv(x, graph, self.lin_rel.weight, self.lin_rel.bias, self.lin_root.weight, edge_weight,
                          self.aggr)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, aggr={self.aggr!r}"
