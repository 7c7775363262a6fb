"""Reading a config: a YAML file (plain data, ``yaml.safe_load``), ``--set`` overrides, and the
result as YAML again (``--print-config``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ray_aekd.config._base import ConfigError, canonical_key, canonicalize, from_dict, set_dotted, to_data
from ray_aekd.config.distill import DistillConfig, apply_preset

__all__ = ["dump_yaml", "load_config", "parse_override", "read_yaml"]

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ``ConfigError`` if it is missing or not plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not plain YAML data: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top; got {type(data).__name__}.")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``: the value is read as a YAML scalar, list or mapping."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value.")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {item!r}: the value is not plain YAML ({error}).") from None
    return key.strip(), value


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML) and ``key=value`` overrides into a validated ``cls``.

    Renamed keys load under their new names, with one warning each on stderr, in the file and
    in overrides alike; an override of an old key replaces the file's new one.
    """
    data: Any = canonicalize(cls, read_yaml(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        key, value = canonical_key(cls, key, value)
        set_dotted(data, key.split("."), value)
    if cls is DistillConfig:
        data = apply_preset(data)
    return from_dict(cls, data)


def dump_yaml(config: Any) -> str:
    """``config`` as YAML that ``load_config`` reads back: every key, defaults filled in."""
    return yaml.safe_dump(to_data(config), sort_keys=False, default_flow_style=None, width=120)
