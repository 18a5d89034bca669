"""MMSA ``aligned_50.pkl`` / ``unaligned_50.pkl`` format (CMU-MOSI, CMU-MOSEI).

The pickle is a dict ``data[split]`` for ``split`` in ``train``/``valid``/``test``; every split is
a dict with

* ``text`` ``(N, T, 768)`` text features, ``text_bert`` ``(N, 3, T)`` BERT inputs (token ids,
  attention mask, segment ids), ``raw_text`` ``(N,)`` transcripts,
* ``audio`` ``(N, T_a, D_a)`` and ``vision`` ``(N, T_v, D_v)`` sequences (MOSI ``D_a = 5``,
  ``D_v = 20``; MOSEI 74 and 35; ``T = 50`` when aligned to the words),
* ``id`` ``(N,)`` clip ids ``<video id>$_$<clip id>``, ``regression_labels`` ``(N,)`` sentiment in
  ``[-3, 3]`` (MMSA also stores ``classification_labels``),
* ``audio_lengths`` / ``vision_lengths`` (the unaligned file only).

These are utterance-level samples, not dialogues. :func:`read_mmsa` returns an
:class:`MMSADataset` with per-split sequence arrays, lengths, labels and ids;
:meth:`MMSADataset.to_corpus` groups the clips of each video into a dialogue (mean-pooled
utterance vectors) for the conversation models, and :meth:`MMSADataset.from_corpus` expands a
dialogue corpus into sequences (used by :func:`write_mmsa` and the synthetic generator).

Reading conventions
-------------------
* ``-inf`` values of ``audio`` and ``vision`` are set to 0 (as MMSA does; COVAREP features hold
  ``-inf`` for silent frames).
* Lengths: ``text`` lengths are the sums of the ``text_bert`` attention masks (``T`` without
  ``text_bert``); ``audio``/``vision`` lengths come from ``*_lengths`` when present, else they equal
  the text lengths (aligned data).
* Grouping: the video id is the part of ``id`` before ``$_$`` (else before the last ``_``; an id
  without either is a video of one clip). Clips are ordered by clip id when every clip id is an
  integer, else they keep their file order. A video occurring in more than one split becomes one
  dialogue per split, named ``<video>@<split>``. Utterances are named ``<video>_<clip>``.
* Pooling (``to_corpus(pool=...)``): ``"nonzero"`` (default) averages the time steps that are not
  all-zero, so it is correct whatever side the padding is on; ``"lengths"`` averages the first
  ``length`` steps; ``"all"`` averages every step.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..corpus import MODALITIES, SPLIT_NAMES, Corpus, Dialogue
from ._common import PathLike, dump_pickle, load_pickle, numeric_array, to_str

__all__ = ["MMSASplit", "MMSADataset", "read_mmsa", "write_mmsa", "MMSA_DIMS", "MMSA_KEY"]

MMSA_DIMS = {"mosi": {"text": 768, "audio": 5, "video": 20},
             "mosei": {"text": 768, "audio": 74, "video": 35}}
"""Feature dimensions of MMSA's aligned CMU-MOSI and CMU-MOSEI files."""

MMSA_KEY = {"text": "text", "audio": "audio", "video": "vision"}
"""Pickle key of every modality."""

_SEP = "$_$"


