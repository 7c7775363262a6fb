"""A small end-to-end demo of AE-KD teacher weighting on real data, in one process.

scikit-learn's bundled handwritten digits (1,797 8x8 images, no network). M teachers are
trained so that they disagree: teacher m sees noisy labels on its own group of classes.
A small student is then distilled from them with each strategy (``average``, ``aekd``,
``mgda``), and the demo reports validation accuracy, agreement with the teacher ensemble,
and the mean weight each strategy gave each teacher.

Deliberately plain PyTorch: no Ray, no MLflow. The distributed pipeline is built on the
same ``ray_aekd.weighting`` and ``ray_aekd.losses`` functions used here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ray_aekd._names import MIN_NORM_STRATEGIES
from ray_aekd.core._checks import check_temperature, check_tolerance
from ray_aekd.core.step import DistillSettings, distill_step
from ray_aekd.core.weighting import GradientSpace, strategy_tolerance
from ray_aekd.data import normalize, split_indices
from ray_aekd.data.labels import corrupt_labels
from ray_aekd.data.sources import digits_source
from ray_aekd.models.digits_nets import DigitsMLP

__all__ = ["DemoResult", "load_digits_split", "run_demo"]


@dataclass
class DemoResult:
    teacher_acc1: list[float]
    ensemble_acc1: float
    # per strategy: val/acc1, val/agreement, mean weight per teacher, seconds
    strategies: dict[str, dict[str, float | list[float]]] = field(default_factory=dict)


def load_digits_split(seed: int, val_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """Digits as ``x_train [N, 64]`` (standardised), ``y_train [N]``, ``x_val``, ``y_val``,
    split by seed."""
    source = digits_source()
    train, val = split_indices(len(source), val_fraction, seed)
    x = normalize(source.images, source.mean, source.std).flatten(1)
    return x[train], source.labels[train], x[val], source.labels[val]


def _mlp(hidden: int) -> nn.Module:
    return DigitsMLP(num_classes=10, in_features=64, hidden=hidden)


def _train_teacher(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300) -> nn.Module:
    torch.manual_seed(seed)
    model = _mlp(128)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def run_demo(
    num_teachers: int = 3,
    epochs: int = 30,
    tolerance: float = 0.6,
    temperature: float = 4.0,
    seed: int = 0,
    strategies: Sequence[str] = MIN_NORM_STRATEGIES,
    label_noise: float = 0.7,
    space: GradientSpace = "batch_mean",
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train disagreeing teachers on digits, then distil a student with each strategy.

    Args:
        num_teachers: M >= 2. Teacher m has ``label_noise`` of the labels of its own
            group of classes (classes ``m, m + M, ...``) replaced by a random other class.
        epochs: student epochs per strategy (batch 64, SGD with momentum).
        tolerance: C for ``aekd``, in ``[1/M, 1]``.
        temperature: T > 0.
        seed: split, teachers, noise and student initialisation.
        strategies: any of ``average``, ``aekd``, ``mgda``.
        label_noise: share of a teacher's group labels that are corrupted, in ``[0, 1]``.
        space: gradient space of the weighting, ``batch_mean`` or ``per_sample``.
        log: where progress lines go.
    """
    _check_demo_args(num_teachers, epochs, tolerance, temperature, strategies, label_noise, space)
    x_train, y_train, x_val, y_val = load_digits_split(seed)
    log(f"digits: {len(y_train)} train / {len(y_val)} validation images (scikit-learn, bundled)")
    teachers = _disagreeing_teachers(x_train, y_train, num_teachers, label_noise, seed, log)
    with torch.inference_mode():
        train_logits = torch.stack([t(x_train) for t in teachers])  # [M, N, 10]
        val_logits = torch.stack([t(x_val) for t in teachers])
    ensemble_val = val_logits.softmax(-1).mean(0)
    result = DemoResult(
        teacher_acc1=[_accuracy(v, y_val) for v in val_logits], ensemble_acc1=_accuracy(ensemble_val, y_val)
    )
    log(
        "teachers val/acc1: "
        + "  ".join(f"t{m} {acc:.3f}" for m, acc in enumerate(result.teacher_acc1))
        + f"   ensemble {result.ensemble_acc1:.3f}"
    )
    for name in strategies:
        cap = strategy_tolerance(name, num_teachers, tolerance)
        start = time.perf_counter()
        student, mean_weights = _distil(x_train, y_train, train_logits, cap, temperature, epochs, seed, space)
        with torch.inference_mode():
            val_student = student(x_val)
        row: dict[str, float | list[float]] = {
            "tolerance": cap,
            "val/acc1": _accuracy(val_student, y_val),
            "val/agreement": float((val_student.argmax(-1) == ensemble_val.argmax(-1)).float().mean()),
            "mean_weights": mean_weights,
            "seconds": time.perf_counter() - start,
        }
        result.strategies[name] = row
        log(
            f"{name:8s} C={cap:.3f}  val/acc1 {row['val/acc1']:.3f}  val/agreement {row['val/agreement']:.3f}  "
            f"mean weights [{', '.join(f'{w:.3f}' for w in mean_weights)}]  ({row['seconds']:.1f}s)"
        )
    return result


