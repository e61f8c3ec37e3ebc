"""Classification metrics of MERC: accuracy, weighted F1 (the MELD/IEMOCAP standard), macro F1,
per-class precision/recall/F1 and the confusion matrix. Bootstrap intervals and the paired test
between runs are in :mod:`bemerc.train.evaluate`."""

from __future__ import annotations

import numpy as np


def class_weights(y: np.ndarray, n_classes: int, power: float) -> np.ndarray:
    """(C,) weight per class for a class-balanced loss, ``(N / (C * n_c)) ** power`` (0: all 1, 1: inverse
    frequency); 1 for classes absent from ``y``. The baseline weighs XGBoost's samples by it, tune its
    examples (scaled to mean 1).

    >>> class_weights(np.array([0, 0, 0, 1]), 2, 1.0).tolist()
    [0.6666666666666666, 2.0]
    """
    counts = np.bincount(y, minlength=n_classes).astype(float)
    weights = np.ones(n_classes)
    seen = counts > 0
    weights[seen] = (len(y) / (n_classes * counts[seen])) ** power
    return weights


def confusion(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts; rows are gold classes, columns predicted ones."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (gold, pred), 1)
    return matrix


def _scores(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def weighted_f1(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Support-weighted mean of per-class F1."""
    _, _, f1, support = _scores(confusion(gold, pred, n_classes))
    return float((f1 * support).sum() / max(support.sum(), 1))


def classification_metrics(gold: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """Metrics of integer predictions ``pred`` against ``gold`` (indices into ``classes``).

    >>> m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])
    >>> round(m["accuracy"], 3), round(m["weighted_f1"], 3)
    (0.667, 0.667)
    """
    matrix = confusion(gold, pred, len(classes))
    precision, recall, f1, support = _scores(matrix)
    present = support > 0
    return {
        "n": int(len(gold)),
        "accuracy": float((gold == pred).mean()) if len(gold) else 0.0,
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion": matrix.tolist(),
        "classes": list(classes),
    }
