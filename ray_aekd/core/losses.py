"""Distillation losses for an ensemble of teachers: logit KD, FitNet hints, and their sum.

Logit KD (Hinton et al., 2015), per teacher m, with temperature T:

    KD_m = T^2 / B * sum_b KL(softmax(t_mb / T) || softmax(z_b / T))

Student loss (AE-KD, Du et al., NeurIPS 2020, eq. 9 with the authors' defaults
gamma = 1, lambda = 0.9, beta = 0):

    L = gamma * CE(z, y) + lambda * sum_m alpha_m KD_m + beta * sum_m alpha'_m Hint_m

with the teacher weights alpha, alpha' treated as constants (detached). Hint_m is a
FitNet-style (Romero et al., 2015) mean squared error between a regressed student feature
and teacher m's feature, with one regressor per teacher.

Everything here takes tensors and returns tensors: no optimizer, no device moves, no host
reads. Deliberately left out: Ray, MLflow and any training-loop state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ray_aekd.core._checks import check_logits, check_temperature
from ray_aekd.core.weighting import GradientSpace, strategy_weights, teacher_gram

__all__ = [
    "HintRegressors",
    "distillation_loss",
    "hint_gram",
    "hint_losses",
    "hint_weights",
    "kd_losses",
    "mse_per_teacher",
]


def kd_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each teacher's KD loss on the student, with the T^2 scaling.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[M, B, K]`` (treated as constants).
        temperature: T > 0.

    Returns:
        ``[M]``: ``T^2 * mean_b KL(softmax(t_mb / T) || softmax(z_b / T))``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)  # [B, K]
    log_teacher = F.log_softmax(teacher_logits.detach().to(log_student.dtype) / temperature, dim=-1)  # [M, B, K]
    p_teacher = log_teacher.exp()
    # classes a teacher rules out (logit -inf) contribute 0, not 0 * inf
    kl = torch.where(p_teacher > 0, p_teacher * (log_teacher - log_student.unsqueeze(0)), 0.0).sum(-1)  # [M, B]
    return kl.mean(-1) * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_weights: torch.Tensor,
    temperature: float,
    ce_weight: float = 1.0,
    kd_weight: float = 0.9,
    hints: torch.Tensor | None = None,
    hint_teacher_weights: torch.Tensor | None = None,
    hint_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The multi-teacher student loss, with every term named.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[M, B, K]``.
        labels: ``[B]`` class indices.
        teacher_weights: ``[M]`` alpha (uniform for ``average``, from ``aekd_weights`` for
            AE-KD); detached here, so no gradient flows through the weights.
        temperature: T > 0.
        ce_weight: gamma, weight of the cross-entropy with the labels.
        kd_weight: lambda, weight of the weighted KD sum.
        hints: ``[M]`` per-teacher hint losses (``hint_losses``), optional.
        hint_teacher_weights: ``[M]`` alpha' for the hints; required with ``hints``.
        hint_weight: beta, weight of the weighted hint sum.

    Returns:
        Scalars ``loss`` (to backpropagate), ``ce``, ``kd`` (the weighted KD sum), and per
        teacher i: ``kd/<i>``, ``weight/<i>``; with hints also ``hint``, ``hint/<i>``,
        ``hint_weight/<i>``. All are tensors; nothing is read back to the host.
    """
    kd = kd_losses(student_logits, teacher_logits, temperature)  # [M]
    weights = _checked_weights(teacher_weights, kd.shape[0], "teacher_weights").detach().to(kd.device, kd.dtype)
    ce = F.cross_entropy(student_logits, labels)
    kd_sum = (weights * kd).sum()
    out = {"loss": ce_weight * ce + kd_weight * kd_sum, "ce": ce, "kd": kd_sum}
    for i in range(kd.shape[0]):
        out[f"kd/{i}"] = kd[i]
        out[f"weight/{i}"] = weights[i]
    if hints is None:
        return out
    if hint_teacher_weights is None:
        raise ValueError("hints were given without hint_teacher_weights ([M] weights for the hint terms).")
    hint_alpha = _checked_weights(hint_teacher_weights, kd.shape[0], "hint_teacher_weights").detach()
    hint_alpha = hint_alpha.to(hints.device, hints.dtype)
    if hints.shape != kd.shape:
        raise ValueError(f"hints must have shape [M] = {list(kd.shape)}; got {list(hints.shape)}.")
    hint_sum = (hint_alpha * hints).sum()
    out["loss"] = out["loss"] + hint_weight * hint_sum
    out["hint"] = hint_sum
    for i in range(kd.shape[0]):
        out[f"hint/{i}"] = hints[i]
        out[f"hint_weight/{i}"] = hint_alpha[i]
    return out


