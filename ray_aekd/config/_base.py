"""The machinery every config class shares: the error, the checks, building a frozen dataclass
from plain data (``from_dict``), renamed keys, and turning a config back into plain data.

No config class lives here; imports only the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "Renamed",
    "canonical_key",
    "canonicalize",
    "check",
    "check_custom_resources",
    "check_labels",
    "check_name",
    "flatten",
    "from_dict",
    "set_dotted",
    "to_data",
]

T = TypeVar("T")

#: The release in which keys renamed now stop loading.
OLD_KEYS_UNTIL = "0.3"


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type, or out of range."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("<key>: got <value>; allowed: <allowed>.")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}.")


def check_name(key: str, name: str) -> None:
    """A run's, a teacher's or a sweep's name: it becomes a folder and an MLflow name."""
    check(bool(name) and "/" not in name, key, name, "a non-empty name without '/'")


def check_custom_resources(key: str, resources: dict[str, Any]) -> None:
    """Custom Ray resources (``{"teacher_gpu": 1}``): names a node offers, amounts Ray can book."""
    for name, amount in resources.items():
        where = f"{key}.{name}"
        check(isinstance(name, str) and bool(name), key, resources, "a mapping of resource names to amounts")
        check(
            name not in ("CPU", "GPU", "memory", "object_store_memory"),
            where,
            amount,
            "a custom resource; CPUs and GPUs have their own keys (cpus, gpus)",
        )
        ok = isinstance(amount, int | float) and not isinstance(amount, bool) and math.isfinite(amount)
        check(
            ok and (0 < amount <= 1 or float(amount).is_integer() and amount > 0),
            where,
            amount,
            "a number in (0, 1] or a whole number > 1 (Ray books fractions of one unit only)",
        )


def check_labels(key: str, selector: dict[str, Any]) -> None:
    """A Ray label selector (``{"ray-aekd/role": "teacher"}``): node label -> value (Ray's syntax:
    ``value``, ``!value``, ``in(a,b)``, ``!in(a,b)``)."""
    for name, value in selector.items():
        check(isinstance(name, str) and bool(name), key, selector, "a mapping of node label names to values")
        check(isinstance(value, str) and bool(value), f"{key}.{name}", value, "a string (quote numbers)")


# --- renamed keys ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An old key that still loads under its new name until ``OLD_KEYS_UNTIL``.

    A config class lists them in ``RENAMED: ClassVar[dict[str, str | Renamed]]``: old dotted key
    -> new dotted key, both relative to the class (``"resources.cpus_per_teacher": "trials.cpus"``).
    ``convert`` turns an old value into the new one (``use_gpu: true`` -> ``gpus: 1``); it gets
    the value and the old key's full name, and raises ``ConfigError`` for a value the old key
    did not allow either.
    """

    new: str
    convert: Callable[[Any, str], Any] | None = None


_warned: set[str] = set()


def _general(key: str) -> str:
    """``teachers.2.num_cpus`` -> ``teachers.<i>.num_cpus``: one warning for every teacher."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "<i>", key)


def renamed_message(old: str, new: str) -> str:
    return f"{_general(old)} is renamed {_general(new)}; the old key works until {OLD_KEYS_UNTIL}."


def _warn_renamed(old: str, new: str) -> None:
    """One line on stderr, once per old key and process."""
    text = renamed_message(old, new)
    if text not in _warned:
        _warned.add(text)
        print(f"ray-aekd: warning: {text}", file=sys.stderr)


def _renames(cls: Any) -> Mapping[str, Renamed]:
    table = getattr(cls, "RENAMED", None) or {}
    return {old: new if isinstance(new, Renamed) else Renamed(new) for old, new in table.items()}


def _pop(data: dict[str, Any], keys: list[str]) -> tuple[bool, Any]:
    """Remove ``data[k0][k1]...`` and return ``(found, value)``; sections on the way are copied
    (the caller's data is never changed), and a section the move leaves empty goes too."""
    if len(keys) == 1:
        return (True, data.pop(keys[0])) if keys[0] in data else (False, None)
    section = data.get(keys[0])
    if not isinstance(section, dict):
        return False, None
    section = dict(section)
    found, value = _pop(section, keys[1:])
    if found:
        if section:
            data[keys[0]] = section
        else:  # resources: {} after its keys moved
            del data[keys[0]]
    return found, value


