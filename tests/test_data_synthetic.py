"""The synthetic generator: real statistics, learnable signal, cross-modal redundancy, context."""
import numpy as np
import pytest

from imer_fast.data import MODALITIES, make_synthetic
from imer_fast.data.synthetic import SYNTHETIC_SPECS

SMALL = 16  # feature dimension used for statistics tests (dims do not affect lengths/labels)


@pytest.fixture(scope="module")
def iemocap6():
    return make_synthetic("iemocap6", seed=0, feature_dims=32)


@pytest.fixture(scope="module")
def mosi():
    return make_synthetic("mosi", seed=0, feature_dims=32)


def _stack(corpus, split, m):
    return np.concatenate([d.features[m] for d in corpus.split(split)]).astype(np.float64)


def _labels(corpus, split):
    return np.concatenate([d.labels for d in corpus.split(split)])


def _ridge(x, y, lam=1.0):
    x1 = np.hstack([x, np.ones((len(x), 1))])
    w = np.linalg.solve(x1.T @ x1 + lam * np.eye(x1.shape[1]), x1.T @ y)
    return lambda z: np.hstack([z, np.ones((len(z), 1))]) @ w


def _balanced_accuracy(pred, y, k):
    return float(np.mean([np.mean(pred[y == c] == c) for c in range(k) if np.any(y == c)]))


def _length_stats(lengths):
    return (lengths.min(), lengths.max(), np.median(lengths), np.percentile(lengths, 10),
            np.percentile(lengths, 90))


# ----------------------------------------------------------------- statistics
def test_iemocap6_statistics(iemocap6):
    c = iemocap6
    assert c.task == "classification" and c.num_classes == 6 and c.num_speakers == 2
    assert c.label_names == ["hap", "sad", "neu", "ang", "exc", "fru"]
    assert len(c.dialogues) == 151 and {s: len(v) for s, v in c.splits.items()} == {
        "train": 120, "test": 31}
    assert c.num_utterances() == 7433
    assert c.num_utterances("train") == 5810 and c.num_utterances("test") == 1623
    lo, hi, med, p10, p90 = _length_stats(c.lengths())
    assert (lo, hi) == (8, 110)
    assert abs(med - 47) <= 2 and abs(p10 - 28) <= 3 and abs(p90 - 69) <= 3
    assert abs(c.lengths().mean() - 49.2) < 0.1
    target = np.array([648, 1084, 1708, 1103, 1041, 1849]) / 7433
    freq = c.label_counts() / c.num_utterances()
    assert np.abs(freq - target).max() <= 0.006
    # IEMOCAP-like ids: sessions 1-4 train, session 5 test; two speakers per dialogue
    assert all(did[4] in "1234" for did in c.splits["train"])
    assert all(did[4] == "5" for did in c.splits["test"])
    assert all(set(d.speakers.tolist()) <= {0, 1} for d in c.dialogues.values())
    assert np.mean([len(set(d.speakers.tolist())) == 2 for d in c.dialogues.values()]) > 0.95
    assert c.splits["train"] == sorted(c.splits["train"])


def test_iemocap4_statistics():
    c = make_synthetic("iemocap4", seed=1, feature_dims=SMALL)
    assert len(c.dialogues) == 151 and c.num_utterances() == 5531
    lo, hi, med, _, _ = _length_stats(c.lengths())
    assert (lo, hi) == (5, 110) and abs(med - 37) <= 2
    target = np.array([1636, 1084, 1708, 1103]) / 5531
    assert np.abs(c.label_counts() / 5531 - target).max() <= 0.006


def test_mosi_statistics(mosi):
    c = mosi
    assert c.task == "regression" and c.num_classes == 1 and c.num_speakers == 1
    assert {s: len(v) for s, v in c.splits.items()} == {"train": 52, "valid": 10, "test": 31}
    assert {s: c.num_utterances(s) for s in c.splits} == {"train": 1284, "valid": 229, "test": 686}
    lo, hi, med, _, _ = _length_stats(c.lengths())
    assert (lo, hi) == (9, 63) and abs(med - 22) <= 2
    y = np.concatenate([d.labels for d in c.dialogues.values()])
    assert y.dtype == np.float32 and y.min() >= -3 and y.max() <= 3
    assert np.allclose(y * 5, np.round(y * 5), atol=1e-4)  # 0.2 grid
    assert 0.8 < y.std() < 2.0 and 0.01 < np.mean(y == 0) < 0.2
    assert all(np.all(d.speakers == 0) for d in c.dialogues.values())


