"""Training and evaluation steps on plain tensors: no Ray, no MLflow.

Teachers are trained with ``classification_epoch``; every model is evaluated with
``evaluate``. The distillation step joins them in a later change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["classification_epoch", "evaluate", "make_optimizer"]


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    schedule: str,
    epochs: int,
    milestones: tuple[int, ...] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum and a per-epoch schedule: ``cosine``, ``multistep`` (x0.1 at each
    milestone) or ``constant``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
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
