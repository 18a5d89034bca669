"""Dialogue datasets, padded/packed batches and loaders.

* :class:`DialogueDataset` serves the dialogues of one split with their availability masks.
* :func:`collate_dialogues` pads a list of dialogues into a :class:`DialogueBatch`.
* :meth:`DialogueBatch.packed` converts it to the varlen form (:class:`PackedBatch`) used by the
  fused kernels: utterances of all dialogues concatenated, with ``cu_seqlens``.
* :func:`make_loader` builds a ``torch.utils.data.DataLoader`` for one epoch.

Masks and seeds
---------------
Utterance-level protocols (``gcnet``, ``fixed``, ``none``) are drawn once per epoch for all
utterances of the split, in split order, with a generator seeded by ``(seed, epoch, split)``, so the
masks do not depend on shuffling, batch size or workers, and a new epoch gives new masks (GCNet
redraws every epoch). Batch-level protocols (``imder``) are drawn per batch with a generator
seeded by ``(seed, epoch, split, batch index)``; batch order comes from ``(seed, epoch, split)``.

Padding conventions
-------------------
``features`` (model input) are zero where a modality is unavailable and on padding;
``ground_truth`` holds the unmasked features (zero on padding only). ``availability`` is False on
padding, ``utterance_mask`` is True on real utterances, ``speakers`` are 0 on padding, and
``labels`` are ``-100`` on padding for classification (``torch.nn.CrossEntropyLoss``'s default
``ignore_index``) and ``0.0`` for regression (use ``utterance_mask``). A modality the corpus does
not have gets no entry in ``features`` and is unavailable everywhere.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .corpus import MODALITIES, Corpus, Dialogue
from .missing import MissingProtocol, make_protocol

__all__ = ["DialogueItem", "DialogueBatch", "PackedBatch", "DialogueDataset", "collate_dialogues",
           "make_loader", "make_rng", "CLASSIFICATION_PAD_LABEL", "REGRESSION_PAD_LABEL"]

CLASSIFICATION_PAD_LABEL = -100
"""Label of padded positions in classification batches (CrossEntropyLoss's ``ignore_index``)."""
REGRESSION_PAD_LABEL = 0.0
"""Label of padded positions in regression batches (mask them with ``utterance_mask``)."""


def make_rng(seed: int, *keys: Union[int, str]) -> np.random.Generator:
    """A generator seeded by ``seed`` and further integer/string keys (strings are CRC32-hashed)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    ent = [int(seed)]
    for k in keys:
        if isinstance(k, str):
            ent.append(zlib.crc32(k.encode()))
        else:
            if int(k) < 0:
                raise ValueError(f"seed key: expected non-negative integers, got {k!r}")
            ent.append(int(k))
    return np.random.default_rng(np.random.SeedSequence(ent))


@dataclass(eq=False)
class DialogueItem:
    """One dialogue as served by :class:`DialogueDataset` (numpy arrays).

    ``availability`` is ``bool [L, 3]``, or None when a batch-level protocol decides it at
    collation time.
    """

    id: str
    features: Dict[str, np.ndarray]
    availability: Optional[np.ndarray]
    speakers: np.ndarray
    labels: np.ndarray

    @property
    def length(self) -> int:
        return int(self.labels.shape[0])


def _map_tensors(obj, fn):
    kwargs = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            v = fn(v)
        elif isinstance(v, dict):
            v = {k: fn(t) if isinstance(t, torch.Tensor) else t for k, t in v.items()}
        kwargs[f.name] = v
    return replace(obj, **kwargs)


@dataclass(eq=False)
class PackedBatch:
    """Varlen form of a :class:`DialogueBatch`: the ``N`` real utterances concatenated.

    Attributes:
        features / ground_truth: modality -> ``[N, D_m]``.
        availability: ``bool [N, 3]``; speakers ``int64 [N]``; labels ``[N]``.
        cu_seqlens: ``int32 [B + 1]`` cumulative dialogue lengths (``cu_seqlens[-1] == N``).
        max_seqlen: longest dialogue.
        lengths: ``int64 [B]``.
        batch_index: ``int64 [N]`` dialogue of every utterance; position: ``int64 [N]`` its index in
            the dialogue; flat_index: ``int64 [N]`` its index in the flattened ``[B * L]`` padded
            layout (``batch_index * L + position``).
        padded_shape: ``(B, L)`` of the padded batch.
    """

    features: Dict[str, torch.Tensor]
    ground_truth: Dict[str, torch.Tensor]
    availability: torch.Tensor
    speakers: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: torch.Tensor
    batch_index: torch.Tensor
    position: torch.Tensor
    flat_index: torch.Tensor
    padded_shape: tuple
    dialogue_ids: List[str]
    task: str = "classification"

    @property
    def num_utterances(self) -> int:
        return int(self.availability.shape[0])

    def to_padded(self, x: torch.Tensor, fill: Union[int, float, bool] = 0) -> torch.Tensor:
        """Scatter a per-utterance tensor ``[N, ...]`` back to the padded layout ``[B, L, ...]``."""
        if x.shape[0] != self.num_utterances:
            raise ValueError(f"x: expected first dimension N={self.num_utterances}, got "
                             f"{tuple(x.shape)}")
        b, length = self.padded_shape
        out = x.new_full((b * length,) + tuple(x.shape[1:]), fill)
        out[self.flat_index.to(x.device)] = x
        return out.view((b, length) + tuple(x.shape[1:]))

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass(eq=False)
class DialogueBatch:
    """A padded batch of ``B`` dialogues of at most ``L`` utterances (see the module docstring).

    Attributes:
        features: modality -> ``float32 [B, L, D_m]`` model input (unavailable entries zeroed).
        ground_truth: modality -> ``float32 [B, L, D_m]`` unmasked features.
        availability: ``bool [B, L, 3]`` in MODALITIES order (False on padding).
        utterance_mask: ``bool [B, L]``.
        lengths: ``int64 [B]``.
        speakers: ``int64 [B, L]`` (0 on padding).
        labels: ``int64 [B, L]`` (-100 on padding) or ``float32 [B, L]`` (0.0 on padding).
        dialogue_ids: the ``B`` dialogue ids.
        task: ``"classification"`` or ``"regression"``.
    """

    features: Dict[str, torch.Tensor]
    ground_truth: Dict[str, torch.Tensor]
    availability: torch.Tensor
    utterance_mask: torch.Tensor
    lengths: torch.Tensor
    speakers: torch.Tensor
    labels: torch.Tensor
    dialogue_ids: List[str]
    task: str = "classification"

    @property
    def batch_size(self) -> int:
        return int(self.utterance_mask.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.utterance_mask.shape[1])

    @property
    def num_utterances(self) -> int:
        return int(self.lengths.sum().item()) if self.lengths.numel() else 0

    @property
    def modalities(self) -> tuple:
        return tuple(m for m in MODALITIES if m in self.features)

    def to(self, device, non_blocking: bool = False) -> "DialogueBatch":
        """A copy with every tensor on ``device``."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "DialogueBatch":
        """A copy in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return _map_tensors(self, lambda t: t.pin_memory())

    def missing_fraction(self) -> float:
        """Fraction of unavailable (utterance, modality) entries over real utterances and the batch's modalities."""
        n = self.num_utterances
        if n == 0:
            return 0.0
        columns = [MODALITIES.index(m) for m in MODALITIES if m in self.features]
        avail = self.availability[self.utterance_mask][:, columns]
        return float(1.0 - avail.float().mean().item())

    def packed(self) -> PackedBatch:
        """The varlen form: real utterances concatenated dialogue by dialogue."""
        b, length = self.utterance_mask.shape
        mask = self.utterance_mask
        dev = mask.device
        flat_index = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
        batch_index = torch.div(flat_index, max(length, 1), rounding_mode="floor")
        position = flat_index - batch_index * length
        cu = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        if b:
            cu[1:] = torch.cumsum(self.lengths.to(dev), 0).to(torch.int32)

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape((b * length,) + tuple(x.shape[2:]))[flat_index]

        return PackedBatch(
            features={m: flat(x) for m, x in self.features.items()},
            ground_truth={m: flat(x) for m, x in self.ground_truth.items()},
            availability=flat(self.availability), speakers=flat(self.speakers),
            labels=flat(self.labels), cu_seqlens=cu,
            max_seqlen=int(self.lengths.max().item()) if b else 0,
            lengths=self.lengths.clone(), batch_index=batch_index, position=position,
            flat_index=flat_index, padded_shape=(b, length),
            dialogue_ids=list(self.dialogue_ids), task=self.task)


def collate_dialogues(items: Sequence[Union[DialogueItem, Dialogue]], *,
                      missing: Union[str, MissingProtocol, None] = None,
                      rng: Optional[np.random.Generator] = None,
                      batch_index: Optional[int] = None, num_batches: Optional[int] = None,
                      feature_dims: Optional[Dict[str, int]] = None, task: Optional[str] = None,
                      pad_length: Optional[int] = None) -> DialogueBatch:
    """Pad dialogues into a :class:`DialogueBatch`.

    Args:
        items: :class:`DialogueItem` (from :class:`DialogueDataset`) or plain
            :class:`~imer_fast.data.corpus.Dialogue` objects (all modalities available).
        missing: protocol used for items without availability (batch-level protocols such as
            ``imder`` need ``rng``, ``batch_index`` and ``num_batches``). None: all available.
        rng: generator for ``missing`` (default: seeded by ``batch_index``).
        feature_dims, task: needed only to build an empty batch (``items == []``).
        pad_length: pad to at least this many utterances (e.g. a fixed shape for CUDA graphs).
    """
    items = [_as_item(x) for x in items]
    if not items:
        if feature_dims is None or task is None:
            raise ValueError("items: cannot collate an empty list without feature_dims and task")
        dims = {m: int(feature_dims[m]) for m in MODALITIES if m in feature_dims}
        length = int(pad_length or 0)
        return _build([], dims, task, length)
    dims = {m: int(items[0].features[m].shape[1]) for m in MODALITIES if m in items[0].features}
    for it in items:
        if set(it.features) != set(dims):
            raise ValueError(f"items: dialogue {it.id!r} has modalities {sorted(it.features)}; "
                             f"expected {sorted(dims)} like {items[0].id!r}")
        for m, d in dims.items():
            if it.features[m].shape[1] != d:
                raise ValueError(f"items: dialogue {it.id!r}: {m} dims inconsistent: expected "
                                 f"D={d}, got {it.features[m].shape[1]}")
    kinds = {it.labels.dtype.kind for it in items}
    inferred = "classification" if kinds <= set("iub") else "regression"
    if task is None:
        task = inferred
    elif task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    elif task == "classification" and inferred == "regression":
        bad = next(it for it in items if it.labels.dtype.kind not in "iub")
        raise ValueError(f"task: 'classification' needs integer labels; dialogue {bad.id!r} has "
                         f"{bad.labels.dtype} labels (regression targets would be truncated)")
    protocol = make_protocol(missing) if missing is not None else None
    need = [i for i, it in enumerate(items) if it.availability is None]
    if need:
        total = sum(items[i].length for i in need)
        if protocol is None:
            avail = np.ones((total, len(MODALITIES)), dtype=bool)
        else:
            if rng is None:
                rng = make_rng(0, "collate", int(batch_index or 0))
            avail = np.asarray(protocol.sample(total, rng, batch_index=batch_index, num_batches=num_batches,
                                               present=present_modalities(dims)), dtype=bool)
        start = 0
        for i in need:
            n = items[i].length
            items[i] = replace(items[i], availability=avail[start:start + n])
            start += n
    length = max(it.length for it in items)
    if pad_length is not None:
        length = max(length, int(pad_length))
    return _build(items, dims, task, length)


def present_modalities(feature_dims) -> np.ndarray:
    """bool ``[3]`` in MODALITIES order: which modalities ``feature_dims`` (a corpus's or a batch's) has."""
    return np.array([m in feature_dims for m in MODALITIES], dtype=bool)


def _as_item(x) -> DialogueItem:
    if isinstance(x, DialogueItem):
        return x
    if isinstance(x, Dialogue):
        return DialogueItem(id=x.id, features=x.features, availability=None, speakers=x.speakers,
                            labels=x.labels)
    raise ValueError(f"items: expected DialogueItem or Dialogue objects, got {type(x).__name__}")


def _build(items: List[DialogueItem], dims: Dict[str, int], task: str, length: int) -> DialogueBatch:
    b = len(items)
    nm = len(MODALITIES)
    gt = {m: np.zeros((b, length, d), dtype=np.float32) for m, d in dims.items()}
    avail = np.zeros((b, length, nm), dtype=bool)
    umask = np.zeros((b, length), dtype=bool)
    speakers = np.zeros((b, length), dtype=np.int64)
    if task == "classification":
        labels = np.full((b, length), CLASSIFICATION_PAD_LABEL, dtype=np.int64)
    else:
        labels = np.full((b, length), REGRESSION_PAD_LABEL, dtype=np.float32)
    present = present_modalities(dims)
    for i, it in enumerate(items):
        n = it.length
        for m in dims:
            gt[m][i, :n] = it.features[m]
        a = np.asarray(it.availability, dtype=bool)
        if a.shape != (n, nm):
            raise ValueError(f"availability of dialogue {it.id!r}: expected shape ({n}, {nm}), got "
                             f"{a.shape}")
        avail[i, :n] = a & present
        umask[i, :n] = True
        speakers[i, :n] = it.speakers
        labels[i, :n] = it.labels
    feats = {m: gt[m] * avail[..., MODALITIES.index(m), None] for m in dims}
    return DialogueBatch(
        features={m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in feats.items()},
        ground_truth={m: torch.from_numpy(x) for m, x in gt.items()},
        availability=torch.from_numpy(avail), utterance_mask=torch.from_numpy(umask),
        lengths=torch.tensor([it.length for it in items], dtype=torch.int64),
        speakers=torch.from_numpy(speakers), labels=torch.from_numpy(labels),
        dialogue_ids=[it.id for it in items], task=task)


class DialogueDataset(Dataset):
    """The dialogues of one split with their availability masks (a ``torch`` map-style dataset).

    Args:
        corpus: the corpus.
        split: ``"train"``, ``"valid"`` or ``"test"`` (a split the corpus lacks is empty).
        missing: a :class:`~imer_fast.data.missing.MissingProtocol`, a protocol string such as
            ``"gcnet:0.3"``, or None (everything available).
        seed: seed of the masks.
        epoch: epoch whose masks are drawn (change it with :meth:`set_epoch`).

    Items are :class:`DialogueItem` objects; use :meth:`collate` (or :func:`collate_dialogues`)
    as the ``collate_fn``.
    """

    def __init__(self, corpus: Corpus, split: str, missing: Union[str, MissingProtocol, None] = None,
                 seed: int = 0, epoch: int = 0):
        self.corpus = corpus
        self.split = split
        self.dialogues: List[Dialogue] = corpus.split(split)
        self.protocol: MissingProtocol = make_protocol(missing)
        self.seed = int(seed)
        make_rng(self.seed)  # validates the seed
        self._availability: Optional[List[np.ndarray]] = None
        self.epoch = -1
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the availability masks of utterance-level protocols for ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)
        if self.protocol.level != "utterance":
            self._availability = None
            return
        total = sum(d.length for d in self.dialogues)
        rng = make_rng(self.seed, self.epoch, "availability", self.split)
        avail = np.asarray(self.protocol.sample(total, rng, present=present_modalities(self.corpus.feature_dims)),
                           dtype=bool)
        out, start = [], 0
        for d in self.dialogues:
            out.append(avail[start:start + d.length])
            start += d.length
        self._availability = out

    @property
    def availability(self) -> Optional[List[np.ndarray]]:
        """Per-dialogue availability of the current epoch (None for batch-level protocols)."""
        return self._availability

    def __len__(self) -> int:
        return len(self.dialogues)

    def __getitem__(self, index: int) -> DialogueItem:
        d = self.dialogues[index]
        avail = None if self._availability is None else self._availability[index]
        return DialogueItem(id=d.id, features=d.features, availability=avail, speakers=d.speakers,
                            labels=d.labels)

    def collate(self, items: Sequence[DialogueItem], batch_index: Optional[int] = None,
                num_batches: Optional[int] = None, pad_length: Optional[int] = None
                ) -> DialogueBatch:
        """Collate items of this dataset (batch-level protocols need the batch position)."""
        rng = None
        if self.protocol.level == "batch":
            if batch_index is None or num_batches is None:
                raise ValueError(f"collate: protocol {self.protocol.spec!r} is batch-level; pass "
                                 f"batch_index and num_batches (make_loader does)")
            rng = make_rng(self.seed, self.epoch, "batch", self.split, int(batch_index))
        return collate_dialogues(items, missing=self.protocol, rng=rng, batch_index=batch_index,
                                 num_batches=num_batches, feature_dims=self.corpus.feature_dims,
                                 task=self.corpus.task, pad_length=pad_length)


