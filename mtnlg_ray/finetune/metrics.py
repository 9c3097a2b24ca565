"""Classification metrics from a confusion matrix: accuracy, and precision, recall, F1 per class and macro.

A class the model never predicts has precision 0 (no true positives among zero predictions), and a
class absent from the gold labels but predicted has recall 0: both count in the macro average, as
scikit-learn does with `zero_division=0`, so a degenerate classifier cannot look good on macro F1. A
class in neither the gold labels nor the predictions (a dev set without it) is left out of the macro
average, as scikit-learn leaves it out; the per-class table still lists it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(gold: Sequence[int], predicted: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; row = gold class, column = predicted class."""
    gold, predicted = np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if gold.shape != predicted.shape:
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (gold, predicted), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(len(numerator), dtype=np.float64)
    nonzero = denominator > 0
    out[nonzero] = numerator[nonzero] / denominator[nonzero]
    return out


def classification_metrics(gold: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro P/R/F1 and a per-class table for class indices into `labels`."""
    matrix = confusion_matrix(gold, predicted, len(labels))
    true_pos = np.diag(matrix).astype(np.float64)
    precision = _ratio(true_pos, matrix.sum(axis=0))
    recall = _ratio(true_pos, matrix.sum(axis=1))
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = int(matrix.sum())
    seen = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0  # in the gold labels or the predictions

    def macro(values: np.ndarray) -> float:
        return float(values[seen].mean()) if seen.any() else 0.0

    return {
        "n": total,
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, matrix.sum(axis=1))
        },
        "confusion": matrix.tolist(),
    }
