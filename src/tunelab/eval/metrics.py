"""Classification metrics computed from a streaming confusion matrix.

Evaluation never holds all logits: each batch adds its predictions to a (C, C) count matrix,
which is also what processes sum across when training runs distributed.
"""
from __future__ import annotations

import numpy as np
import torch

METRICS = ("accuracy", "macro_f1", "weighted_f1", "loss")


class ConfusionMatrix:
    """counts[true, predicted]; updated batch by batch."""

    def __init__(self, num_labels: int):
        self.counts = torch.zeros(num_labels, num_labels, dtype=torch.long)
        self.loss_sum = 0.0
        self.n = 0

    def update(self, preds: torch.Tensor, labels: torch.Tensor, loss_sum: float = 0.0) -> None:
        c = self.counts.shape[0]
        idx = labels.long() * c + preds.long()
        self.counts += torch.bincount(idx, minlength=c * c).view(c, c)
        self.loss_sum += float(loss_sum)
        self.n += int(labels.numel())

    def compute(self) -> dict[str, float]:
        return classification_metrics(self.counts.numpy(), self.loss_sum)


def classification_metrics(counts: np.ndarray, loss_sum: float = 0.0) -> dict[str, float]:
    counts = counts.astype(np.float64)
    total = counts.sum()
    tp = np.diag(counts)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
        "loss": float(loss_sum / total) if total else 0.0,
        "n": int(total),
    }


def per_class_report(counts: np.ndarray, labels: list[str]) -> list[dict]:
    counts = counts.astype(np.float64)
    rows = []
    for i, name in enumerate(labels):
        tp, support, predicted = counts[i, i], counts[i].sum(), counts[:, i].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        rows.append({"label": name, "precision": p, "recall": r, "f1": f, "support": int(support)})
    return rows


def format_report(counts: np.ndarray, labels: list[str], metrics: dict) -> str:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix as text."""
    width = max(10, max(len(x) for x in labels) + 2)
    lines = [f"accuracy  {metrics['accuracy']:.4f}    macro-F1  {metrics['macro_f1']:.4f}    "
             f"n = {metrics['n']}", "",
             f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for row in per_class_report(counts, labels):
        lines.append(f"{row['label']:<{width}}{row['precision']:>10.4f}{row['recall']:>10.4f}"
                     f"{row['f1']:>10.4f}{row['support']:>10d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * width + "".join(f"{x[:9]:>10}" for x in labels)]
    for i, name in enumerate(labels):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>10d}" for v in counts[i]))
    return "\n".join(lines)


def plot_confusion(counts: np.ndarray, labels: list[str], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelab.io import atomic_write_bytes

    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = counts.max() if counts.size else 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if counts[i, j] > top / 2 else "black")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
