"""Figures for a distillation run: the teachers' weights over training, and how much the
teachers' gradients conflict. Matplotlib (Agg), written to PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_cosine_matrix", "plot_weights"]


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
