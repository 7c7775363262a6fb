"""Figures for a distillation run (the teachers' weights over training, how much the teachers'
gradients conflict) and for an evaluation (confusion matrix, reliability diagram).
Matplotlib (Agg), written to PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_confusion_matrix", "plot_cosine_matrix", "plot_reliability", "plot_weights"]


def plot_weights(steps: np.ndarray, weights: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """Per-step teacher weights ``weights [S, M]`` against ``steps [S]``, with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    window = max(1, len(steps) // 50)
    kernel = np.ones(window) / window
    for m, name in enumerate(names):
        (line,) = ax.plot(steps, weights[:, m], alpha=0.25, linewidth=0.8)
        if window > 1 and len(steps) >= window:
            smooth = np.convolve(weights[:, m], kernel, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color=line.get_color(), label=name)
        else:
            line.set_alpha(1.0)
            line.set_label(name)
    ax.axhline(1 / len(names), color="grey", linestyle=":", linewidth=0.8, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("teacher weight α")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cosine_matrix(cosine: np.ndarray, names: Sequence[str], path: Path) -> None:
    """Mean cosine similarity between the teachers' gradients on the student, ``[M, M]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.7 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(cosine, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cosine[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("mean cosine of teachers' gradients")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(confusion: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix ``[K, K]`` (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    size = min(12.0, 2.0 + 0.45 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(counts: np.ndarray, confidence: np.ndarray, accuracy: np.ndarray, ece: float, path: Path,
                     title: str) -> None:  # fmt: skip
    """Reliability diagram: accuracy against mean confidence per confidence bin (``[bins]`` each;
    empty bins left out), with the bins' sample counts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = len(counts)
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    used = counts > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.bar(centres[used], accuracy[used], width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    top.plot(confidence[used], confidence[used], "o", color="tab:red", markersize=3, label="mean confidence")
    top.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title}\nECE {ece:.4f}", fontsize=9)
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centres, counts, width=1 / bins, edgecolor="black", color="tab:grey")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("samples")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
