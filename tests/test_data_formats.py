"""Readers and writers: round trips through our own writers and hand-built edge-case files."""
import pickle

import numpy as np
import pytest

from imer_fast.data import (MMSADataset, assert_corpus_equal, corpus_differences, make_synthetic,
                            read_dialoguegcn, read_gcnet, read_mmsa, write_dialoguegcn,
                            write_gcnet, write_mmsa, write_synthetic)
from imer_fast.data.formats.gcnet import load_utterance_feature
from imer_fast.data.formats.mmsa import MMSASplit

DIMS = {"text": 12, "audio": 6, "video": 9}


@pytest.fixture(scope="module")
def iemocap():
    return make_synthetic("iemocap6", seed=3, scale=0.05, feature_dims=DIMS)


@pytest.fixture(scope="module")
def mosi():
    return make_synthetic("mosi", seed=4, scale=0.1, feature_dims=DIMS)


def _dump(obj, path):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)
    return path


# ---------------------------------------------------------------- GCNet
def test_gcnet_roundtrip_iemocap(iemocap, tmp_path):
    paths = write_gcnet(iemocap, tmp_path)
    with open(paths["label_path"], "rb") as fh:
        raw = pickle.load(fh)
    assert len(raw) == 6  # IEMOCAP layout, no valVid
    assert isinstance(raw[4], set) and isinstance(raw[5], set)
    first = next(iter(iemocap.dialogues.values()))
    assert raw[2][first.id][0] in ("F", "M")
    back = read_gcnet(**paths, name=iemocap.name, num_classes=6, label_names=iemocap.label_names)
    assert corpus_differences(iemocap, back) == []
    assert back.task == "classification" and back.num_speakers == 2
    for did, d in back.dialogues.items():
        assert d.features["text"].dtype == np.float32
        assert np.array_equal(d.features["audio"], iemocap.dialogues[did].features["audio"])


def test_gcnet_roundtrip_mosi_has_valid(mosi, tmp_path):
    paths = write_gcnet(mosi, tmp_path, label_filename="CMUMOSI_features.pkl",
                        feature_dir_names={"text": "deberta", "a": "wav2vec", "v": "manet"})
    with open(paths["label_path"], "rb") as fh:
        raw = pickle.load(fh)
    assert len(raw) == 7
    first = next(iter(mosi.dialogues.values()))
    assert set(raw[2][first.id]) == {""}  # one anonymous speaker, as in CMU-MOSI
    assert isinstance(raw[1][first.id][0], float)
    assert paths["feature_dirs"]["audio"].name == "wav2vec"
    back = read_gcnet(**paths, name="mosi")
    assert back.task == "regression" and back.num_classes == 1 and back.num_speakers == 1
    assert set(back.splits) == {"train", "valid", "test"}
    assert_corpus_equal(mosi, back)


def _hand_gcnet(tmp_path, speakers=("M", "F", "M"), entries=6):
    folders = {m: tmp_path / m for m in ("text", "audio", "video")}
    for f in folders.values():
        f.mkdir()
    utts = ["dlgB_000", "dlgB_001", "dlgB_002"]
    videoIDs = {"dlgB": utts, "dlgA": ["dlgA_u1"]}
    labels = {"dlgB": [0, 2, 1], "dlgA": [1]}
    spk = {"dlgB": list(speakers), "dlgA": ["F"]}
    sent = {"dlgB": ["hello", "there", "friend"], "dlgA": [""]}
    obj = [videoIDs, labels, spk, sent, {"dlgB", "dlgA"}, set()]
    if entries == 7:
        obj = [videoIDs, labels, spk, sent, ["dlgB"], [], ["dlgA"]]
    label = _dump(obj, tmp_path / "label.pkl")
    return label, folders, utts


