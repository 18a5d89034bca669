"""Padded and packed batches, datasets, loaders and mask seeding."""
import numpy as np
import pytest
import torch

from imer_fast.data import (CLASSIFICATION_PAD_LABEL, MODALITIES, Corpus, Dialogue, DialogueBatch,
                            DialogueDataset, collate_dialogues, make_loader, make_synthetic,
                            missing_fraction)

DIMS = {"text": 5, "audio": 3, "video": 4}


def _corpus(lengths=(1, 3, 1, 6), task="classification", valid=False):
    rng = np.random.default_rng(0)
    dialogues = {}
    for k, n in enumerate(lengths):
        did = f"d{k}"
        labels = rng.integers(0, 4, n) if task == "classification" else rng.normal(size=n)
        dialogues[did] = Dialogue(
            id=did, features={m: rng.normal(size=(n, d)) for m, d in DIMS.items()},
            labels=labels, speakers=rng.integers(0, 2, n))
    ids = list(dialogues)
    splits = {"train": ids[:-1], "test": ids[-1:]}
    if valid:
        splits["valid"] = []
    return Corpus(name="toy", dialogues=dialogues, splits=splits, task=task,
                  num_classes=4 if task == "classification" else 1, label_names=None,
                  feature_dims=DIMS, num_speakers=2)


def test_collate_padding_and_masking_with_length_one_dialogues():
    c = _corpus()
    ds = DialogueDataset(c, "train", missing="gcnet:0.5", seed=1)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert isinstance(batch, DialogueBatch)
    assert batch.dialogue_ids == ["d0", "d1", "d2"] and batch.lengths.tolist() == [1, 3, 1]
    assert batch.batch_size == 3 and batch.max_len == 3 and batch.num_utterances == 5
    for m, d in DIMS.items():
        assert batch.features[m].shape == (3, 3, d) and batch.features[m].dtype == torch.float32
    assert batch.availability.shape == (3, 3, 3) and batch.availability.dtype == torch.bool
    um = batch.utterance_mask
    assert um.tolist() == [[True, False, False], [True, True, True], [True, False, False]]
    assert not batch.availability[~um].any()  # False on padding
    assert (batch.labels[~um] == CLASSIFICATION_PAD_LABEL).all() and batch.labels.dtype == torch.int64
    assert (batch.speakers[~um] == 0).all()
    for i, did in enumerate(batch.dialogue_ids):
        dlg = c.dialogues[did]
        n = dlg.length
        assert batch.labels[i, :n].tolist() == dlg.labels.tolist()
        assert batch.speakers[i, :n].tolist() == dlg.speakers.tolist()
        assert np.array_equal(batch.availability[i, :n].numpy(), ds.availability[i])
        for j, m in enumerate(MODALITIES):
            gt = batch.ground_truth[m][i, :n].numpy()
            assert np.array_equal(gt, dlg.features[m])  # ground truth is unmasked
            avail = batch.availability[i, :n, j].numpy()
            x = batch.features[m][i, :n].numpy()
            assert np.array_equal(x[avail], gt[avail]) and not x[~avail].any()
            assert not batch.features[m][i, n:].any() and not batch.ground_truth[m][i, n:].any()
    # stored corpus features are never modified by masking
    assert np.array_equal(c.dialogues["d1"].features["text"], _corpus().dialogues["d1"].features["text"])


def test_regression_padding_and_plain_dialogues():
    c = _corpus(task="regression")
    batch = collate_dialogues(c.split("train"), pad_length=8)
    assert batch.task == "regression" and batch.labels.dtype == torch.float32
    assert batch.max_len == 8 and (batch.labels[~batch.utterance_mask] == 0.0).all()
    assert batch.availability[batch.utterance_mask].all()  # no protocol: everything available
    assert batch.missing_fraction() == 0.0


