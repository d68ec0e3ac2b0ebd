"""Classification scores: per-class F1, weighted F1 (the papers' W-F1), accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: {y_true.shape[0]} labels but {y_pred.shape[0]} predictions")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: labels and predictions must be in [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]) -> dict:
    """weighted_f1, macro_f1, accuracy, per_class_f1 (name -> F1), support, n."""
    K = len(label_names)
    cm = confusion_matrix(y_true, y_pred, K)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(K), where=denom > 0)
    n = int(support.sum())
    return {
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "per_class_f1": {name: float(v) for name, v in zip(label_names, f1)},
        "support": {name: int(v) for name, v in zip(label_names, support)},
        "n": n,
        "confusion_matrix": cm.tolist(),
    }


def format_table(result: dict) -> str:
    """The per-class F1 table, then weighted F1 and accuracy, as the CLI prints them."""
    names = list(result["per_class_f1"])
    width = max(12, max(len(n) for n in names) + 2)
    lines = [f"{'class':<{width}}{'F1':>8}{'support':>10}"]
    for name in names:
        lines.append(f"{name:<{width}}{100 * result['per_class_f1'][name]:>8.2f}{result['support'][name]:>10d}")
    lines.append("-" * (width + 18))
    lines.append(f"{'weighted F1':<{width}}{100 * result['weighted_f1']:>8.2f}{result['n']:>10d}")
    lines.append(f"{'accuracy':<{width}}{100 * result['accuracy']:>8.2f}")
    return "\n".join(lines)
