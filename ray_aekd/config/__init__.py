"""Typed, validated configs: YAML (plain data, ``yaml.safe_load``) into frozen dataclasses.

``load_config(TeachersConfig, "tune_configs/teachers_digits.yaml", ["train.epochs=2"])``
reads the file, applies ``--set`` overrides (dotted keys; values parsed as YAML scalars),
and builds the dataclass tree. Unknown keys, wrong types and out-of-range values raise one
``ConfigError`` naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from ray_aekd.core.weighting import STRATEGIES
from ray_aekd.data.sources import SOURCES
from ray_aekd.data.views import split_indices
from ray_aekd.models.preprocess import Preprocess
from ray_aekd.models.registry import model_spec
from ray_aekd.models.sources import SOURCE_KINDS, ModelSource

__all__ = [
    "PRESETS",
    "PreprocessConfig",
    "CACHE_DTYPES",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "DistillDataConfig",
    "DistillConfig",
    "DistillTeacher",
    "DistillTrackingConfig",
    "FAULTS_ENV",
    "FaultsConfig",
    "TEACHER_FAULTS_ENV",
    "TeacherFaultsConfig",
    "LossConfig",
    "StudentConfig",
    "WorkersConfig",
    "apply_preset",
    "ResourcesConfig",
    "TeacherSpec",
    "TeachersConfig",
    "TrackingConfig",
    "TrainConfig",
    "flatten",
    "from_dict",
    "load_config",
    "with_env_faults",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type, or out of range."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}.")


def _check_resources(key: str, resources: dict[str, Any]) -> None:
    """Custom Ray resources (``{"teacher_gpu": 1}``): names a node offers, amounts Ray can book."""
    for name, amount in resources.items():
        where = f"{key}.{name}"
        _check(isinstance(name, str) and bool(name), key, resources, "a mapping of resource names to amounts")
        _check(
            name not in ("CPU", "GPU", "memory", "object_store_memory"),
            where,
            amount,
            "a custom resource; CPUs and GPUs have their own keys (num_cpus/num_gpus, cpus_per_worker/use_gpu)",
        )
        ok = isinstance(amount, int | float) and not isinstance(amount, bool) and math.isfinite(amount)
        _check(
            ok and (0 < amount <= 1 or float(amount).is_integer() and amount > 0),
            where,
            amount,
            "a number in (0, 1] or a whole number > 1 (Ray books fractions of one unit only)",
        )


def _check_labels(key: str, selector: dict[str, Any]) -> None:
    """A Ray label selector (``{"ray-aekd/role": "teacher"}``): node label -> value (Ray's syntax:
    ``value``, ``!value``, ``in(a,b)``, ``!in(a,b)``)."""
    for name, value in selector.items():
        _check(isinstance(name, str) and bool(name), key, selector, "a mapping of node label names to values")
        _check(isinstance(value, str) and bool(value), f"{key}.{name}", value, "a string (quote numbers)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    path: str | None = None
    download: bool = False
    val_fraction: float = 0.2
    image_size: int | None = None  # image folders only: resize to this square size
    augment: bool = True  # random crop (pad 4, or 1 for 8x8 digits) and horizontal flip
    split_seed: int | None = None  # seed of the train/val split; null: the run's seed
    tuning_fraction: float = 0.0  # > 0: validate on this share of the training split; the val split is never read

    def validate(self, prefix: str) -> None:
        _check(self.dataset in SOURCES, f"{prefix}.dataset", self.dataset, ", ".join(SOURCES))
        _check(0 < self.val_fraction < 1, f"{prefix}.val_fraction", self.val_fraction, "a number in (0, 1)")
        seed = self.split_seed
        _check(seed is None or seed >= 0, f"{prefix}.split_seed", seed, "an integer >= 0, or null (the run's seed)")
        _check(
            0 <= self.tuning_fraction < 1,
            f"{prefix}.tuning_fraction",
            self.tuning_fraction,
            "a number in [0, 1): 0 validates on the val split, more carves a tuning split out of the training split",
        )
        _check(
            self.dataset == "digits" or bool(self.path),
            f"{prefix}.path",
            self.path,
            f"a folder for dataset {self.dataset!r}",
        )
        if self.image_size is not None:
            _check(self.image_size >= 8, f"{prefix}.image_size", self.image_size, "an integer >= 8, or null")
            _check(
                self.dataset == "imagefolder",
                f"{prefix}.image_size",
                self.image_size,
                "null unless dataset is imagefolder (other datasets have a fixed size)",
            )

    def split(self, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(train [N_t], validation [N_v])`` indices of a source of ``num`` samples for a run with
        seed ``seed``: the val split (by ``split_seed``, else ``seed``), or with ``tuning_fraction``
        a tuning split out of the training split, the val split left out of both."""
        split_seed = seed if self.split_seed is None else self.split_seed
        return split_indices(num, self.val_fraction, split_seed, self.tuning_fraction)