def test_zero_length_split_and_empty_batch():
    c = _corpus(valid=True)
    ds = DialogueDataset(c, "valid", missing="gcnet:0.3")
    assert len(ds) == 0
    assert list(make_loader(c, "valid", batch_size=4, missing="imder:0.5")) == []
    assert list(make_loader(_corpus(), "valid", batch_size=2)) == []  # split absent altogether
    empty = ds.collate([])
    assert empty.batch_size == 0 and empty.num_utterances == 0
    assert empty.features["audio"].shape == (0, 0, 3) and empty.availability.shape == (0, 0, 3)
    packed = empty.packed()
    assert packed.cu_seqlens.tolist() == [0] and packed.max_seqlen == 0
    assert packed.features["text"].shape == (0, 5)
    with pytest.raises(ValueError, match="empty list"):
        collate_dialogues([])


def test_packed_matches_padded():
    c = make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=6)
    batch = next(iter(make_loader(c, "train", batch_size=4, shuffle=True, missing="gcnet:0.4")))
    p = batch.packed()
    n = batch.num_utterances
    assert p.num_utterances == n and p.cu_seqlens.dtype == torch.int32
    assert p.cu_seqlens.tolist() == [0] + np.cumsum(batch.lengths.numpy()).tolist()
    assert p.max_seqlen == int(batch.lengths.max())
    for m in MODALITIES:
        assert p.features[m].shape == (n, 6)
        assert torch.equal(p.to_padded(p.features[m]), batch.features[m])
        assert torch.equal(p.to_padded(p.ground_truth[m]), batch.ground_truth[m])
    assert torch.equal(p.to_padded(p.availability, False), batch.availability)
    assert torch.equal(p.to_padded(p.labels, -100), batch.labels)
    assert torch.equal(p.to_padded(p.speakers), batch.speakers)
    # segment b of the packed layout is dialogue b
    for b in range(batch.batch_size):
        s, e = p.cu_seqlens[b].item(), p.cu_seqlens[b + 1].item()
        ln = batch.lengths[b].item()
        assert torch.equal(p.features["text"][s:e], batch.features["text"][b, :ln])
        assert (p.batch_index[s:e] == b).all() and p.position[s:e].tolist() == list(range(ln))
    moved = p.to("cpu")
    assert torch.equal(moved.cu_seqlens, p.cu_seqlens)
    with pytest.raises(ValueError, match="first dimension"):
        p.to_padded(torch.zeros(n + 1))


def test_masks_are_seeded_per_epoch_and_independent_of_batching():
    c = make_synthetic("mosi", seed=0, scale=0.3, feature_dims=4)

    def masks(**kw):
        out = {}
        for b in make_loader(c, "train", missing="gcnet:0.3", seed=11, **kw):
            for i, did in enumerate(b.dialogue_ids):
                out[did] = b.availability[i, : b.lengths[i]].numpy().copy()
        return out

    a = masks(batch_size=3, epoch=0)
    assert set(a) == set(c.splits["train"])
    same = masks(batch_size=5, shuffle=True, epoch=0)
    assert all(np.array_equal(a[k], same[k]) for k in a)
    other_epoch = masks(batch_size=3, epoch=1)
    assert any(not np.array_equal(a[k], other_epoch[k]) for k in a)
    # split-level missing fraction is the requested rate
    allmask = np.concatenate([a[k] for k in c.splits["train"]])
    assert abs(missing_fraction(allmask) - 0.3) <= 0.005 and allmask.any(axis=1).all()
    ds = DialogueDataset(c, "train", missing="gcnet:0.3", seed=11, epoch=0)
    first = [x.copy() for x in ds.availability]
    ds.set_epoch(1)
    assert any(not np.array_equal(x, y) for x, y in zip(first, ds.availability))
    ds.set_epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip(first, ds.availability))
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


