"""The named steps of a distillation run, in-process on a tiny student and no Ray: one epoch of
training (``distributed.epochs.train_epoch``), one validation pass (``validate_epoch``), the
epoch's metrics (``train_metrics``) and the teachers' weights of one step (``core.step``)."""

from __future__ import annotations

import pytest
import torch

from ray_aekd.core.step import DistillSettings, make_optimizer, teacher_weights
from ray_aekd.core.weighting import NonFiniteLogitsError
from ray_aekd.data.sources import digits_source
from ray_aekd.distributed.epochs import StudentBatch, train_epoch, train_metrics, validate_epoch
from ray_aekd.models import build_model

NAMES = ["a", "b", "c"]
BATCH = 64


@pytest.fixture(scope="module")
def digits():
    """Digits with three teachers' logits: each one confident on the labels, except that teacher m
    is wrong on its own classes (m, m + 3, ...), so that they disagree."""
    source = digits_source()
    n = len(source) // BATCH * BATCH  # full batches only
    labels = source.labels[:n]
    teacher_logits = []
    for m in range(len(NAMES)):
        wrong = labels % len(NAMES) == m
        said = torch.where(wrong, (labels + 1) % 10, labels)
        teacher_logits.append(torch.nn.functional.one_hot(said, 10).float() * 6.0)
    return source, torch.stack(teacher_logits)  # [M, N, 10]


def _batches(digits, order=None):
    source, logits = digits
    n = logits.shape[1]
    order = torch.arange(n) if order is None else order
    for i in range(0, n, BATCH):
        idx = order[i : i + BATCH]
        yield StudentBatch(source.images[idx], source.labels[idx], idx, logits[:, idx])


def _student(seed=0):
    torch.manual_seed(seed)
    model = build_model("digits_mlp", 10, in_channels=1)
    optimizer, _ = make_optimizer(model, 0.05, 0.9, 0.0, "constant", epochs=3)
    return model, optimizer


def test_train_epoch_lowers_the_loss_and_trains_on_every_sample_once(digits):
    source, logits = digits
    model, optimizer = _student()
    settings = DistillSettings(strategy="aekd", tolerance=0.6)
    losses, step = [], 0
    for epoch in range(3):
        order = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(epoch))
        totals = train_epoch(
            model, _batches(digits, order), optimizer, settings, source.mean, source.std, len(source), step
        )
        step += totals.steps
        alpha = torch.stack(totals.weights).double()
        metrics = train_metrics(totals, alpha, NAMES, hinted=False, lr=0.05, seconds=1.0)
        losses.append(metrics["train/loss"])

        assert totals.steps == logits.shape[1] // BATCH and totals.first_step_at is not None
        assert metrics["train/samples"] == metrics["train/distinct_samples"] == logits.shape[1]
        assert metrics["train/repeated_samples"] == 0
        # every step's weights are a convex combination with no teacher above C
        assert torch.allclose(alpha.sum(1), torch.ones(len(alpha), dtype=torch.float64), atol=1e-6)
        assert float(alpha.max()) <= 0.6 + 1e-6
        assert sum(metrics[f"weights/{n}"] for n in NAMES) == pytest.approx(1.0, abs=1e-6)
        assert metrics["train/loss"] == pytest.approx(metrics["train/ce"] + 0.9 * metrics["train/kd"], rel=1e-4)
    assert step == 3 * (logits.shape[1] // BATCH)
    assert losses[2] < losses[0]


def test_validate_epoch_scores_every_sample_once_however_many_workers(digits):
    source, logits = digits
    model, optimizer = _student()
    settings = DistillSettings(strategy="average")
    train_epoch(model, _batches(digits), optimizer, settings, source.mean, source.std, len(source))

    alone = validate_epoch(model, _batches(digits), source.mean, source.std)
    assert set(alone) == {"val/acc1", "val/acc5", "val/loss", "val/agreement", "val/ece"}
    assert alone["val/acc1"] > 0.5  # one epoch on real digits: far above chance (0.1)
    assert 0.0 <= alone["val/agreement"] <= 1.0 and alone["val/acc5"] >= alone["val/acc1"]

    # two workers: each scores the samples with index % 2 == rank; the all-reduce adds their sums
    other: list[torch.Tensor] = []
    validate_epoch(model, _batches(digits), source.mean, source.std, rank=1, world=2,
                   reduce_sum=lambda sums: other.append(sums) or sums)  # fmt: skip
    both = validate_epoch(model, _batches(digits), source.mean, source.std, rank=0, world=2,
                          reduce_sum=lambda sums: sums + other[0])  # fmt: skip
    assert both == pytest.approx(alone, rel=1e-6)


def test_step_hooks_see_every_global_step_in_order(digits):
    source, logits = digits
    model, optimizer = _student()
    before, after = [], []
    totals = train_epoch(
        model, _batches(digits), optimizer, DistillSettings(), source.mean, source.std, len(source), step=100,
        before_step=before.append, after_step=after.append,
    )  # fmt: skip
    assert before == list(range(100, 100 + totals.steps))
    assert after == list(range(101, 101 + totals.steps))


def test_a_teacher_with_nan_logits_stops_the_epoch_naming_it_and_the_step(digits):
    source, logits = digits
    bad = logits.clone()
    bad[1, 3 * BATCH + 5, 2] = float("nan")  # teacher b, in the fourth batch
    model, optimizer = _student()
    with pytest.raises(NonFiniteLogitsError, match="at step 13") as caught:
        train_epoch(model, _batches((source, bad)), optimizer, DistillSettings(), source.mean, source.std,
                    len(source), step=10)  # fmt: skip
    assert caught.value.teachers == [1] and caught.value.step == 13


@pytest.mark.parametrize(("strategy", "cap"), [("average", 1 / 3), ("aekd", 0.6), ("mgda", 1.0)])
def test_teacher_weights_sum_to_one_and_respect_the_strategy(strategy, cap):
    torch.manual_seed(0)
    student, teachers = torch.randn(16, 10), torch.randn(3, 16, 10)
    weights, gram = teacher_weights(student, teachers, DistillSettings(strategy=strategy, tolerance=0.6))
    assert gram.shape == (3, 3) and torch.allclose(gram, gram.T)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(weights.max()) <= cap + 1e-6 and float(weights.min()) >= -1e-9
    if strategy == "average":
        assert torch.allclose(weights, torch.full((3,), 1 / 3))