def test_gcnet_hand_built_shapes_and_pooling(tmp_path):
    label, folders, utts = _hand_gcnet(tmp_path)
    rng = np.random.default_rng(0)
    seq = rng.standard_normal((5, 4)).astype(np.float32)
    np.save(folders["text"] / "dlgB_000.npy", seq)                      # [T, D] -> mean over T
    np.save(folders["text"] / "dlgB_001.npy", np.ones((1, 4), np.float32))  # [1, D]
    np.save(folders["text"] / "dlgB_002.npy", np.arange(4, dtype=np.float64))  # [D], float64
    np.save(folders["text"] / "dlgA_u1.npy", np.full(4, 2.0, np.float32))
    for u in utts + ["dlgA_u1"]:
        np.save(folders["audio"] / f"{u}.npy", np.full(3, 1.5, np.float32))
    # video: per-utterance face folders holding both parties' faces (the speaker's are pooled; an
    # empty folder or no face of the speaker -> zeros), and one plain file
    (folders["video"] / "dlgB_000").mkdir()  # speaker M
    np.save(folders["video"] / "dlgB_000" / "face_M_0.npy", np.zeros(2, np.float32))
    np.save(folders["video"] / "dlgB_000" / "face_M_1.npy", np.array([[2.0, 4.0], [4.0, 8.0]]))
    np.save(folders["video"] / "dlgB_000" / "face_F_0.npy", np.full(2, 100.0, np.float32))  # the listener
    (folders["video"] / "dlgB_001").mkdir()  # speaker F: only the listener's face
    np.save(folders["video"] / "dlgB_001" / "face_M_0.npy", np.full(2, 100.0, np.float32))
    np.save(folders["video"] / "dlgB_002.npy", np.array([1.0, -1.0], np.float32))
    np.save(folders["video"] / "dlgA_u1.npy", np.array([3.0, 3.0], np.float32))

    c = read_gcnet(label, folders)
    assert c.name == "label" and c.task == "classification" and c.num_classes == 3
    assert c.feature_dims == {"text": 4, "audio": 3, "video": 2}
    assert c.splits == {"train": ["dlgA", "dlgB"], "test": []}  # sets are read sorted
    b = c.dialogues["dlgB"]
    np.testing.assert_allclose(b.features["text"][0], seq.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(b.features["text"][1], np.ones(4))
    np.testing.assert_array_equal(b.features["text"][2], np.arange(4))
    np.testing.assert_allclose(b.features["video"][0], [2.0, 4.0])  # mean of the speaker's 3 face rows
    np.testing.assert_array_equal(b.features["video"][1], [0.0, 0.0])  # no face of the speaker
    # speakers: sorted names -> F = 0, M = 1
    assert b.speakers.tolist() == [1, 0, 1]
    assert b.sentences == ["hello", "there", "friend"]
    assert c.dialogues["dlgA"].sentences is None  # all-empty transcripts
    assert b.utterance_ids == utts
    assert c.split("valid") == []
    with pytest.raises(ValueError, match="split"):
        c.split("dev")


def test_gcnet_face_folders_by_party(tmp_path):
    folder = tmp_path / "video"
    (folder / "u0").mkdir(parents=True)
    np.save(folder / "u0" / "Ses01_F_0.npy", np.full(2, 10.0, np.float32))
    np.save(folder / "u0" / "Ses01_M_0.npy", np.full(2, -10.0, np.float32))
    np.testing.assert_array_equal(load_utterance_feature(folder, "u0", "video", speaker="F"), [10.0, 10.0])
    np.testing.assert_array_equal(load_utterance_feature(folder, "u0", "video", speaker="M"), [-10.0, -10.0])
    np.testing.assert_array_equal(load_utterance_feature(folder, "u0", "video", speaker=""), [0.0, 0.0])  # MOSI
    (folder / "u1").mkdir()
    np.save(folder / "u1" / "face0.npy", np.ones(2, np.float32))
    with pytest.raises(ValueError, match="face file 'face0.npy' names neither party"):
        load_utterance_feature(folder, "u1", "video", speaker="F")
    (folder / "u2").mkdir()
    assert load_utterance_feature(folder, "u2", "video", speaker="F") is None  # no face at all


def test_gcnet_speaker_map_and_seven_entries(tmp_path):
    label, folders, utts = _hand_gcnet(tmp_path, entries=7)
    for m, d in (("text", 4), ("audio", 3), ("video", 2)):
        for u in utts + ["dlgA_u1"]:
            np.save(folders[m] / f"{u}.npy", np.zeros(d, np.float32))
    c = read_gcnet(label, {"l": folders["text"], "a": folders["audio"], "v": folders["video"]},
                   speaker_map={"M": 0, "F": 1}, label_names=["x", "y", "z"])
    assert c.splits == {"train": ["dlgB"], "valid": [], "test": ["dlgA"]}
    assert c.dialogues["dlgB"].speakers.tolist() == [0, 1, 0]
    assert c.label_names == ["x", "y", "z"]
    # a subset of modalities is allowed
    only_text = read_gcnet(label, {"text": folders["text"]})
    assert only_text.modalities == ("text",)


def test_gcnet_errors(tmp_path):
    label, folders, utts = _hand_gcnet(tmp_path)
    for m, d in (("text", 4), ("audio", 3), ("video", 2)):
        for u in utts + ["dlgA_u1"]:
            np.save(folders[m] / f"{u}.npy", np.zeros(d, np.float32))
    # missing feature file: names the utterance and the folder
    (folders["audio"] / "dlgB_001.npy").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_gcnet(label, folders)
    assert "dlgB_001" in str(err.value) and str(folders["audio"]) in str(err.value)
    np.save(folders["audio"] / "dlgB_001.npy", np.zeros(5, np.float32))  # wrong dim
    with pytest.raises(ValueError, match=r"dims inconsistent: expected D=3 .* got 5"):
        read_gcnet(label, folders)
    np.save(folders["audio"] / "dlgB_001.npy", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        read_gcnet(label, folders)
    np.save(folders["audio"] / "dlgB_001.npy", np.zeros(3, np.float32))
    # wrong pickle length: names expected layouts and what was received
    bad = _dump([{}, {}, {}, {}, set()], tmp_path / "bad.pkl")
    with pytest.raises(ValueError, match=r"expected a list of 6 entries .* 7 entries .* length 5"):
        read_gcnet(bad, folders)
    # split id not in videoIDs
    with open(label, "rb") as fh:
        obj = pickle.load(fh)
    obj[5] = {"nope"}
    with pytest.raises(ValueError, match="'nope'"):
        read_gcnet(_dump(obj, tmp_path / "bad2.pkl"), folders)
    # labels list of the wrong length
    obj[5] = set()
    obj[1]["dlgB"] = [0, 1]
    with pytest.raises(ValueError, match=r"videoLabels\['dlgB'\] has 2 entries; expected 3"):
        read_gcnet(_dump(obj, tmp_path / "bad3.pkl"), folders)
    # malformed per-dialogue entries: a clear error naming the entry, never a raw TypeError
    obj[1]["dlgB"] = 2
    with pytest.raises(ValueError, match=r"videoLabels\['dlgB'\]: expected a list with one entry per utterance"):
        read_gcnet(_dump(obj, tmp_path / "bad4.pkl"), folders)
    obj[1]["dlgB"] = [0, 2, 1]
    obj[3]["dlgB"] = 7
    with pytest.raises(ValueError, match=r"videoSentence\['dlgB'\]: expected a list"):
        read_gcnet(_dump(obj, tmp_path / "bad5.pkl"), folders)
    obj[3]["dlgB"] = ["a", "b", "c"]
    obj[2]["dlgB"] = ["M", None, "M"]
    with pytest.raises(ValueError, match=r"videoSpeakers\['dlgB'\]: expected speaker names .* got NoneType"):
        read_gcnet(_dump(obj, tmp_path / "bad6.pkl"), folders)
    with pytest.raises(FileNotFoundError, match="feature folder not found"):
        read_gcnet(label, {"text": tmp_path / "missing"})
    with pytest.raises(ValueError, match="modality"):
        read_gcnet(label, {"smell": folders["text"]})
    with pytest.raises(FileNotFoundError):
        read_gcnet(tmp_path / "no_such.pkl", folders)


def test_gcnet_writer_rejects_duplicate_utterance_names(iemocap, tmp_path):
    sub = iemocap.subset(list(iemocap.dialogues)[:2])
    d0, d1 = sub.dialogues.values()
    d1.utterance_ids = list(d0.utterance_names()[:1]) + d1.utterance_names()[1:]
    with pytest.raises(ValueError, match="unique across the corpus"):
        write_gcnet(sub, tmp_path)


# ---------------------------------------------------------------- DialogueGCN
@pytest.mark.parametrize("variant", ["original", "roberta"])
@pytest.mark.parametrize("speaker_format", ["onehot", "names"])
def test_dialoguegcn_roundtrip(iemocap, tmp_path, variant, speaker_format):
    paths = write_dialoguegcn(iemocap, tmp_path / "IEMOCAP_features.pkl", variant=variant,
                              speaker_format=speaker_format)
    with open(paths["path"], "rb") as fh:
        raw = pickle.load(fh)
    assert len(raw) == (9 if variant == "original" else 12)
    first = next(iter(iemocap.dialogues))
    spk0 = raw[1][first][0]
    assert (spk0 in ([1, 0], [0, 1])) if speaker_format == "onehot" else spk0 in ("F", "M")
    back = read_dialoguegcn(**paths, name=iemocap.name, num_classes=6,
                            label_names=iemocap.label_names)
    assert_corpus_equal(iemocap, back)


def _hand_dialoguegcn(n_entries):
    ids = {"d1": ["u1", "u2"], "d2": ["v1"]}
    spk = {"d1": ["M", "F"], "d2": ["M"]}
    lab = {"d1": [3, 1], "d2": [0]}
    audio = {"d1": [np.ones(3), np.zeros(3)], "d2": np.full((1, 3), 2.0)}
    visual = {"d1": np.zeros((2, 2)), "d2": [np.ones(2)]}
    sent = {"d1": ["a", "b"], "d2": ["c"]}
    if n_entries == 9:
        text = {"d1": [np.ones(4), np.ones(4)], "d2": [np.zeros(4)]}
        return (ids, spk, lab, text, audio, visual, sent, ["d1"], ["d2"])
    robs = [{"d1": np.full((2, 4), float(k)), "d2": np.full((1, 4), float(k))} for k in range(1, 5)]
    return (ids, spk, lab, *robs, audio, visual, sent, ["d1"], ["d2"])


def test_dialoguegcn_hand_built(tmp_path):
    c = read_dialoguegcn(_dump(_hand_dialoguegcn(9), tmp_path / "f9.pkl"))
    assert c.feature_dims == {"text": 4, "audio": 3, "video": 2}
    assert c.splits == {"train": ["d1"], "test": ["d2"]}
    assert c.dialogues["d1"].speakers.tolist() == [1, 0]  # F -> 0, M -> 1 (as in GCNet)
    assert c.num_classes == 4
    c2 = read_dialoguegcn(tmp_path / "f9.pkl", speaker_map={"M": 0, "F": 1})  # DialogueGCN's own
    assert c2.dialogues["d1"].speakers.tolist() == [0, 1]
    with pytest.raises(ValueError, match="text_feature"):
        read_dialoguegcn(tmp_path / "f9.pkl", text_feature="roberta2")

    path12 = _dump(_hand_dialoguegcn(12), tmp_path / "f12.pkl")
    assert read_dialoguegcn(path12).dialogues["d1"].features["text"][0, 0] == 1.0  # roberta1
    for k in (2, 3, 4):
        for sel in (k, f"roberta{k}"):
            got = read_dialoguegcn(path12, text_feature=sel).dialogues["d2"].features["text"]
            assert np.all(got == float(k))
    mean = read_dialoguegcn(path12, text_feature="mean").dialogues["d1"].features["text"]
    assert np.allclose(mean, 2.5)
    with pytest.raises(ValueError, match="text_feature"):
        read_dialoguegcn(path12, text_feature="roberta5")


def test_dialoguegcn_meld_layout(tmp_path):
    eye = np.eye(9).tolist()
    meld = ({"0": ["0_0", "0_1"]}, {"0": [eye[0], eye[3]]}, {"0": [0, 6]}, {"0": [np.ones(600)] * 2},
            {"0": [np.full(300, 2.0)] * 2}, {"0": [np.full(342, 3.0)] * 2}, {"0": ["hi", "yo"]}, ["0"], [],
            {"0": [1, 2]})  # MMGCN's MELD_features_raw1.pkl: the 9 fields + sentiment labels (not read)
    c = read_dialoguegcn(_dump(meld, tmp_path / "MELD_features_raw1.pkl"), num_classes=7)
    assert c.feature_dims == {"text": 600, "audio": 300, "video": 342} and c.num_classes == 7
    d = c.dialogues["0"]
    assert d.speakers.tolist() == [0, 3] and d.labels.tolist() == [0, 6] and d.sentences == ["hi", "yo"]
    assert np.all(d.features["audio"] == 2.0) and c.splits == {"train": ["0"], "test": []}
    # DialogueGCN's own MELD pickle (9 entries, no visual, sentiment last) is refused, not misread
    dialoguegcn_meld = meld[:5] + ({"0": ["hi", "yo"]}, ["0"], [], {"0": [1, 2]})
    with pytest.raises(ValueError, match="entry 'videoSentence' must be a dict keyed by dialogue id, got list"):
        read_dialoguegcn(_dump(dialoguegcn_meld, tmp_path / "MELD_features_raw.pkl"))


def test_dialoguegcn_errors(iemocap, mosi, tmp_path):
    bad = list(_hand_dialoguegcn(9))
    with pytest.raises(ValueError, match=r"9 entries .* 12 entries .* length 8"):
        read_dialoguegcn(_dump(tuple(bad[:8]), tmp_path / "b.pkl"))
    bad[1] = {"d1": [[1, 1], [0, 1]], "d2": [[1, 0]]}
    with pytest.raises(ValueError, match="one-hot"):
        read_dialoguegcn(_dump(tuple(bad), tmp_path / "b2.pkl"))
    bad = list(_hand_dialoguegcn(9))
    bad[4] = {"d1": [np.ones(3)], "d2": [np.ones(3)]}
    with pytest.raises(ValueError, match=r"videoAudio\['d1'\]: expected shape \[2, D\]"):
        read_dialoguegcn(_dump(tuple(bad), tmp_path / "b3.pkl"))
    bad = list(_hand_dialoguegcn(9))
    bad[2] = dict(bad[2], d1=5)
    with pytest.raises(ValueError, match=r"videoLabels\['d1'\]: expected a list with one entry per utterance"):
        read_dialoguegcn(_dump(tuple(bad), tmp_path / "b4.pkl"))
    # the format has no validation split
    with pytest.raises(ValueError, match="no validation split"):
        write_dialoguegcn(mosi, tmp_path / "m.pkl")
    p = write_dialoguegcn(mosi, tmp_path / "m.pkl", valid="train")["path"]
    back = read_dialoguegcn(p)
    assert sorted(back.splits["train"]) == sorted(mosi.splits["train"] + mosi.splits["valid"])
    assert back.task == "regression"


# ---------------------------------------------------------------- MMSA
@pytest.mark.parametrize("aligned", [True, False])
def test_mmsa_dataset_roundtrip_exact(mosi, tmp_path, aligned):
    data = MMSADataset.from_corpus(mosi, seq_len=10, aligned=aligned, seed=1)
    path = write_mmsa(data, tmp_path / ("aligned_10.pkl" if aligned else "unaligned_10.pkl"))["path"]
    with open(path, "rb") as fh:
        raw = pickle.load(fh)
    assert set(raw) == {"train", "valid", "test"}
    assert raw["train"]["text_bert"].shape[1:] == (3, 10)
    assert ("audio_lengths" in raw["train"]) == (not aligned)
    back = read_mmsa(path, name="mosi")
    assert back.aligned == aligned and back.task == "regression"
    assert back.feature_dims == DIMS and back.seq_lens == {m: 10 for m in DIMS}
    for s, sp in data.splits.items():
        bs = back.split(s)
        assert bs.ids == sp.ids
        np.testing.assert_array_equal(bs.labels, sp.labels)
        for m in DIMS:
            np.testing.assert_array_equal(bs.features[m], sp.features[m])
            np.testing.assert_array_equal(bs.lengths[m], sp.lengths[m])
        if aligned:
            assert all(np.array_equal(bs.lengths["text"], bs.lengths[m]) for m in DIMS)
    torch_view = back.split("test").as_torch()
    assert tuple(torch_view["audio"].shape) == (len(back.split("test")), 10, DIMS["audio"])


def test_mmsa_corpus_roundtrip_pooled(mosi, tmp_path):
    path = write_mmsa(mosi, tmp_path / "aligned_6.pkl", seq_len=6, aligned=False, seed=2)["path"]
    back = read_mmsa(path).to_corpus(name="mosi")
    # pooled sequences give back the utterance features; the single speaker is preserved
    assert corpus_differences(mosi, back, atol=1e-5, check_split_order=True) == []
    # an iemocap corpus (classification) through MMSA loses only the speakers
    iem = make_synthetic("iemocap4", seed=0, scale=0.02, feature_dims=5)
    p2 = write_mmsa(iem, tmp_path / "iem.pkl", seq_len=4)["path"]
    back2 = read_mmsa(p2, label_key="classification_labels").to_corpus(
        num_classes=4, label_names=iem.label_names)
    diffs = corpus_differences(iem, back2, atol=1e-5)
    assert diffs and all("speakers" in d for d in diffs)


def test_mmsa_hand_built_grouping_and_cleaning(tmp_path):
    n, t = 4, 3
    audio = np.zeros((n, t, 2), np.float32)
    audio[:, 0] = 1.0
    audio[1, 1] = -np.inf
    audio[2, :] = [[4.0, 4.0], [-np.inf, 2.0], [0.0, 0.0]]
    vision = np.ones((n, t, 2), np.float32)
    text = np.arange(n * t * 3, dtype=np.float32).reshape(n, t, 3)
    bert = np.zeros((n, 3, t), np.float32)
    bert[:, 1, :2] = 1
    split = {"text": text, "text_bert": bert, "audio": audio, "vision": vision,
             "raw_text": np.array(["c", "a", "b", "z"]),
             "id": np.array(["vidX$_$10", "vidX$_$2", "vidY$_$1", "vidX$_$3"]),
             "regression_labels": np.array([1.0, -2.0, 0.0, 0.6], np.float32),
             "classification_labels": np.array([2, 0, 1, 2])}
    (tmp_path / "MOSI").mkdir()
    test_split = dict(split, id=np.array(["vidZ_1", "vidZ_0", "solo", "vidX$_$1"]))
    path = _dump({"train": split, "test": test_split}, tmp_path / "MOSI" / "aligned_50.pkl")
    data = read_mmsa(path)
    assert data.name == "MOSI" and data.aligned
    sp = data.split("train")
    assert not np.isneginf(sp.features["audio"]).any()  # -inf cleaned to 0
    assert sp.lengths["text"].tolist() == [2] * n and sp.lengths["audio"].tolist() == [2] * n
    c = data.to_corpus()
    assert c.splits["train"] == ["vidX@train", "vidY"]
    x = c.dialogues["vidX@train"]
    # clips ordered numerically: 2, 3, 10
    assert x.utterance_ids == ["vidX_2", "vidX_3", "vidX_10"]
    np.testing.assert_allclose(x.labels, [-2.0, 0.6, 1.0])
    assert x.sentences == ["a", "z", "c"]
    # "nonzero" pooling: clip vidY (row 2) has rows [4,4], [0,2] (after -inf -> 0) and a zero row
    np.testing.assert_allclose(c.dialogues["vidY"].features["audio"][0], [2.0, 3.0])
    lengths_pool = data.to_corpus(pool="lengths").dialogues["vidY"].features["audio"][0]
    np.testing.assert_allclose(lengths_pool, [2.0, 3.0])
    all_pool = data.to_corpus(pool="all").dialogues["vidY"].features["audio"][0]
    np.testing.assert_allclose(all_pool, [4.0 / 3, 2.0])
    assert sorted(c.splits["test"]) == ["solo", "vidX@test", "vidZ"]
    assert c.dialogues["vidZ"].utterance_ids == ["vidZ_0", "vidZ_1"]
    cls = read_mmsa(path, label_key="classification_labels").to_corpus()
    assert cls.task == "classification" and cls.num_classes == 3
    # a missing key is named
    bad = {"train": {k: v for k, v in split.items() if k != "vision"}}
    with pytest.raises(ValueError, match=r"lacks keys \['vision'\]"):
        read_mmsa(_dump(bad, tmp_path / "bad.pkl"))
    # unreadable arrays name the split and the key
    bad = {"train": dict(split, regression_labels=np.array(["x", "y", "z", "w"]))}
    with pytest.raises(ValueError, match=r"split 'train': 'regression_labels': expected a numeric array"):
        read_mmsa(_dump(bad, tmp_path / "bad2.pkl"))
    bad = {"train": dict(split, audio=[np.zeros((3, 2)), np.zeros((2, 2)), np.zeros((3, 2)), np.zeros((3, 2))])}
    with pytest.raises(ValueError, match=r"split 'train': 'audio': expected a numeric array"):
        read_mmsa(_dump(bad, tmp_path / "bad3.pkl"))
    with pytest.raises(ValueError, match="label_key"):
        read_mmsa(path, label_key="labels")


def test_mmsa_split_validation():
    with pytest.raises(ValueError, match="features"):
        MMSASplit(features={"text": np.zeros((2, 3))}, lengths={"text": np.zeros(2, np.int64)},
                  labels=np.zeros(2, np.float32), ids=["a", "b"], raw_text=["", ""])


# ---------------------------------------------------------------- synthetic in all formats
def test_write_synthetic_all_formats_agree(tmp_path):
    out = write_synthetic("mosi", tmp_path, seed=5, scale=0.05, feature_dims=4, mmsa_seq_len=5)
    corpus = out["corpus"]
    assert (tmp_path / "gcnet").is_dir() and out["mmsa"]["path"].name == "aligned_5.pkl"
    g = read_gcnet(**out["gcnet"], name="mosi")
    assert_corpus_equal(corpus, g)
    d = read_dialoguegcn(**out["dialoguegcn"])
    assert sorted(d.splits["train"]) == sorted(corpus.splits["train"] + corpus.splits["valid"])
    for did, dlg in d.dialogues.items():
        np.testing.assert_array_equal(dlg.features["video"], corpus.dialogues[did].features["video"])
    m = read_mmsa(**out["mmsa"]).to_corpus(name="mosi")
    assert corpus_differences(corpus, m, atol=1e-5) == []
    with pytest.raises(ValueError, match="unknown format"):
        write_synthetic("mosi", tmp_path, formats=("csv",))


def test_non_finite_features_are_refused_with_the_utterance_named(tmp_path):
    """A NaN would survive the missing-modality masks (0 * NaN is NaN) into the model input."""
    from imer_fast.data import Dialogue

    features = {"text": np.zeros((3, 2), np.float32), "video": np.zeros((3, 2), np.float32)}
    features["video"][1, 0] = np.nan
    with pytest.raises(ValueError, match=r"Dialogue 'd'.features\['video'\]: utterance 1 \('d_1'\) holds a "
                                         r"non-finite value \(nan\); 1 utterance"):
        Dialogue("d", features, np.zeros(3), np.zeros(3, np.int64), utterance_ids=["d_0", "d_1", "d_2"])
    label, folders, utts = _hand_gcnet(tmp_path)
    for m, d in (("text", 4), ("audio", 3), ("video", 2)):
        for u in utts + ["dlgA_u1"]:
            np.save(folders[m] / f"{u}.npy", np.zeros(d, np.float32))
    np.save(folders["audio"] / "dlgB_002.npy", np.array([0.0, np.inf, 0.0], np.float32))
    with pytest.raises(ValueError, match=r"features\['audio'\]: utterance 2 \('dlgB_002'\) holds a non-finite value "
                                         r"\(inf\)"):
        read_gcnet(label, folders)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_feature_file_is_named(tmp_path, damage):
    label, folders, utts = _hand_gcnet(tmp_path)
    for m, d in (("text", 4), ("audio", 3), ("video", 2)):
        for u in utts + ["dlgA_u1"]:
            np.save(folders[m] / f"{u}.npy", np.zeros(d, np.float32))
    bad = folders["video"] / "dlgB_001.npy"
    bad.write_bytes(bad.read_bytes()[:-3] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=rf"feature file '.*dlgB_001.npy' of utterance 'dlgB_001' \(video\) cannot "
                                         rf"be read: \w+Error"):
        read_gcnet(label, folders)


def _mmsa_split(n=3, t=4):
    return {"text": np.zeros((n, t, 3), np.float32), "audio": np.zeros((n, t, 2), np.float32),
            "vision": np.zeros((n, t, 2), np.float32), "id": np.array([f"v$_${i}" for i in range(n)]),
            "regression_labels": np.zeros(n, np.float32), "classification_labels": np.arange(n)}


def test_mmsa_reader_checks_labels_and_lengths_against_the_clips(tmp_path):
    (tmp_path / "MOSI").mkdir()
    path = tmp_path / "MOSI" / "aligned_50.pkl"
    cases = [
        (dict(regression_labels=np.zeros(2, np.float32)), "'regression_labels': expected 3 labels \\(one per 'id'\\), "
                                                          "got 2", "regression_labels"),
        (dict(classification_labels=np.array([0.5, 1.7, 2.0])), "class labels must be integers; clip 'v\\$_\\$0' has "
                                                                "0.5", "classification_labels"),
        (dict(audio_lengths=np.array([4, 0, 5])), "'audio_lengths': lengths must lie in \\[0, 4\\] .* clip "
                                                  "'v\\$_\\$2' has 5", "regression_labels"),
        (dict(vision_lengths=np.array([-1, 1, 1]), audio_lengths=np.array([1, 1, 1])), "'vision_lengths': .* has -1",
         "regression_labels"),
    ]
    for change, message, label_key in cases:
        _dump({"train": dict(_mmsa_split(), **change)}, path)
        with pytest.raises(ValueError, match=message):
            read_mmsa(path, label_key=label_key)
    _dump({"train": _mmsa_split()}, path)
    assert read_mmsa(path, label_key="classification_labels").split("train").labels.tolist() == [0, 1, 2]
