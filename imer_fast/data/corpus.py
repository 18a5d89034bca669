"""Core in-memory types of the imer_fast data layer.

A :class:`Corpus` is a set of :class:`Dialogue` objects (conversations, or videos for CMU-MOSI /
CMU-MOSEI) with named splits. Every dialogue stores one feature vector per utterance and modality
(``features[m]`` is ``float32 [L, D_m]``), one label per utterance, one speaker index per utterance
and optionally the utterance transcripts.

Conventions used everywhere in imer_fast:

* :data:`MODALITIES` is the canonical modality order ``("text", "audio", "video")``; availability
  masks are ``[..., 3]`` in this order and pattern names use the one-letter codes ``t``, ``a``,
  ``v`` (see :data:`MODALITY_CODES`).
* Classification labels are ``int64`` in ``[0, num_classes)``; regression labels are ``float32``
  and the corpus has ``num_classes == 1``.
* Speakers are ``int64`` in ``[0, num_speakers)``.
* Split names are among :data:`SPLIT_NAMES` (``"train"``, ``"valid"``, ``"test"``); a corpus may
  lack some of them (IEMOCAP in the GCNet protocol has no validation split).

Stored features are never modified by missing-modality protocols: masks are applied when batches
are built, so the unmasked features are always available as reconstruction ground truth.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np

__all__ = [
    "MODALITIES",
    "MODALITY_CODES",
    "SPLIT_NAMES",
    "TASKS",
    "Dialogue",
    "Corpus",
    "corpus_differences",
    "assert_corpus_equal",
    "canonical_modality",
]

MODALITIES = ("text", "audio", "video")
"""Canonical modality order of imer_fast; availability masks are ``[..., 3]`` in this order."""

MODALITY_CODES = {"text": "t", "audio": "a", "video": "v"}
"""One-letter code of every modality (used in missing-pattern names such as ``"tv"``)."""

_MODALITY_ALIASES = {
    "text": "text", "t": "text", "l": "text", "language": "text", "lang": "text",
    "audio": "audio", "a": "audio", "acoustic": "audio",
    "video": "video", "v": "video", "vision": "video", "visual": "video",
}

SPLIT_NAMES = ("train", "valid", "test")
"""Split names a :class:`Corpus` may hold."""

TASKS = ("classification", "regression")


def canonical_modality(name: str) -> str:
    """Map a modality name or alias to its canonical name.

    Accepted aliases: ``t``/``l``/``language`` for text, ``a``/``acoustic`` for audio and
    ``v``/``vision``/``visual`` for video (FedDISC and IMDer call text ``l`` and video ``v``).
    """
    key = str(name).strip().lower()
    if key not in _MODALITY_ALIASES:
        raise ValueError(
            f"modality: expected one of {MODALITIES} (or an alias among "
            f"{sorted(_MODALITY_ALIASES)}), got {name!r}"
        )
    return _MODALITY_ALIASES[key]


def _require_finite(x: np.ndarray, where: str, utterance_ids: Optional[List[str]]) -> None:
    """A NaN or inf from a failed feature extraction would survive the missing-modality masks (0 * NaN is
    NaN) and poison the model input even where its modality counts as missing: refused at the source."""
    finite = np.isfinite(x)
    if finite.all():
        return
    row = int(np.flatnonzero(~finite.all(axis=1))[0])
    value = x[row][~finite[row]][0]
    name = f" ({utterance_ids[row]!r})" if utterance_ids is not None else ""
    raise ValueError(f"{where}: utterance {row}{name} holds a non-finite value ({value}); "
                     f"{int((~finite.all(axis=1)).sum())} utterance(s) affected in all")


def _as_labels(labels, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{where}.labels: expected a 1-D array [L], got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"{where}.labels: expected integer or float labels, got dtype {arr.dtype}")


@dataclass(eq=False)
class Dialogue:
    """One conversation (or one video of monologue clips).

    Attributes:
        id: dialogue identifier (the key of the dialogue in :attr:`Corpus.dialogues`).
        features: modality -> ``float32 [L, D_m]`` utterance-level features, modalities among
            :data:`MODALITIES`.
        labels: ``[L]``; ``int64`` class indices for classification, ``float32`` for regression.
        speakers: ``int64 [L]`` 0-based speaker index of every utterance.
        sentences: the ``L`` utterance transcripts, or ``None``.
        utterance_ids: the ``L`` utterance names (used as feature file names by the GCNet writer),
            or ``None`` (writers then name utterances ``<dialogue id>_<index>``).
        extras: free-form per-utterance arrays (first axis ``L``); the synthetic generator stores
            the clean latent state here (``"latent"``, ``"emotion_state"`` / ``"valence"``).

    Construction converts ``features`` to ``float32``, ``speakers`` to ``int64`` and labels to
    ``int64``/``float32`` and checks that all lengths agree (``L >= 1``). Equality is identity;
    compare contents with :func:`corpus_differences`.
    """

    id: str
    features: Dict[str, np.ndarray]
    labels: np.ndarray
    speakers: np.ndarray
    sentences: Optional[List[str]] = None
    utterance_ids: Optional[List[str]] = None
    extras: Dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"Dialogue {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Dialogue.id: expected a non-empty string, got {self.id!r}")
        if not isinstance(self.features, Mapping) or len(self.features) == 0:
            raise ValueError(f"{where}.features: expected a non-empty dict modality -> [L, D], "
                             f"got {type(self.features).__name__}")
        feats: Dict[str, np.ndarray] = {}
        for m in MODALITIES:  # canonical order
            if m in self.features:
                feats[m] = np.ascontiguousarray(np.asarray(self.features[m], dtype=np.float32))
        unknown = [m for m in self.features if m not in MODALITIES]
        if unknown:
            raise ValueError(f"{where}.features: unknown modalities {unknown}; expected keys among "
                             f"{MODALITIES}")
        self.features = feats
        self.labels = _as_labels(self.labels, where)
        length = int(self.labels.shape[0])
        if length < 1:
            raise ValueError(f"{where}.labels: a dialogue needs at least one utterance, got 0")
        for m, x in feats.items():
            if x.ndim != 2:
                raise ValueError(f"{where}.features[{m!r}]: expected a 2-D array [L, D], got shape "
                                 f"{x.shape}")
            if x.shape[0] != length:
                raise ValueError(f"{where}.features[{m!r}]: expected {length} rows (len(labels)), "
                                 f"got {x.shape[0]}")
        spk = np.asarray(self.speakers)
        if spk.ndim != 1 or spk.shape[0] != length:
            raise ValueError(f"{where}.speakers: expected shape ({length},) (len(labels)), got "
                             f"{spk.shape}")
        if spk.dtype.kind not in "iub":
            raise ValueError(f"{where}.speakers: expected integer speaker indices, got dtype "
                             f"{spk.dtype}")
        self.speakers = spk.astype(np.int64, copy=False)
        if length and self.speakers.min() < 0:
            raise ValueError(f"{where}.speakers: expected 0-based indices >= 0, got min "
                             f"{int(self.speakers.min())}")
        if self.sentences is not None:
            self.sentences = [str(s) for s in self.sentences]
            if len(self.sentences) != length:
                raise ValueError(f"{where}.sentences: expected {length} sentences (len(labels)), "
                                 f"got {len(self.sentences)}")
        if self.utterance_ids is not None:
            self.utterance_ids = [str(u) for u in self.utterance_ids]
            if len(self.utterance_ids) != length:
                raise ValueError(f"{where}.utterance_ids: expected {length} ids (len(labels)), got "
                                 f"{len(self.utterance_ids)}")
            if len(set(self.utterance_ids)) != length:
                raise ValueError(f"{where}.utterance_ids: ids must be unique within a dialogue")
        extras = {}
        for k, v in dict(self.extras).items():
            arr = np.asarray(v)
            if arr.ndim < 1 or arr.shape[0] != length:
                raise ValueError(f"{where}.extras[{k!r}]: expected first axis of length {length}, "
                                 f"got shape {arr.shape}")
            extras[k] = arr
        self.extras = extras
        for m, x in feats.items():   # after utterance_ids, which name the bad utterance
            _require_finite(x, f"{where}.features[{m!r}]", self.utterance_ids)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def length(self) -> int:
        """Number of utterances ``L``."""
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        dims = {m: int(x.shape[1]) for m, x in self.features.items()}
        return (f"Dialogue(id={self.id!r}, length={self.length}, feature_dims={dims}, "
                f"labels={self.labels.dtype}, speakers={sorted(set(self.speakers.tolist()))})")

    def utterance_names(self) -> List[str]:
        """The utterance ids, or ``<dialogue id>_<index>`` names when none are stored."""
        if self.utterance_ids is not None:
            return list(self.utterance_ids)
        width = max(3, len(str(self.length - 1)))
        return [f"{self.id}_{i:0{width}d}" for i in range(self.length)]


@dataclass(eq=False)
class Corpus:
    """A named collection of dialogues with splits.

    Attributes:
        name: corpus name (``"iemocap6"``, ``"mosi"``, ...).
        dialogues: dialogue id -> :class:`Dialogue`.
        splits: split name (among :data:`SPLIT_NAMES`) -> ordered list of dialogue ids.
        task: ``"classification"`` or ``"regression"``.
        num_classes: number of classes (``1`` for regression).
        label_names: ``num_classes`` class names, or ``None``.
        feature_dims: modality -> feature dimension ``D_m`` (modalities among :data:`MODALITIES`;
            every dialogue carries exactly these modalities).
        num_speakers: number of distinct speaker indices (speakers lie in ``[0, num_speakers)``).
        metadata: free-form information (the synthetic generator records its parameters here).

    ``__post_init__`` validates everything and raises ``ValueError`` naming the offending field,
    the expected and the received value. Equality is identity; compare contents with
    :func:`corpus_differences` / :func:`assert_corpus_equal`.
    """

    name: str
    dialogues: Dict[str, Dialogue]
    splits: Dict[str, List[str]]
    task: str
    num_classes: int
    label_names: Optional[List[str]]
    feature_dims: Dict[str, int]
    num_speakers: int
    metadata: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"Corpus {self.name!r}"
        if self.task not in TASKS:
            raise ValueError(f"{where}.task: expected one of {TASKS}, got {self.task!r}")
        self.num_classes = int(self.num_classes)
        if self.task == "regression" and self.num_classes != 1:
            raise ValueError(f"{where}.num_classes: expected 1 for a regression corpus, got "
                             f"{self.num_classes}")
        if self.task == "classification" and self.num_classes < 2:
            raise ValueError(f"{where}.num_classes: expected >= 2 for classification, got "
                             f"{self.num_classes}")
        if self.label_names is not None:
            self.label_names = [str(n) for n in self.label_names]
            if len(self.label_names) != self.num_classes:
                raise ValueError(f"{where}.label_names: expected {self.num_classes} names "
                                 f"(num_classes), got {len(self.label_names)}")
        if not self.feature_dims:
            raise ValueError(f"{where}.feature_dims: expected at least one modality among "
                             f"{MODALITIES}, got {self.feature_dims!r}")
        unknown = [m for m in self.feature_dims if m not in MODALITIES]
        if unknown:
            raise ValueError(f"{where}.feature_dims: unknown modalities {unknown}; expected keys "
                             f"among {MODALITIES}")
        self.feature_dims = {m: int(self.feature_dims[m]) for m in MODALITIES
                             if m in self.feature_dims}
        for m, d in self.feature_dims.items():
            if d < 1:
                raise ValueError(f"{where}.feature_dims[{m!r}]: expected a positive dimension, "
                                 f"got {d}")
        self.num_speakers = int(self.num_speakers)
        if self.num_speakers < 1:
            raise ValueError(f"{where}.num_speakers: expected >= 1, got {self.num_speakers}")
        want_kind = "i" if self.task == "classification" else "f"
        for key, dlg in self.dialogues.items():
            dwhere = f"{where}: dialogue {key!r}"
            if not isinstance(dlg, Dialogue):
                raise ValueError(f"{dwhere}: expected a Dialogue, got {type(dlg).__name__}")
            if dlg.id != key:
                raise ValueError(f"{dwhere}: Dialogue.id is {dlg.id!r}; expected it to equal its "
                                 f"key {key!r}")
            if set(dlg.features) != set(self.feature_dims):
                raise ValueError(f"{dwhere}.features: expected modalities "
                                 f"{sorted(self.feature_dims)} (feature_dims), got "
                                 f"{sorted(dlg.features)}")
            for m, d in self.feature_dims.items():
                got = dlg.features[m].shape[1]
                if got != d:
                    raise ValueError(f"{dwhere}.features[{m!r}]: dims inconsistent: expected D={d} "
                                     f"(feature_dims[{m!r}]), got {got}")
            if dlg.labels.dtype.kind != want_kind:
                if self.task == "regression" and dlg.labels.dtype.kind in "iu":
                    dlg.labels = dlg.labels.astype(np.float32)
                elif (self.task == "classification" and dlg.labels.dtype.kind == "f"
                      and np.all(dlg.labels == np.round(dlg.labels))):
                    dlg.labels = dlg.labels.astype(np.int64)
                else:
                    raise ValueError(f"{dwhere}.labels: expected {self.task} labels "
                                     f"({'int64' if want_kind == 'i' else 'float32'}), got dtype "
                                     f"{dlg.labels.dtype}")
            if self.task == "classification":
                lo, hi = int(dlg.labels.min()), int(dlg.labels.max())
                if lo < 0 or hi >= self.num_classes:
                    raise ValueError(f"{dwhere}.labels: expected class indices in [0, "
                                     f"{self.num_classes}), got range [{lo}, {hi}]")
            elif not np.all(np.isfinite(dlg.labels)):
                raise ValueError(f"{dwhere}.labels: regression labels must be finite")
            smax = int(dlg.speakers.max())
            if smax >= self.num_speakers:
                raise ValueError(f"{dwhere}.speakers: expected indices < num_speakers="
                                 f"{self.num_speakers}, got {smax}")
        splits: Dict[str, List[str]] = {}
        seen: Dict[str, str] = {}
        for split_name, ids in self.splits.items():
            if split_name not in SPLIT_NAMES:
                raise ValueError(f"{where}.splits: unknown split {split_name!r}; expected names "
                                 f"among {SPLIT_NAMES}")
            ids = [str(i) for i in ids]
            for did in ids:
                if did not in self.dialogues:
                    raise ValueError(f"{where}.splits[{split_name!r}]: dialogue id {did!r} does not "
                                     f"exist in dialogues")
                if did in seen:
                    raise ValueError(f"{where}.splits[{split_name!r}]: dialogue id {did!r} already "
                                     f"listed in split {seen[did]!r}")
                seen[did] = split_name
            splits[split_name] = ids
        self.splits = {s: splits[s] for s in SPLIT_NAMES if s in splits}

    # ------------------------------------------------------------------ queries
    @property
    def modalities(self) -> tuple:
        """The modalities of this corpus in canonical order."""
        return tuple(m for m in MODALITIES if m in self.feature_dims)

    def split(self, name: str) -> List[Dialogue]:
        """The dialogues of split ``name`` in split order.

        ``name`` must be one of :data:`SPLIT_NAMES`; a valid split the corpus does not hold (e.g.
        ``"valid"`` for IEMOCAP) yields an empty list.
        """
        if name not in SPLIT_NAMES:
            raise ValueError(f"split: expected one of {SPLIT_NAMES}, got {name!r}")
        return [self.dialogues[i] for i in self.splits.get(name, [])]

    def num_utterances(self, split: Optional[str] = None) -> int:
        """Number of utterances in ``split`` (all dialogues when ``None``)."""
        dialogues = self.dialogues.values() if split is None else self.split(split)
        return int(sum(d.length for d in dialogues))

    def lengths(self, split: Optional[str] = None) -> np.ndarray:
        """Dialogue lengths (``int64``) of ``split`` (all dialogues when ``None``)."""
        dialogues = list(self.dialogues.values()) if split is None else self.split(split)
        return np.array([d.length for d in dialogues], dtype=np.int64)

    def label_counts(self, split: Optional[str] = None) -> np.ndarray:
        """Per-class utterance counts (classification corpora only)."""
        if self.task != "classification":
            raise ValueError(f"label_counts: corpus {self.name!r} has task {self.task!r}; expected "
                             f"'classification'")
        dialogues = list(self.dialogues.values()) if split is None else self.split(split)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for d in dialogues:
            counts += np.bincount(d.labels, minlength=self.num_classes)
        return counts

    def subset(self, ids: Iterable[str], name: Optional[str] = None) -> "Corpus":
        """A corpus holding only the dialogues ``ids`` (splits are filtered accordingly)."""
        keep = [str(i) for i in ids]
        for i in keep:
            if i not in self.dialogues:
                raise ValueError(f"subset: dialogue id {i!r} does not exist in corpus {self.name!r}")
        keep_set = set(keep)
        return Corpus(
            name=name or self.name,
            dialogues={i: self.dialogues[i] for i in keep},
            splits={s: [i for i in ids_ if i in keep_set] for s, ids_ in self.splits.items()},
            task=self.task, num_classes=self.num_classes,
            label_names=None if self.label_names is None else list(self.label_names),
            feature_dims=dict(self.feature_dims), num_speakers=self.num_speakers,
            metadata=dict(self.metadata),
        )

    def with_modalities(self, modalities: Iterable[str], name: Optional[str] = None) -> "Corpus":
        """The same dialogues with only ``modalities``' features (names or aliases). Missing-modality
        masks are drawn over a corpus's modalities, so this is how a model of fewer modalities (DRKF's
        audio + text) gets GCNet's masks over its own modalities rather than over all three."""
        keep = [canonical_modality(m) for m in modalities]
        unknown = [m for m in keep if m not in self.feature_dims]
        if not keep or unknown or len(set(keep)) != len(keep):
            raise ValueError(f"with_modalities: expected distinct modalities among {self.modalities} of corpus "
                             f"{self.name!r}; got {list(modalities)}")
        dialogues = {i: dataclasses.replace(d, features={m: d.features[m] for m in keep})
                     for i, d in self.dialogues.items()}
        return Corpus(name=name or self.name, dialogues=dialogues,
                      splits={s: list(ids) for s, ids in self.splits.items()}, task=self.task,
                      num_classes=self.num_classes,
                      label_names=None if self.label_names is None else list(self.label_names),
                      feature_dims={m: self.feature_dims[m] for m in MODALITIES if m in keep},
                      num_speakers=self.num_speakers,
                      metadata=dict(self.metadata))

    def __repr__(self) -> str:  # concise: the default dataclass repr would print every array
        split_txt = ", ".join(f"{s}={len(v)}" for s, v in self.splits.items())
        return (f"Corpus(name={self.name!r}, task={self.task!r}, num_classes={self.num_classes}, "
                f"dialogues={len(self.dialogues)}, utterances={self.num_utterances()}, "
                f"splits=({split_txt}), feature_dims={self.feature_dims}, "
                f"num_speakers={self.num_speakers})")