@dataclasses.dataclass(frozen=True)
class DistillDataConfig(DataConfig):
    """The data of a distillation run: ``DataConfig`` plus how views and order repeat."""

    views: int | None = None  # distinct augmentation views: epoch e uses view e mod views; null: a new one each epoch
    deterministic: bool = False  # read blocks in a fixed order (Ray Data preserve_order): runs repeat exactly

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.views is not None:
            _check(self.views >= 1, f"{prefix}.views", self.views, "an integer >= 1, or null (a new view every epoch)")

    def view(self, epoch: int) -> int:
        """The augmentation view that epoch ``epoch`` (0-based) reads."""
        return epoch % self.views if self.views else epoch

    def repeating_views(self) -> int | None:
        """How many distinct views the epochs cycle through: ``views``, 1 without augmentation,
        None when every epoch sees a new one."""
        return 1 if not self.augment else self.views


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Where a run's soft labels come from. ``mode``: keep each training view, its images and
    its teachers' logits, in Ray's object store (``memory``: teachers run once per view, not once
    per epoch), or run the teachers every epoch (``stream``); ``auto`` keeps them when the views
    repeat (``data.views`` set, or ``data.augment: false``), there are no hint features, and
    they fit in half of the object store. ``path``: a soft-label cache on disk (``ray-aekd
    relabel``): teacher logits for ``data.views`` views, read instead of running any teacher."""

    path: str | None = None  # local folder, s3://..., gs://...; set: read teacher logits from it, run no teacher
    dtype: str = "float32"  # float32 | float16 (half the size; logits rounded to ~3 significant digits)
    mode: str = "auto"  # auto | memory | stream

    def validate(self, prefix: str) -> None:
        _check(self.path != "", f"{prefix}.path", self.path, "a folder or URI, or null")
        _check(self.dtype in CACHE_DTYPES, f"{prefix}.dtype", self.dtype, ", ".join(CACHE_DTYPES))
        _check(self.mode in CACHE_MODES, f"{prefix}.mode", self.mode, ", ".join(CACHE_MODES))


#: How a soft-label cache stores logits.
CACHE_DTYPES = ("float32", "float16")
#: Where a run keeps its training views' soft labels between epochs (``CacheConfig.mode``).
CACHE_MODES = ("auto", "memory", "stream")

#: Environment variable with a YAML mapping of ``faults`` keys; it wins over the config's.
FAULTS_ENV = "RAY_AEKD_FAULTS"


def _check_kill_teacher(teacher: str | None, names: list[str]) -> None:
    _check(teacher is None or teacher in names, "faults.kill_teacher", teacher,
           f"one of the teachers ({', '.join(names)}), or null")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FaultsConfig:
    """Fault injection for tests and failure drills; everything off by default. Each fault
    fires once per run: a marker file in the run folder's ``faults/`` records that it has."""

    kill_worker_rank: int | None = None  # kill this Ray Train worker's process (as a pre-empted node would) ...
    kill_worker_step: int = 1  # ... just before it runs this global step (counted from 0)
    kill_teacher: str | None = None  # kill the process of one actor (or task) of this teacher's stage ...
    kill_teacher_batch: int = 1  # ... when it receives its n-th batch (from 1), before running it
    mlflow_down_epoch: int | None = None  # the tracking server is unreachable from this epoch (from 1) on

    def validate(self, prefix: str) -> None:
        rank = self.kill_worker_rank
        _check(rank is None or rank >= 0, f"{prefix}.kill_worker_rank", rank, "an integer >= 0, or null")
        _check(self.kill_worker_step >= 0, f"{prefix}.kill_worker_step", self.kill_worker_step, "an integer >= 0")
        _check(self.kill_teacher != "", f"{prefix}.kill_teacher", self.kill_teacher, "a teacher's name, or null")
        _check(self.kill_teacher_batch >= 1, f"{prefix}.kill_teacher_batch", self.kill_teacher_batch, "an integer >= 1")
        down = self.mlflow_down_epoch
        _check(down is None or down >= 1, f"{prefix}.mlflow_down_epoch", down, "an integer >= 1, or null")

    @property
    def active(self) -> bool:
        return self.kill_worker_rank is not None or self.kill_teacher is not None or self.mlflow_down_epoch is not None


