"""The ``faults`` sections: fault injection for tests and failure drills, off by default, and the
environment variables that switch them on without editing a config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import yaml

from ray_aekd.config._base import ConfigError, check, from_dict

__all__ = [
    "FAULTS_ENV",
    "TEACHER_FAULTS_ENV",
    "FaultsConfig",
    "TeacherFaultsConfig",
    "check_kill_teacher",
    "with_env_faults",
]

#: Environment variable with a YAML mapping of ``faults`` keys; it wins over the config's.
FAULTS_ENV = "RAY_AEKD_FAULTS"
#: Environment variable with a YAML mapping of ``ray-aekd teachers``' ``faults`` keys; it wins over the config's.
#: Not ``FAULTS_ENV``: a quickstart trains teachers and then distils, and each command has its own faults.
TEACHER_FAULTS_ENV = "RAY_AEKD_TEACHER_FAULTS"


def check_kill_teacher(teacher: str | None, names: list[str]) -> None:
    check(teacher is None or teacher in names, "faults.kill_teacher", teacher,
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
        check(rank is None or rank >= 0, f"{prefix}.kill_worker_rank", rank, "an integer >= 0, or null")
        check(self.kill_worker_step >= 0, f"{prefix}.kill_worker_step", self.kill_worker_step, "an integer >= 0")
        check(self.kill_teacher != "", f"{prefix}.kill_teacher", self.kill_teacher, "a teacher's name, or null")
        check(self.kill_teacher_batch >= 1, f"{prefix}.kill_teacher_batch", self.kill_teacher_batch, "an integer >= 1")
        down = self.mlflow_down_epoch
        check(down is None or down >= 1, f"{prefix}.mlflow_down_epoch", down, "an integer >= 1, or null")

    @property
    def active(self) -> bool:
        return self.kill_worker_rank is not None or self.kill_teacher is not None or self.mlflow_down_epoch is not None


@dataclasses.dataclass(frozen=True)
class TeacherFaultsConfig:
    """Fault injection for ``ray-aekd teachers`` (tests, drills); off by default. The kill fires
    once per run: a marker file in ``output_dir/faults/`` records that it has."""

    kill_teacher: str | None = None  # kill the process of this teacher's Tune trial (as a pre-empted node would) ...
    kill_teacher_epoch: int = 1  # ... just after it reported this epoch (from 1) with its checkpoint

    def validate(self, prefix: str) -> None:
        check(self.kill_teacher != "", f"{prefix}.kill_teacher", self.kill_teacher, "a teacher's name, or null")
        check(self.kill_teacher_epoch >= 1, f"{prefix}.kill_teacher_epoch", self.kill_teacher_epoch, "an integer >= 1")

    @property
    def active(self) -> bool:
        return self.kill_teacher is not None


class _WithFaultsProtocol(Protocol):
    @property
    def faults(self) -> Any: ...

    def validate(self, prefix: str) -> None: ...


_WithFaults = TypeVar("_WithFaults", bound=_WithFaultsProtocol)


def with_env_faults(config: _WithFaults, environ: Mapping[str, str] | None = None) -> _WithFaults:
    """``config`` with the faults of its command's environment variable merged over its own: for
    a distillation ``RAY_AEKD_FAULTS`` (a YAML mapping of ``faults`` keys, e.g.
    ``{kill_worker_rank: 1, kill_worker_step: 15}``), for ``ray-aekd teachers``
    ``RAY_AEKD_TEACHER_FAULTS`` (e.g. ``{kill_teacher: b, kill_teacher_epoch: 1}``)."""
    env = TEACHER_FAULTS_ENV if isinstance(config.faults, TeacherFaultsConfig) else FAULTS_ENV
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
        config = dataclasses.replace(config, faults=faults)  # type: ignore[type-var]
        config.validate("")
    except ConfigError as error:
        raise ConfigError(f"{env}: {error}") from None
    return config