def _has(data: dict[str, Any], keys: list[str]) -> bool:
    node: Any = data
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    """The field types of a config class (``typing.get_type_hints``, read once per class)."""
    return typing.get_type_hints(cls)


def _field_class(cls: Any, name: str) -> tuple[Any, bool]:
    """``(the dataclass a field holds, whether it holds a list of them)``, or ``(None, False)``."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        return None, False
    tp = _hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        return (inner, True) if dataclasses.is_dataclass(inner) else (None, False)
    return (tp, False) if dataclasses.is_dataclass(tp) else (None, False)


def _rename_level(cls: Any, data: dict[str, Any], prefix: str, warn: bool) -> dict[str, Any]:
    """A copy of ``data`` with the renamed keys of ``cls`` itself (not of its sections) moved."""
    renames = _renames(cls)
    if not renames:
        return data
    data = dict(data)
    for old, renamed in renames.items():
        found, value = _pop(data, old.split("."))
        if not found:
            continue
        full_old, full_new = prefix + old, prefix + renamed.new
        if _has(data, renamed.new.split(".")):
            raise ConfigError(f"{full_old} and {full_new}: both given; {full_old} is the old name of {full_new}: "
                              f"keep {full_new} only.")  # fmt: skip
        if renamed.convert is not None:
            value = renamed.convert(value, full_old)
        _set_copying(data, renamed.new.split("."), value)
        if warn:
            _warn_renamed(full_old, full_new)
    return data


def _set_copying(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        section = data.get(key)
        data[key] = dict(section) if isinstance(section, dict) else {}
        data = data[key]
    data[keys[-1]] = value


def canonicalize(cls: Any, data: Any, prefix: str = "", warn: bool = True) -> Any:
    """``data`` (plain data for ``cls``, or part of it) with every renamed key under its new
    name, as a copy; a warning on stderr names each old key used. Both names at once is an
    error. ``prefix``: where ``data`` sits (``"teachers.0."``), for the messages."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = _rename_level(cls, data, prefix, warn)
    out = dict(data)
    for name, value in data.items():
        inner, many = _field_class(cls, name) if isinstance(name, str) else (None, False)
        if inner is None:
            continue
        if many and isinstance(value, list):
            out[name] = [canonicalize(inner, v, f"{prefix}{name}.{i}.", warn) for i, v in enumerate(value)]
        elif not many:
            out[name] = canonicalize(inner, value, f"{prefix}{name}.", warn)
    return out


def canonical_key(cls: Any, key: str, value: Any = None, warn: bool = True) -> tuple[str, Any]:
    """``(key, value)`` of a ``--set key=value`` with a renamed key under its new name (and the
    value converted); other keys are returned as they are."""
    parts = key.split(".")
    done: list[str] = []
    while parts and dataclasses.is_dataclass(cls):
        for old, renamed in _renames(cls).items():
            old_parts = old.split(".")
            if parts[: len(old_parts)] == old_parts and len(parts) == len(old_parts):
                full_old = ".".join(done + parts)
                parts = renamed.new.split(".")
                full_new = ".".join(done + parts)
                if renamed.convert is not None:
                    value = renamed.convert(value, full_old)
                if warn:
                    _warn_renamed(full_old, full_new)
                break
        inner, many = _field_class(cls, parts[0])
        done.append(parts.pop(0))
        if many and parts and parts[0].isdigit():
            done.append(parts.pop(0))
        elif many:
            break
        cls = inner
    return ".".join(done + parts), value


# --- plain data in and out ----------------------------------------------------------------------


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``data[k0][k1]...`` = ``value``, making sections on the way; a number indexes a list."""
    node: Any = data
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
    """Build dataclass ``cls`` from plain data, checking keys and types, then ``validate``.
    Renamed keys load under their new names (with a warning)."""
    where = prefix or "config"
    if not isinstance(data, dict):
        names = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise ConfigError(f"{where}: got {data!r}; allowed: a mapping of {names}.")
    data = _rename_level(cls, data, f"{prefix}." if prefix else "", warn=True)  # sections: in their own call
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}.")
    hints = _hints(typing.cast(Any, cls))
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


def _number(value: Any) -> float | None:
    """A YAML number as a float, or None. PyYAML reads ``5e-4`` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)  # type: ignore[arg-type]
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
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: got {value!r}; allowed: a number.")
        return number
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


def to_data(obj: Any) -> Any:
    """A config as plain data (dicts, lists, scalars) that ``from_dict`` reads back and
    ``yaml.safe_dump`` writes: every key, defaults filled in."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj
