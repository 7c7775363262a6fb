"""Validation metrics as additive sums, so that workers can all-reduce them before dividing.

``validation_sums`` turns one batch into a fixed-length float64 vector of sums; add the
vectors of every batch (and every worker), then ``validation_metrics`` gives:

- ``val/acc1``, ``val/acc5``: top-1 / top-5 accuracy of the student;
- ``val/loss``: mean cross-entropy with the labels;
- ``val/agreement``: share of samples where the student's top-1 class is the teacher
  ensemble's (the mean of the teachers' softmax);
- ``val/ece``: expected calibration error over ``ECE_BINS`` equal-width confidence bins
  (Guo et al., 2017).

Pure torch: no Ray, no MLflow, no host reads.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "ECE_BINS",
    "SUMS_LENGTH",
    "calibration_bins",
    "ensemble_probabilities",
    "validation_metrics",
    "validation_sums",
]

ECE_BINS = 15
_FIXED = 5  # count, loss, top-1, top-5, agreement; then 3 sums per ECE bin
#: Length of a ``validation_sums`` vector (start sums from ``torch.zeros(SUMS_LENGTH)``).
SUMS_LENGTH = _FIXED + 3 * ECE_BINS


def ensemble_probabilities(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher ensemble's prediction: the mean softmax, ``[M, B, K]`` -> ``[B, K]``."""
    return teacher_logits.float().softmax(-1).mean(0)


def validation_sums(logits: torch.Tensor, labels: torch.Tensor, ensemble: torch.Tensor | None = None) -> torch.Tensor:
    """Sums for one batch.

    Args:
        logits: ``[B, K]`` student logits.
        labels: ``[B]``.
        ensemble: ``[B, K]`` ensemble probabilities (``ensemble_probabilities``), optional.

    Returns:
        float64 ``[5 + 3 * ECE_BINS]``: count, loss sum, top-1 hits, top-5 hits, agreements,
        then per confidence bin: samples, confidence sum, hits.
    """
    logits = logits.detach().float()
    probs = logits.softmax(-1)
    confidence, predicted = probs.max(-1)
    hits = (predicted == labels).double()
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    agree = (
        (predicted == ensemble.argmax(-1)).double().sum()
        if ensemble is not None
        else torch.zeros((), dtype=torch.float64, device=logits.device)
    )
    bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    per_bin = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)
    per_bin[0].index_add_(0, bins, torch.ones_like(hits))
    per_bin[1].index_add_(0, bins, confidence.double())
    per_bin[2].index_add_(0, bins, hits)
    head = torch.stack(
        [
            torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=logits.device),
            F.cross_entropy(logits, labels, reduction="sum").double(),
            hits.sum(),
            (top == labels[:, None]).any(-1).double().sum(),
            agree,
        ]
    )
    return torch.cat([head, per_bin.flatten()])


def validation_metrics(sums: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
    """Metrics from summed ``validation_sums`` vectors (one host read)."""
    values = sums.cpu().double()
    count = float(values[0])
    if count == 0:
        raise ValueError("validation_metrics: no validation samples were seen.")
    per_bin = values[_FIXED:].view(3, ECE_BINS)
    ece = float((per_bin[1] - per_bin[2]).abs().sum()) / count
    return {
        f"{prefix}acc1": float(values[2]) / count,
        f"{prefix}acc5": float(values[3]) / count,
        f"{prefix}loss": float(values[1]) / count,
        f"{prefix}agreement": float(values[4]) / count,
        f"{prefix}ece": ece,
    }


def calibration_bins(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin of summed ``validation_sums``: ``(samples, mean confidence, accuracy)``,
    each float64 ``[ECE_BINS]`` (0 where a bin is empty), for a reliability diagram."""
    per_bin = sums.cpu().double()[_FIXED:].view(3, ECE_BINS)
    count = per_bin[0]
    safe = count.clamp_min(1)
    return count, torch.where(count > 0, per_bin[1] / safe, 0), torch.where(count > 0, per_bin[2] / safe, 0)
