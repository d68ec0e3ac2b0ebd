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
    """weighted_f1, macro_f1, accuracy, per_class_f1 / _precision / _recall
    (name -> value), support, n, confusion_matrix (rows true, columns predicted)."""
    K = len(label_names)
    cm = confusion_matrix(y_true, y_pred, K)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(K), where=denom > 0)
    precision = np.divide(tp, predicted, out=np.zeros(K), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(K), where=support > 0)
    n = int(support.sum())
    seen = (support > 0) | (predicted > 0)
    return {
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        # scikit-learn's macro F1: the mean over every class that occurs in the
        # truth or in the predictions (a predicted but absent class counts as 0).
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "per_class_f1": {name: float(v) for name, v in zip(label_names, f1)},
        "per_class_precision": {name: float(v) for name, v in zip(label_names, precision)},
        "per_class_recall": {name: float(v) for name, v in zip(label_names, recall)},
        "support": {name: int(v) for name, v in zip(label_names, support)},
        "n": n,
        "confusion_matrix": cm.tolist(),
    }


#: The single numbers :func:`summary_score` gives (what decision biases and ``cascla tune`` maximise).
SUMMARY_SCORES = ("weighted_f1", "macro_f1", "mean_f1", "minority_f1", "accuracy")


def minority_classes(prior: Sequence[float], label_names: Sequence[str]) -> tuple[str, ...]:
    """The minority classes of a training label distribution ``prior`` (one
    frequency per class, in label order): those below half the uniform share
    1/K, or where no class is, the least frequent one. MELD's training split
    gives fear, disgust and sadness; IEMOCAP's, happy."""
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or prior.shape[0] != len(label_names) or not prior.shape[0]:
        raise ValueError(f"minority_classes: {prior.shape} frequencies for {len(label_names)} classes")
    rare = np.flatnonzero(prior < 0.5 / prior.shape[0])
    if not rare.size:
        rare = np.array([int(prior.argmin())])
    return tuple(label_names[int(i)] for i in rare)


def summary_score(result: dict, name: str, minority: Sequence[str] | None = None) -> float:
    """One number of a :func:`scores` result: ``weighted_f1``, ``macro_f1``,
    ``accuracy``, ``mean_f1`` (the mean of weighted and macro F1) or
    ``minority_f1`` (the mean of weighted F1 and the mean F1 of the classes
    ``minority`` names, :func:`minority_classes`), as decision biases and
    ``cascla tune`` maximise them."""
    if name == "mean_f1":
        return 0.5 * (result["weighted_f1"] + result["macro_f1"])
    if name == "minority_f1":
        if not minority:
            raise ValueError("summary_score: minority_f1 needs the minority classes (metrics.minority_classes)")
        return 0.5 * (result["weighted_f1"] + float(np.mean([result["per_class_f1"][c] for c in minority])))
    if name not in SUMMARY_SCORES:
        raise ValueError(f"summary_score: no score {name!r} (one of {', '.join(SUMMARY_SCORES)})")
    return float(result[name])


def format_table(result: dict) -> str:
    """The per-class F1 table, then weighted F1 and accuracy, as the CLI prints them."""
    names = list(result["per_class_f1"])
    width = max(12, max(len(n) for n in names) + 2)
    has_pr = "per_class_precision" in result
    head = f"{'class':<{width}}" + (f"{'precision':>11}{'recall':>8}" if has_pr else "") + f"{'F1':>8}{'support':>10}"
    lines = [head]
    for name in names:
        pr = (f"{100 * result['per_class_precision'][name]:>11.2f}{100 * result['per_class_recall'][name]:>8.2f}"
              if has_pr else "")
        lines.append(f"{name:<{width}}{pr}{100 * result['per_class_f1'][name]:>8.2f}{result['support'][name]:>10d}")
    lines.append("-" * len(head))
    pad = " " * (19 if has_pr else 0)
    lines.append(f"{'weighted F1':<{width}}{pad}{100 * result['weighted_f1']:>8.2f}{result['n']:>10d}")
    lines.append(f"{'macro F1':<{width}}{pad}{100 * result['macro_f1']:>8.2f}")
    lines.append(f"{'accuracy':<{width}}{pad}{100 * result['accuracy']:>8.2f}")
    return "\n".join(lines)


def plot_confusion(result: dict, path: str, title: str = "") -> None:
    """Write the confusion matrix of ``result`` (from :func:`scores`) as a PNG:
    rows true, columns predicted, each row normalised to 1, counts printed in
    the cells. Written atomically."""
    import io

    from ._extras import require

    matplotlib = require("matplotlib", "plotting the confusion matrix (--plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._io import atomic_write

    names = list(result["per_class_f1"])
    cm = np.asarray(result["confusion_matrix"], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    K = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * K, 0.8 + 0.8 * K), dpi=120)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(K):
        for j in range(K):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    labels = [f"{n}\nF1 {100 * result['per_class_f1'][n]:.1f}" for n in names]
    ax.set_xticks(range(K), names, rotation=45, ha="right")
    ax.set_yticks(range(K), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True)
