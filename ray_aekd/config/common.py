"""Sections that teachers and distillation configs share (``train``, ``tracking``) and the check
of a model name."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
from collections.abc import Iterator

from ray_aekd._names import BUILTIN_MODELS, TIMM_PREFIX, TORCHVISION_PREFIX, unknown_model_message
from ray_aekd.config._base import ConfigError, check

__all__ = ["SCHEDULES", "TrackingConfig", "TrainConfig", "check_model", "library_models_checked_later"]

#: ``train.schedule``: how the learning rate moves over the epochs.
SCHEDULES = ("cosine", "multistep", "constant")


#: While ``library_models_checked_later()`` runs: the torchvision:/timm: names seen, whose
#: check (which imports torch) is left to the run. None otherwise.
_later: list[str] | None = None
_LIBRARY_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@contextlib.contextmanager
def library_models_checked_later() -> Iterator[list[str]]:
    """Within the block, ``check_model`` checks only the syntax of ``torchvision:<name>`` and
    ``timm:<name>`` (no torch import: ``--check`` stays instant); yields the names seen, which
    the full check (at the run's start) asks the library about."""
    global _later
    outer, _later = _later, []
    try:
        yield _later
    finally:
        _later = outer


def check_model(key: str, name: str) -> None:
    """``name`` is a model the registry can build: a built-in name (checked without torch), a
    model registered in this process, ``torchvision:<name>`` or ``timm:<name>``."""
    if name in BUILTIN_MODELS:
        return
    prefix = next((p for p in (TORCHVISION_PREFIX, TIMM_PREFIX) if name.startswith(p)), None)
    if prefix is not None and _later is not None:
        if not _LIBRARY_NAME.fullmatch(name[len(prefix) :]):
            raise ConfigError(f"{key}: got {name!r}; allowed: {prefix}<a model name of the library>, e.g. resnet18.")
        if name not in _later:
            _later.append(name)
        return
    registry_loaded = "ray_aekd.models.registry" in sys.modules  # models registered by the caller's code
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)) or registry_loaded:
        # Only here does a config check import torch (and torchvision or timm): to ask the
        # library whether it has this model.
        from ray_aekd.models.registry import model_spec

        try:
            model_spec(name)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
        return
    raise ConfigError(f"{key}: {unknown_model_message(name, BUILTIN_MODELS)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimiser (SGD with momentum, optionally Nesterov's) and its learning-rate schedule."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # the global batch (split evenly across workers)
    lr: float = 0.05  # the learning rate at the start
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (the AE-KD authors' recipe uses it)
    weight_decay: float = 5e-4  # L2 penalty of SGD
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: tuple[int, ...] = ()  # multistep: epochs at which lr *= 0.1

    def validate(self, prefix: str) -> None:
        check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        check(math.isfinite(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "a finite number > 0")
        check(0 <= self.momentum < 1, f"{prefix}.momentum", self.momentum, "a number in [0, 1)")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "a number >= 0")
        check(self.schedule in SCHEDULES, f"{prefix}.schedule", self.schedule, ", ".join(SCHEDULES))
        if self.schedule == "multistep":
            steps = self.milestones
            ok = bool(steps) and steps[0] > 0 and all(a < b for a, b in zip(steps, steps[1:], strict=False))
            check(
                ok and self.milestones[-1] < self.epochs,
                f"{prefix}.milestones",
                list(self.milestones),
                f"increasing epochs in [1, {self.epochs - 1}] for schedule multistep",
            )


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow runs go."""

    uri: str | None = (
        None  # MLflow tracking URI; --tracking-uri and MLFLOW_TRACKING_URI win; default sqlite:///mlflow.db
    )
    experiment: str = "ray-aekd"  # MLflow experiment name

    def validate(self, prefix: str) -> None:
        check(bool(self.experiment), f"{prefix}.experiment", self.experiment, "a non-empty name")
