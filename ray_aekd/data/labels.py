"""Label corruption, for building teachers that are biased on chosen classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["corrupt_labels"]


def corrupt_labels(
    labels: torch.Tensor, classes: Sequence[int], rate: float, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace a ``rate`` share of the labels in ``classes`` by a uniformly drawn other class.

    Args:
        labels: ``[N]`` class indices.
        classes: the classes whose labels may be corrupted.
        rate: probability, per sample of those classes, in ``[0, 1]``.
        num_classes: K.
        generator: source of randomness (seeded by the caller).

    Returns:
        ``[N]`` labels; the others are unchanged.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1]; got {rate}.")
    hit = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype)) & (
        torch.rand(len(labels), generator=generator) < rate
    )
    shift = torch.randint(1, num_classes, (len(labels),), generator=generator)
    return torch.where(hit, (labels + shift) % num_classes, labels)
