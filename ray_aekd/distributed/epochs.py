"""One epoch of distillation and one validation pass on one worker, over plain tensors.

What the Ray Train loop (``train.train_loop``) runs every epoch, without Ray: it hands these
functions its shard's batches as ``StudentBatch``es and an all-reduce hook, and does the rest
(the view clock, checkpoints, reports) itself. So an epoch can be run and tested on a tiny model
in any process.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ray_aekd.config import TrainConfig
from ray_aekd.core.metrics import SUMS_LENGTH, ensemble_probabilities, validation_metrics, validation_sums
from ray_aekd.core.step import DistillSettings, distill_step, make_optimizer
from ray_aekd.data.views import normalize

__all__ = ["EpochTotals", "StudentBatch", "train_epoch", "train_metrics", "train_optimizer", "validate_epoch"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class StudentBatch:
    """One batch as the student reads it."""

    images: torch.Tensor  # uint8 [B, C, H, W], as stored (normalised here)
    labels: torch.Tensor  # [B]
    index: torch.Tensor  # [B] int64, the samples' indices in the source
    teacher_logits: torch.Tensor  # [M, B, K]
    teacher_features: list[torch.Tensor] | None = None  # M hint features [B, ...], with hints only


@dataclasses.dataclass
class EpochTotals:
    """What one worker's epoch of ``train_epoch`` adds up (on the training device: no host read)."""

    sums: torch.Tensor  # float64 [4]: samples, then loss, ce and kd summed over samples
    hint_sum: torch.Tensor  # float64 []: the hint loss summed over samples (0 without hints)
    tally: torch.Tensor  # int64 [source size]: how many times each sample of the source was trained on
    weights: list[torch.Tensor]  # per step, the teachers' weights [M]
    grams: list[torch.Tensor]  # per step, the [M, M] Gram of the teachers' gradients
    first_step_at: float | None = None  # time.perf_counter() when the first step was done

    @property
    def steps(self) -> int:
        return len(self.weights)

    def reduced(self, reduce_sum: Reduce) -> EpochTotals:
        """The totals over every worker (``reduce_sum``: an all-reduce sum); weights and Grams are
        the same on every worker already."""
        return dataclasses.replace(
            self, sums=reduce_sum(self.sums), hint_sum=reduce_sum(self.hint_sum), tally=reduce_sum(self.tally)
        )


def train_epoch(
    model: nn.Module,
    batches: Iterable[StudentBatch],
    optimizer: torch.optim.Optimizer,
    settings: DistillSettings,
    mean: Sequence[float],
    std: Sequence[float],
    source_size: int,
    step: int = 0,
    device: torch.device | str = "cpu",
    reduce: Reduce | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> EpochTotals:
    """One ``distill_step`` per batch of ``batches``.

    Args:
        model: the student (a ``HintStudent`` with hints), in training mode from here on.
        mean, std: per-channel normalisation of the images.
        source_size: samples in the source (the length of ``EpochTotals.tally``).
        step: the global step of the first batch (named in errors).
        reduce: all-reduce-mean hook of ``distill_step`` (several workers).
        before_step, after_step: called with the global step before each step, and with the
            next one after it (fault drills, progress).

    Raises:
        NonFiniteLogitsError: from ``distill_step``, with the step.
    """
    model.train()
    hinted = settings.hint_weight > 0
    totals = EpochTotals(
        sums=torch.zeros(4, dtype=torch.float64, device=device),
        hint_sum=torch.zeros((), dtype=torch.float64, device=device),
        tally=torch.zeros(source_size, dtype=torch.int64, device=device),
        weights=[],
        grams=[],
    )
    for batch in batches:
        if before_step is not None:
            before_step(step)
        images, labels = normalize(batch.images, tuple(mean), tuple(std)), batch.labels
        totals.tally.index_add_(0, batch.index, torch.ones_like(batch.index))
        out = distill_step(
            model, images, labels, batch.teacher_logits, optimizer, settings, reduce, step, batch.teacher_features
        )
        count = labels.shape[0]
        totals.sums += torch.stack([torch.tensor(count, device=device), out["loss"] * count, out["ce"] * count,
                                    out["kd"] * count]).double()  # fmt: skip
        if hinted:
            totals.hint_sum += out["hint"].double() * count
        totals.weights.append(torch.stack([out[f"weight/{m}"] for m in range(batch.teacher_logits.shape[0])]))
        totals.grams.append(out["gram"])
        step += 1
        if after_step is not None:
            after_step(step)
        if totals.first_step_at is None:
            totals.first_step_at = time.perf_counter()  # reading the first batch, then one step
    return totals


def validate_epoch(
    student: nn.Module,
    batches: Iterable[StudentBatch],
    mean: Sequence[float],
    std: Sequence[float],
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    reduce_sum: Reduce | None = None,
) -> dict[str, float]:
    """``val/*`` metrics of ``student`` (``core.metrics.validation_metrics``) over ``batches``.

    Every worker sees all the batches and scores the samples with ``index % world == rank``, so
    that none is dropped or counted twice; ``reduce_sum`` (an all-reduce sum) adds up the workers'
    sums.
    """
    sums = torch.zeros(SUMS_LENGTH, dtype=torch.float64, device=device)
    student.eval()
    with torch.inference_mode():
        for batch in batches:
            mine = batch.index % world == rank
            logits = student(normalize(batch.images[mine], tuple(mean), tuple(std)))
            ensemble = ensemble_probabilities(batch.teacher_logits[:, mine])
            sums += validation_sums(logits, batch.labels[mine], ensemble)
    return validation_metrics(reduce_sum(sums) if reduce_sum is not None else sums)


def train_metrics(
    totals: EpochTotals, alpha: torch.Tensor, names: Sequence[str], hinted: bool, lr: float, seconds: float
) -> dict[str, float]:
    """The ``train/*``, ``weights/<teacher>`` and ``lr`` metrics of an epoch.

    Args:
        totals: the epoch's totals over every worker (``EpochTotals.reduced``).
        alpha: ``[S, M]``, the teachers' weights of each step (on the host).
        names: the M teachers.
        hinted: with hints (adds ``train/hint``).
        lr: the learning rate the epoch trained with.
        seconds: the time the epoch's training took.
    """
    sums = totals.sums
    samples = float(sums[0])
    metrics = {
        "train/loss": float(sums[1]) / samples,
        "train/ce": float(sums[2]) / samples,
        "train/kd": float(sums[3]) / samples,
    }
    if hinted:
        metrics["train/hint"] = float(totals.hint_sum) / samples
    metrics |= {f"weights/{name}": float(alpha[:, m].mean()) for m, name in enumerate(names)}
    return metrics | {
        "train/samples": samples,  # what the workers trained on (full batches only)
        "train/distinct_samples": float((totals.tally > 0).sum()),  # = train/samples when none came twice
        "train/repeated_samples": float((totals.tally > 1).sum()),  # samples that came twice or more this epoch
        "lr": lr,
        "train/samples_per_second": samples / seconds,
    }


def train_optimizer(
    model: nn.Module, train: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and schedule that a ``train`` section asks for (teachers and students alike)."""
    return make_optimizer(
        model, train.lr, train.momentum, train.weight_decay, train.schedule, train.epochs, train.milestones,
        nesterov=train.nesterov,
    )  # fmt: skip
