"""``imer_fast::relational_csr`` and :class:`RelationalGraph`, the graph form every graph op consumes.

A typed edge list ``edge_index [2, E]`` (row 0 source, row 1 target, PyG convention) and
``edge_type [E]`` become a CSR keyed by ``(target, relation)``:

- ``seg_ptr [N * R + 1]``: edges ``seg_ptr[i * R + r] : seg_ptr[i * R + r + 1]`` enter node ``i`` with
  relation ``r``; ``col`` holds their sources and ``perm`` their ids in the original edge list;
- the transpose keyed by ``(source, relation)``: ``t_seg_ptr``, ``t_col`` (targets) and ``t_eid``
  (positions in the forward-sorted order), which backward passes gather over without atomics.

Both sorts are stable, so equal keys keep their original edge order and results are repeatable.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from . import _runtime

_runtime.require_cpp()

CSR = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def relational_csr_ref(edge_index: Tensor, edge_type: Tensor, num_nodes: int, num_relations: int) -> CSR:
    """Pure-torch twin of ``imer_fast::relational_csr`` (stable sorts)."""
    src, tgt = edge_index[0], edge_index[1]
    num_keys = num_nodes * num_relations
    key = tgt * num_relations + edge_type
    perm = torch.sort(key, stable=True).indices
    seg_ptr = _ptr_from_sorted_keys(key[perm], num_keys)
    t_key = (src * num_relations + edge_type)[perm]
    t_eid = torch.sort(t_key, stable=True).indices
    t_seg_ptr = _ptr_from_sorted_keys(t_key[t_eid], num_keys)
    return seg_ptr, src[perm], perm, t_seg_ptr, tgt[perm][t_eid], t_eid


def _ptr_from_sorted_keys(sorted_keys: Tensor, num_keys: int) -> Tensor:
    counts = torch.bincount(sorted_keys, minlength=num_keys)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@torch.library.register_fake("imer_fast::relational_csr")
def _relational_csr_fake(edge_index, edge_type, num_nodes, num_relations):
    num_edges = edge_index.shape[1]
    seg = edge_index.new_empty(num_nodes * num_relations + 1)
    edges = lambda: edge_index.new_empty(num_edges)  # noqa: E731
    return seg, edges(), edges(), seg.clone(), edges(), edges()


def _relational_csr_cuda(edge_index, edge_type, num_nodes, num_relations):
    # A stable sort is what this op is; torch's CUDA radix sort is the fastest GPU path there is,
    # so the GPU backend is the torch composite rather than a hand-written Triton sort.
    return relational_csr_ref(edge_index, edge_type, num_nodes, num_relations)


torch.library.register_kernel("imer_fast::relational_csr", "cuda", _relational_csr_cuda)
_runtime.register_triton_cpu_route("relational_csr", _relational_csr_cuda)


@backends.register_selector("relational_csr")
def select_relational_csr_backend(edge_index: Tensor) -> backends.Choice:
    on = edge_index.device
    return backends.choose(
        "relational_csr",
        [
            # The GPU route: this op is a stable sort there, and torch's radix sort (the op's CUDA kernel,
            # the reference's code) is the fastest; listed as "triton" so that forcing the GPU backend
            # (backends.force / IMER_FAST_BACKEND) covers the graph builders too.
            ("triton", lambda: _runtime.triton_cannot_run(on)),
            ("cpp", lambda: None if on.type == "cpu" else f"tensors are on {on.type}, not cpu"),
            ("reference", lambda: None),
        ],
    )


def relational_csr(edge_index: Tensor, edge_type: Tensor, num_nodes: int, num_relations: int) -> CSR:
    """Sort a typed edge list into the forward and transposed relational CSR (see module doc)."""
    if select_relational_csr_backend(edge_index).backend == "reference":
        return relational_csr_ref(edge_index, edge_type, num_nodes, num_relations)
    return torch.ops.imer_fast.relational_csr(edge_index, edge_type, num_nodes, num_relations)


def _check_edges(edge_index: Tensor, edge_type: Tensor, num_nodes: int, num_relations: int, op: str) -> None:
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        got = f"shape {tuple(edge_index.shape)}" if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"{op}: edge_index must be a tensor of shape [2, E]; got {got}")
    if edge_index.dtype != torch.long:
        raise TypeError(f"{op}: edge_index must be int64 (node indices); got {edge_index.dtype}")
    if edge_type.dtype != torch.long:
        raise TypeError(f"{op}: edge_type must be int64; got {edge_type.dtype}")
    if edge_type.shape != (edge_index.shape[1],):
        raise ValueError(f"{op}: edge_type must have shape [E = {edge_index.shape[1]}]; got {tuple(edge_type.shape)}")
    if edge_type.device != edge_index.device:
        raise ValueError(f"{op}: edge_type is on {edge_type.device} but edge_index on {edge_index.device}")
    if num_nodes < 0 or num_relations < 1:
        raise ValueError(f"{op}: num_nodes must be >= 0 and num_relations >= 1; got {num_nodes} and {num_relations}")
    if edge_index.numel():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_nodes:
            raise ValueError(f"{op}: edge_index entries must lie in [0, num_nodes = {num_nodes}); got range [{lo}, {hi}]")
        tlo, thi = int(edge_type.min()), int(edge_type.max())
        if tlo < 0 or thi >= num_relations:
            raise ValueError(
                f"{op}: edge_type must lie in [0, num_relations = {num_relations}); got range [{tlo}, {thi}]"
            )


@dataclass(frozen=True)
class RelationalGraph:
    """A typed graph in the sorted form imer_fast's graph kernels consume. Build it once per batch
    with :meth:`from_edges` (or ``build_dialogue_graph(...).graph``) and reuse it across layers.

    Everything derived from the graph is computed here, eagerly, in the autograd mode the graph is
    built in: nothing is cached later (a lazy cache filled under ``torch.inference_mode`` would hand
    autograd tensors it may not save, and data-dependent ints cannot be computed inside
    ``torch.compile``). A graph built under ``torch.inference_mode`` serves inference only."""

    edge_index: Tensor
    edge_type: Tensor
    num_nodes: int
    num_relations: int
    seg_ptr: Tensor
    col: Tensor
    perm: Tensor
    t_seg_ptr: Tensor
    t_col: Tensor
    t_eid: Tensor
    max_degree: int
    inverse_counts: Tensor  # float64 [E]: 1 / (edges in the edge's segment), per sorted edge ('mean')
    merged: Optional["RelationalGraph"] = None  # the edges with types ignored (None: one relation)

    @classmethod
    def from_edges(
        cls, edge_index: Tensor, edge_type: Optional[Tensor] = None, num_nodes: Optional[int] = None,
        num_relations: Optional[int] = None,
    ) -> "RelationalGraph":
        op = "RelationalGraph.from_edges"
        for name, t in (("edge_index", edge_index), ("edge_type", edge_type)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a torch.long tensor; got {type(t).__name__}")
        for name, n in (("num_nodes", num_nodes), ("num_relations", num_relations)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral)):
                raise TypeError(f"{op}: {name} must be an int or None; got {n!r}")
        if edge_type is None:
            edge_type = torch.zeros(edge_index.shape[1] if edge_index.dim() == 2 else 0, dtype=torch.long,
                                    device=edge_index.device)
        if num_nodes is None:
            num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
        if num_relations is None:
            num_relations = int(edge_type.max()) + 1 if edge_type.numel() else 1
        _check_edges(edge_index, edge_type, num_nodes, num_relations, op)
        seg_ptr, col, perm, t_seg_ptr, t_col, t_eid = relational_csr(edge_index, edge_type, num_nodes, num_relations)
        # The (target, relation) segments of a node are contiguous: every R-th pointer is the untyped CSR.
        m_seg_ptr, m_t_seg_ptr = seg_ptr[::num_relations].contiguous(), t_seg_ptr[::num_relations].contiguous()
        if num_nodes == 0:
            max_degree = max_merged = 0
        else:  # one host sync for both
            max_degree, max_merged = torch.stack([torch.cat([seg_ptr.diff(), t_seg_ptr.diff()]).max(),
                                                  torch.cat([m_seg_ptr.diff(), m_t_seg_ptr.diff()]).max()]).tolist()
        merged = None
        if num_relations > 1:
            merged = cls(edge_index, torch.zeros_like(edge_type), num_nodes, 1, m_seg_ptr, col, perm, m_t_seg_ptr,
                         t_col, t_eid, max_merged, _inverse_counts(m_seg_ptr, col.numel()))
        return cls(edge_index, edge_type, num_nodes, num_relations, seg_ptr, col, perm, t_seg_ptr, t_col, t_eid,
                   max_degree, _inverse_counts(seg_ptr, col.numel()), merged)

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def edge_scale(self, edge_weight: Optional[Tensor], aggr: str, dtype: torch.dtype) -> Optional[Tensor]:
        """Per-edge factor in sorted order: edge weight, divided by the segment size for 'mean'."""
        if aggr != "mean":
            return None if edge_weight is None else edge_weight[self.perm]
        inv = self.inverse_counts.to(dtype)
        return inv if edge_weight is None else edge_weight[self.perm] * inv

    def single_relation(self) -> "RelationalGraph":
        """The same edges with their types ignored (for GraphConv layers sharing the graph)."""
        return self if self.merged is None else self.merged

    def to(self, device) -> "RelationalGraph":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return RelationalGraph(**{k: (v.to(device) if isinstance(v, (Tensor, RelationalGraph)) else v)
                                  for k, v in moved.items()})


def _inverse_counts(seg_ptr: Tensor, num_edges: int) -> Tensor:
    counts = seg_ptr.diff()
    return torch.repeat_interleave(counts, counts, output_size=num_edges).to(torch.float64).reciprocal()