def test_mosei_small_and_scale():
    c = make_synthetic("mosei", seed=0, feature_dims=SMALL)
    spec = SYNTHETIC_SPECS["mosei"]
    assert {s: len(v) for s, v in c.splits.items()} == spec["splits"]
    assert {s: c.num_utterances(s) for s in c.splits} == spec["utterances"]
    assert c.lengths().min() == 1  # includes length-1 videos
    tiny = make_synthetic("mosi", seed=0, scale=0.01, feature_dims=SMALL)
    assert all(len(v) == 2 for v in tiny.splits.values())  # at least a couple per split
    half = make_synthetic("iemocap6", seed=0, scale=0.5, feature_dims=SMALL)
    assert {s: len(v) for s, v in half.splits.items()} == {"train": 60, "test": 16}
    assert abs(half.lengths().mean() - 49.2) < 1.5


def test_feature_dims_override():
    c = make_synthetic("iemocap4", seed=0, scale=0.02, feature_dims={"audio": 7})
    assert c.feature_dims == {"text": 1024, "audio": 7, "video": 1024}
    d = next(iter(c.dialogues.values()))
    assert d.features["audio"].shape == (d.length, 7) and d.features["text"].dtype == np.float32
    assert make_synthetic("mosi", scale=0.02, feature_dims=3).feature_dims == {m: 3 for m in MODALITIES}


def test_errors():
    with pytest.raises(ValueError, match=r"unknown synthetic dataset 'meld'.*iemocap6"):
        make_synthetic("meld")
    with pytest.raises(ValueError, match="scale"):
        make_synthetic("mosi", scale=0)
    with pytest.raises(ValueError, match="seed"):
        make_synthetic("mosi", seed=-1)
    with pytest.raises(ValueError, match="feature_dims"):
        make_synthetic("mosi", feature_dims={"smell": 3})
    with pytest.raises(ValueError, match=r"feature_dims\['text'\]"):
        make_synthetic("mosi", feature_dims={"text": 0})


# ----------------------------------------------------------------- reproducibility
def test_bitwise_reproducible():
    a = make_synthetic("iemocap6", seed=7, scale=0.1, feature_dims=24)
    b = make_synthetic("iemocap6", seed=7, scale=0.1, feature_dims=24)
    other = make_synthetic("iemocap6", seed=8, scale=0.1, feature_dims=24)
    assert a.splits == b.splits
    for did in a.dialogues:
        da, db = a.dialogues[did], b.dialogues[did]
        for m in MODALITIES:
            assert da.features[m].tobytes() == db.features[m].tobytes()
        assert da.labels.tobytes() == db.labels.tobytes()
        assert da.speakers.tobytes() == db.speakers.tobytes()
        assert da.extras["latent"].tobytes() == db.extras["latent"].tobytes()
        assert da.utterance_ids == db.utterance_ids
    assert any(not np.array_equal(a.dialogues[d].features["text"], other.dialogues[d].features["text"])
               for d in a.dialogues if d in other.dialogues)
    # the generative "world" does not depend on scale
    big = make_synthetic("iemocap6", seed=7, scale=0.3, feature_dims=24)
    for m in MODALITIES:
        assert np.array_equal(big.metadata["generator"]["W"][m], a.metadata["generator"]["W"][m])


