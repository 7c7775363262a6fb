"""A sweep's config and search space: moved to ``ray_aekd.config.sweep`` (the config layer holds
every command's config; checking a space needs no Ray). This module re-exports it for code that
imports it from here."""

from ray_aekd.config.sweep import (
    ALGORITHMS,
    DISTRIBUTIONS,
    METRICS,
    SCHEDULERS,
    TOLERANCE_FRACTION,
    Dimension,
    SchedulerConfig,
    SearchConfig,
    SweepConfig,
    SweepTrialsConfig,
    apply_values,
    load_sweep,
    parse_space,
)

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
