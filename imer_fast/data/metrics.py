"""Evaluation metrics of the IMER literature (numpy; masks and sample weights supported).

Classification (IEMOCAP):

* **WA** — weighted accuracy = plain accuracy.
* **UA** — unweighted accuracy = mean per-class recall over the classes present in the labels
  (what DRKF and most IEMOCAP papers report; sklearn's ``balanced_accuracy_score``).
* **F1_weighted** / **F1_macro** — per-class ``F1 = 2 TP / (2 TP + FP + FN)`` over the classes
  present in labels or predictions (sklearn's default label set), averaged weighted by true
  support or uniformly; a class that is never predicted has F1 0.

Regression (CMU-MOSI / CMU-MOSEI; MMSA's definitions):

* **Acc2_has0** / **F1_has0** — ``labels >= 0`` vs ``preds >= 0`` over all samples (weighted F1).
* **Acc2_non0** / **F1_non0** — ``labels > 0`` vs ``preds > 0`` over samples with ``label != 0``.
* **Acc3**, **Acc5**, **Acc7** — accuracy after ``round(clip(x, -1, 1))``, ``round(clip(x, -2,
  2))``, ``round(clip(x, -3, 3))`` of both predictions and labels (``np.round``: halves to even).
* **MAE** — mean absolute error; **Corr** — Pearson correlation (NaN when either side is constant).

Inputs may be numpy arrays, lists or (CPU/GPU) torch tensors of any matching shape, e.g. padded
``[B, L]`` labels with ``[B, L]`` predictions or ``[B, L, C]`` logits (classification predictions
with one more dimension than the labels are arg-maxed). ``mask`` (True = keep) and
``sample_weight`` broadcast to the label shape from the same number of dimensions (a scalar weight
too): a ``[B]`` mask for ``[B, L]`` labels is an error, not aligned with the last axis. Classification
labels ``< 0`` (the ``-100`` padding of :class:`~imer_fast.data.batching.DialogueBatch`) are always
ignored. Metrics of an empty selection are NaN. Class predictions and labels given as floats must be
whole numbers (refused, not truncated); half-precision tensors are widened to float32.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "accuracy", "unweighted_accuracy", "f1_score", "confusion_matrix", "classification_report",
    "acc2", "f1_binary", "acc_k", "mae", "pearson", "regression_report",
]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        if x.is_floating_point() and x.element_size() < 4:  # numpy has no bfloat16; float16 widened alike
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _select(preds, labels, mask, sample_weight, classification: bool
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = _np(preds)
    y = _np(labels)
    if classification and p.ndim == y.ndim + 1:
        p = p.argmax(axis=-1)
    if not classification and p.ndim == y.ndim + 1 and p.shape[-1] == 1:
        p = p[..., 0]
    if p.shape != y.shape:
        raise ValueError(f"preds: expected shape {y.shape} (labels) or {y.shape + ('C',)} (logits), "
                         f"got {p.shape}")
    keep = np.ones(y.shape, dtype=bool)
    if mask is not None:
        m = _np(mask).astype(bool)
        try:
            if m.ndim != y.ndim:  # numpy would align a [B] mask with the last axis of [B, L] labels when B == L
                raise ValueError
            keep &= np.broadcast_to(m, y.shape)
        except ValueError as exc:
            raise ValueError(f"mask: expected a shape broadcastable to {y.shape}, got {m.shape}") from exc
    if classification:
        keep &= y >= 0
    w = np.ones(y.shape, dtype=np.float64)
    if sample_weight is not None:
        sw = _np(sample_weight).astype(np.float64)
        try:
            if sw.ndim not in (0, y.ndim):  # as for the mask: no silent alignment with the wrong axis
                raise ValueError
            w = np.broadcast_to(sw, y.shape).astype(np.float64)
        except ValueError as exc:
            raise ValueError(f"sample_weight: expected a shape broadcastable to {y.shape}, got "
                             f"{sw.shape}") from exc
        if np.any(w[keep] < 0):
            raise ValueError("sample_weight: expected non-negative weights")
    p, y, w = p[keep], y[keep], w[keep]
    if classification:
        for name, values in (("preds", p), ("labels", y)):
            whole = values == np.round(values) if np.issubdtype(values.dtype, np.floating) else True
            if not np.all(whole):
                raise ValueError(f"{name}: class indices must be whole numbers (or give logits with a class "
                                 f"axis); got non-integral values such as {values[~whole][:3].tolist()}")
        p, y = p.astype(np.int64), y.astype(np.int64)
    else:
        p, y = p.astype(np.float64), y.astype(np.float64)
    return p, y, w


def _wmean(x: np.ndarray, w: np.ndarray) -> float:
    tw = w.sum()
    return float((x * w).sum() / tw) if tw > 0 else float("nan")


# ------------------------------------------------------------------ classification
def accuracy(preds, labels, mask=None, sample_weight=None) -> float:
    """WA: (weighted) fraction of correct predictions."""
    p, y, w = _select(preds, labels, mask, sample_weight, True)
    return _wmean((p == y).astype(np.float64), w)


def confusion_matrix(preds, labels, mask=None, sample_weight=None,
                     num_classes: Optional[int] = None) -> np.ndarray:
    """``[C, C]`` (weighted) counts, rows = true class, columns = predicted class."""
    p, y, w = _select(preds, labels, mask, sample_weight, True)
    c = int(max(p.max(initial=-1), y.max(initial=-1)) + 1)
    if num_classes is not None:
        if num_classes < c:
            raise ValueError(f"num_classes: classes go up to {c - 1}, so expected >= {c}, got "
                             f"{num_classes}")
        c = int(num_classes)
    if np.any(p < 0):
        raise ValueError("preds: expected non-negative class indices")
    cm = np.zeros((c, c), dtype=np.float64)
    np.add.at(cm, (y, p), w)
    return cm


def _per_class(p: np.ndarray, y: np.ndarray, w: np.ndarray):
    classes = np.union1d(np.unique(y), np.unique(p))
    tp = np.array([w[(y == k) & (p == k)].sum() for k in classes])
    fp = np.array([w[(y != k) & (p == k)].sum() for k in classes])
    fn = np.array([w[(y == k) & (p != k)].sum() for k in classes])
    support = np.array([w[y == k].sum() for k in classes])
    return classes, tp, fp, fn, support


def unweighted_accuracy(preds, labels, mask=None, sample_weight=None) -> float:
    """UA: mean per-class recall over the classes present in the (selected) labels."""
    p, y, w = _select(preds, labels, mask, sample_weight, True)
    if y.size == 0:
        return float("nan")
    classes, tp, fp, fn, support = _per_class(p, y, w)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(tp[present] / support[present]))


def f1_score(preds, labels, average: str = "weighted", mask=None, sample_weight=None):
    """F1 with ``average`` ``"weighted"`` (by true support), ``"macro"`` or ``None`` (a dict
    class -> F1)."""
    if average not in ("weighted", "macro", None):
        raise ValueError(f"average: expected 'weighted', 'macro' or None, got {average!r}")
    p, y, w = _select(preds, labels, mask, sample_weight, True)
    return _f1(p, y, w, average)


def _f1(p, y, w, average):
    if y.size == 0:
        return float("nan") if average is not None else {}
    classes, tp, fp, fn, support = _per_class(p, y, w)
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)
    if average is None:
        return {int(k): float(v) for k, v in zip(classes, f1)}
    if average == "macro":
        return float(f1.mean())
    total = support.sum()
    return float((f1 * support).sum() / total) if total > 0 else float("nan")


def classification_report(preds, labels, mask=None, sample_weight=None,
                          label_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """``{"WA", "UA", "F1_weighted", "F1_macro", "N", "recall"}``.

    ``N`` is the number of selected utterances; ``recall`` maps every class present in the labels
    (its name when ``label_names`` is given) to its recall.
    """
    p, y, w = _select(preds, labels, mask, sample_weight, True)
    out: Dict[str, object] = {
        "WA": _wmean((p == y).astype(np.float64), w),
        "UA": float("nan"), "F1_weighted": _f1(p, y, w, "weighted"),
        "F1_macro": _f1(p, y, w, "macro"), "N": int(y.size), "recall": {},
    }
    if y.size:
        classes, tp, _, _, support = _per_class(p, y, w)
        present = support > 0
        if present.any():
            out["UA"] = float(np.mean(tp[present] / support[present]))
        rec = {}
        for k, t, s in zip(classes, tp, support):
            if s > 0:
                key = label_names[int(k)] if label_names is not None and 0 <= k < len(label_names) \
                    else int(k)
                rec[key] = float(t / s)
        out["recall"] = rec
    return out


# ------------------------------------------------------------------ regression
def acc2(preds, labels, mode: str = "non0", mask=None, sample_weight=None) -> float:
    """Binary sentiment accuracy: ``mode="has0"`` (``>= 0`` over all) or ``"non0"`` (``> 0``
    over ``label != 0``)."""
    p, y, w = _select(preds, labels, mask, sample_weight, False)
    pb, yb, wb = _binary(p, y, w, mode)
    return _wmean((pb == yb).astype(np.float64), wb)


def f1_binary(preds, labels, mode: str = "non0", mask=None, sample_weight=None) -> float:
    """Weighted F1 of the binary sentiment decision on the subset of :func:`acc2`."""
    p, y, w = _select(preds, labels, mask, sample_weight, False)
    pb, yb, wb = _binary(p, y, w, mode)
    return _f1(pb.astype(np.int64), yb.astype(np.int64), wb, "weighted")


def _binary(p, y, w, mode):
    if mode == "has0":
        return p >= 0, y >= 0, w
    if mode == "non0":
        nz = y != 0
        return p[nz] > 0, y[nz] > 0, w[nz]
    raise ValueError(f"mode: expected 'has0' or 'non0', got {mode!r}")


def acc_k(preds, labels, k: int = 7, mask=None, sample_weight=None) -> float:
    """Acc-3/5/7: accuracy of ``round(clip(x, -(k-1)/2, (k-1)/2))``."""
    if k not in (3, 5, 7):
        raise ValueError(f"k: expected 3, 5 or 7, got {k!r}")
    p, y, w = _select(preds, labels, mask, sample_weight, False)
    return _acc_k(p, y, w, k)


def _acc_k(p, y, w, k):
    r = (k - 1) // 2
    return _wmean((np.round(np.clip(p, -r, r)) == np.round(np.clip(y, -r, r))).astype(np.float64), w)


def mae(preds, labels, mask=None, sample_weight=None) -> float:
    """Mean absolute error."""
    p, y, w = _select(preds, labels, mask, sample_weight, False)
    return _wmean(np.abs(p - y), w)


def pearson(preds, labels, mask=None, sample_weight=None) -> float:
    """(Weighted) Pearson correlation; NaN for fewer than 2 samples or a constant side."""
    p, y, w = _select(preds, labels, mask, sample_weight, False)
    return _pearson(p, y, w)


def _pearson(p, y, w):
    if y.size < 2 or w.sum() <= 0:
        return float("nan")
    mp, my = _wmean(p, w), _wmean(y, w)
    cov = _wmean((p - mp) * (y - my), w)
    vp, vy = _wmean((p - mp) ** 2, w), _wmean((y - my) ** 2, w)
    if vp <= 0 or vy <= 0:
        return float("nan")
    return float(np.clip(cov / np.sqrt(vp * vy), -1.0, 1.0))


def regression_report(preds, labels, mask=None, sample_weight=None) -> Dict[str, float]:
    """``{"Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc3", "Acc5", "Acc7", "MAE", "Corr",
    "N"}``."""
    p, y, w = _select(preds, labels, mask, sample_weight, False)
    out: Dict[str, float] = {}
    for mode, key in (("has0", "has0"), ("non0", "non0")):
        pb, yb, wb = _binary(p, y, w, mode)
        out[f"Acc2_{key}"] = _wmean((pb == yb).astype(np.float64), wb)
        out[f"F1_{key}"] = _f1(pb.astype(np.int64), yb.astype(np.int64), wb, "weighted")
    for k in (3, 5, 7):
        out[f"Acc{k}"] = _acc_k(p, y, w, k)
    out["MAE"] = _wmean(np.abs(p - y), w)
    out["Corr"] = _pearson(p, y, w)
    out["N"] = int(y.size)
    return out
