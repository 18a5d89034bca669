"""Helpers shared by the file-format readers and writers."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


def load_pickle(path: PathLike, what: str):
    """Load a pickle written by Python 2 or 3 (``latin1`` decoding, as the releases do)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {str(path)!r}")
    with open(path, "rb") as fh:
        try:
            return pickle.load(fh, encoding="latin1")
        except Exception as exc:  # pragma: no cover - message enrichment only
            raise ValueError(f"{what}: could not unpickle {str(path)!r}: {exc}") from exc


def load_sequence_pickle(path: PathLike, what: str, layouts: dict):
    """Load a pickle holding a list/tuple whose length must be one of ``layouts`` (length -> a
    description naming its entries); the error lists every accepted layout."""
    obj = load_pickle(path, what)
    if not isinstance(obj, (list, tuple)) or len(obj) not in layouts:
        got = f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (list, tuple)) \
            else type(obj).__name__
        expected = " or ".join(f"{n} entries {desc}" for n, desc in layouts.items())
        raise ValueError(f"{what}: expected a list of {expected}, got {got}")
    return obj


def dump_pickle(obj, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=4)
    return path


def to_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return str(value)


def per_utterance(value, what: str, length: Optional[int] = None) -> list:
    """A per-dialogue entry of a label pickle (one item per utterance) as a list; ``what`` names it in
    the error when it is not a sequence (a scalar, a string, None) or, with ``length``, has another length."""
    if isinstance(value, (str, bytes, Mapping)) or (isinstance(value, np.ndarray) and value.ndim == 0):
        raise ValueError(f"{what}: expected a list with one entry per utterance, got {type(value).__name__} "
                         f"{value!r:.60}")
    try:
        items = list(value)
    except TypeError as exc:
        raise ValueError(f"{what}: expected a list with one entry per utterance, got {type(value).__name__} "
                         f"{value!r:.60}") from exc
    if length is not None and len(items) != length:
        raise ValueError(f"{what} has {len(items)} entries; expected {length} (one per utterance in videoIDs)")
    return items


def numeric_array(value, dtype, what: str) -> np.ndarray:
    """``np.asarray(value, dtype)`` whose failure (strings, ragged rows) names ``what``."""
    try:
        return np.array(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a numeric array, got {type(value).__name__} that numpy cannot read "
                         f"as {np.dtype(dtype).name} ({exc})") from exc


def ordered_ids(ids, what: str) -> List[str]:
    """Split ids as a list: sets (no order) are sorted, sequences keep their order."""
    if ids is None:
        return []
    if isinstance(ids, (set, frozenset)):
        return sorted(to_str(i) for i in ids)
    if isinstance(ids, Mapping):
        return [to_str(i) for i in ids.keys()]
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what}: expected a collection of dialogue ids, got the string {ids!r}")
    try:
        return [to_str(i) for i in ids]
    except TypeError as exc:
        raise ValueError(f"{what}: expected a collection of dialogue ids, got "
                         f"{type(ids).__name__}") from exc


def speaker_table(names: Iterable[str]) -> Dict[str, int]:
    """Map speaker names to 0-based indices in sorted order of the distinct names.

    IEMOCAP's ``'F'``/``'M'`` become ``F -> 0``, ``M -> 1`` (the mapping GCNet hard-codes); CMU-MOSI's
    single empty speaker name becomes ``'' -> 0``.
    """
    return {n: i for i, n in enumerate(sorted(set(names)))}


def default_speaker_names(num_speakers: int) -> List[str]:
    """Speaker names written for integer speakers (inverse of :func:`speaker_table`).

    One speaker -> ``['']`` (CMU-MOSI convention), two -> ``['F', 'M']`` (IEMOCAP convention),
    more -> ``['S00', 'S01', ...]`` (zero-padded so that sorted order equals index order).
    """
    if num_speakers == 1:
        return [""]
    if num_speakers == 2:
        return ["F", "M"]
    width = len(str(num_speakers - 1))
    return [f"S{i:0{width}d}" for i in range(num_speakers)]


def check_speaker_names(names: Sequence[str], num_speakers: int, what: str) -> List[str]:
    names = [str(n) for n in names]
    if len(names) < num_speakers:
        raise ValueError(f"{what}: expected at least {num_speakers} speaker names (num_speakers), "
                         f"got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: speaker names must be distinct, got {names}")
    if sorted(names) != names:
        raise ValueError(f"{what}: speaker names must be in sorted order so that reading maps them "
                         f"back to the same indices, got {names}")
    return names


def infer_labels(per_dialogue: Dict[str, Sequence], task: Optional[str], what: str
                 ) -> Tuple[Dict[str, np.ndarray], str]:
    """Convert per-dialogue label lists to arrays and infer the task when ``task`` is None.

    A corpus whose labels are all integral numbers of integer type is a classification corpus;
    any Python/NumPy float makes it a regression corpus.
    """
    arrays: Dict[str, np.ndarray] = {}
    any_float = False
    for did, labels in per_dialogue.items():
        arr = np.asarray(labels)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"{what}: labels of dialogue {did!r}: expected a flat list, got shape "
                             f"{arr.shape}")
        if arr.dtype.kind == "f":
            any_float = True
        elif arr.dtype.kind not in "iub":
            raise ValueError(f"{what}: labels of dialogue {did!r}: expected numbers, got dtype "
                             f"{arr.dtype}")
        arrays[did] = arr
    if task is None:
        task = "regression" if any_float else "classification"
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification', 'regression' or None, got {task!r}")
    out = {}
    for did, arr in arrays.items():
        if task == "regression":
            out[did] = arr.astype(np.float32)
        else:
            if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
                raise ValueError(f"{what}: labels of dialogue {did!r}: classification labels must be "
                                 f"integers, got non-integral values")
            out[did] = arr.astype(np.int64)
    return out, task


def infer_num_classes(labels: Dict[str, np.ndarray], task: str, num_classes: Optional[int]) -> int:
    if task == "regression":
        if num_classes not in (None, 1):
            raise ValueError(f"num_classes: expected 1 (or None) for regression labels, got "
                             f"{num_classes}")
        return 1
    observed = max((int(a.max()) for a in labels.values() if a.size), default=-1) + 1
    if num_classes is None:
        return max(observed, 2)
    if num_classes < observed:
        raise ValueError(f"num_classes: labels go up to {observed - 1}, so expected num_classes >= "
                         f"{observed}, got {num_classes}")
    return int(num_classes)


def dims_of(dialogue_features: Mapping[str, Mapping[str, np.ndarray]]) -> Dict[str, int]:
    dims: Dict[str, int] = {}
    for feats in dialogue_features.values():
        for m, x in feats.items():
            dims.setdefault(m, int(np.asarray(x).shape[-1]))
    return dims
