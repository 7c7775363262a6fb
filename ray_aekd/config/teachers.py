"""The config of ``ray-aekd teachers``: the ensemble to train, each teacher as one Ray Tune trial."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ray_aekd.config._base import Renamed, check, check_name
from ray_aekd.config.common import TrackingConfig, TrainConfig, check_model
from ray_aekd.config.data import DataConfig
from ray_aekd.config.faults import TeacherFaultsConfig, check_kill_teacher

__all__ = ["ResourcesConfig", "TeacherSpec", "TeachersConfig", "TrialsConfig", "check_unique_names"]


def check_unique_names(names: list[str]) -> None:
    check(len(names) >= 1, "teachers", [], "a list of at least one teacher")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    check(not duplicates, "teachers", duplicates, "unique teacher names (these repeat)")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One teacher to train: its architecture, seed and what it sees of the training data."""

    name: str  # the teacher's folder under output_dir and its MLflow run name
    model: str  # a registry name (digits_cnn, resnet20, ...), torchvision:<name> or timm:<name>
    seed: int = 0  # initialisation and data order
    label_noise: float = 0.0  # share of the labels of noisy_classes replaced by another class
    noisy_classes: tuple[int, ...] = ()  # the classes whose labels label_noise corrupts
    subset_fraction: float = 1.0  # share of the training split this teacher sees

    def validate(self, prefix: str) -> None:
        check_name(f"{prefix}.name", self.name)
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
        check(
            all(c >= 0 for c in self.noisy_classes),
            f"{prefix}.noisy_classes",
            list(self.noisy_classes),
            "class indices >= 0",
        )
        check_model(f"{prefix}.model", self.model)
        check(0 <= self.label_noise <= 1, f"{prefix}.label_noise", self.label_noise, "a number in [0, 1]")
        check(0 < self.subset_fraction <= 1, f"{prefix}.subset_fraction", self.subset_fraction, "a number in (0, 1]")
        check(
            self.label_noise == 0 or bool(self.noisy_classes),
            f"{prefix}.noisy_classes",
            list(self.noisy_classes),
            "at least one class index when label_noise > 0",
        )


@dataclasses.dataclass(frozen=True)
class TrialsConfig:
    """What each teacher's Ray Tune trial books: the process that trains one teacher."""

    cpus: float = 1.0  # CPUs per teacher
    gpus: float = 0.0  # GPUs per teacher; fractional allowed: 0.5 puts two teachers on a GPU
    max_failures: int = 2  # restarts of each teacher's trial, each from its last (per-epoch) checkpoint; -1: no limit

    def validate(self, prefix: str) -> None:
        check(self.cpus > 0, f"{prefix}.cpus", self.cpus, "a number > 0")
        check(self.gpus >= 0, f"{prefix}.gpus", self.gpus, "a number >= 0")
        check(self.max_failures >= -1, f"{prefix}.max_failures", self.max_failures, "an integer >= 0, or -1")


#: The name of ``TrialsConfig`` in 0.1 (the section was ``resources``); kept until 0.3.
ResourcesConfig = TrialsConfig


@dataclasses.dataclass(frozen=True)
class TeachersConfig:
    """``ray-aekd teachers``: train the teachers side by side, one Ray Tune trial each."""

    teachers: tuple[TeacherSpec, ...]  # the ensemble, one entry per teacher
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    trials: TrialsConfig = TrialsConfig()  # each teacher's trial: CPUs, GPUs, restarts
    tracking: TrackingConfig = TrackingConfig(experiment="ray-aekd-teachers")
    output_dir: str = "runs/teachers"  # a folder per teacher (its checkpoint) and Tune's state (_tune)
    seed: int = 0  # seed of the train/val split (unless data.split_seed); each teacher has its own seed
    faults: TeacherFaultsConfig = TeacherFaultsConfig()  # fault injection (tests, drills); RAY_AEKD_TEACHER_FAULTS wins

    RENAMED: ClassVar[dict[str, str | Renamed]] = {
        "resources.cpus_per_teacher": "trials.cpus",
        "resources.gpus_per_teacher": "trials.gpus",
        "resources.max_failures": "trials.max_failures",
    }

    def validate(self, prefix: str) -> None:
        names = [t.name for t in self.teachers]
        check_unique_names(names)
        check(bool(self.output_dir), "output_dir", self.output_dir, "a path")
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        faults = self.faults
        check_kill_teacher(faults.kill_teacher, names)
        check(
            faults.kill_teacher is None or faults.kill_teacher_epoch <= self.train.epochs,
            "faults.kill_teacher_epoch",
            faults.kill_teacher_epoch,
            f"an epoch of the run (1 to train.epochs = {self.train.epochs}): the fault could never fire",
        )
