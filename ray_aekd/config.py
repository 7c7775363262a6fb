"""Typed, validated configs: YAML (plain data, ``yaml.safe_load``) into frozen dataclasses.

``load_config(TeachersConfig, "tune_configs/teachers_digits.yaml", ["train.epochs=2"])``
reads the file, applies ``--set`` overrides (dotted keys; values parsed as YAML scalars),
and builds the dataclass tree. Unknown keys, wrong types and out-of-range values raise one
``ConfigError`` naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ray_aekd.data.sources import SOURCES
from ray_aekd.models.registry import model_spec

__all__ = [
    "ConfigError",
    "DataConfig",
    "ResourcesConfig",
    "TeacherSpec",
    "TeachersConfig",
    "TrackingConfig",
    "TrainConfig",
    "flatten",
    "from_dict",
    "load_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type, or out of range."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    path: str | None = None
    download: bool = False
    val_fraction: float = 0.2
    image_size: int | None = None  # image folders only: resize to this square size
    augment: bool = True  # random crop (pad 4, or 1 for 8x8 digits) and horizontal flip

    def validate(self, prefix: str) -> None:
        _check(self.dataset in SOURCES, f"{prefix}.dataset", self.dataset, ", ".join(SOURCES))
        _check(0 < self.val_fraction < 1, f"{prefix}.val_fraction", self.val_fraction, "a number in (0, 1)")
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

    def validate(self, prefix: str) -> None:
        _check(self.cpus_per_teacher > 0, f"{prefix}.cpus_per_teacher", self.cpus_per_teacher, "a number > 0")
        _check(self.gpus_per_teacher >= 0, f"{prefix}.gpus_per_teacher", self.gpus_per_teacher, "a number >= 0")


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

    def validate(self, prefix: str) -> None:
        _check(len(self.teachers) >= 1, "teachers", [], "a list of at least one teacher")
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _check(not duplicates, "teachers", duplicates, "unique teacher names (these repeat)")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a path")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")


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
        raise ConfigError(f"{where}: expected a mapping; got {data!r}.")
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
