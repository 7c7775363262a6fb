"""Training and evaluation steps on plain tensors: no Ray, no MLflow.

Teachers are trained with ``classification_epoch``, students with ``distill_step``; every
model is evaluated with ``evaluate``. The distributed layer calls these inside Ray workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ray_aekd.core._checks import check_logits
from ray_aekd.core.features import forward_with_feature
from ray_aekd.core.losses import HintRegressors, distillation_loss, hint_gram, mse_per_teacher
from ray_aekd.core.weighting import (
    GradientSpace,
    NonFiniteLogitsError,
    check_finite_logits,
    kd_logit_gradients,
    strategy_weights,
    teacher_gram,
)

__all__ = [
    "DistillSettings",
    "HintStudent",
    "classification_epoch",
    "distill_step",
    "evaluate",
    "make_optimizer",
    "teacher_weights",
]


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    schedule: str,
    epochs: int,
    milestones: tuple[int, ...] = (),
    nesterov: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum (Nesterov's with ``nesterov``, as the AE-KD authors train) and a
    per-epoch schedule: ``cosine``, ``multistep`` (x0.1 at each milestone) or ``constant``."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    if schedule == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))
        )
    elif schedule == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=0.1)
    elif schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}. Valid schedules: cosine, multistep, constant.")
    return optimizer, scheduler


def classification_epoch(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer
) -> dict[str, float]:
    """One epoch of cross-entropy training; ``batches`` yields ``(x [B, ...], y [B])``.

    Returns ``train/loss`` and ``train/acc1`` averaged over samples. Raises ``FloatingPointError``
    naming the step if the loss stops being finite.
    """
    model.train()
    loss_sum: torch.Tensor | None = None  # accumulated on the device: no host sync per step
    correct: torch.Tensor | None = None
    count = 0
    for step, (x, y) in enumerate(batches):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_loss = loss.detach() * len(y)
        batch_correct = (logits.detach().argmax(-1) == y).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        count += len(y)
        if step % 50 == 49 and not torch.isfinite(loss):  # one host read every 50 steps
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}.")
    if loss_sum is None or correct is None:
        raise ValueError("classification_epoch got no batches.")
    if not torch.isfinite(loss_sum):
        raise FloatingPointError("training loss is not finite at the end of the epoch.")
    return {"train/loss": float(loss_sum) / count, "train/acc1": float(correct) / count}


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[dict[str, float], torch.Tensor]:
    """Accuracy and loss of ``model`` on ``x [N, ...]``, ``y [N]``; also returns logits ``[N, K]``."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    metrics = {
        "val/acc1": float((logits.argmax(-1) == y).float().mean()),
        "val/loss": float(F.cross_entropy(logits, y)),
    }
    return metrics, logits


@dataclass(frozen=True)
class DistillSettings:
    """How one distillation step weighs its terms (the authors' CIFAR defaults).

    Attributes:
        strategy: one of ``ray_aekd.core.weighting.STRATEGIES`` (``strategy_weights`` says what
            each does): ``average``, ``aekd``, ``mgda``, ``upgrad``, ``authors_svm``, ``fixed``, ``none``.
        tolerance: C for ``aekd`` and ``authors_svm``, in ``[1/M, 1]``.
        temperature: T > 0.
        ce_weight: gamma, weight of the cross-entropy with the labels.
        kd_weight: lambda, weight of the weighted KD sum.
        space: gradient space of the weighting, ``batch_mean`` or ``per_sample``.
        normalize: solve on unit-norm gradients, then re-weight by ``1/||g_m||`` (the authors'
            ``svm_norm``; ``strategy_weights``).
        hint_weight: beta, weight of the weighted FitNet hint sum (0: logits only). The hint
            terms get their own weights from the same strategy, solved in the gradient space
            of the student's hint feature.
        weights: the M teacher weights of ``fixed`` (each >= 0, summing to 1).
    """

    strategy: str = "aekd"
    tolerance: float = 0.6
    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 0.9
    space: GradientSpace = "batch_mean"
    normalize: bool = False
    hint_weight: float = 0.0
    weights: tuple[float, ...] | None = None


class HintStudent(nn.Module):
    """A student plus one hint regressor per teacher; ``forward`` returns
    ``(logits [B, K], feature, regressed)`` so that DDP sees every parameter in one forward.

    Args:
        student: the student network.
        hint_layer: name of the student submodule whose output is regressed onto the teachers'.
        regressors: ``HintRegressors`` from that feature's channels to each teacher's.
    """

    def __init__(self, student: nn.Module, hint_layer: str, regressors: HintRegressors) -> None:
        super().__init__()
        self.student = student
        self.hint_layer = hint_layer
        self.regressors = regressors

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logits, feature = forward_with_feature(self.student, images, self.hint_layer)
        return logits, feature, self.regressors(feature)


