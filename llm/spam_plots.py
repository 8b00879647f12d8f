"""The spam stage's figures: training/validation curves against steps (the book's figures 6.16 and
6.17, examples seen on the top axis) and the test split's confusion matrix, written as PNG atomically.

    from llm.spam_plots import plot_curves, plot_confusion
    plot_curves(history, "loss", "Loss", batch_size, Path("loss_curve.png"))   # history: [{step, train_loss, val_loss}]
    plot_confusion(np.array([[70, 5], [3, 72]]), "test accuracy 94.67%", Path("confusion_matrix.png"))

llm.spam calls these at the end of run_spam; matplotlib is imported only then.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from llm.fsutil import atomic_write_bytes
from llm.spam_data import LABELS


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # lazy: see plot_curves

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_curves(history: list[dict], key: str, ylabel: str, batch_size: int, path: Path) -> Path:
    """The book's figures 6.16/6.17: train and val curves vs steps, examples seen on top."""
    import matplotlib  # lazy: ~0.7 s to import, only the end of the stage draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, [h[f"train_{key}"] for h in history], label=f"Training {key}")
    ax.plot(steps, [h[f"val_{key}"] for h in history], linestyle="-.", label=f"Validation {key}")
    ax.set_xlabel("Steps")
    ax.set_ylabel(ylabel)
    ax.legend()
    top = ax.secondary_xaxis("top", functions=(lambda s: s * batch_size, lambda e: e / batch_size))
    top.set_xlabel("Examples seen")
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_confusion(cm: np.ndarray, title: str, path: Path) -> Path:
    """The test split's confusion matrix (rows true, columns predicted), counts in the cells."""
    import matplotlib  # lazy: see plot_curves

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    fig.tight_layout()
    return _save_fig(fig, path)