class HintRegressors(nn.Module):
    """One 1x1-convolution regressor per teacher, from the student's feature to the teacher's.

    Args:
        student_channels: C_s, channels of the student feature.
        teacher_channels: C_m for each teacher m.

    Shapes:
        student feature ``[B, C_s, H, W]`` (or ``[B, C_s]``) -> list of ``[B, C_m, H, W]``
        (or ``[B, C_m]``), one per teacher.
    """

    def __init__(self, student_channels: int, teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if not teacher_channels:
            raise ValueError("HintRegressors needs at least one teacher; got teacher_channels = [].")
        self.regressors = nn.ModuleList(
            nn.Conv2d(student_channels, channels, kernel_size=1, bias=False) for channels in teacher_channels
        )

    def forward(self, student_feature: torch.Tensor) -> list[torch.Tensor]:
        flat = student_feature.dim() == 2
        x = student_feature[..., None, None] if flat else student_feature
        return [r(x).flatten(1) if flat else r(x) for r in self.regressors]


def hint_losses(
    student_feature: torch.Tensor, teacher_features: Sequence[torch.Tensor], regressors: HintRegressors
) -> torch.Tensor:
    """Per-teacher FitNet hint loss: ``mean((r_m(f_s) - f_m)^2)``.

    Args:
        student_feature: ``[B, C_s, H, W]`` or ``[B, C_s]``.
        teacher_features: M tensors ``[B, C_m, H, W]`` or ``[B, C_m]`` (treated as constants).
        regressors: one regressor per teacher.

    Returns:
        ``[M]``.
    """
    return mse_per_teacher(regressors(student_feature), teacher_features)


def mse_per_teacher(regressed: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[M]`` mean squared errors between each regressed student feature and its teacher's
    feature (treated as constant); shapes must match pairwise."""
    if len(regressed) != len(teacher_features):
        raise ValueError(
            f"Got {len(teacher_features)} teacher features for {len(regressed)} hint regressors; they must match."
        )
    losses = []
    for m, (mine, theirs) in enumerate(zip(regressed, teacher_features, strict=True)):
        if mine.shape != theirs.shape:
            raise ValueError(
                f"Hint regressor {m} maps the student feature to {list(mine.shape)}, "
                f"but teacher {m}'s feature is {list(theirs.shape)}."
            )
        losses.append(F.mse_loss(mine, theirs.detach().to(mine.dtype)))
    return torch.stack(losses)


def hint_weights(
    hints: torch.Tensor,
    student_feature: torch.Tensor,
    tolerance: float,
    space: GradientSpace = "batch_mean",
    normalize: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """AE-KD weights alpha' for the hint terms, in the gradient space of the student feature.

    The gradient of each hint loss on the student feature is taken with
    ``torch.autograd.grad``, which walks only the hint regressors (not the student), and
    keeps the graph for the step's single backward.

    Args:
        hints: ``[M]`` from ``hint_losses`` (still attached to ``student_feature``).
        student_feature: ``[B, ...]``, the feature the hints were computed from.
        tolerance: C in ``[1/M, 1]``.
        space, normalize, reduce: as for ``aekd_weights``.

    Returns:
        ``[M]`` detached weights.
    """
    return strategy_weights(hint_gram(hints, student_feature, space, reduce), "aekd", tolerance, normalize)


def hint_gram(
    hints: torch.Tensor,
    student_feature: torch.Tensor,
    space: GradientSpace = "batch_mean",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[M, M]`` raw Gram of the hint losses' gradients on the student feature ``[B, ...]``
    (``hints [M]`` still attached to it); the graph is kept for the step's backward."""
    if not student_feature.requires_grad:
        raise ValueError("student_feature must be part of the autograd graph (requires_grad) to weight hints.")
    grads = [torch.autograd.grad(hints[m], student_feature, retain_graph=True)[0] for m in range(hints.shape[0])]
    return teacher_gram(torch.stack(grads), space=space, reduce=reduce)


def _checked_weights(weights: torch.Tensor, num_teachers: int, name: str) -> torch.Tensor:
    if weights.shape != (num_teachers,):
        raise ValueError(f"{name} must have shape [M] = [{num_teachers}]; got {list(weights.shape)}.")
    return weights