def distill_step(
    student: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    settings: DistillSettings,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    step: int | None = None,
    teacher_features: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One AE-KD step: student forward, per-teacher KD, teacher weights, one backward, update.

    Args:
        student: the model being trained (may be wrapped in DDP). With hints, a ``HintStudent``
            (or a DDP wrapping one).
        images: ``[B, ...]`` inputs; labels: ``[B]``.
        teacher_logits: ``[M, B, K]``, the teachers' logits for the same views.
        optimizer: steps the student's parameters (and the hint regressors').
        settings: strategy, tolerance, temperature and loss weights.
        reduce: all-reduce hook so that every worker computes the same weights.
        step: the global step, named in errors.
        teacher_features: with ``settings.hint_weight > 0``, M tensors ``[B, ...]``, each
            teacher's hint feature for the same views.

    Returns:
        The named loss terms and weights (``loss``, ``ce``, ``kd``, ``kd/<i>``, ``weight/<i>``,
        with hints ``hint``, ``hint/<i>``, ``hint_weight/<i>``) and ``gram``, the ``[M, M]`` Gram
        of the teachers' gradients (all-reduced when ``reduce`` is given); detached tensors,
        nothing is read back to the host here.

    Raises:
        ValueError: a teacher's (or the student's) logits hold NaN/Inf; the message names the
            teacher and the step.
    """
    hinted = settings.hint_weight > 0
    if hinted and teacher_features is None:
        raise ValueError("settings.hint_weight > 0 needs teacher_features (one hint feature per teacher).")
    output = student(images)
    logits, feature, regressed = output if hinted else (output, None, None)
    _check_step_logits(logits, teacher_logits, step)
    weights, gram = teacher_weights(logits, teacher_logits, settings, reduce)
    hints = hint_alpha = None
    if hinted:
        hints, hint_alpha = _hint_terms(feature, regressed, teacher_features, settings, reduce)
    out = distillation_loss(
        logits, teacher_logits, labels, weights, settings.temperature, settings.ce_weight, settings.kd_weight,
        hints=hints, hint_teacher_weights=hint_alpha, hint_weight=settings.hint_weight,
    )  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    out["gram"] = gram
    return {name: value.detach() for name, value in out.items()}


def teacher_weights(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    settings: DistillSettings,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' weights for one step, and the Gram they were solved from.

    Args:
        logits: ``[B, K]`` student logits; teacher_logits: ``[M, B, K]``.
        settings: strategy (``strategy_weights``), tolerance, fixed weights, temperature and
            gradient space.
        reduce: all-reduce hook applied to the gradient statistics before the solve.

    Returns:
        ``(weights [M], gram [M, M])``: the weights (in the logits' dtype) and the raw Gram of
        the teachers' gradients on the student's logits; detached.
    """
    gradients = kd_logit_gradients(logits, teacher_logits, settings.temperature)
    gram = teacher_gram(gradients, settings.space, reduce=reduce)
    weights = strategy_weights(gram, settings.strategy, settings.tolerance, settings.normalize, settings.weights)
    return weights.to(logits.dtype), gram


def _check_step_logits(logits: torch.Tensor, teacher_logits: torch.Tensor, step: int | None) -> None:
    """Shapes agree and every logit is finite; a ``NonFiniteLogitsError`` names ``step``."""
    check_logits(logits, teacher_logits)
    try:
        check_finite_logits(logits, teacher_logits)
    except NonFiniteLogitsError as error:
        if step is None:
            raise
        raise NonFiniteLogitsError(f"{error.args[0]} (at step {step})", error.teachers, step) from None


def _hint_terms(
    feature: torch.Tensor | None,
    regressed: Sequence[torch.Tensor] | None,
    teacher_features: Sequence[torch.Tensor] | None,
    settings: DistillSettings,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hints [M], hint weights [M])``: each teacher's FitNet MSE and its weight from the
    step's strategy, solved in the gradient space of the student's hint ``feature``."""
    assert feature is not None and regressed is not None and teacher_features is not None
    hints = mse_per_teacher(regressed, teacher_features)
    if settings.strategy in ("average", "fixed", "none"):  # no gradients needed
        gram = torch.zeros(hints.shape[0], hints.shape[0], dtype=hints.dtype, device=hints.device)
    else:
        gram = hint_gram(hints, feature, settings.space, reduce)
    alpha = strategy_weights(gram, settings.strategy, settings.tolerance, settings.normalize, settings.weights)
    return hints, alpha.to(hints.dtype)
