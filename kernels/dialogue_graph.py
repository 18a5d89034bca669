"""Triton kernel of ``imer_fast::build_dialogue_graph``: the windowed GCNet / DialogueGCN edge set.

Per-node quantities (first source, degree, CSR offset) come from a handful of vectorised torch ops;
one host sync reads the edge count (and the validation scalars); then a single kernel, one program
per ``BLOCK`` targets, walks the candidate sources in ``CHUNK``-wide steps up to the largest degree of
its block and writes ``edge_index`` / ``edge_type`` at ``rowptr[i] + d``. No per-edge or per-dialogue
Python.

Target ``i`` (local position in a dialogue of length ``n``) receives edges from the sources
``j in [max(0, i - window_future), min(n - 1, i + window_past)]`` (-1: unbounded on that side), in
ascending order; relation ids (``S = num_speakers``):

- ``temporal``: 0 if ``j < i`` (past), 1 if ``j == i``, 2 if ``j > i`` (future);
- ``speaker``: ``speaker[i] * S + speaker[j]``;
- ``dialoguegcn``: ``(speaker[j] * S + speaker[i]) * 2 + (0 if j < i else 1)``;
- ``none``: 0.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["build_dialogue_graph", "RELATION_KINDS"]

_OP = "imer_fast::build_dialogue_graph (triton): "

RELATION_KINDS = {"temporal": 0, "speaker": 1, "dialoguegcn": 2, "none": 3}


@triton.jit
def _dialogue_graph_kernel(
    rowptr_ptr, first_ptr, deg_ptr, spk_ptr, edge_index_ptr, edge_type_ptr,
    N, E, S,
    KIND: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    nodes = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    nmask = nodes < N
    base = tl.load(rowptr_ptr + nodes, mask=nmask, other=0)
    first = tl.load(first_ptr + nodes, mask=nmask, other=0)
    deg = tl.load(deg_ptr + nodes, mask=nmask, other=0)
    if KIND == 1 or KIND == 2:
        spk_t = tl.load(spk_ptr + nodes, mask=nmask, other=0)
    tile_deg = tl.max(deg, axis=0)
    offs = tl.arange(0, CHUNK)
    for c0 in range(0, tile_deg, CHUNK):
        d = c0 + offs
        valid = d[None, :] < deg[:, None]
        src = first[:, None] + d[None, :]
        tgt = nodes[:, None] + tl.zeros((BLOCK, CHUNK), dtype=tl.int64)
        e = base[:, None] + d[None, :]
        tl.store(edge_index_ptr + e, src, mask=valid)
        tl.store(edge_index_ptr + E + e, tgt, mask=valid)
        if KIND == 0:
            rel = tl.where(src < tgt, 0, tl.where(src == tgt, 1, 2)).to(tl.int64)
        elif KIND == 1:
            spk_s = tl.load(spk_ptr + src, mask=valid, other=0)
            rel = spk_t[:, None] * S + spk_s
        elif KIND == 2:
            spk_s = tl.load(spk_ptr + src, mask=valid, other=0)
            rel = (spk_s * S + spk_t[:, None]) * 2 + tl.where(src < tgt, 0, 1).to(tl.int64)
        else:
            rel = tl.zeros((BLOCK, CHUNK), dtype=tl.int64)
        tl.store(edge_type_ptr + e, rel, mask=valid)


def build_dialogue_graph(lengths: Tensor, speakers: Tensor, window_past: int, window_future: int, relations: str,
                         num_speakers: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Edges of a batch of dialogues (see module doc): ``(edge_index [2, E] (source, target),
    edge_type [E], rowptr [N + 1])``, sorted by target then source. One host sync (the edge count)."""
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.dtype != torch.long:
        raise ValueError(f"{_OP}lengths must be a 1-D int64 tensor")
    if not isinstance(speakers, Tensor) or speakers.dim() != 1 or speakers.dtype != torch.long:
        raise ValueError(f"{_OP}speakers must be a packed 1-D int64 tensor")
    if speakers.device != lengths.device:
        raise ValueError(f"{_OP}speakers are on {speakers.device} but lengths on {lengths.device}")
    window_past, window_future, num_speakers = int(window_past), int(window_future), int(num_speakers)
    # A window reaching past every dialogue is unbounded; clamping keeps int64 arithmetic from overflowing.
    window_past = -1 if window_past >= speakers.numel() else window_past
    window_future = -1 if window_future >= speakers.numel() else window_future
    if window_past < -1 or window_future < -1:
        raise ValueError(f"{_OP}window_past and window_future must be >= -1 (-1: whole dialogue); got "
                         f"{window_past} and {window_future}")
    if num_speakers < 1:
        raise ValueError(f"{_OP}num_speakers must be >= 1; got {num_speakers}")
    if relations not in RELATION_KINDS:
        raise ValueError(f"{_OP}relations must be one of {sorted(RELATION_KINDS)}; got {relations!r}")

    device = lengths.device
    lengths = lengths.contiguous()
    speakers = speakers.contiguous()
    batch, num_nodes = lengths.numel(), speakers.numel()
    if batch == 0 and num_nodes > 0:
        raise ValueError(f"{_OP}speakers must hold sum(lengths) = 0 entries; got {num_nodes}")

    # Per-node dialogue, local position and source range; searchsorted keeps every index in range
    # even for inconsistent inputs, which the single sync below then rejects before any launch.
    ends = torch.cumsum(lengths, 0)
    node = torch.arange(num_nodes, dtype=torch.long, device=device)
    if num_nodes > 0:
        dlg = torch.searchsorted(ends, node, right=True).clamp_(max=batch - 1)
        n = lengths[dlg]
        start = ends[dlg] - n
    else:
        n = start = node
    i = node - start
    lo = (i - window_future).clamp_(min=0) if window_future >= 0 else torch.zeros_like(i)
    hi = torch.minimum(i + window_past, n - 1) if window_past >= 0 else n - 1
    deg = (hi - lo + 1).clamp_(min=0)
    first = start + lo
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=device)
    rowptr[1:] = torch.cumsum(deg, 0)

    zero = rowptr[:1]
    stats = torch.cat([
        rowptr[-1:],
        ends[-1:] if batch else zero,
        lengths.min().view(1) if batch else zero,
        speakers.min().view(1) if num_nodes else zero,
        speakers.max().view(1) if num_nodes else zero,
    ]).tolist()  # the one host sync
    num_edges, total, min_len, spk_min, spk_max = (int(v) for v in stats)
    if min_len < 0:
        raise ValueError(f"{_OP}lengths must be >= 0; got a length of {min_len}")
    if total != num_nodes:
        raise ValueError(f"{_OP}speakers must hold sum(lengths) = {total} entries; got {num_nodes}")
    if spk_min < 0 or spk_max >= num_speakers:
        raise ValueError(f"{_OP}speaker ids must lie in [0, num_speakers = {num_speakers}); got range "
                         f"[{spk_min}, {spk_max}]")

    edge_index = torch.empty((2, num_edges), dtype=torch.long, device=device)
    edge_type = torch.empty((num_edges,), dtype=torch.long, device=device)
    if num_edges == 0:
        return edge_index, edge_type, rowptr
    if window_past >= 0 and window_future >= 0:
        chunk = max(4, min(64, triton.next_power_of_2(window_past + window_future + 1)))
    else:
        chunk = 32
    block = max(16, min(128, 2048 // chunk))
    grid = (triton.cdiv(num_nodes, block),)
    _dialogue_graph_kernel[grid](
        rowptr, first, deg, speakers, edge_index, edge_type,
        num_nodes, num_edges, num_speakers,
        KIND=RELATION_KINDS[relations], BLOCK=block, CHUNK=chunk, num_warps=4,
    )
    return edge_index, edge_type, rowptr
