"""The config of ``ray-aekd sweep``: a base distillation config, overrides for it, and a search
space over its keys, all checked before anything runs (no Ray, no torch here).

A sweep config (YAML, plain data) names a base distillation config, overrides for it, and a
search space over its dotted keys in a closed vocabulary::

    space:
      distill.tolerance_fraction: {grid: [0.0, 0.5, 1.0]}   # C = 1/M + f (1 - 1/M)
      distill.temperature: {loguniform: [1.0, 8.0]}
      train.lr: {choice: [0.05, 0.1]}

Distributions: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]`` (lo > 0), ``randint: [lo, hi]``
(integers lo <= x < hi), ``choice: [values]`` and ``grid: [values]`` (every value is run).

The tolerance C is valid only in [1/M, 1] for M teachers, so the space can give it as
``distill.tolerance`` (checked against M) or as ``distill.tolerance_fraction`` in [0, 1], valid
for any M. Every value a space can produce is checked against the distillation config before
Ray starts: each grid and choice value, both ends of each range, and their combinations.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ray_aekd.config._base import ConfigError, Renamed, canonical_key, canonicalize, check, check_name, from_dict
from ray_aekd.config._base import set_dotted as _set_dotted
from ray_aekd.config.distill import DistillConfig, apply_preset
from ray_aekd.config.loading import load_config

__all__ = [
    "ALGORITHMS",
    "DISTRIBUTIONS",
    "METRICS",
    "SCHEDULERS",
    "TOLERANCE_FRACTION",
    "Dimension",
    "SchedulerConfig",
    "SearchConfig",
    "SweepConfig",
    "SweepTrialsConfig",
    "apply_values",
    "load_sweep",
    "parse_space",
]

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
METRICS = {"val/acc1": "max", "val/acc5": "max", "val/agreement": "max", "val/loss": "min", "val/ece": "min"}

#: A space key for the tolerance that is valid for any number of teachers M.
TOLERANCE_FRACTION = "distill.tolerance_fraction"

# keys the sweep sets for every trial itself
_MANAGED = ("name", "output_dir", "tracking")
# keys a soft-label cache was made for: a sweep that reads one cannot vary them
_CACHE_KEYS = ("teachers", "data", "seed", "cache")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How the trials' values are chosen."""

    algorithm: str = "grid"  # grid | random | optuna
    seed: int = 0  # random and optuna sampling

    def validate(self, prefix: str) -> None:
        check(self.algorithm in ALGORITHMS, f"{prefix}.algorithm", self.algorithm, ", ".join(ALGORITHMS))
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Whether weak trials are stopped early."""

    type: str = "none"  # none | asha (stops weak trials early on the sweep's metric)
    grace_period: int = 1  # asha: epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # asha: keep 1/reduction_factor of the trials at each rung

    def validate(self, prefix: str) -> None:
        check(self.type in SCHEDULERS, f"{prefix}.type", self.type, ", ".join(SCHEDULERS))
        check(self.grace_period >= 1, f"{prefix}.grace_period", self.grace_period, "an integer >= 1")
        check(self.reduction_factor >= 2, f"{prefix}.reduction_factor", self.reduction_factor, "an integer >= 2")


@dataclasses.dataclass(frozen=True)
class SweepTrialsConfig:
    """The sweep's Ray Tune trials: what each trial's own process books and how many run at once.
    A trial drives one distillation; its workers and teachers book their own resources."""

    cpus: float = 0.1  # CPUs of each trial's own (driver) process
    max_concurrent: int = 2  # trials at once (Tune's max_concurrent_trials)

    def validate(self, prefix: str) -> None:
        check(self.cpus > 0, f"{prefix}.cpus", self.cpus, "a number > 0")
        check(self.max_concurrent >= 1, f"{prefix}.max_concurrent", self.max_concurrent, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """``ray-aekd sweep``: one distillation per Tune trial over a search space of the base config's keys."""

    base: str  # the distillation config; a relative path is read next to the sweep file first
    space: dict[str, Any]  # dotted key -> {distribution: arguments}
    teachers: str | None = None  # a teachers config: trains the teachers first when a checkpoint is missing
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged into the base config
    name: str = "sweep"  # the parent MLflow run; trials are <name>-<trial id>
    output_dir: str = "runs/sweep"  # the sweep's folder (<output_dir>/<name>): trials, table, plots
    storage_path: str | None = None  # Tune's state: shared path, s3://..., gs://...; null: output_dir/<name>/_tune
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    metric: str = "val/acc1"  # the trial metric the search optimises
    mode: str | None = None  # max | min; default: the metric's (max for accuracies)
    num_samples: int = 1  # random/optuna: trials; grid: repeats of the grid
    trials: SweepTrialsConfig = SweepTrialsConfig()  # each trial's own process, and how many at once
    soft_label_cache: bool = False  # run the teachers once (ray-aekd relabel) and let every trial read the cache

    RENAMED: ClassVar[dict[str, str | Renamed]] = {
        "trial_cpus": "trials.cpus",
        "max_concurrent_trials": "trials.max_concurrent",
    }

    def validate(self, prefix: str) -> None:
        check(bool(self.base), "base", self.base, "the path of a distillation config")
        check(bool(self.space), "space", self.space, "a mapping of dotted config keys to distributions")
        check_name("name", self.name)
        check(bool(self.output_dir), "output_dir", self.output_dir, "a path")
        check(self.storage_path != "", "storage_path", self.storage_path, "a path or URI (s3://, gs://), or null")
        check(self.metric in METRICS, "metric", self.metric, ", ".join(METRICS))
        check(self.mode in (None, "max", "min"), "mode", self.mode, "max, min, or null")
        check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")

    @property
    def direction(self) -> str:
        return self.mode or METRICS[self.metric]


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One key of the space: a distribution and its arguments."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # [lo, hi] for ranges, the values for choice/grid

    def candidates(self) -> list[Any]:
        """The values to check: every listed value, or both ends of a range."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"space.{key}"
    check(
        isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS,
        where,
        spec,
        "one distribution: {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}, {choice: [values]} "
        "or {grid: [values]}",
    )
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        check(isinstance(args, list) and len(args) >= 1, f"{where}.{kind}", args, "a non-empty list of values")
        for value in args:
            check(
                value is None or isinstance(value, str | int | float | bool),
                f"{where}.{kind}",
                value,
                "plain values (numbers, strings, true/false, null)",
            )
        return Dimension(key, kind, tuple(args))
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) for a in args
    )  # fmt: skip
    check(numbers, f"{where}.{kind}", args, "[lo, hi], two finite numbers")
    lo, hi = args
    check(lo < hi, f"{where}.{kind}", args, "[lo, hi] with lo < hi")
    if kind == "loguniform":
        check(lo > 0, f"{where}.{kind}", args, "[lo, hi] with 0 < lo < hi")
    if kind == "randint":
        check(isinstance(lo, int) and isinstance(hi, int), f"{where}.{kind}", args, "[lo, hi], integers (hi excluded)")
    return Dimension(key, kind, (lo, hi))


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The base config data with the sampled ``values`` (dotted keys) set; a
    ``distill.tolerance_fraction`` f becomes ``distill.tolerance`` = 1/M + f (1 - 1/M)."""
    data = copy.deepcopy(base)
    num_teachers = len(data.get("teachers") or [])
    for key, value in values.items():
        if key == TOLERANCE_FRACTION:
            low = 1 / max(1, num_teachers)
            key, value = "distill.tolerance", low + float(value) * (1 - low)
        key, value = canonical_key(DistillConfig, key, value)
        _set_dotted(data, key.split("."), value)
    return data