def test_loader_order_workers_and_imder_schedule():
    full = make_synthetic("mosi", seed=1, scale=0.4, feature_dims=4)
    c = full.subset(full.splits["train"][:20] + full.splits["test"])
    n = len(c.splits["train"])
    assert n == 20
    plain = [b.dialogue_ids for b in make_loader(c, "train", batch_size=2)]
    assert sum(plain, []) == c.splits["train"]
    shuffled = [b.dialogue_ids for b in make_loader(c, "train", batch_size=2, shuffle=True, seed=3)]
    again = [b.dialogue_ids for b in make_loader(c, "train", batch_size=2, shuffle=True, seed=3)]
    assert shuffled == again and sorted(sum(shuffled, [])) == sorted(c.splits["train"])
    assert shuffled != plain
    assert len(list(make_loader(c, "train", batch_size=3, drop_last=True))) == n // 3
    # IMDer at MR 0.5 over 10 batches: 7 batches keep one modality, 1 keeps two, 2 keep all
    batches = list(make_loader(c, "train", batch_size=2, missing="imder:0.5", seed=2))
    nb = len(batches)
    assert nb == 10
    kept = []
    for b in batches:
        rows = b.availability[b.utterance_mask]
        assert (rows == rows[0]).all()  # one pattern per batch
        kept.append(int(rows[0].sum()))
    assert kept == [1] * 7 + [2] + [3] * 2
    # worker processes give the same batches (masks do not depend on the process)
    multi = list(make_loader(c, "train", batch_size=2, missing="imder:0.5", seed=2, num_workers=2))
    for a, b in zip(batches, multi):
        assert a.dialogue_ids == b.dialogue_ids and torch.equal(a.availability, b.availability)
        assert torch.equal(a.features["video"], b.features["video"])
    # a batch-level protocol cannot be collated without its batch position
    ds = DialogueDataset(c, "train", missing="imder:0.5")
    with pytest.raises(ValueError, match="batch-level"):
        ds.collate([ds[0]])
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(c, "train", batch_size=0)


def test_fixed_pattern_and_to_device():
    c = _corpus()
    batch = next(iter(make_loader(c, "train", batch_size=8, missing="fixed:ta")))
    real = batch.availability[batch.utterance_mask]
    assert real[:, :2].all() and not real[:, 2].any()
    assert not batch.features["video"].any() and batch.ground_truth["video"].abs().sum() > 0
    assert batch.missing_fraction() == pytest.approx(1 / 3)
    moved = batch.to("cpu")
    assert isinstance(moved, DialogueBatch) and torch.equal(moved.labels, batch.labels)
    assert moved.modalities == MODALITIES


def test_corpus_with_two_modalities():
    c = _corpus()
    dialogues = {k: Dialogue(id=k, features={m: d.features[m] for m in ("text", "audio")},
                             labels=d.labels, speakers=d.speakers) for k, d in c.dialogues.items()}
    two = Corpus(name="ta", dialogues=dialogues, splits=c.splits, task="classification",
                 num_classes=4, label_names=None, feature_dims={"text": 5, "audio": 3},
                 num_speakers=2)
    batch = next(iter(make_loader(two, "train", batch_size=8)))
    assert set(batch.features) == {"text", "audio"}
    assert not batch.availability[..., 2].any()  # absent modality: never available
    assert batch.availability[batch.utterance_mask][:, :2].all()
    assert batch.missing_fraction() == 0.0  # counted over the corpus's two modalities
    for spec in ("gcnet:0.3", "gcnet:0.7", "imder:0.7"):
        for batch in make_loader(two, "train", batch_size=2, missing=spec, seed=0):
            avail = batch.availability[batch.utterance_mask]
            assert avail[:, :2].any(dim=1).all(), spec  # no utterance left without an input
            assert not avail[:, 2].any()
    with pytest.raises(ValueError, match="keeps none of the corpus's modalities"):
        make_loader(two, "train", batch_size=2, missing="fixed:v")


def test_float_labels_are_not_truncated_into_classes():
    d = Dialogue(id="d0", features={"text": np.zeros((3, 2), np.float32)}, labels=np.array([0.4, -1.6, 2.8]),
                 speakers=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"task: 'classification' needs integer labels; dialogue 'd0' has float32 labels"):
        collate_dialogues([d], task="classification")
    assert torch.equal(collate_dialogues([d], task="regression").labels, torch.tensor([[0.4, -1.6, 2.8]]))

