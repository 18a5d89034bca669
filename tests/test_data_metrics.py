"""Metrics against hand-computed values (and sklearn when it is installed)."""
import math

import numpy as np
import pytest
import torch

from imer_fast.data import (acc2, acc_k, accuracy, classification_report, confusion_matrix,
                            f1_binary, f1_score, mae, pearson, regression_report,
                            unweighted_accuracy)

Y = np.array([0, 0, 1, 1, 2, 2, 2])
P = np.array([0, 1, 1, 1, 2, 0, 2])
# per class: recall 1/2, 2/2, 2/3; F1 = 2TP/(2TP+FP+FN): 2/4, 4/5, 4/5
WA = 5 / 7
UA = (0.5 + 1.0 + 2 / 3) / 3
WF1 = (2 * 0.5 + 2 * 0.8 + 3 * 0.8) / 7
MF1 = (0.5 + 0.8 + 0.8) / 3


def test_classification_hand_computed():
    assert accuracy(P, Y) == pytest.approx(WA)
    assert unweighted_accuracy(P, Y) == pytest.approx(UA)
    assert f1_score(P, Y, "weighted") == pytest.approx(WF1)
    assert f1_score(P, Y, "macro") == pytest.approx(MF1)
    assert f1_score(P, Y, None) == pytest.approx({0: 0.5, 1: 0.8, 2: 0.8})
    rep = classification_report(P, Y, label_names=["a", "b", "c"])
    assert rep["WA"] == pytest.approx(WA) and rep["UA"] == pytest.approx(UA)
    assert rep["F1_weighted"] == pytest.approx(WF1) and rep["F1_macro"] == pytest.approx(MF1)
    assert rep["N"] == 7 and rep["recall"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 2 / 3})
    cm = confusion_matrix(P, Y, num_classes=4)
    assert cm.shape == (4, 4) and cm[0, 1] == 1 and cm[2, 0] == 1 and cm.trace() == 5


def test_classification_masks_padding_logits_and_weights():
    # padded [B, L] layout with -100 padding and [B, L, C] logits
    labels = np.full((2, 5), -100)
    labels[0, :4], labels[1, :3] = Y[:4], Y[4:]
    preds = np.zeros((2, 5), dtype=np.int64)
    preds[0, :4], preds[1, :3] = P[:4], P[4:]
    preds[0, 4] = preds[1, 4] = 2  # predictions on padding are ignored
    logits = np.eye(3)[preds] * 5.0
    for pr in (preds, logits, torch.from_numpy(logits)):
        rep = classification_report(pr, torch.from_numpy(labels))
        assert rep["N"] == 7 and rep["WA"] == pytest.approx(WA) and rep["UA"] == pytest.approx(UA)
    # an explicit mask removes utterances too
    mask = np.ones_like(Y, dtype=bool)
    mask[5] = False  # drop the (true 2, pred 0) error
    assert accuracy(P, Y, mask=mask) == pytest.approx(5 / 6)
    # integer sample weights equal duplication
    w = np.array([3, 1, 1, 2, 1, 1, 1])
    dup = np.repeat(np.arange(7), w)
    for fn in (accuracy, unweighted_accuracy):
        assert fn(P, Y, sample_weight=w) == pytest.approx(fn(P[dup], Y[dup]))
    for avg in ("weighted", "macro"):
        assert f1_score(P, Y, avg, sample_weight=w) == pytest.approx(f1_score(P[dup], Y[dup], avg))
    # a per-dialogue [B] mask (or weight) for [B, L] labels is refused even when B == L, where numpy
    # would align it with the utterance axis; [B, 1] broadcasts as meant
    square = np.zeros((3, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"mask: expected a shape broadcastable to \(3, 3\), got \(3,\)"):
        accuracy(square, square, mask=np.array([True, False, True]))
    with pytest.raises(ValueError, match="sample_weight: expected a shape broadcastable"):
        accuracy(square, square, sample_weight=np.array([1.0, 2.0, 3.0]))
    per_dialogue = np.array([[True], [False], [True]])
    assert accuracy(np.eye(3, dtype=np.int64), np.zeros((3, 3), np.int64), mask=per_dialogue) == pytest.approx(4 / 6)


def test_classification_label_sets_and_empty():
    # a class that only appears in predictions lowers macro F1 but not UA
    y, p = np.array([0, 0, 1]), np.array([0, 2, 1])
    assert unweighted_accuracy(p, y) == pytest.approx((0.5 + 1.0) / 2)
    assert f1_score(p, y, "macro") == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert f1_score(p, y, "weighted") == pytest.approx((2 * 2 / 3 + 1.0) / 3)
    empty = classification_report(np.array([1]), np.array([-100]))
    assert empty["N"] == 0 and math.isnan(empty["WA"]) and math.isnan(empty["UA"])
    with pytest.raises(ValueError, match="preds: expected shape"):
        accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="average"):
        f1_score(P, Y, "micro")
    with pytest.raises(ValueError, match="sample_weight"):
        accuracy(P, Y, sample_weight=-np.ones(7))
    with pytest.raises(ValueError, match=r"preds: class indices must be whole numbers .* \[0.9, 1.6\]"):
        accuracy(np.array([0.9, 1.6]), np.array([1, 2]))  # truncating would score 0.9 as class 0
    assert accuracy(np.array([1.0, 2.0]), np.array([1, 2])) == 1.0