class _EpochBatches(Dataset):
    """Dataset whose item ``b`` is the collated batch ``b`` of one epoch."""

    def __init__(self, dataset: DialogueDataset, batches: List[List[int]],
                 pad_length: Optional[int]):
        self.dataset = dataset
        self.batches = batches
        self.pad_length = pad_length

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> DialogueBatch:
        idx = self.batches[b]
        return self.dataset.collate([self.dataset[i] for i in idx], batch_index=b,
                                    num_batches=len(self.batches), pad_length=self.pad_length)


def _identity(x):
    return x


def make_loader(corpus: Corpus, split: str, batch_size: int, shuffle: bool = False,
                missing: Union[str, MissingProtocol, None] = None, seed: int = 0, epoch: int = 0,
                *, num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False,
                pad_length: Optional[int] = None) -> DataLoader:
    """A ``DataLoader`` yielding the :class:`DialogueBatch` es of one epoch.

    The batch order (shuffled with ``(seed, epoch, split)`` when ``shuffle``) and every mask are
    fixed by ``(seed, epoch)``, independently of ``num_workers``; build one loader per epoch
    (``make_loader(..., epoch=e)``) to get GCNet's per-epoch redrawn masks. An empty split gives a
    loader with no batches. The :class:`DialogueDataset` is ``loader.dataset.dataset``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    ds = DialogueDataset(corpus, split, missing=missing, seed=seed, epoch=epoch)
    n = len(ds)
    order = (make_rng(int(seed), int(epoch), "order", split).permutation(n) if shuffle
             else np.arange(n))
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return DataLoader(_EpochBatches(ds, batches, pad_length), batch_size=None, shuffle=False,
                      num_workers=num_workers, collate_fn=_identity, pin_memory=pin_memory)