_MAX_COMBINATIONS = 4096


def parse_space(space: dict[str, Any], base: dict[str, Any], algorithm: str, cached: bool) -> list[Dimension]:
    """Check ``space`` against the base config data and the search algorithm; raise one
    ``ConfigError`` naming the key, the value and what is allowed."""
    dimensions = []
    for key, spec in space.items():
        check(isinstance(key, str) and bool(key), "space", key, "dotted config keys such as distill.temperature")
        check(
            not key.startswith(_MANAGED),
            f"space.{key}",
            spec,
            f"keys other than {', '.join(_MANAGED)} (the sweep sets them for each trial)",
        )
        if cached:
            check(
                not key.startswith(_CACHE_KEYS),
                f"space.{key}",
                spec,
                f"keys outside {', '.join(_CACHE_KEYS)} with soft_label_cache: true (the cache holds the logits "
                "of one set of teachers on one dataset, split and set of views)",
            )
        dimensions.append(_parse_dimension(key, spec))
    keys = [d.key for d in dimensions]
    check(
        not (TOLERANCE_FRACTION in keys and "distill.tolerance" in keys),
        "space",
        sorted(keys),
        f"either distill.tolerance or {TOLERANCE_FRACTION}, not both",
    )
    for d in dimensions:
        if d.key == TOLERANCE_FRACTION:
            for value in d.candidates():
                ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
                check(ok, f"space.{d.key}", value, "numbers in [0, 1] (0 is C = 1/M, 1 is C = 1)")
    if algorithm == "grid":
        for d in dimensions:
            check(
                d.kind == "grid",
                f"space.{d.key}",
                {d.kind: list(d.values)},
                "{grid: [values]} with search.algorithm grid (use random or optuna to sample distributions)",
            )
    if algorithm == "optuna":
        for d in dimensions:
            check(
                d.kind != "grid",
                f"space.{d.key}",
                {d.kind: list(d.values)},
                "a distribution or {choice: [values]} with search.algorithm optuna (it does not run grids)",
            )
    for combination in _combinations_to_check([list(d.candidates()) for d in dimensions]):
        values = dict(zip(keys, combination, strict=True))
        try:
            from_dict(DistillConfig, apply_preset(apply_values(base, values)))
        except ConfigError as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"space: the trial {shown} would be invalid: {error}") from None
    return dimensions


