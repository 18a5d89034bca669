"""Missing-modality protocols: GCNet/CPM masks, IMDer schedule, fixed patterns, the factory."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imer_fast.data import (FixedAvailability, GCNetMissing, IMDerMissing, NoMissing,
                            all_patterns, evaluate_patterns, fixed, gcnet, imder, make_protocol,
                            missing_fraction, pattern_mask, pattern_name)
from imer_fast.data.missing import IMDER_MISS_ONE, IMDER_MISS_TWO

FAST = settings(max_examples=30, deadline=None, database=None)


# ----------------------------------------------------------------- GCNet
@FAST
@given(n=st.integers(34, 600), rate=st.floats(0.0, 2 / 3), seed=st.integers(0, 2**32 - 1))
def test_gcnet_rate_within_tolerance_and_one_kept(n, rate, seed):
    mask = GCNetMissing(rate).sample(n, np.random.default_rng(seed))
    assert mask.shape == (n, 3) and mask.dtype == bool
    assert mask.any(axis=1).all()
    assert abs(missing_fraction(mask) - rate) <= 0.005


@FAST
@given(n=st.integers(1, 300), rate=st.floats(2 / 3 + 1e-6, 0.7), seed=st.integers(0, 1000))
def test_gcnet_high_rates_keep_exactly_one(n, rate, seed):
    mask = GCNetMissing(rate).sample(n, np.random.default_rng(seed))
    assert (mask.sum(axis=1) == 1).all()
    assert missing_fraction(mask) == pytest.approx(2 / 3)  # the most that keeping one allows


@FAST
@given(n=st.integers(200, 600), rate=st.sampled_from([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
       seed=st.integers(0, 1000))
def test_gcnet_retry_mode_like_cpm(n, rate, seed):
    mask = GCNetMissing(rate, mode="retry").sample(n, np.random.default_rng(seed))
    assert mask.any(axis=1).all()
    assert abs(missing_fraction(mask) - rate) < 0.005


def test_gcnet_edge_cases_and_errors():
    rng = np.random.default_rng(0)
    assert GCNetMissing(0.0).sample(5, rng).all()
    assert GCNetMissing(0.3).sample(0, rng).shape == (0, 3)
    # every modality and every pair occurs: the draw is not degenerate
    mask = GCNetMissing(0.3).sample(3000, rng)
    assert {pattern_name(r) for r in mask} == set(all_patterns())
    # masks are reproducible from the generator state
    a = GCNetMissing(0.4).sample(100, np.random.default_rng(5))
    b = GCNetMissing(0.4).sample(100, np.random.default_rng(5))
    assert np.array_equal(a, b)
    for bad in (0.71, 0.8, -0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 0.7\].*got"):
            GCNetMissing(bad)
    with pytest.raises(ValueError, match="rate"):
        GCNetMissing("high")
    with pytest.raises(ValueError, match="mode"):
        GCNetMissing(0.2, mode="fast")
    with pytest.raises(ValueError, match="num_utterances"):
        GCNetMissing(0.2).sample(-1, rng)


# ----------------------------------------------------------------- IMDer
@pytest.mark.parametrize("mr", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
@pytest.mark.parametrize("nb", [10, 40, 100])
def test_imder_schedule_matches_rate(mr, nb):
    proto = IMDerMissing(mr)
    sched = proto.schedule(nb)
    i = int(round(mr * 10)) - 1
    n2, n1 = int(np.sum(sched == 2)), int(np.sum(sched == 1))
    assert n2 == math.ceil(round(IMDER_MISS_TWO[i] * nb, 9))
    assert n1 == min(nb - n2, math.ceil(round(IMDER_MISS_ONE[i] * nb, 9)))
    # two-drop batches come first, then one-drop batches, then complete ones
    assert np.all(np.diff(-sched) >= 0)
    # with nb a multiple of 10 the missing fraction is exactly the rate (2/3 at most)
    assert (2 * n2 + n1) / (3 * nb) == pytest.approx(min(mr, 2 / 3))


def test_imder_sample_is_batch_level():
    proto = IMDerMissing(0.5)
    assert proto.level == "batch"
    rng = np.random.default_rng(0)
    nb = 10
    kept = []
    for b in range(nb):
        mask = proto.sample(7, rng, batch_index=b, num_batches=nb)
        assert mask.shape == (7, 3) and (mask == mask[0]).all()  # one pattern per batch
        kept.append(int(mask[0].sum()))
    assert kept == [1] * 7 + [2] + [3] * 2
    with pytest.raises(ValueError, match="batch_index and num_batches"):
        proto.sample(7, rng)
    with pytest.raises(ValueError, match="batch_index"):
        proto.sample(7, rng, batch_index=10, num_batches=10)
    # which modalities are dropped is uniformly random over batches
    counts = np.zeros(3)
    for _ in range(600):
        counts += proto.sample(1, rng, batch_index=0, num_batches=nb)[0]
    assert counts.min() > 150


def test_imder_zero_rate_drops_nothing_and_release_counting():
    assert not IMDerMissing(0.0).schedule(50).any()
    assert IMDerMissing(0.0).sample(4, np.random.default_rng(0), 0, 5).all()
    rel = IMDerMissing(0.3, release_counting=True)
    assert rel.spec == "imder:0.3:release"
    # 14 batches: the release divides by round(14 / 10) * 10 = 10, so ceil(0.3 * 10) = 3 batches
    assert int(np.sum(rel.schedule(14) == 2)) == 3 and int(np.sum(rel.schedule(14) == 1)) == 3
    assert not rel.schedule(3).any()  # round(0.3) * 10 = 0: the release never drops anything
    for bad in (0.35, 0.8, -0.1, 1.0):
        with pytest.raises(ValueError, match=r"0.0, 0.1, \.\.\., 0.7"):
            IMDerMissing(bad)
    with pytest.raises(ValueError, match="num_batches"):
        IMDerMissing(0.2).schedule(-1)


# ----------------------------------------------------------------- fixed patterns
def test_fixed_patterns():
    assert fixed("tv") == fixed({"text", "video"}) == fixed("vt") == fixed("l+v") == \
        FixedAvailability(["video", "t"])
    assert fixed("tv").mask.tolist() == [True, False, True]
    assert fixed("tv").modalities == ("text", "video") and fixed("text").name == "t"
    assert fixed("audio, video").name == "av"
    m = fixed("a").sample(4)
    assert m.shape == (4, 3) and (m == [False, True, False]).all()
    with pytest.raises(ValueError, match="at least one modality"):
        fixed("")
    with pytest.raises(ValueError, match=r"unknown modality 'x'"):
        fixed("tx")
    with pytest.raises(ValueError, match="at least one modality"):
        fixed(set())


def test_all_patterns_and_evaluation():
    assert all_patterns() == ["t", "a", "v", "ta", "tv", "av", "tav"]
    pairs = list(evaluate_patterns())
    assert [n for n, _ in pairs] == all_patterns()
    masks = {tuple(p.mask.tolist()) for _, p in pairs}
    assert len(masks) == 7 and (False, False, False) not in masks
    for name, proto in pairs:
        assert pattern_name(proto.sample(1)[0]) == name
        assert pattern_mask(name).tolist() == proto.mask.tolist()
    assert [n for n, _ in evaluate_patterns(["vt", "a"])] == ["tv", "a"]


# ----------------------------------------------------------------- corpora with fewer modalities
TEXT_AUDIO = np.array([True, True, False])


@FAST
@given(n=st.integers(100, 600), rate=st.floats(0.0, 0.7), seed=st.integers(0, 1000),
       present=st.sampled_from([(True, True, False), (True, False, True), (False, True, True)]))
def test_gcnet_draws_over_the_corpus_modalities(n, rate, seed, present):
    present = np.array(present)
    mask = GCNetMissing(rate).sample(n, np.random.default_rng(seed), present=present)
    assert not mask[:, ~present].any()  # an absent modality is never available
    assert mask.any(axis=1).all()  # every utterance keeps one of the corpus's modalities
    # the rate is counted over the two modalities and capped at 1/2 (one of two kept)
    assert abs(missing_fraction(mask[:, present]) - min(rate, 0.5)) <= 0.005


def test_three_modality_masks_are_unchanged_by_present():
    for protocol in (GCNetMissing(0.4), GCNetMissing(0.4, mode="retry"), NoMissing(), fixed("tv")):
        a = protocol.sample(50, np.random.default_rng(3))
        b = protocol.sample(50, np.random.default_rng(3), present=np.ones(3, dtype=bool))
        assert np.array_equal(a, b)


def test_one_modality_corpus_is_always_complete():
    mask = GCNetMissing(0.6).sample(20, np.random.default_rng(0), present=np.array([False, True, False]))
    assert mask[:, 1].all() and not mask[:, [0, 2]].any()


def test_imder_drops_at_most_all_but_one_present_modality():
    protocol = IMDerMissing(0.7)  # drops two modalities in every batch
    for b in range(10):
        mask = protocol.sample(4, np.random.default_rng(b), batch_index=b, num_batches=10, present=TEXT_AUDIO)
        assert (mask[:, :2].sum(axis=1) == 1).all() and not mask[:, 2].any()
    one = IMDerMissing(0.4)
    rows = {pattern_name(one.sample(1, np.random.default_rng(b), batch_index=b, num_batches=10,
                                    present=TEXT_AUDIO)[0]) for b in range(10)}
    assert rows <= {"t", "a", "ta"} and rows & {"t", "a"}


def test_fixed_pattern_outside_the_corpus_is_refused():
    assert fixed("tv").sample(2, present=TEXT_AUDIO).tolist() == [[True, False, False]] * 2
    with pytest.raises(ValueError, match=r"'fixed:v' keeps none of the corpus's modalities \['text', 'audio'\]"):
        fixed("v").sample(2, present=TEXT_AUDIO)
    with pytest.raises(ValueError, match="present: expected 3 booleans"):
        fixed("t").sample(2, present=[1, 0, 0])


def test_patterns_of_a_two_modality_corpus():
    assert all_patterns(TEXT_AUDIO) == ["t", "a", "ta"]
    assert [n for n, _ in evaluate_patterns(present=TEXT_AUDIO)] == ["t", "a", "ta"]


# ----------------------------------------------------------------- factory
def test_make_protocol():
    assert isinstance(make_protocol("none"), NoMissing) and isinstance(make_protocol(None), NoMissing)
    assert isinstance(make_protocol(""), NoMissing)
    p = make_protocol("gcnet:0.3")
    assert isinstance(p, GCNetMissing) and p.rate == 0.3 and p == gcnet(0.3)
    assert make_protocol("gcnet:0.3:retry").mode == "retry"
    q = make_protocol("IMDER:0.5")
    assert isinstance(q, IMDerMissing) and q.rate == 0.5 and q == imder(0.5)
    assert make_protocol("fixed:vt") == fixed("tv")
    for proto in (p, q, fixed("av"), NoMissing(), gcnet(0.0), imder(0.7, release_counting=True)):
        assert make_protocol(proto.spec) == proto  # spec strings round-trip
        assert make_protocol(proto) is proto
    assert NoMissing().sample(3, None).all()
    with pytest.raises(ValueError, match=r"unknown missing protocol 'cpm'.*gcnet"):
        make_protocol("cpm:0.3")
    with pytest.raises(ValueError, match="not a number"):
        make_protocol("gcnet:abc")
    with pytest.raises(ValueError, match=r"\[0, 0.7\]"):
        make_protocol("gcnet:0.9")
    with pytest.raises(ValueError, match="needs a missing rate"):
        make_protocol("imder")
    with pytest.raises(ValueError, match="needs a pattern"):
        make_protocol("fixed:")
    with pytest.raises(ValueError, match="unknown gcnet option"):
        make_protocol("gcnet:0.1:fast")
    with pytest.raises(ValueError, match="spec"):
        make_protocol(0.3)
