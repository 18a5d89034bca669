"""GCNet / FedDISC corpus format (IEMOCAP, CMU-MOSI, CMU-MOSEI).

Layout
------
* A *label pickle* holding a list of

  - 6 entries ``[videoIDs, videoLabels, videoSpeakers, videoSentence, trainVid, testVid]``
    (IEMOCAP), or
  - 7 entries ``[videoIDs, videoLabels, videoSpeakers, videoSentence, trainVid, valVid, testVid]``
    (CMU-MOSI / CMU-MOSEI).

  ``videoIDs``, ``videoLabels``, ``videoSpeakers`` and ``videoSentence`` are dicts keyed by dialogue
  id holding one list entry per utterance: the utterance names, the labels (``int`` class indices
  for IEMOCAP, ``float`` sentiment in ``[-3, 3]`` for MOSI/MOSEI), the speaker names (``'F'``/``'M'``
  in IEMOCAP, ``''`` in MOSI) and the transcripts. The split entries are collections of dialogue
  ids (the IEMOCAP release unions them with ``|``, so they are sets).

* One folder per modality (feature set) holding one ``<utterance name>.npy`` per utterance.

Reading conventions
-------------------
* Speakers: the distinct speaker names of the whole corpus are sorted and numbered from 0, so
  IEMOCAP maps ``F -> 0`` and ``M -> 1`` (the mapping GCNet hard-codes) and MOSI's single ``''``
  speaker maps to 0. Integer speaker entries are used as they are. ``speaker_map`` overrides this.
* Features: a file may hold ``[D]``, ``[1, D]`` or ``[T, D]``; a 2-D array with ``T > 1`` is
  mean-pooled over time (GCNet does the same). Some feature sets store a *folder*
  ``<utterance name>/`` of per-frame/face ``.npy`` files instead of a file; then all rows of all
  files in it are mean-pooled, and an empty folder (no face detected) gives a zero vector, as in
  the release. IEMOCAP's face folders hold both parties' faces: an utterance of speaker ``'F'``
  pools the files whose name contains an F, one of ``'M'`` the others, and gets zeros when its
  speaker has none (the release's reading; see :func:`load_utterance_feature`).
* Split collections that are sets are read in sorted order; lists keep their order. Dialogues of
  ``videoIDs`` listed in no split are kept in :attr:`Corpus.dialogues` but belong to no split.
* A dialogue whose transcripts are all empty strings gets ``sentences=None``.
* Labels: float labels make the corpus a regression corpus, integer labels a classification
  corpus (override with ``task``); ``num_classes`` defaults to ``max(label) + 1``.

Writing conventions
-------------------
:func:`write_gcnet` writes 7 entries when the corpus has a ``"valid"`` split and 6 otherwise, the
split collections as sets, speaker names ``''`` (one speaker), ``'F'``/``'M'`` (two) or
``'S00', 'S01', ...`` (more), and one ``float32 [D]`` file per utterance and modality. Utterance
names must be unique across the corpus (all features of a modality share one folder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..corpus import MODALITIES, Corpus, Dialogue, canonical_modality
from ._common import (PathLike, check_speaker_names, default_speaker_names, dump_pickle, infer_labels,
                      infer_num_classes, load_sequence_pickle, ordered_ids, per_utterance, speaker_table, to_str)

__all__ = ["read_gcnet", "write_gcnet", "load_utterance_feature", "GCNET_DEFAULT_DIMS",
           "GCNET_LABEL_FIELDS_6", "GCNET_LABEL_FIELDS_7"]

GCNET_DEFAULT_DIMS = {"text": 1024, "audio": 512, "video": 1024}
"""Feature dimensions of the GCNet/FedDISC feature sets: DeBERTa-large text, wav2vec-large audio,
MA-Net face video."""

GCNET_LABEL_FIELDS_6 = ("videoIDs", "videoLabels", "videoSpeakers", "videoSentence", "trainVid",
                        "testVid")
GCNET_LABEL_FIELDS_7 = ("videoIDs", "videoLabels", "videoSpeakers", "videoSentence", "trainVid",
                        "valVid", "testVid")


def _pool(arr: np.ndarray, utt: str, folder: Path, modality: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"feature of utterance {utt!r} in folder {str(folder)!r} ({modality}): "
                         f"expected a numeric array, got dtype {arr.dtype}")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 1:
        return arr.astype(np.float32)
    if arr.ndim == 2:
        if arr.shape[0] == 0:
            raise ValueError(f"feature of utterance {utt!r} in folder {str(folder)!r} ({modality}): "
                             f"expected at least one time step, got shape {arr.shape}")
        if arr.shape[0] == 1:
            return arr[0].astype(np.float32)
        return arr.astype(np.float64).mean(axis=0).astype(np.float32)
    raise ValueError(f"feature of utterance {utt!r} in folder {str(folder)!r} ({modality}): expected "
                     f"shape [D], [1, D] or [T, D], got {arr.shape}")


def _face_party(file_name: str, sub: Path, utterance: str, modality: str) -> str:
    """The IEMOCAP party ('F' or 'M') a face file belongs to: 'F' when its name contains an F, else 'M'
    (the release's rule, which asserts that one of the two letters is there)."""
    if "F" in file_name:
        return "F"
    if "M" in file_name:
        return "M"
    raise ValueError(f"feature of utterance {utterance!r} in folder {str(sub)!r} ({modality}): face file "
                     f"{file_name!r} names neither party; IEMOCAP face files contain 'F' or 'M'")


def _load_npy(path: Path, utterance: str, modality: str) -> np.ndarray:
    """One feature file; a damaged one (an interrupted extraction: truncated, empty, pickled objects) is
    named, since a corpus has tens of thousands of them."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:   # numpy raises ValueError, EOFError, OSError ... depending on the damage
        raise ValueError(f"feature file {str(path)!r} of utterance {utterance!r} ({modality}) cannot be read: "
                         f"{type(err).__name__}: {err}") from err


def load_utterance_feature(folder: PathLike, utterance: str, modality: str = "?",
                           speaker: Optional[str] = None) -> Optional[np.ndarray]:
    """Load and pool the feature of one utterance from a GCNet feature folder.

    Returns a ``float32 [D]`` vector, or ``None`` for an empty per-utterance face folder (the
    caller substitutes zeros). Raises ``FileNotFoundError`` naming the utterance and the folder
    when neither ``<utterance>.npy`` nor a folder ``<utterance>/`` exists.

    An IEMOCAP face folder holds the faces of both parties of the dyad. With ``speaker`` ``'F'`` or
    ``'M'`` (IEMOCAP's speaker names) only that party's faces are pooled — a file belongs to F when
    its name contains an F, otherwise to M, as the release reads them — and an utterance whose
    speaker has no face gives zeros; with any other speaker (MOSI's ``''``, or None) every face is pooled.
    """
    folder = Path(folder)
    path = folder / f"{utterance}.npy"
    if path.is_file():
        return _pool(_load_npy(path, utterance, modality), utterance, folder, modality)
    sub = folder / utterance
    if sub.is_dir():
        rows, dims = [], set()
        for f in sorted(sub.glob("*.npy")):
            x = np.asarray(_load_npy(f, utterance, modality), dtype=np.float64)
            while x.ndim > 2 and x.shape[0] == 1:
                x = x[0]
            if x.ndim == 1:
                x = x[None, :]
            if x.ndim != 2:
                raise ValueError(f"feature of utterance {utterance!r} in folder {str(sub)!r} "
                                 f"({modality}): expected [D] or [T, D] per file, got {x.shape} in "
                                 f"{f.name!r}")
            dims.add(x.shape[1])
            if speaker not in ("F", "M") or _face_party(f.name, sub, utterance, modality) == speaker:
                rows.append(x)
        if not dims:
            return None
        if len(dims) != 1:
            raise ValueError(f"feature of utterance {utterance!r} in folder {str(sub)!r} "
                             f"({modality}): dims inconsistent across files: {sorted(dims)}")
        if not rows:
            return np.zeros(dims.pop(), np.float32)
        return np.concatenate(rows, axis=0).mean(axis=0).astype(np.float32)
    raise FileNotFoundError(
        f"missing feature file for utterance {utterance!r} ({modality}): expected "
        f"{path.name!r} (or a folder {utterance!r}) in folder {str(folder)!r}")


def read_gcnet(label_path: PathLike, feature_dirs: Mapping[str, PathLike], name: Optional[str] = None,
               *, task: Optional[str] = None, num_classes: Optional[int] = None,
               label_names: Optional[Sequence[str]] = None,
               speaker_map: Optional[Mapping[str, int]] = None) -> Corpus:
    """Read a GCNet/FedDISC label pickle and its per-utterance feature folders.

    Args:
        label_path: the label pickle (6 or 7 entries, see the module docstring).
        feature_dirs: modality (``"text"``, ``"audio"``, ``"video"`` or an alias such as ``"l"``,
            ``"a"``, ``"v"``) -> folder of ``<utterance>.npy`` files. Any non-empty subset of the
            modalities may be given.
        name: corpus name (default: the label file's stem).
        task: ``"classification"`` / ``"regression"``; inferred from the label types when None.
        num_classes: number of classes (default ``max(label) + 1``; ignored for regression).
        label_names: class names, or None.
        speaker_map: speaker name -> index; default: sorted distinct names numbered from 0.

    Returns:
        A :class:`~imer_fast.data.corpus.Corpus` with splits ``train``/``test`` (6 entries) or
        ``train``/``valid``/``test`` (7 entries).
    """
    label_path = Path(label_path)
    what = f"GCNet label pickle {str(label_path)!r}"
    obj = load_sequence_pickle(label_path, what, {6: f"{list(GCNET_LABEL_FIELDS_6)} (IEMOCAP)",
                                                  7: f"{list(GCNET_LABEL_FIELDS_7)} (MOSI/MOSEI)"})
    if len(obj) == 6:
        video_ids, video_labels, video_speakers, video_sentences, train_vid, test_vid = obj
        split_sources = {"train": train_vid, "test": test_vid}
        fields = GCNET_LABEL_FIELDS_6
    else:
        video_ids, video_labels, video_speakers, video_sentences, train_vid, val_vid, test_vid = obj
        split_sources = {"train": train_vid, "valid": val_vid, "test": test_vid}
        fields = GCNET_LABEL_FIELDS_7
    for fname, entry in zip(fields[:4], (video_ids, video_labels, video_speakers, video_sentences)):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: entry {fname!r} must be a dict keyed by dialogue id, got "
                             f"{type(entry).__name__}")
    if not feature_dirs:
        raise ValueError(f"feature_dirs: expected a dict modality -> folder with at least one "
                         f"modality among {MODALITIES}, got {feature_dirs!r}")
    dirs: Dict[str, Path] = {}
    for m, folder in feature_dirs.items():
        cm = canonical_modality(m)
        if cm in dirs:
            raise ValueError(f"feature_dirs: modality {cm!r} given twice")
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"feature_dirs[{m!r}]: feature folder not found: {str(folder)!r}")
        dirs[cm] = folder
    dirs = {m: dirs[m] for m in MODALITIES if m in dirs}

    dialogue_ids = [to_str(d) for d in video_ids.keys()]
    raw_by_str = {to_str(d): d for d in video_ids.keys()}
    splits = {s: ordered_ids(ids, f"{what}: split {s!r}") for s, ids in split_sources.items()}
    for s, ids in splits.items():
        for did in ids:
            if did not in raw_by_str:
                raise ValueError(f"{what}: split {s!r} lists dialogue {did!r}, which is not a key of "
                                 f"videoIDs")

    # utterance names, labels, speakers per dialogue
    utts: Dict[str, List[str]] = {}
    raw_labels: Dict[str, Sequence] = {}
    raw_speakers: Dict[str, List] = {}
    for did in dialogue_ids:
        key = raw_by_str[did]
        names = [to_str(u) for u in per_utterance(video_ids[key], f"{what}: videoIDs[{did!r}]")]
        if not names:
            raise ValueError(f"{what}: dialogue {did!r} has no utterances in videoIDs")
        for fname, entry in (("videoLabels", video_labels), ("videoSpeakers", video_speakers)):
            if key not in entry:
                raise ValueError(f"{what}: dialogue {did!r} is missing from {fname}")
        utts[did] = names
        raw_labels[did] = per_utterance(video_labels[key], f"{what}: videoLabels[{did!r}]", len(names))
        raw_speakers[did] = per_utterance(video_speakers[key], f"{what}: videoSpeakers[{did!r}]", len(names))
        for s in raw_speakers[did]:
            if not isinstance(s, (str, bytes, int, np.integer)) or isinstance(s, bool):
                raise ValueError(f"{what}: videoSpeakers[{did!r}]: expected speaker names (str) or indices "
                                 f"(int), got {type(s).__name__} {s!r}")
    labels, task = infer_labels(raw_labels, task, what)
    num_classes = infer_num_classes(labels, task, num_classes)

    all_spk = [s for v in raw_speakers.values() for s in v]
    if speaker_map is not None:
        table = {str(k): int(v) for k, v in speaker_map.items()}
        to_index = lambda s: table[to_str(s)]  # noqa: E731
        missing = sorted({to_str(s) for s in all_spk} - set(table))
        if missing:
            raise ValueError(f"speaker_map: no index for speaker names {missing}")
    elif all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in all_spk):
        to_index = int  # already indices
    else:
        table = speaker_table(to_str(s) for s in all_spk)
        to_index = lambda s: table[to_str(s)]  # noqa: E731

    dims: Dict[str, int] = {}
    pending: Dict[str, tuple] = {}  # did -> (modality -> list of vectors or None, sentences)
    for did in dialogue_ids:
        key = raw_by_str[did]
        feats: Dict[str, List[Optional[np.ndarray]]] = {}
        for m, folder in dirs.items():
            rows: List[Optional[np.ndarray]] = []
            for u, spk in zip(utts[did], raw_speakers[did]):
                vec = load_utterance_feature(folder, u, m, speaker=to_str(spk))
                if vec is not None:
                    if m not in dims:
                        dims[m] = int(vec.shape[0])
                    elif vec.shape[0] != dims[m]:
                        raise ValueError(
                            f"feature of utterance {u!r} in folder {str(folder)!r} ({m}): dims "
                            f"inconsistent: expected D={dims[m]} (as earlier utterances), got "
                            f"{vec.shape[0]}")
                rows.append(vec)
            feats[m] = rows
        sentences = None
        if key in video_sentences:
            sents = [to_str(s) for s in per_utterance(video_sentences[key], f"{what}: videoSentence[{did!r}]",
                                                      len(utts[did]))]
            sentences = None if all(s == "" for s in sents) else sents
        pending[did] = (feats, sentences)
    for m in dirs:
        if m not in dims:
            raise ValueError(f"feature_dirs[{m!r}]: every utterance has an empty face folder; "
                             f"cannot infer the feature dimension")
    built: Dict[str, Dialogue] = {}
    for did in dialogue_ids:
        feats, sentences = pending[did]
        arrays = {m: np.stack([r if r is not None else np.zeros(dims[m], np.float32) for r in rows])
                  for m, rows in feats.items()}
        built[did] = Dialogue(
            id=did, features=arrays, labels=labels[did],
            speakers=np.array([to_index(s) for s in raw_speakers[did]], dtype=np.int64),
            sentences=sentences, utterance_ids=utts[did])
    num_speakers = max((int(d.speakers.max()) for d in built.values()), default=0) + 1
    return Corpus(name=name if name is not None else label_path.stem, dialogues=built,
                  splits=splits, task=task, num_classes=num_classes,
                  label_names=list(label_names) if label_names is not None else None,
                  feature_dims=dims, num_speakers=num_speakers)


def write_gcnet(corpus: Corpus, root: PathLike, *, label_filename: Optional[str] = None,
                feature_dir_names: Optional[Mapping[str, str]] = None,
                speaker_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Write ``corpus`` in the GCNet/FedDISC format under ``root``.

    Args:
        corpus: the corpus.
        root: output folder (created).
        label_filename: name of the label pickle (default ``<corpus name>_label.pkl``).
        feature_dir_names: modality -> folder name under ``root`` (default: the modality name).
        speaker_names: names written for speaker indices ``0..num_speakers-1``; must be sorted so
            that reading maps them back to the same indices (default: see
            :func:`~imer_fast.data.formats._common.default_speaker_names`).

    Returns:
        ``{"label_path": Path, "feature_dirs": {modality: Path}}`` — pass it to
        :func:`read_gcnet` as keyword arguments to read the corpus back.
    """
    root = Path(root)
    names = check_speaker_names(speaker_names if speaker_names is not None
                                else default_speaker_names(corpus.num_speakers),
                                corpus.num_speakers, "speaker_names")
    dir_names = {m: m for m in corpus.modalities}
    if feature_dir_names:
        for m, n in feature_dir_names.items():
            dir_names[canonical_modality(m)] = str(n)
    seen: Dict[str, str] = {}
    for did, dlg in corpus.dialogues.items():
        for u in dlg.utterance_names():
            if "/" in u or "\\" in u or u in ("", ".", ".."):
                raise ValueError(f"write_gcnet: utterance name {u!r} of dialogue {did!r} cannot be "
                                 f"used as a file name")
            if u in seen:
                raise ValueError(f"write_gcnet: utterance name {u!r} occurs in dialogues {seen[u]!r} "
                                 f"and {did!r}; names must be unique across the corpus")
            seen[u] = did
    feature_dirs = {m: root / dir_names[m] for m in corpus.modalities}
    for d in feature_dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    video_ids, video_labels, video_speakers, video_sentences = {}, {}, {}, {}
    for did, dlg in corpus.dialogues.items():
        utts = dlg.utterance_names()
        video_ids[did] = utts
        if corpus.task == "classification":
            video_labels[did] = [int(x) for x in dlg.labels]
        else:
            video_labels[did] = [float(x) for x in dlg.labels]
        video_speakers[did] = [names[int(s)] for s in dlg.speakers]
        video_sentences[did] = list(dlg.sentences) if dlg.sentences is not None else [""] * len(utts)
        for m, folder in feature_dirs.items():
            x = dlg.features[m]
            for i, u in enumerate(utts):
                np.save(folder / f"{u}.npy", np.ascontiguousarray(x[i], dtype=np.float32))
    entries = [video_ids, video_labels, video_speakers, video_sentences,
               set(corpus.splits.get("train", []))]
    if "valid" in corpus.splits:
        entries.append(set(corpus.splits["valid"]))
    entries.append(set(corpus.splits.get("test", [])))
    label_path = dump_pickle(entries, root / (label_filename or f"{corpus.name}_label.pkl"))
    return {"label_path": label_path, "feature_dirs": feature_dirs}