@dataclass(eq=False)
class MMSASplit:
    """One split of an MMSA file.

    Attributes:
        features: modality -> ``float32 [N, T_m, D_m]`` sequences.
        lengths: modality -> ``int64 [N]`` valid lengths.
        labels: ``[N]``; ``float32`` regression labels or ``int64`` classification labels.
        ids: ``N`` clip ids (``<video>$_$<clip>``).
        raw_text: ``N`` transcripts.
        text_bert: ``float32 [N, 3, T]`` BERT inputs, or None.
    """

    features: Dict[str, np.ndarray]
    lengths: Dict[str, np.ndarray]
    labels: np.ndarray
    ids: List[str]
    raw_text: List[str]
    text_bert: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = int(np.asarray(self.labels).shape[0])
        for m, x in self.features.items():
            if x.ndim != 3 or x.shape[0] != n:
                raise ValueError(f"MMSASplit.features[{m!r}]: expected [N={n}, T, D], got {x.shape}")
            if m not in self.lengths or self.lengths[m].shape != (n,):
                raise ValueError(f"MMSASplit.lengths[{m!r}]: expected shape ({n},)")
        if len(self.ids) != n or len(self.raw_text) != n:
            raise ValueError(f"MMSASplit: expected {n} ids and raw_text entries, got {len(self.ids)} "
                             f"and {len(self.raw_text)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        shapes = {m: tuple(x.shape) for m, x in self.features.items()}
        return f"MMSASplit(N={len(self)}, features={shapes}, labels={self.labels.dtype})"

    def as_torch(self) -> Dict[str, object]:
        """Torch tensors: ``{modality: [N, T, D]}``, ``"lengths"``, ``"labels"``, ``"ids"``."""
        import torch

        out: Dict[str, object] = {m: torch.from_numpy(x) for m, x in self.features.items()}
        out["lengths"] = {m: torch.from_numpy(v) for m, v in self.lengths.items()}
        out["labels"] = torch.from_numpy(self.labels)
        out["ids"] = list(self.ids)
        if self.text_bert is not None:
            out["text_bert"] = torch.from_numpy(self.text_bert)
        return out


def _split_id(clip_id: str):
    if _SEP in clip_id:
        vid, clip = clip_id.split(_SEP, 1)
    elif "_" in clip_id:
        vid, clip = clip_id.rsplit("_", 1)
    else:
        vid, clip = clip_id, "0"
    return vid, clip


def _pool(x: np.ndarray, length: int, pool: str) -> np.ndarray:
    if pool == "nonzero":
        rows = x[np.any(x != 0, axis=1)]
    elif pool == "lengths":
        rows = x[:length]
    else:
        rows = x
    if rows.shape[0] == 0:
        return np.zeros(x.shape[1], dtype=np.float32)
    return rows.astype(np.float64).mean(axis=0).astype(np.float32)


@dataclass(eq=False)
class MMSADataset:
    """Contents of an MMSA pickle: per-split utterance sequences.

    Attributes:
        name: dataset name.
        aligned: whether all modalities share the word-aligned length (``aligned_50.pkl``).
        splits: split name -> :class:`MMSASplit`.
        task: ``"regression"`` or ``"classification"`` (from the label key that was read).
    """

    name: str
    aligned: bool
    splits: Dict[str, MMSASplit]
    task: str = "regression"
    metadata: Dict[str, object] = field(default_factory=dict)

    @property
    def feature_dims(self) -> Dict[str, int]:
        for s in self.splits.values():
            return {m: int(x.shape[2]) for m, x in s.features.items()}
        return {}

    @property
    def seq_lens(self) -> Dict[str, int]:
        for s in self.splits.values():
            return {m: int(x.shape[1]) for m, x in s.features.items()}
        return {}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(v)}" for s, v in self.splits.items())
        return (f"MMSADataset(name={self.name!r}, aligned={self.aligned}, task={self.task!r}, "
                f"splits=({sizes}), feature_dims={self.feature_dims}, seq_lens={self.seq_lens})")

    def split(self, name: str) -> MMSASplit:
        if name not in self.splits:
            raise KeyError(f"split: expected one of {sorted(self.splits)}, got {name!r}")
        return self.splits[name]

    # --------------------------------------------------------------- grouping
    def to_corpus(self, pool: str = "nonzero", name: Optional[str] = None,
                  num_classes: Optional[int] = None,
                  label_names: Optional[Sequence[str]] = None) -> Corpus:
        """Group clips into dialogues by video id and mean-pool every sequence (see module doc)."""
        if pool not in ("nonzero", "lengths", "all"):
            raise ValueError(f"pool: expected 'nonzero', 'lengths' or 'all', got {pool!r}")
        # video -> splits it occurs in
        occurs: Dict[str, List[str]] = {}
        for sname, sp in self.splits.items():
            for cid in sp.ids:
                vid = _split_id(cid)[0]
                lst = occurs.setdefault(vid, [])
                if sname not in lst:
                    lst.append(sname)
        dialogues: Dict[str, Dialogue] = {}
        splits: Dict[str, List[str]] = {}
        for sname, sp in self.splits.items():
            groups: Dict[str, List[int]] = {}
            for i, cid in enumerate(sp.ids):
                groups.setdefault(_split_id(cid)[0], []).append(i)
            order: List[str] = []
            for vid, idx in groups.items():
                clips = [_split_id(sp.ids[i])[1] for i in idx]
                if all(c.lstrip("-").isdigit() for c in clips):
                    idx = [i for _, i in sorted(zip((int(c) for c in clips), idx),
                                                key=lambda t: t[0])]
                    clips = [_split_id(sp.ids[i])[1] for i in idx]
                did = vid if len(occurs[vid]) == 1 else f"{vid}@{sname}"
                feats = {m: np.stack([_pool(sp.features[m][i], int(sp.lengths[m][i]), pool)
                                      for i in idx]) for m in sp.features}
                sents = [sp.raw_text[i] for i in idx]
                dialogues[did] = Dialogue(
                    id=did, features=feats, labels=sp.labels[idx],
                    speakers=np.zeros(len(idx), dtype=np.int64),
                    sentences=None if all(s == "" for s in sents) else sents,
                    utterance_ids=[f"{vid}_{c}" for c in clips])
                order.append(did)
            splits[sname] = order
        if self.task == "classification":
            observed = max((int(d.labels.max()) for d in dialogues.values()), default=1) + 1
            nc = int(num_classes) if num_classes is not None else max(observed, 2)
        else:
            nc = 1
        return Corpus(name=name or self.name, dialogues=dialogues, splits=splits, task=self.task,
                      num_classes=nc, label_names=list(label_names) if label_names else None,
                      feature_dims=self.feature_dims, num_speakers=1)

    @classmethod
    def from_corpus(cls, corpus: Corpus, *, seq_len: int = 50, aligned: bool = True,
                    seed: int = 0, temporal_noise: float = 0.5, min_len: int = 1
                    ) -> "MMSADataset":
        """Expand a dialogue corpus into MMSA-style utterance sequences.

        Utterance ``i`` of dialogue ``d`` becomes clip ``<d>$_$<k>`` where ``k`` is the utterance
        name without its ``<d>_`` prefix (or the utterance name when it has none). Each utterance
        vector ``v`` becomes a right-padded sequence of ``l`` steps ``v + e_t - mean(e)`` with
        Gaussian ``e_t`` (standard deviation ``temporal_noise`` times the modality's feature
        standard deviation), so averaging the ``l`` valid steps gives back ``v`` (to float32
        rounding). ``l`` is drawn uniformly from ``[min_len, seq_len]``; aligned data uses one
        ``l`` for all modalities, unaligned data one per modality. ``text_bert`` holds
        placeholder token ids (hashes of the words) with its attention mask.
        """
        if seq_len < 1 or not 1 <= min_len <= seq_len:
            raise ValueError(f"seq_len/min_len: expected 1 <= min_len <= seq_len, got min_len="
                             f"{min_len}, seq_len={seq_len}")
        rng = np.random.default_rng([int(seed), zlib.crc32(corpus.name.encode())])
        mods = corpus.modalities
        stds = {}
        for m in mods:
            allx = [d.features[m] for d in corpus.dialogues.values()]
            stds[m] = float(np.concatenate(allx).std()) if allx else 1.0
        splits: Dict[str, MMSASplit] = {}
        for sname in SPLIT_NAMES:
            if sname not in corpus.splits:
                continue
            dlgs = corpus.split(sname)
            n = sum(d.length for d in dlgs)
            feats = {m: np.zeros((n, seq_len, corpus.feature_dims[m]), np.float32) for m in mods}
            lengths = {m: np.zeros(n, np.int64) for m in mods}
            text_bert = np.zeros((n, 3, seq_len), np.float32)
            ids: List[str] = []
            raw: List[str] = []
            labels = []
            row = 0
            for d in dlgs:
                names = d.utterance_names()
                for i in range(d.length):
                    u = names[i]
                    clip = u[len(d.id) + 1:] if u.startswith(d.id + "_") and len(u) > len(d.id) + 1 \
                        else u
                    ids.append(f"{d.id}{_SEP}{clip}")
                    raw.append(d.sentences[i] if d.sentences is not None else "")
                    labels.append(d.labels[i])
                    shared = int(rng.integers(min_len, seq_len + 1))
                    for m in mods:
                        ln = shared if aligned else int(rng.integers(min_len, seq_len + 1))
                        v = d.features[m][i].astype(np.float64)
                        e = rng.standard_normal((ln, v.shape[0])) * (temporal_noise * stds[m])
                        e -= e.mean(axis=0, keepdims=True)
                        feats[m][row, :ln] = (v + e).astype(np.float32)
                        lengths[m][row] = ln
                    tl = int(lengths["text"][row]) if "text" in mods else shared
                    text_bert[row, 0, :tl] = _token_ids(raw[-1], tl)
                    text_bert[row, 1, :tl] = 1.0
                    row += 1
            lab = np.asarray(labels, dtype=np.int64 if corpus.task == "classification"
                             else np.float32).reshape(n)
            splits[sname] = MMSASplit(features=feats, lengths=lengths, labels=lab, ids=ids,
                                      raw_text=raw, text_bert=text_bert)
        return cls(name=corpus.name, aligned=aligned, splits=splits, task=corpus.task,
                   metadata={"source": "from_corpus", "seq_len": seq_len, "seed": seed})