def test_half_precision_tensors_are_accepted():
    import torch

    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    labels = torch.tensor([1, 0, 0])
    for dtype in (torch.bfloat16, torch.float16):
        assert accuracy(logits.to(dtype), labels) == pytest.approx(2 / 3)
        a, b = logits[:, 0].to(dtype), logits[:, 1].to(dtype)
        assert mae(a, b) == pytest.approx(mae(a.float(), b.float()))


YR = np.array([-1.2, 0.0, 0.4, 2.6, -3.0, 1.0])
PR = np.array([-0.8, 0.3, -0.1, 3.4, -2.2, 0.0])


def test_regression_hand_computed():
    rep = regression_report(PR, YR)
    expect = {
        "Acc2_has0": 5 / 6,
        "F1_has0": (4 * 6 / 7 + 2 * 4 / 5) / 6,
        "Acc2_non0": 3 / 5,
        "F1_non0": (3 * 0.5 + 2 * 2 / 3) / 5,
        "Acc3": 5 / 6, "Acc5": 5 / 6, "Acc7": 4 / 6,
        "MAE": 3.8 / 6,
        "Corr": float(np.corrcoef(PR, YR)[0, 1]),
        "N": 6,
    }
    assert rep == pytest.approx(expect)
    assert acc2(PR, YR, "has0") == pytest.approx(5 / 6) and acc2(PR, YR) == pytest.approx(0.6)
    assert f1_binary(PR, YR, "non0") == pytest.approx(expect["F1_non0"])
    assert acc_k(PR, YR, 7) == pytest.approx(4 / 6) and mae(PR, YR) == pytest.approx(3.8 / 6)
    assert pearson(PR, YR) == pytest.approx(expect["Corr"])
    with pytest.raises(ValueError, match="mode"):
        acc2(PR, YR, "zero")
    with pytest.raises(ValueError, match="k"):
        acc_k(PR, YR, 4)


def test_regression_masks_weights_and_degenerate():
    # [B, L, 1] predictions against [B, L] labels with a mask
    labels = np.zeros((2, 4), np.float32)
    preds = np.full((2, 4, 1), 9.0, np.float32)
    mask = np.zeros((2, 4), bool)
    labels[0, :3], preds[0, :3, 0], mask[0, :3] = YR[:3], PR[:3], True
    labels[1, :3], preds[1, :3, 0], mask[1, :3] = YR[3:], PR[3:], True
    rep = regression_report(torch.from_numpy(preds), labels, mask=torch.from_numpy(mask))
    assert rep["N"] == 6 and rep["MAE"] == pytest.approx(3.8 / 6, rel=1e-6)
    w = np.array([1, 2, 1, 1, 3, 1])
    dup = np.repeat(np.arange(6), w)
    weighted = regression_report(PR, YR, sample_weight=w)
    duplicated = regression_report(PR[dup], YR[dup])
    assert weighted.pop("N") == 6 and duplicated.pop("N") == 9  # N counts utterances
    assert weighted == pytest.approx(duplicated)
    assert math.isnan(pearson(np.ones(4), np.arange(4.0)))
    assert math.isnan(regression_report(PR, YR, mask=np.zeros(6, bool))["MAE"])


def test_against_sklearn_if_installed():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 500)
    p = np.where(rng.random(500) < 0.5, y, rng.integers(0, 6, 500))
    w = rng.random(500)
    assert accuracy(p, y, sample_weight=w) == pytest.approx(skm.accuracy_score(y, p, sample_weight=w))
    assert unweighted_accuracy(p, y) == pytest.approx(skm.balanced_accuracy_score(y, p))
    for avg in ("weighted", "macro"):
        assert f1_score(p, y, avg, sample_weight=w) == pytest.approx(
            skm.f1_score(y, p, average=avg, sample_weight=w))