def _check_demo_args(
    num_teachers: int,
    epochs: int,
    tolerance: float,
    temperature: float,
    strategies: Sequence[str],
    label_noise: float,
    space: str,
) -> None:
    """Refuse a bad argument of ``run_demo``, naming it and what is allowed."""
    if num_teachers < 2:
        raise ValueError(f"the number of teachers (--teachers) must be >= 2; got {num_teachers}.")
    if epochs < 1:
        raise ValueError(f"epochs (--epochs) must be >= 1; got {epochs}.")
    check_tolerance(tolerance, num_teachers)
    check_temperature(temperature)
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1]; got {label_noise}.")
    for name in strategies:
        if name not in MIN_NORM_STRATEGIES:
            raise ValueError(f"the demo compares {', '.join(MIN_NORM_STRATEGIES)}; got strategy {name!r}.")
    if space not in ("batch_mean", "per_sample"):
        raise ValueError(f"space must be one of batch_mean, per_sample; got {space!r}.")


def _disagreeing_teachers(
    x: torch.Tensor, y: torch.Tensor, num_teachers: int, label_noise: float, seed: int, log: Callable[[str], None]
) -> list[nn.Module]:
    """M teachers; teacher m learns from labels with ``label_noise`` of its own classes
    (``m, m + M, ...``) replaced by a random other class."""
    gen = torch.Generator().manual_seed(seed + 1)
    teachers = []
    for m in range(num_teachers):
        group = list(range(m, 10, num_teachers))
        noisy = corrupt_labels(y, group, label_noise, 10, gen)
        teachers.append(_train_teacher(x, noisy, seed=seed * 100 + m))
        log(f"teacher {m}: trained with {label_noise:.0%} label noise on classes {group}")
    return teachers


def _distil(
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor,
    cap: float,
    temperature: float,
    epochs: int,
    seed: int,
    space: GradientSpace,
    batch_size: int = 64,
) -> tuple[nn.Module, list[float]]:
    """Train a student MLP on ``x [N, 64]`` with teacher logits ``[M, N, 10]``; returns the
    student and the mean weight of each teacher over all steps."""
    torch.manual_seed(seed)
    student = _mlp(32)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 2)
    weight_sum = torch.zeros(teacher_logits.shape[0], dtype=torch.float64)
    # the strategy is carried by C: C = 1/M gives exactly uniform weights
    settings = DistillSettings(strategy="aekd", tolerance=cap, temperature=temperature, space=space)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            out = distill_step(student, x[idx], y[idx], teacher_logits[:, idx], optimizer, settings, step=steps)
            weight_sum += torch.stack([out[f"weight/{m}"] for m in range(len(weight_sum))]).double()
            steps += 1
    return student.eval(), (weight_sum / steps).tolist()
