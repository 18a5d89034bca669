"""Validation of the core Dialogue/Corpus types."""
import numpy as np
import pytest

from imer_fast.data import (Corpus, Dialogue, assert_corpus_equal, canonical_modality,
                            corpus_differences, make_synthetic)

DIMS = {"text": 4, "audio": 3, "video": 2}


def _dialogue(did="d", n=3, **over):
    kw = dict(id=did, features={m: np.zeros((n, d)) for m, d in DIMS.items()},
              labels=np.arange(n) % 2, speakers=np.zeros(n, np.int64))
    kw.update(over)
    return Dialogue(**kw)


def _corpus(**over):
    kw = dict(name="c", dialogues={"d": _dialogue()}, splits={"train": ["d"]},
              task="classification", num_classes=2, label_names=None, feature_dims=DIMS,
              num_speakers=1)
    kw.update(over)
    return Corpus(**kw)


def test_dialogue_coerces_dtypes():
    d = _dialogue(labels=[1, 0, 1], speakers=[0, 1, 0])
    assert d.features["text"].dtype == np.float32 and d.labels.dtype == np.int64
    assert d.speakers.dtype == np.int64 and len(d) == 3
    assert d.utterance_names() == ["d_000", "d_001", "d_002"]
    r = _dialogue(labels=np.array([0.5, -1.0, 2.0]))
    assert r.labels.dtype == np.float32


@pytest.mark.parametrize("over, match", [
    (dict(labels=np.zeros(4, np.int64)), r"features\['text'\]: expected 4 rows"),
    (dict(speakers=np.zeros(2, np.int64)), r"speakers: expected shape \(3,\)"),
    (dict(features={"text": np.zeros((3, 2, 2))}), "2-D"),
    (dict(features={"smell": np.zeros((3, 2))}), "unknown modalities"),
    (dict(sentences=["a"]), "sentences: expected 3"),
    (dict(utterance_ids=["a", "a", "b"]), "unique"),
    (dict(speakers=np.array([0, -1, 0])), ">= 0"),
    (dict(labels=np.zeros(0, np.int64), features={"text": np.zeros((0, 2))},
          speakers=np.zeros(0, np.int64)), "at least one utterance"),
])
def test_dialogue_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _dialogue(**over)


@pytest.mark.parametrize("over, match", [
    (dict(task="ranking"), "task"),
    (dict(num_classes=1), "num_classes"),
    (dict(task="regression", num_classes=2), "num_classes: expected 1"),
    (dict(label_names=["a"]), "label_names: expected 2"),
    (dict(feature_dims={"text": 4, "audio": 3, "video": 5}),
     r"dims inconsistent: expected D=5 .* got 2"),
    (dict(feature_dims={"text": 4, "audio": 3}), "expected modalities"),
    (dict(splits={"train": ["x"]}), r"dialogue id 'x' does not exist"),
    (dict(splits={"train": ["d"], "test": ["d"]}), "already listed"),
    (dict(splits={"dev": ["d"]}), "unknown split 'dev'"),
    (dict(num_classes=1, task="classification"), "num_classes"),
    (dict(dialogues={"d": _dialogue(labels=np.array([0, 1, 5]))}), r"class indices in \[0, 2\)"),
    (dict(dialogues={"e": _dialogue()}, splits={}), "expected it to equal its key"),
    (dict(dialogues={"d": _dialogue(speakers=np.array([0, 1, 0]))}), "num_speakers=1"),
])
def test_corpus_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _corpus(**over)


def test_corpus_queries_and_comparison():
    c = make_synthetic("iemocap4", seed=0, scale=0.03, feature_dims=3)
    assert c.split("valid") == [] and len(c.split("train")) == len(c.splits["train"])
    assert c.lengths("test").sum() == c.num_utterances("test")
    assert c.label_counts().sum() == c.num_utterances()
    sub = c.subset(c.splits["test"])
    assert set(sub.splits["test"]) == set(c.splits["test"]) and sub.splits["train"] == []
    assert "iemocap4" in repr(c) and "utterances=" in repr(c)
    assert corpus_differences(c, c) == []
    other = make_synthetic("iemocap4", seed=1, scale=0.03, feature_dims=3)
    with pytest.raises(AssertionError, match="corpora differ"):
        assert_corpus_equal(c, other)
    with pytest.raises(ValueError, match="label_counts"):
        make_synthetic("mosi", scale=0.02, feature_dims=2).label_counts()
    assert canonical_modality("l") == "text" and canonical_modality("vision") == "video"
    with pytest.raises(ValueError, match="modality"):
        canonical_modality("smell")


def test_with_modalities_keeps_the_dialogues_and_draws_masks_over_the_kept_modalities():
    from imer_fast.data import make_loader, make_synthetic

    corpus = make_synthetic("iemocap4", scale=0.05, feature_dims=8)
    two = corpus.with_modalities(["audio", "l"])          # aliases allowed; canonical order kept
    assert two.feature_dims == {"text": 8, "audio": 8} and two.splits == corpus.splits
    for did, d in two.dialogues.items():
        assert set(d.features) == {"text", "audio"}
        np.testing.assert_array_equal(d.features["audio"], corpus.dialogues[did].features["audio"])
        np.testing.assert_array_equal(d.labels, corpus.dialogues[did].labels)
    available = np.concatenate([b.packed().availability.numpy()
                                for b in make_loader(two, "train", 4, missing="gcnet:0.5", seed=0)])
    assert not available[:, 2].any() and available[:, :2].any(axis=1).all()   # no utterance left without both
    assert available[:, :2].mean() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="with_modalities: expected distinct modalities among \\('text', 'audio'\\)"):
        two.with_modalities(["video"])
    with pytest.raises(ValueError, match="with_modalities"):
        corpus.with_modalities(["text", "text"])