def _combinations_to_check(candidates: list[list[Any]]) -> Iterator[tuple[Any, ...]]:
    """Every candidate of each dimension with the other dimensions at their first candidate (so
    that each value is checked at least once), then the whole grid up to ``_MAX_COMBINATIONS``
    (values that are only invalid together: beyond the cap such pairs are left to the trial)."""
    if not all(candidates):
        return
    first = [values[0] for values in candidates]
    for i, values in enumerate(candidates):
        for value in values[1:]:
            yield (*first[:i], value, *first[i + 1 :])
    yield from itertools.islice(itertools.product(*candidates), _MAX_COMBINATIONS)


def _beside(sweep_file: str | Path | None, name: str) -> Path:
    """``name`` next to the sweep file if it is there, else as given (relative to the working directory)."""
    path = Path(name)
    if not path.is_absolute() and sweep_file is not None and (Path(sweep_file).parent / path).is_file():
        return Path(sweep_file).parent / path
    return path


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, dict[str, Any]]:
    """``(sweep, base)``: the validated sweep config and its base distillation config as plain
    data (overrides merged, preset not yet applied), both checked."""
    sweep = load_config(SweepConfig, path, overrides)
    base_path = _beside(path, sweep.base)
    if not base_path.is_file():
        raise ConfigError(f"base: got {sweep.base!r}; allowed: a distillation config file (none found there).")
    if sweep.teachers is not None:
        teachers_path = _beside(path, sweep.teachers)
        if not teachers_path.is_file():
            raise ConfigError(f"teachers: got {sweep.teachers!r}; allowed: a teachers config file, or null.")
        sweep = dataclasses.replace(sweep, teachers=str(teachers_path))
    try:
        base = yaml.safe_load(base_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"base: {str(base_path)!r} is not plain YAML data: {error}") from None
    check(isinstance(base, dict), "base", str(base_path), "a YAML file holding a mapping")
    # renamed keys under their new names first, so that an override of an old key replaces the new one
    base = _deep_merge(canonicalize(DistillConfig, base), canonicalize(DistillConfig, sweep.overrides, "overrides."))
    if sweep.soft_label_cache:
        base.setdefault("cache", {})
        if not base["cache"].get("path"):
            base["cache"]["path"] = str(Path(sweep.output_dir) / sweep.name / "soft_labels")
    try:
        config = from_dict(DistillConfig, apply_preset(base))
    except ConfigError as error:
        raise ConfigError(f"base ({base_path}) with overrides: {error}") from None
    check(
        config.workers.num_workers >= 1,
        "overrides.workers.num_workers",
        config.workers.num_workers,
        "an integer >= 1 in a sweep (Train's local mode, 0, does not report to Tune)",
    )
    parse_space(sweep.space, base, sweep.search.algorithm, sweep.soft_label_cache)
    if sweep.search.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "search.algorithm: got 'optuna', but optuna is not installed; allowed: grid, random, or install it "
                "(pip install 'ray-aekd[optuna]')."
            ) from None
    return sweep, base
