"""ray_aekd: distil an ensemble of teachers into one student with AE-KD, on Ray.

The package is layered; each subpackage imports only the ones before it:

- ``ray_aekd.core``: the maths (teacher weighting, losses, one distillation step, metrics); torch only.
- ``ray_aekd.models``: networks, checkpoints, teacher sources, export.
- ``ray_aekd.data``: datasets, splits, augmentation views, Ray Data builders.
- ``ray_aekd.config``: the typed configuration of every command (plain data; imports no torch).
- ``ray_aekd.tracking``: MLflow runs, evaluation, comparison, plots (the only layer with MLflow).
- ``ray_aekd.distributed``: teachers on Ray Data, the Ray Train loop, Tune sweeps, teacher training.
- ``ray_aekd.cli``: the ``ray-aekd`` command.

The names below are the public API. They are loaded on first use, so ``import ray_aekd`` stays
instant and imports neither torch, Ray nor MLflow.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("ray-aekd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

#: public name -> the module that defines it
_PUBLIC = {
    # core maths
    "min_norm_weights": "ray_aekd.core.weighting",
    "aekd_weights": "ray_aekd.core.weighting",
    "teacher_gram": "ray_aekd.core.weighting",
    "STRATEGIES": "ray_aekd.core.weighting",
    "kd_losses": "ray_aekd.core.losses",
    "distillation_loss": "ray_aekd.core.losses",
    "distill_step": "ray_aekd.core.step",
    "validation_metrics": "ray_aekd.core.metrics",
    # models and data
    "build_model": "ray_aekd.models.registry",
    "register_model": "ray_aekd.models.registry",
    "model_names": "ray_aekd.models.registry",
    "ModelSource": "ray_aekd.models.sources",
    "load_source": "ray_aekd.models.sources",
    "open_source": "ray_aekd.data.sources",
    # configuration
    "ConfigError": "ray_aekd.config",
    "DistillConfig": "ray_aekd.config",
    "TeachersConfig": "ray_aekd.config",
    "load_config": "ray_aekd.config",
    "SweepConfig": "ray_aekd.config.sweep",
    "load_sweep": "ray_aekd.config.sweep",
    # runs on Ray
    "distill": "ray_aekd.distributed.distill",
    "train_teachers": "ray_aekd.distributed.teachers",
    "relabel": "ray_aekd.distributed.soft_labels",
    "run_sweep": "ray_aekd.distributed.sweep",
    "sweep_from_file": "ray_aekd.distributed.sweep",
    # MLflow and reports
    "evaluate_model": "ray_aekd.tracking.evaluate",
    "compare": "ray_aekd.tracking.compare",
    "upload": "ray_aekd.tracking.upload",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_aekd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