#: Environment variable with a YAML mapping of ``ray-aekd teachers``' ``faults`` keys; it wins over the config's.
#: Not ``FAULTS_ENV``: a quickstart trains teachers and then distils, and each command has its own faults.
TEACHER_FAULTS_ENV = "RAY_AEKD_TEACHER_FAULTS"


@dataclasses.dataclass(frozen=True)
class TeacherFaultsConfig:
    """Fault injection for ``ray-aekd teachers`` (tests, drills); off by default. The kill fires
    once per run: a marker file in ``output_dir/faults/`` records that it has."""

    kill_teacher: str | None = None  # kill the process of this teacher's Tune trial (as a pre-empted node would) ...
    kill_teacher_epoch: int = 1  # ... just after it reported this epoch (from 1) with its checkpoint

    def validate(self, prefix: str) -> None:
        _check(self.kill_teacher != "", f"{prefix}.kill_teacher", self.kill_teacher, "a teacher's name, or null")
        _check(self.kill_teacher_epoch >= 1, f"{prefix}.kill_teacher_epoch", self.kill_teacher_epoch, "an integer >= 1")

    @property
    def active(self) -> bool:
        return self.kill_teacher is not None


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    name: str
    model: str
    seed: int = 0
    label_noise: float = 0.0  # share of the labels of noisy_classes replaced by another class
    noisy_classes: tuple[int, ...] = ()
    subset_fraction: float = 1.0  # share of the training split this teacher sees

    def validate(self, prefix: str) -> None:
        _check(bool(self.name) and "/" not in self.name, f"{prefix}.name", self.name, "a non-empty name without '/'")
        _check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
        _check(
            all(c >= 0 for c in self.noisy_classes),
            f"{prefix}.noisy_classes",
            list(self.noisy_classes),
            "class indices >= 0",
        )
        try:
            model_spec(self.model)
        except ValueError as error:
            raise ConfigError(f"{prefix}.model: {error}") from None
        _check(0 <= self.label_noise <= 1, f"{prefix}.label_noise", self.label_noise, "a number in [0, 1]")
        _check(0 < self.subset_fraction <= 1, f"{prefix}.subset_fraction", self.subset_fraction, "a number in (0, 1]")
        _check(
            self.label_noise == 0 or bool(self.noisy_classes),
            f"{prefix}.noisy_classes",
            list(self.noisy_classes),
            "at least one class index when label_noise > 0",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: tuple[int, ...] = ()  # multistep: epochs at which lr *= 0.1

    def validate(self, prefix: str) -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        _check(math.isfinite(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "a finite number > 0")
        _check(0 <= self.momentum < 1, f"{prefix}.momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "a number >= 0")
        schedules = ("cosine", "multistep", "constant")
        _check(self.schedule in schedules, f"{prefix}.schedule", self.schedule, ", ".join(schedules))
        if self.schedule == "multistep":
            steps = self.milestones
            ok = bool(steps) and steps[0] > 0 and all(a < b for a, b in zip(steps, steps[1:], strict=False))
            _check(
                ok and self.milestones[-1] < self.epochs,
                f"{prefix}.milestones",
                list(self.milestones),
                f"increasing epochs in [1, {self.epochs - 1}] for schedule multistep",
            )


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_teacher: float = 1.0
    gpus_per_teacher: float = 0.0  # fractional allowed: 0.5 puts two teachers on a GPU
    max_failures: int = 2  # restarts of each teacher's trial, each from its last (per-epoch) checkpoint; -1: no limit

    def validate(self, prefix: str) -> None:
        _check(self.cpus_per_teacher > 0, f"{prefix}.cpus_per_teacher", self.cpus_per_teacher, "a number > 0")
        _check(self.gpus_per_teacher >= 0, f"{prefix}.gpus_per_teacher", self.gpus_per_teacher, "a number >= 0")
        _check(self.max_failures >= -1, f"{prefix}.max_failures", self.max_failures, "an integer >= 0, or -1")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db
    experiment: str = "ray-aekd"

    def validate(self, prefix: str) -> None:
        _check(bool(self.experiment), f"{prefix}.experiment", self.experiment, "a non-empty name")


@dataclasses.dataclass(frozen=True)
class TeachersConfig:
    teachers: tuple[TeacherSpec, ...]
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig(experiment="ray-aekd-teachers")
    output_dir: str = "runs/teachers"
    seed: int = 0
    faults: TeacherFaultsConfig = TeacherFaultsConfig()  # fault injection (tests, drills); RAY_AEKD_TEACHER_FAULTS wins

    def validate(self, prefix: str) -> None:
        _check(len(self.teachers) >= 1, "teachers", [], "a list of at least one teacher")
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _check(not duplicates, "teachers", duplicates, "unique teacher names (these repeat)")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a path")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        faults = self.faults
        _check_kill_teacher(faults.kill_teacher, names)
        _check(
            faults.kill_teacher is None or faults.kill_teacher_epoch <= self.train.epochs,
            "faults.kill_teacher_epoch",
            faults.kill_teacher_epoch,
            f"an epoch of the run (1 to train.epochs = {self.train.epochs}): the fault could never fire",
        )


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What a teacher was trained on: ``x in [0, 1] -> resize to size -> (x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None  # resize images to size x size first (bilinear); null: the data's size

    def validate(self, prefix: str) -> None:
        _check(len(self.mean) >= 1, f"{prefix}.mean", list(self.mean), "one number, or one per input channel")
        _check(
            len(self.std) >= 1 and all(math.isfinite(v) and v > 0 for v in self.std),
            f"{prefix}.std",
            list(self.std),
            "one number > 0, or one per input channel",
        )
        size = self.size
        _check(size is None or size >= 1, f"{prefix}.size", size, "an integer >= 1, or null (the data's size)")

    def to_preprocess(self) -> Preprocess:
        return Preprocess(self.mean, self.std, self.size)


_SOURCE_ALLOWED = (
    "exactly one of checkpoint (a ray_aekd checkpoint folder or URI), model + weights (an architecture and a "
    ".pt/.pth/.safetensors state dict), exported (a torch.export .pt2 program), torchscript (a TorchScript file) "
    "or mlflow (models:/<name>@<alias>, models:/<model id>, runs:/<run id>/<path>)"
)


@dataclasses.dataclass(frozen=True)
class DistillTeacher:
    """A trained teacher for distillation: where the model is (one of ``SOURCE_KINDS``), how
    its inputs are prepared, and how its Ray Data stage runs."""

    name: str
    checkpoint: str | None = None  # ray_aekd checkpoint: folder, fsspec URL (s3://...) or MLflow URI
    model: str | None = None  # with weights: a registry name, torchvision:<name> or timm:<name>
    weights: str | None = None  # the state dict for model: .pt/.pth (tensors only) or .safetensors
    exported: str | None = None  # a torch.export program (.pt2) with a dynamic batch dimension
    torchscript: str | None = None  # a scripted or traced module (torch.jit.save)
    mlflow: str | None = None  # MLflow PyTorch model: models:/<name>@<alias>, models:/<id>, runs:/<id>/<path>, a folder
    preprocess: PreprocessConfig | None = None  # null: the dataset's (a checkpoint's own; [0, 1] for our exports)
    num_gpus: float = 0.0  # per actor; fractional shares a GPU
    num_cpus: float = 1.0  # per actor or task (fractions oversubscribe a small machine with processes)
    actors: int = 1  # size of this teacher's actor pool (stage: actors)
    batch_size: int = 256  # inference batch size
    stage: str = "auto"  # actors | tasks | auto (actors when num_gpus > 0, else tasks)
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources per actor/task
    label_selector: dict[str, str] = dataclasses.field(default_factory=dict)  # run only on nodes with these labels

    @property
    def source_kind(self) -> str:
        """The key that names this teacher's model (``checkpoint``, ``model``, ...)."""
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)

    @property
    def location(self) -> str:
        """The file, folder or URI of the model (``weights`` for a ``model`` teacher)."""
        kind = self.source_kind
        return str(self.weights if kind == "model" else getattr(self, kind))

    def with_location(self, location: str) -> DistillTeacher:
        """This teacher with its file, folder or URI replaced (resolved paths, downloaded MLflow models)."""
        kind = self.source_kind
        return dataclasses.replace(self, **{"weights" if kind == "model" else kind: location})

    def source(self) -> ModelSource:
        kind = self.source_kind
        return ModelSource(
            kind=kind,
            location=self.location,
            architecture=self.model,
            preprocess=self.preprocess.to_preprocess() if self.preprocess is not None else None,
        )

    def validate(self, prefix: str) -> None:
        _check_resources(f"{prefix}.resources", self.resources)
        _check_labels(f"{prefix}.label_selector", self.label_selector)
        stages = ("auto", "actors", "tasks")
        _check(self.stage in stages, f"{prefix}.stage", self.stage, ", ".join(stages))
        _check(
            self.stage != "tasks" or self.num_gpus == 0,
            f"{prefix}.stage",
            self.stage,
            "actors or auto for a teacher with num_gpus > 0 (an actor holds its GPU)",
        )
        _check(
            self.actors == 1 or self.stage == "actors" or (self.stage == "auto" and self.num_gpus > 0),
            f"{prefix}.actors",
            self.actors,
            "1 unless the teacher runs as an actor pool (stage: actors, or auto with num_gpus > 0)",
        )
        _check(bool(self.name) and "/" not in self.name, f"{prefix}.name", self.name, "a non-empty name without '/'")
        _check(
            (self.model is None) == (self.weights is None),
            f"{prefix}.{'weights' if self.weights is None else 'model'}",
            None,
            "model and weights together: the architecture and its state dict file",
        )
        given = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        _check(len(given) == 1, prefix, f"{self.name} with {', '.join(given) or 'none of them'}", _SOURCE_ALLOWED)
        for key in (*SOURCE_KINDS, "weights"):
            value = getattr(self, key)
            _check(value is None or bool(value.strip()), f"{prefix}.{key}", value, "a non-empty path or URI, or null")
        if self.model is not None:
            try:
                model_spec(self.model)
            except ValueError as error:
                raise ConfigError(f"{prefix}.model: {error}") from None
        if self.mlflow is not None:
            _check(
                self.mlflow.startswith(("models:/", "runs:/")) or "://" not in self.mlflow,
                f"{prefix}.mlflow",
                self.mlflow,
                "models:/<name>@<alias>, models:/<name>/<version>, models:/<model id>, runs:/<run id>/<path>, or a "
                "local MLflow model folder",
            )
        _check(
            0 <= self.num_gpus <= 1 or float(self.num_gpus).is_integer(),
            f"{prefix}.num_gpus",
            self.num_gpus,
            "a number in [0, 1] (fractions share a GPU) or a whole number of GPUs",
        )
        _check(self.num_cpus > 0, f"{prefix}.num_cpus", self.num_cpus, "a number > 0")
        _check(self.actors >= 1, f"{prefix}.actors", self.actors, "an integer >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    model: str = "digits_mlp"
    hint_layer: str | None = None  # hints: the student layer regressed onto the teachers' (default: the model's)

    def validate(self, prefix: str) -> None:
        try:
            model_spec(self.model)
        except ValueError as error:
            raise ConfigError(f"{prefix}.model: {error}") from None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    strategy: str = "aekd"  # average | aekd | mgda
    tolerance: float = 0.6  # C, in [1/M, 1]
    temperature: float = 4.0
    ce_weight: float = 1.0  # gamma
    kd_weight: float = 0.9  # lambda
    hint_weight: float = 0.0  # beta: > 0 adds hint-level AE-KD
    space: str = "batch_mean"  # batch_mean | per_sample
    normalize: bool = False

    def validate(self, prefix: str) -> None:
        _check(self.strategy in STRATEGIES, f"{prefix}.strategy", self.strategy, ", ".join(STRATEGIES))
        # the range [1/M, 1] needs M: DistillConfig.validate checks it with the numbers
        _check(math.isfinite(self.tolerance), f"{prefix}.tolerance", self.tolerance, "a number in [1/M, 1]")
        ok = math.isfinite(self.temperature) and self.temperature > 0
        _check(ok, f"{prefix}.temperature", self.temperature, "a finite number > 0")
        for key in ("ce_weight", "kd_weight", "hint_weight"):
            value = getattr(self, key)
            _check(math.isfinite(value) and value >= 0, f"{prefix}.{key}", value, "a finite number >= 0")
        spaces = ("batch_mean", "per_sample")
        _check(self.space in spaces, f"{prefix}.space", self.space, ", ".join(spaces))


@dataclasses.dataclass(frozen=True)
class WorkersConfig:
    num_workers: int = 2  # Ray Train workers; 0 runs the loop in this process (Train's local mode)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False  # one GPU per worker, NCCL; otherwise gloo on CPU
    max_failures: int = 0  # worker-group restarts, each resuming from the last checkpoint
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources per worker
    label_selector: dict[str, str] = dataclasses.field(default_factory=dict)  # run only on nodes with these labels

    def validate(self, prefix: str) -> None:
        _check_resources(f"{prefix}.resources", self.resources)
        _check_labels(f"{prefix}.label_selector", self.label_selector)
        _check(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "an integer >= 0")
        _check(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.max_failures >= -1, f"{prefix}.max_failures", self.max_failures, "an integer >= 0, or -1")
        for key in ("resources", "label_selector"):
            _check(
                not (getattr(self, key) and self.num_workers == 0),
                f"{prefix}.{key}",
                getattr(self, key),
                "empty when num_workers is 0 (local mode runs the loop in this process, not on a placed worker)",
            )
        _check(
            not (self.use_gpu and self.num_workers == 0),
            f"{prefix}.use_gpu",
            self.use_gpu,
            "false when num_workers is 0 (local mode runs on this process's device)",
        )


@dataclasses.dataclass(frozen=True)
class DistillTrackingConfig(TrackingConfig):
    register_model: str | None = None  # also register the student under this MLflow model name

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(self.register_model != "", f"{prefix}.register_model", self.register_model, "a name, or null")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teachers: tuple[DistillTeacher, ...]
    student: StudentConfig = StudentConfig()
    distill: LossConfig = LossConfig()
    data: DistillDataConfig = DistillDataConfig()
    train: TrainConfig = TrainConfig()
    workers: WorkersConfig = WorkersConfig()
    cache: CacheConfig = CacheConfig()
    tracking: DistillTrackingConfig = DistillTrackingConfig(experiment="ray-aekd")
    name: str = "distill"  # MLflow run name and the run folder under output_dir
    output_dir: str = "runs/distill"  # run folders; on a multi-node cluster a path every node sees (NFS)
    storage_path: str | None = None  # Train checkpoints: shared path, s3://... or gs://...; null: output_dir/_train
    seed: int = 0
    faults: FaultsConfig = FaultsConfig()  # fault injection (tests, drills); RAY_AEKD_FAULTS overrides it

    def validate(self, prefix: str) -> None:
        num = len(self.teachers)
        _check(num >= 1, "teachers", [], "a list of at least one teacher")
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _check(not duplicates, "teachers", duplicates, "unique teacher names (these repeat)")
        _check(
            num >= 2 or self.distill.strategy == "average",
            "distill.strategy",
            self.distill.strategy,
            "average when there is a single teacher (weighting needs M >= 2)",
        )
        if self.distill.strategy == "aekd" and num >= 2:
            _check(
                1 / num - 1e-9 <= self.distill.tolerance <= 1,
                "distill.tolerance",
                self.distill.tolerance,
                f"a number in [1/M, 1] = [{1 / num:.6g}, 1] for M = {num} teachers",
            )
        else:  # average and mgda do not read it (C = 1/M and C = 1); still no nonsense
            _check(0 < self.distill.tolerance <= 1, "distill.tolerance", self.distill.tolerance, "a number in (0, 1]")
        if self.cache.path is not None:
            _check(
                self.data.views is not None or not self.data.augment,
                "data.views",
                self.data.views,
                "an integer >= 1 when cache.path is set (the cache holds that many views; or data.augment: false)",
            )
            _check(
                self.distill.hint_weight == 0,
                "distill.hint_weight",
                self.distill.hint_weight,
                "0 when cache.path is set (the cache holds logits, not the teachers' hint features)",
            )
        if self.cache.mode == "memory":
            _check(
                self.data.views is not None or not self.data.augment,
                "cache.mode",
                self.cache.mode,
                "auto or stream when every epoch sees a new view (data.views is null and data.augment is true): "
                "memory keeps data.views views, so set data.views",
            )
            _check(
                self.distill.hint_weight == 0,
                "cache.mode",
                self.cache.mode,
                "auto or stream when distill.hint_weight > 0 (memory keeps logits, not the teachers' hint features)",
            )
        _check(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a path")
        _check(self.storage_path != "", "storage_path", self.storage_path, "a path or URI (s3://, gs://), or null")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        faults = self.faults
        _check_kill_teacher(faults.kill_teacher, names)
        _check(
            faults.kill_teacher is None or self.cache.path is None,
            "faults.kill_teacher",
            faults.kill_teacher,
            "null when cache.path is set (no teacher runs: the fault could never fire)",
        )
        down = faults.mlflow_down_epoch
        _check(
            down is None or down <= self.train.epochs,
            "faults.mlflow_down_epoch",
            down,
            f"an epoch of the run (1 to train.epochs = {self.train.epochs}), or null",
        )
        workers = max(1, self.workers.num_workers)
        _check(
            faults.kill_worker_rank is None or (faults.kill_worker_rank < workers and self.workers.num_workers > 0),
            "faults.kill_worker_rank",
            faults.kill_worker_rank,
            f"a rank below workers.num_workers = {self.workers.num_workers} (local mode has no worker to kill), "
            "or null",
        )


_WithFaults = TypeVar("_WithFaults", DistillConfig, TeachersConfig)


def with_env_faults(config: _WithFaults, environ: Mapping[str, str] | None = None) -> _WithFaults:
    """``config`` with the faults of its command's environment variable merged over its own: for
    a distillation ``RAY_AEKD_FAULTS`` (a YAML mapping of ``faults`` keys, e.g.
    ``{kill_worker_rank: 1, kill_worker_step: 15}``), for ``ray-aekd teachers``
    ``RAY_AEKD_TEACHER_FAULTS`` (e.g. ``{kill_teacher: b, kill_teacher_epoch: 1}``)."""
    env = TEACHER_FAULTS_ENV if isinstance(config, TeachersConfig) else FAULTS_ENV
    raw = (os.environ if environ is None else environ).get(env)
    if not raw:
        return config
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"{env}: {raw!r} is not plain YAML ({error}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{env}: got {raw!r}; allowed: a YAML mapping of faults keys.")
    try:
        faults = from_dict(type(config.faults), dataclasses.asdict(config.faults) | data, "faults")
        config = dataclasses.replace(config, faults=faults)
        config.validate("")
    except ConfigError as error:
        raise ConfigError(f"{env}: {error}") from None
    return config


#: ``preset: <name>`` at the top of a distillation config fills in these values; keys the
#: config sets itself win. ``authors_cifar`` is the AE-KD authors' CIFAR-100 recipe.
PRESETS: dict[str, dict[str, Any]] = {
    "authors_cifar": {
        "train": {
            "epochs": 240,
            "batch_size": 64,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": [150, 180, 210],
        },
        "distill": {"temperature": 4.0, "tolerance": 0.6, "ce_weight": 1.0, "kd_weight": 0.9},
        "data": {"augment": True},
    }
}


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Merge ``data["preset"]`` (a name in ``PRESETS``) under the config's own values."""
    if "preset" not in data:
        return data
    data = dict(data)
    name = data.pop("preset")
    _check(name in PRESETS, "preset", name, ", ".join(PRESETS))
    merged = {k: dict(v) for k, v in PRESETS[name].items()}
    for key, value in data.items():
        if key in merged and isinstance(value, dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML) and ``key=value`` overrides into a validated ``cls``."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not plain YAML data: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top; got {type(data).__name__}.")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not plain YAML ({error}).") from None
        _set_dotted(data, key.strip().split("."), value)
    if cls is DistillConfig:
        data = apply_preset(data)
    return from_dict(cls, data)


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section.")
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {'.'.join(keys)}: cannot set a value there.")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking keys and types, then ``validate``."""
    where = prefix or "config"
    if not isinstance(data, dict):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise ConfigError(f"{where}: got {data!r}; allowed: a mapping of {fields}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required but missing.")
    obj = cls(**values)
    obj.validate(prefix)  # type: ignore[attr-defined]
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is dict:  # a free-form mapping (sweep overrides and spaces), checked by its owner
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; allowed: a mapping.")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: got {value!r}; allowed: a list.")
        return tuple(_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; allowed: true or false.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; allowed: an integer.")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: got {value!r}; allowed: a number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; allowed: a string.")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}.")  # pragma: no cover - a bug in a config class


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.epochs": 10, "teachers.0.model": "digits_cnn", ...}`` for MLflow params."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            out.update(flatten(getattr(obj, f.name), f"{prefix}{f.name}."))
    elif isinstance(obj, tuple) and obj and dataclasses.is_dataclass(obj[0]):
        for i, item in enumerate(obj):
            out.update(flatten(item, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = list(obj) if isinstance(obj, tuple) else obj
    return out