def _token_ids(sentence: str, length: int) -> np.ndarray:
    """Placeholder BERT ids: [CLS]=101, hashed word ids in [1000, 30000), [SEP]=102, cycled."""
    words = sentence.split() or ["[UNK]"]
    out = np.empty(length, np.float32)
    out[0] = 101.0
    for t in range(1, length):
        out[t] = 1000 + zlib.crc32(words[(t - 1) % len(words)].encode()) % 29000
    if length > 1:
        out[length - 1] = 102.0
    return out


def read_mmsa(path: PathLike, name: Optional[str] = None, *,
              label_key: str = "regression_labels") -> MMSADataset:
    """Read an MMSA ``aligned_50.pkl``/``unaligned_50.pkl`` file.

    Args:
        path: the pickle.
        name: dataset name (default: the name of the folder holding the file, e.g. ``MOSI``).
        label_key: ``"regression_labels"`` (default; regression) or ``"classification_labels"``.

    Returns:
        An :class:`MMSADataset`; the file is unaligned when its splits hold ``audio_lengths``.
    """
    path = Path(path)
    what = f"MMSA pickle {str(path)!r}"
    data = load_pickle(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a dict keyed by split name, got {type(data).__name__}")
    present = [s for s in SPLIT_NAMES if s in data]
    if not present:
        raise ValueError(f"{what}: expected split keys among {SPLIT_NAMES}, got {sorted(data)}")
    if label_key not in ("regression_labels", "classification_labels"):
        raise ValueError(f"label_key: expected 'regression_labels' or 'classification_labels', got "
                         f"{label_key!r}")
    aligned_flags = set()
    splits: Dict[str, MMSASplit] = {}
    dims: Dict[str, int] = {}
    for sname in present:
        sp = data[sname]
        if not isinstance(sp, dict):
            raise ValueError(f"{what}: split {sname!r}: expected a dict, got {type(sp).__name__}")
        required = ["text", "audio", "vision", "id", label_key]
        missing = [k for k in required if k not in sp]
        if missing:
            raise ValueError(f"{what}: split {sname!r} lacks keys {missing}; expected {required} "
                             f"(got {sorted(sp)})")
        ids = [to_str(i) for i in np.asarray(sp["id"]).reshape(-1)]
        n = len(ids)   # every other array of the split is checked against the clip ids
        labels = numeric_array(sp[label_key], np.float64, f"{what}: split {sname!r}: {label_key!r}").reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"{what}: split {sname!r}: {label_key!r}: expected {n} labels (one per 'id'), got "
                             f"{labels.shape[0]}")
        if label_key == "classification_labels":
            fractional = np.flatnonzero(labels != np.round(labels))
            if fractional.size:
                raise ValueError(f"{what}: split {sname!r}: {label_key!r}: class labels must be integers; clip "
                                 f"{ids[fractional[0]]!r} has {labels[fractional[0]]}")
            labels = labels.astype(np.int64)
        else:
            labels = labels.astype(np.float32)
        feats = {}
        for m, key in MMSA_KEY.items():
            # numeric_array copies: the -inf cleaning below must not touch `data`
            x = numeric_array(sp[key], np.float32, f"{what}: split {sname!r}: {key!r}")
            if x.ndim != 3 or x.shape[0] != n:
                raise ValueError(f"{what}: split {sname!r}: {key!r}: expected shape [N={n} (one per 'id'), T, D], "
                                 f"got {x.shape}")
            if m != "text":
                x[np.isneginf(x)] = 0.0
            if m in dims and dims[m] != x.shape[2]:
                raise ValueError(f"{what}: split {sname!r}: {key!r}: dims inconsistent: expected "
                                 f"D={dims[m]} (as other splits), got {x.shape[2]}")
            dims.setdefault(m, int(x.shape[2]))
            feats[m] = x
        text_bert = None
        if "text_bert" in sp:
            text_bert = numeric_array(sp["text_bert"], np.float32, f"{what}: split {sname!r}: 'text_bert'")
            if text_bert.ndim != 3 or text_bert.shape[:2] != (n, 3):
                raise ValueError(f"{what}: split {sname!r}: 'text_bert': expected shape [N={n}, 3, "
                                 f"T], got {text_bert.shape}")
            text_len = text_bert[:, 1, :].sum(axis=1).round().astype(np.int64)
        else:
            text_len = np.full(n, feats["text"].shape[1], np.int64)
        unaligned = "audio_lengths" in sp or "vision_lengths" in sp
        aligned_flags.add(not unaligned)
        lengths = {"text": text_len}
        for m, key in (("audio", "audio_lengths"), ("video", "vision_lengths")):
            if key in sp:
                ln = np.asarray(sp[key]).reshape(-1).astype(np.int64)
                if ln.shape[0] != n:
                    raise ValueError(f"{what}: split {sname!r}: {key!r}: expected {n} lengths, got "
                                     f"{ln.shape[0]}")
                steps = feats[m].shape[1]
                bad = np.flatnonzero((ln < 0) | (ln > steps))
                if bad.size:
                    raise ValueError(f"{what}: split {sname!r}: {key!r}: lengths must lie in [0, {steps}] (the "
                                     f"sequences' length); clip {ids[bad[0]]!r} has {ln[bad[0]]}")
                lengths[m] = ln
            else:
                lengths[m] = text_len.copy()
        raw = [to_str(t) for t in np.asarray(sp["raw_text"]).reshape(-1)] if "raw_text" in sp \
            else [""] * n
        splits[sname] = MMSASplit(features=feats, lengths=lengths, labels=labels, ids=ids,
                                  raw_text=raw, text_bert=text_bert)
    if len(aligned_flags) != 1:
        raise ValueError(f"{what}: some splits hold audio_lengths/vision_lengths and some do not")
    return MMSADataset(name=name if name is not None else (path.parent.name or path.stem),
                       aligned=aligned_flags.pop(), splits=splits,
                       task="regression" if label_key == "regression_labels" else "classification")


