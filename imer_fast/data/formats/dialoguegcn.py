"""DialogueGCN / MMGCN ``IEMOCAP_features.pkl`` (and MMGCN's MELD) format.

The pickle holds a tuple (or list) of

* 9 entries ``videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual,
  videoSentence, trainVid, testVid`` (the original DialogueGCN release: text 100-d, audio 1,582-d,
  visual 342-d),
* 10 entries: the 9 above plus ``videoSentiment`` (MMGCN / MM-DFN's ``MELD_features_raw1.pkl``: text
  600-d, audio 300-d, visual 342-d, one-hot speakers of 9 roles, 7 emotions; the sentiment labels are not
  read). DialogueGCN's own ``MELD_features_raw.pkl`` orders its 9 entries differently (no visual, labels
  of sentiment last) and is refused with an error naming the entry that is not a dict, or
* 12 entries ``videoIDs, videoSpeakers, videoLabels, roberta1, roberta2, roberta3, roberta4,
  videoAudio, videoVisual, videoSentence, trainVid, testVid`` (the RoBERTa variant: four 1,024-d
  text feature sets, e.g. from different RoBERTa layers).

Every ``video*``/``roberta*`` entry is a dict keyed by dialogue id with one entry per utterance
(a list of vectors or a ``[L, D]`` array). ``trainVid``/``testVid`` are collections of dialogue ids
(there is no validation split in this format).

Reading conventions
-------------------
* Speakers come either as per-utterance one-hot vectors (``[1, 0]`` / ``[0, 1]``), read as the index
  of the 1, or as names (``'M'``/``'F'``), read like the GCNet reader does: the distinct names of the
  corpus sorted and numbered from 0, i.e. ``F -> 0``, ``M -> 1``, so that both IEMOCAP formats give
  the same speaker indices. (DialogueGCN's own loader turns ``'M'`` into ``[1, 0]``, i.e. index 0;
  pass ``speaker_map={'M': 0, 'F': 1}`` to get that.) Integer entries are used as they are.
* ``text_feature`` selects the text of the 12-entry variant: ``"roberta1"`` (default) ...
  ``"roberta4"`` (or ``1``...``4``), or ``"mean"`` for the average of the four sets. The 9-entry
  variant has a single text set (``text_feature`` must be None or ``"text"``).
* Split sets are read in sorted order, lists keep their order; a dialogue whose transcripts are all
  empty gets ``sentences=None``.

Writing conventions
-------------------
:func:`write_dialoguegcn` writes a 9-tuple (``variant="original"``) or a 12-tuple
(``variant="roberta"``, the corpus text copied into all four RoBERTa slots), speakers as one-hot
lists (default) or names, per-dialogue feature lists of ``float32`` vectors and the splits as sets.
The format has no validation split: ``valid="error"`` (default) refuses a corpus with a non-empty
``valid`` split, ``"train"`` merges it into ``trainVid``, ``"drop"`` leaves it out of both sets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..corpus import MODALITIES, Corpus, Dialogue
from ._common import (PathLike, check_speaker_names, default_speaker_names, dump_pickle, infer_labels,
                      infer_num_classes, load_sequence_pickle, ordered_ids, per_utterance, speaker_table, to_str)

__all__ = ["read_dialoguegcn", "write_dialoguegcn", "DIALOGUEGCN_FIELDS_9", "DIALOGUEGCN_FIELDS_10",
           "DIALOGUEGCN_FIELDS_12", "DIALOGUEGCN_DIMS"]

DIALOGUEGCN_FIELDS_9 = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio",
                        "videoVisual", "videoSentence", "trainVid", "testVid")
DIALOGUEGCN_FIELDS_10 = DIALOGUEGCN_FIELDS_9 + ("videoSentiment",)
"""MMGCN / MM-DFN's ``MELD_features_raw1.pkl``: the 9 fields (text 600-d, audio 300-d, visual 342-d, 9-way
one-hot speakers, 7 emotion classes) plus per-utterance sentiment labels, which are not read."""
DIALOGUEGCN_FIELDS_12 = ("videoIDs", "videoSpeakers", "videoLabels", "roberta1", "roberta2",
                         "roberta3", "roberta4", "videoAudio", "videoVisual", "videoSentence",
                         "trainVid", "testVid")
DIALOGUEGCN_DIMS = {"original": {"text": 100, "audio": 1582, "video": 342},
                    "roberta": {"text": 1024, "audio": 1582, "video": 342}}
"""Feature dimensions of the released DialogueGCN/MMGCN IEMOCAP pickles."""

_ROBERTA = ("roberta1", "roberta2", "roberta3", "roberta4")


def _feature_matrix(entry, did: str, fname: str, length: int, what: str) -> np.ndarray:
    try:
        x = np.asarray(entry, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {fname}[{did!r}]: expected {length} equally sized vectors") from exc
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0, :]
    if x.ndim != 2 or x.shape[0] != length:
        raise ValueError(f"{what}: {fname}[{did!r}]: expected shape [{length}, D] (one vector per "
                         f"utterance in videoIDs), got {x.shape}")
    return x


def _speaker_indices(raw: Dict[str, list], speaker_map: Optional[Mapping[str, int]], what: str
                     ) -> Dict[str, np.ndarray]:
    flat = [s for v in raw.values() for s in v]
    if speaker_map is not None:
        table = {str(k): int(v) for k, v in speaker_map.items()}
        missing = sorted({to_str(s) for s in flat if not _is_vector(s)} - set(table))
        if missing:
            raise ValueError(f"speaker_map: no index for speaker names {missing}")
    names = [to_str(s) for s in flat if isinstance(s, (str, bytes, np.str_))]
    table_default = speaker_table(names) if names else {}
    out = {}
    for did, spk in raw.items():
        idx = []
        for s in spk:
            if _is_vector(s):
                v = np.asarray(s, dtype=np.float64).ravel()
                ones = np.flatnonzero(v)
                if v.size == 0 or len(ones) != 1 or v[ones[0]] != 1:
                    raise ValueError(f"{what}: videoSpeakers[{did!r}]: expected one-hot vectors such "
                                     f"as [1, 0], got {list(v)}")
                idx.append(int(ones[0]))
            elif isinstance(s, (str, bytes, np.str_)):
                key = to_str(s)
                idx.append(table[key] if speaker_map is not None else table_default[key])
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                idx.append(int(s))
            else:
                raise ValueError(f"{what}: videoSpeakers[{did!r}]: expected one-hot vectors, names "
                                 f"or integers, got {s!r}")
        out[did] = np.array(idx, dtype=np.int64)
    return out


def _is_vector(s) -> bool:
    return isinstance(s, (list, tuple, np.ndarray)) and np.ndim(s) >= 1


def read_dialoguegcn(path: PathLike, name: Optional[str] = None, *,
                     text_feature: Union[str, int, None] = None, task: Optional[str] = None,
                     num_classes: Optional[int] = None,
                     label_names: Optional[Sequence[str]] = None,
                     speaker_map: Optional[Mapping[str, int]] = None) -> Corpus:
    """Read a DialogueGCN/MMGCN features pickle (9-, 10- (MELD) or 12-entry variant).

    Args:
        path: the pickle.
        name: corpus name (default: the file stem).
        text_feature: RoBERTa set used as text for the 12-entry variant: ``"roberta1"`` (default)
            to ``"roberta4"``, ``1``-``4``, or ``"mean"``; must be None/``"text"`` for 9 entries.
        task, num_classes, label_names, speaker_map: as in
            :func:`~imer_fast.data.formats.gcnet.read_gcnet`.
    """
    path = Path(path)
    what = f"DialogueGCN pickle {str(path)!r}"
    obj = load_sequence_pickle(path, what, {9: list(DIALOGUEGCN_FIELDS_9), 10: f"{list(DIALOGUEGCN_FIELDS_10)} (MELD)",
                                            12: list(DIALOGUEGCN_FIELDS_12)})
    fields = {9: DIALOGUEGCN_FIELDS_9, 10: DIALOGUEGCN_FIELDS_10, 12: DIALOGUEGCN_FIELDS_12}[len(obj)]
    entries = dict(zip(fields, obj))
    for fname in fields[:fields.index("trainVid")]:
        if not isinstance(entries[fname], Mapping):
            raise ValueError(f"{what}: entry {fname!r} must be a dict keyed by dialogue id, got "
                             f"{type(entries[fname]).__name__}")
    if len(obj) in (9, 10):
        if text_feature not in (None, "text", "videoText"):
            raise ValueError(f"text_feature: the 9-entry variant has a single text feature set; "
                             f"expected None or 'text', got {text_feature!r}")
        text_sources = ["videoText"]
    else:
        tf = "roberta1" if text_feature is None else text_feature
        if isinstance(tf, (int, np.integer)) and not isinstance(tf, bool) and 1 <= int(tf) <= 4:
            tf = f"roberta{int(tf)}"
        if tf == "mean":
            text_sources = list(_ROBERTA)
        elif tf in _ROBERTA:
            text_sources = [tf]
        else:
            raise ValueError(f"text_feature: expected one of {list(_ROBERTA)}, 1-4 or 'mean', got "
                             f"{text_feature!r}")

    video_ids = entries["videoIDs"]
    raw_by_str = {to_str(k): k for k in video_ids.keys()}
    splits = {"train": ordered_ids(entries["trainVid"], f"{what}: trainVid"),
              "test": ordered_ids(entries["testVid"], f"{what}: testVid")}
    for s, ids in splits.items():
        for did in ids:
            if did not in raw_by_str:
                raise ValueError(f"{what}: split {s!r} lists dialogue {did!r}, which is not a key of "
                                 f"videoIDs")
    utts, raw_labels, raw_speakers = {}, {}, {}
    for did, key in raw_by_str.items():
        names = [to_str(u) for u in per_utterance(video_ids[key], f"{what}: videoIDs[{did!r}]")]
        if not names:
            raise ValueError(f"{what}: dialogue {did!r} has no utterances in videoIDs")
        for fname in ("videoLabels", "videoSpeakers"):
            if key not in entries[fname]:
                raise ValueError(f"{what}: dialogue {did!r} is missing from {fname}")
        utts[did] = names
        raw_labels[did] = per_utterance(entries["videoLabels"][key], f"{what}: videoLabels[{did!r}]", len(names))
        raw_speakers[did] = per_utterance(entries["videoSpeakers"][key], f"{what}: videoSpeakers[{did!r}]",
                                          len(names))
    labels, task = infer_labels(raw_labels, task, what)
    num_classes = infer_num_classes(labels, task, num_classes)
    speakers = _speaker_indices(raw_speakers, speaker_map, what)

    dialogues: Dict[str, Dialogue] = {}
    dims: Dict[str, int] = {}
    for did, key in raw_by_str.items():
        n = len(utts[did])
        feats = {}
        texts = []
        for src in text_sources:
            if key not in entries[src]:
                raise ValueError(f"{what}: dialogue {did!r} is missing from {src}")
            texts.append(_feature_matrix(entries[src][key], did, src, n, what))
        if len(texts) > 1:
            if len({t.shape for t in texts}) != 1:
                raise ValueError(f"{what}: dialogue {did!r}: the RoBERTa sets have different shapes "
                                 f"{[t.shape for t in texts]}; cannot average them")
            feats["text"] = np.mean(np.stack(texts).astype(np.float64), axis=0).astype(np.float32)
        else:
            feats["text"] = texts[0]
        for m, src in (("audio", "videoAudio"), ("video", "videoVisual")):
            if key not in entries[src]:
                raise ValueError(f"{what}: dialogue {did!r} is missing from {src}")
            feats[m] = _feature_matrix(entries[src][key], did, src, n, what)
        for m, x in feats.items():
            if m not in dims:
                dims[m] = int(x.shape[1])
            elif x.shape[1] != dims[m]:
                raise ValueError(f"{what}: dialogue {did!r}: {m} features: dims inconsistent: "
                                 f"expected D={dims[m]} (as earlier dialogues), got {x.shape[1]}")
        sentences = None
        sent_entry = entries["videoSentence"]
        if key in sent_entry:
            sents = [to_str(s) for s in sent_entry[key]]
            if len(sents) != n:
                raise ValueError(f"{what}: videoSentence[{did!r}] has {len(sents)} entries; "
                                 f"expected {n}")
            sentences = None if all(s == "" for s in sents) else sents
        dialogues[did] = Dialogue(id=did, features=feats, labels=labels[did],
                                  speakers=speakers[did], sentences=sentences,
                                  utterance_ids=utts[did])
    num_speakers = max((int(d.speakers.max()) for d in dialogues.values()), default=0) + 1
    return Corpus(name=name if name is not None else path.stem, dialogues=dialogues, splits=splits,
                  task=task, num_classes=num_classes,
                  label_names=list(label_names) if label_names is not None else None,
                  feature_dims=dims, num_speakers=num_speakers)


def write_dialoguegcn(corpus: Corpus, path: PathLike, *, variant: str = "original",
                      speaker_format: str = "onehot",
                      speaker_names: Optional[Sequence[str]] = None,
                      valid: str = "error") -> Dict[str, Path]:
    """Write ``corpus`` as a DialogueGCN/MMGCN features pickle.

    Args:
        corpus: a corpus with all three modalities.
        path: output pickle path (parent folders are created).
        variant: ``"original"`` (9 entries) or ``"roberta"`` (12 entries, text in all four slots).
        speaker_format: ``"onehot"`` (``[1, 0]`` lists of length ``num_speakers``) or ``"names"``.
        speaker_names: names for ``speaker_format="names"`` (sorted; default ``'F'``/``'M'`` for two
            speakers).
        valid: what to do with a non-empty ``valid`` split: ``"error"``, ``"train"`` or ``"drop"``.

    Returns:
        ``{"path": Path}`` (pass as keyword arguments to :func:`read_dialoguegcn`).
    """
    if variant not in ("original", "roberta"):
        raise ValueError(f"variant: expected 'original' or 'roberta', got {variant!r}")
    if speaker_format not in ("onehot", "names"):
        raise ValueError(f"speaker_format: expected 'onehot' or 'names', got {speaker_format!r}")
    if valid not in ("error", "train", "drop"):
        raise ValueError(f"valid: expected 'error', 'train' or 'drop', got {valid!r}")
    missing = [m for m in MODALITIES if m not in corpus.feature_dims]
    if missing:
        raise ValueError(f"write_dialoguegcn: the format stores text, audio and video; corpus "
                         f"{corpus.name!r} lacks {missing}")
    valid_ids = corpus.splits.get("valid", [])
    if valid_ids and valid == "error":
        raise ValueError(f"write_dialoguegcn: the format has no validation split but corpus "
                         f"{corpus.name!r} has {len(valid_ids)} valid dialogues; pass valid='train' "
                         f"or valid='drop'")
    names: List[str] = []
    if speaker_format == "names":
        names = check_speaker_names(speaker_names if speaker_names is not None
                                    else default_speaker_names(corpus.num_speakers),
                                    corpus.num_speakers, "speaker_names")
    ids, spk, lab, text, audio, visual, sent = {}, {}, {}, {}, {}, {}, {}
    eye = np.eye(corpus.num_speakers, dtype=np.int64)
    for did, dlg in corpus.dialogues.items():
        ids[did] = dlg.utterance_names()
        if speaker_format == "onehot":
            spk[did] = [eye[int(s)].tolist() for s in dlg.speakers]
        else:
            spk[did] = [names[int(s)] for s in dlg.speakers]
        lab[did] = ([int(x) for x in dlg.labels] if corpus.task == "classification"
                    else [float(x) for x in dlg.labels])
        text[did] = [row.copy() for row in dlg.features["text"]]
        audio[did] = [row.copy() for row in dlg.features["audio"]]
        visual[did] = [row.copy() for row in dlg.features["video"]]
        sent[did] = list(dlg.sentences) if dlg.sentences is not None else [""] * dlg.length
    train = list(corpus.splits.get("train", []))
    if valid == "train":
        train += list(valid_ids)
    train_set, test_set = set(train), set(corpus.splits.get("test", []))
    if variant == "original":
        obj = (ids, spk, lab, text, audio, visual, sent, train_set, test_set)
    else:
        roberta = [{k: [r.copy() for r in v] for k, v in text.items()} for _ in range(3)]
        obj = (ids, spk, lab, text, *roberta, audio, visual, sent, train_set, test_set)
    return {"path": dump_pickle(obj, path)}