def test_latent_is_stored_and_explains_features():
    c = make_synthetic("iemocap4", seed=2, scale=0.3, feature_dims=20)
    h = np.concatenate([d.extras["latent"] for d in c.dialogues.values()]).astype(np.float64)
    y = np.concatenate([d.labels for d in c.dialogues.values()])
    st = np.concatenate([d.extras["emotion_state"] for d in c.dialogues.values()])
    assert h.shape[1] == c.metadata["generator"]["latent_dim"] and np.array_equal(st, y)
    x = np.concatenate([d.features["text"] for d in c.dialogues.values()]).astype(np.float64)
    pred = _ridge(h, x, lam=1e-3)(h)
    r2 = 1 - ((pred - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r2 > 0.5  # text = W (h + xi) + private + noise: the clean latent explains most of it


# ----------------------------------------------------------------- learnable properties
def test_each_modality_alone_beats_chance(iemocap6):
    c = iemocap6
    ytr, yte = _labels(c, "train"), _labels(c, "test")
    k = c.num_classes
    majority = np.bincount(yte, minlength=k).max() / len(yte)
    scores = {}
    for m in MODALITIES:
        xtr, xte = _stack(c, "train", m), _stack(c, "test", m)
        # nearest centroid and a ridge (linear) classifier, both trained on the train split
        cent = np.stack([xtr[ytr == j].mean(0) for j in range(k)])
        nc = ((xte[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)
        lin = _ridge(xtr, np.eye(k)[ytr])(xte).argmax(1)
        scores[m] = (_balanced_accuracy(nc, yte, k), _balanced_accuracy(lin, yte, k),
                     np.mean(lin == yte))
        assert scores[m][0] > 1 / k + 0.08, (m, scores[m])
        assert scores[m][1] > 1 / k + 0.1, (m, scores[m])
    assert scores["text"][2] > majority + 0.1
    # text is the most informative modality, video the least
    assert scores["text"][1] > scores["video"][1]


def test_mosi_each_modality_predicts_sentiment(mosi):
    ytr, yte = _labels(mosi, "train"), _labels(mosi, "test")
    for m in MODALITIES:
        pred = _ridge(_stack(mosi, "train", m), ytr)(_stack(mosi, "test", m))
        assert np.corrcoef(pred, yte)[0, 1] > 0.4, m


@pytest.mark.parametrize("name", ["iemocap6", "mosi"])
def test_modalities_recoverable_from_the_others(name, iemocap6, mosi):
    c = iemocap6 if name == "iemocap6" else mosi
    for m in MODALITIES:
        others = [o for o in MODALITIES if o != m]
        xtr = np.hstack([_stack(c, "train", o) for o in others])
        xte = np.hstack([_stack(c, "test", o) for o in others])
        ytr, yte = _stack(c, "train", m), _stack(c, "test", m)
        pred = _ridge(xtr, ytr)(xte)
        r2 = 1 - ((pred - yte) ** 2).sum() / ((yte - yte.mean(0)) ** 2).sum()
        assert r2 > 0.1, (name, m, r2)
        # a control: shuffled rows carry no cross-modal information
        perm = np.random.default_rng(0).permutation(len(xtr))
        pred0 = _ridge(xtr[perm], ytr)(xte)
        r2_0 = 1 - ((pred0 - yte) ** 2).sum() / ((yte - yte.mean(0)) ** 2).sum()
        assert r2 > r2_0 + 0.1


def _context_features(c, split):
    rows = []
    for d in c.split(split):
        x = np.hstack([d.features[m] for m in MODALITIES]).astype(np.float64)
        prev, nxt = np.zeros_like(x), np.zeros_like(x)
        for i in range(d.length):
            same = np.flatnonzero(d.speakers == d.speakers[i])
            before, after = same[same < i], same[same > i]
            if before.size:
                prev[i] = x[before[-1]]
            if after.size:
                nxt[i] = x[after[0]]
        rows.append(np.hstack([x, prev, nxt]))
    return np.concatenate(rows)


def test_context_helps(iemocap6):
    c = iemocap6
    ytr, yte = _labels(c, "train"), _labels(c, "test")
    k = c.num_classes
    ctx_tr, ctx_te = _context_features(c, "train"), _context_features(c, "test")
    width = sum(c.feature_dims.values())
    alone = _ridge(ctx_tr[:, :width], np.eye(k)[ytr])(ctx_te[:, :width]).argmax(1)
    with_ctx = _ridge(ctx_tr, np.eye(k)[ytr])(ctx_te).argmax(1)
    assert np.mean(with_ctx == yte) > np.mean(alone == yte) + 0.03
    # labels are sticky within a speaker: far more repeats than independent draws would give
    same = [np.mean(d.labels[1:][d.speakers[1:] == d.speakers[:-1]]
                    == d.labels[:-1][d.speakers[1:] == d.speakers[:-1]])
            for d in c.dialogues.values() if np.any(d.speakers[1:] == d.speakers[:-1])]
    pi = c.label_counts() / c.num_utterances()
    assert np.mean(same) > (pi ** 2).sum() + 0.3


def _cross_modal_r2(c, m):
    others = [o for o in MODALITIES if o != m]
    xtr = np.hstack([_stack(c, "train", o) for o in others])
    xte = np.hstack([_stack(c, "test", o) for o in others])
    ytr, yte = _stack(c, "train", m), _stack(c, "test", m)
    pred = _ridge(xtr, ytr)(xte)
    return 1 - ((pred - yte) ** 2).sum() / ((yte - yte.mean(0)) ** 2).sum()


def test_modality_noise_sets_cross_modal_redundancy():
    default = make_synthetic("iemocap6", seed=0, scale=0.2, feature_dims=16)
    same = make_synthetic("iemocap6", seed=0, scale=0.2, feature_dims=16, modality_noise=1.0)
    for key, d in default.dialogues.items():
        for m in MODALITIES:
            assert np.array_equal(d.features[m], same.dialogues[key].features[m])
    redundant = make_synthetic("iemocap6", seed=0, scale=0.2, feature_dims=16, modality_noise=0.2)
    for m in MODALITIES:
        low, high = _cross_modal_r2(default, m), _cross_modal_r2(redundant, m)
        assert low < 0.5 and high > 0.8 and high > low + 0.3, (m, low, high)
    # labels, speakers and the shared latent do not depend on the noise amplitude
    for key, d in default.dialogues.items():
        r = redundant.dialogues[key]
        assert np.array_equal(d.labels, r.labels) and np.array_equal(d.extras["latent"], r.extras["latent"])
    with pytest.raises(ValueError, match="modality_noise: expected a non-negative number"):
        make_synthetic("mosi", modality_noise=-0.1)