def write_mmsa(data: Union[MMSADataset, Corpus], path: PathLike, **from_corpus_kwargs
               ) -> Dict[str, Path]:
    """Write an :class:`MMSADataset` (or a corpus, expanded with :meth:`MMSADataset.from_corpus`
    and ``from_corpus_kwargs``) as an MMSA pickle.

    Every split gets ``text``, ``text_bert``, ``audio``, ``vision``, ``raw_text``, ``id``,
    ``regression_labels`` (and ``classification_labels`` for classification data), plus
    ``audio_lengths``/``vision_lengths`` when unaligned. Returns ``{"path": Path}``.
    """
    if isinstance(data, Corpus):
        missing = [m for m in MODALITIES if m not in data.feature_dims]
        if missing:
            raise ValueError(f"write_mmsa: the format stores text, audio and video; corpus "
                             f"{data.name!r} lacks {missing}")
        data = MMSADataset.from_corpus(data, **from_corpus_kwargs)
    elif from_corpus_kwargs:
        raise ValueError(f"write_mmsa: {sorted(from_corpus_kwargs)} only apply when writing a Corpus")
    out = {}
    for sname, sp in data.splits.items():
        d = {
            "text": sp.features["text"],
            "audio": sp.features["audio"],
            "vision": sp.features["video"],
            "raw_text": np.array(sp.raw_text, dtype=object),
            "id": np.array(sp.ids, dtype=object),
            "regression_labels": sp.labels.astype(np.float32),
        }
        if sp.text_bert is not None:
            d["text_bert"] = sp.text_bert
        if data.task == "classification":
            d["classification_labels"] = sp.labels.astype(np.int64)
        if not data.aligned:
            d["audio_lengths"] = [int(x) for x in sp.lengths["audio"]]
            d["vision_lengths"] = [int(x) for x in sp.lengths["video"]]
        out[sname] = d
    return {"path": dump_pickle(out, path)}