def corpus_differences(a: Corpus, b: Corpus, *, atol: float = 0.0, check_names: bool = False,
                       check_split_order: bool = False, check_sentences: bool = True,
                       check_utterance_ids: bool = True,
                       check_label_names: bool = True) -> List[str]:
    """List the differences between two corpora (empty list: equal).

    Features and regression labels are compared with absolute tolerance ``atol`` (``0``: exact);
    classification labels and speakers exactly. Split order is ignored unless
    ``check_split_order`` (several formats store splits as sets). ``extras`` and ``metadata`` are
    not compared (no file format stores them).
    """
    diffs: List[str] = []
    if check_names and a.name != b.name:
        diffs.append(f"name: {a.name!r} != {b.name!r}")
    for attr in ("task", "num_classes", "feature_dims", "num_speakers"):
        if getattr(a, attr) != getattr(b, attr):
            diffs.append(f"{attr}: {getattr(a, attr)!r} != {getattr(b, attr)!r}")
    if check_label_names and a.label_names != b.label_names:
        diffs.append(f"label_names: {a.label_names!r} != {b.label_names!r}")
    if set(a.splits) != set(b.splits):
        diffs.append(f"split names: {sorted(a.splits)} != {sorted(b.splits)}")
    for s in set(a.splits) & set(b.splits):
        x, y = a.splits[s], b.splits[s]
        if (x != y) if check_split_order else (sorted(x) != sorted(y)):
            diffs.append(f"splits[{s!r}] differ ({len(x)} vs {len(y)} ids)")
    if set(a.dialogues) != set(b.dialogues):
        only_a = sorted(set(a.dialogues) - set(b.dialogues))[:5]
        only_b = sorted(set(b.dialogues) - set(a.dialogues))[:5]
        diffs.append(f"dialogue ids differ: only in first {only_a}, only in second {only_b}")
    for did in sorted(set(a.dialogues) & set(b.dialogues)):
        da, db = a.dialogues[did], b.dialogues[did]
        if da.length != db.length:
            diffs.append(f"dialogue {did!r}: length {da.length} != {db.length}")
            continue
        for m in sorted(set(da.features) | set(db.features)):
            if m not in da.features or m not in db.features:
                diffs.append(f"dialogue {did!r}: modality {m!r} missing on one side")
                continue
            fa, fb = da.features[m], db.features[m]
            if fa.shape != fb.shape:
                diffs.append(f"dialogue {did!r}: features[{m!r}] shape {fa.shape} != {fb.shape}")
                continue
            same = np.allclose(fa, fb, rtol=0.0, atol=atol) if atol else np.array_equal(fa, fb)
            if not same:
                err = float(np.max(np.abs(fa.astype(np.float64) - fb)))
                diffs.append(f"dialogue {did!r}: features[{m!r}] differ (max abs err {err:.3g})")
        if da.labels.dtype != db.labels.dtype:
            diffs.append(f"dialogue {did!r}: labels dtype {da.labels.dtype} != {db.labels.dtype}")
        elif da.labels.dtype.kind == "f" and atol:
            if not np.allclose(da.labels, db.labels, rtol=0.0, atol=atol):
                diffs.append(f"dialogue {did!r}: labels differ")
        elif not np.array_equal(da.labels, db.labels):
            diffs.append(f"dialogue {did!r}: labels differ")
        if not np.array_equal(da.speakers, db.speakers):
            diffs.append(f"dialogue {did!r}: speakers differ")
        if check_sentences and da.sentences != db.sentences:
            diffs.append(f"dialogue {did!r}: sentences differ")
        if check_utterance_ids and da.utterance_names() != db.utterance_names():
            diffs.append(f"dialogue {did!r}: utterance ids differ")
    return diffs


def assert_corpus_equal(a: Corpus, b: Corpus, **kwargs) -> None:
    """Raise ``AssertionError`` listing the differences found by :func:`corpus_differences`."""
    diffs = corpus_differences(a, b, **kwargs)
    if diffs:
        shown = "\n  ".join(diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise AssertionError(f"corpora differ:\n  {shown}{more}")

