"""The flags that mean the same on every command, defined once, and what they do.

- ``--config FILE`` and ``--set KEY=VALUE`` (repeatable): the command's YAML config and overrides
  of its dotted keys; ``--check`` validates them and exits, ``--print-config`` prints the resolved
  config (every key, defaults filled in) and exits. Neither starts Ray or imports torch.
- ``--tracking-uri URI``: the MLflow tracking URI of this command. It sets the config's
  ``tracking.uri`` and wins over ``MLFLOW_TRACKING_URI`` for this command (the environment
  variable wins over the config's key otherwise). ``--experiment NAME``: ``tracking.experiment``.
- ``--output-dir DIR``: the config's ``output_dir``, where the command writes its folders.
- ``--json [PATH]``: the result as JSON, to PATH, or alone to stdout instead of the summary (what
  the command prints while it runs then goes to stderr).
- ``--verbose``: an input error's traceback; on the commands that keep a log file (or run Ray
  workers), Ray's and MLflow's own logs on the console instead (``VERBOSE_HELP``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ray_aekd._locations import check_outputs_survive

__all__ = [
    "DEFAULT_TRACKING_URI",
    "TRACKING_ENV",
    "VERBOSE_HELP",
    "add_config_flags",
    "add_json_flag",
    "add_output_dir_flag",
    "add_tracking_flags",
    "add_verbose_flag",
    "check_outputs",
    "config_command",
    "json_stdout",
    "overrides",
    "tracking_source",
    "tracking_uri_for_this_command",
    "write_json",
]

#: The environment variable MLflow reads its tracking URI from.
TRACKING_ENV = "MLFLOW_TRACKING_URI"
#: What MLflow logs to when neither a flag, the environment nor the config names a store (the
#: same as ``ray_aekd.tracking.runs.DEFAULT_TRACKING_URI``; this module imports no MLflow).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

_STDOUT = "-"


def add_config_flags(parser: argparse.ArgumentParser, example: str) -> None:
    """``--config``, ``--set``, ``--check`` and ``--print-config``."""
    group = parser.add_argument_group("config")
    group.add_argument("--config", required=True, metavar="FILE", help=f"the YAML config, e.g. {example}")
    group.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable; the value is read as YAML)",
    )  # fmt: skip
    group.add_argument(
        "--check", action="store_true",
        help="validate the config (with --set) and exit: 'config OK: FILE', or exit code 2 and the error; "
        "starts no Ray, imports no torch (of a torchvision:/timm: model name only the syntax: the run checks "
        "the rest when it starts, and the OK line says so)",
    )  # fmt: skip
    group.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML (every key, defaults filled in)"
    )


def add_tracking_flags(
    parser: argparse.ArgumentParser,
    experiment: str | None = "the config's tracking.experiment",
    default: str | None = None,
) -> None:
    """``--tracking-uri`` and, unless ``experiment`` is None, ``--experiment`` (``experiment``:
    what its default is, in words; ``default``: its value, None for the config's)."""
    group = parser.add_argument_group("MLflow")
    group.add_argument(
        "--tracking-uri", metavar="URI",
        help=f"MLflow tracking URI; wins over {TRACKING_ENV}, which wins over the config's tracking.uri "
        f"(default {DEFAULT_TRACKING_URI})",
    )  # fmt: skip
    if experiment is not None:
        group.add_argument(
            "--experiment", metavar="NAME", default=default, help=f"MLflow experiment (default {experiment})"
        )


def add_output_dir_flag(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--output-dir`` (``default``: its default, else the config's ``output_dir``)."""
    shown = f"default {default}" if default else "default: the config's output_dir"
    parser.add_argument("--output-dir", metavar="DIR", default=default, help=f"{what} ({shown})")


def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json", nargs="?", const=_STDOUT, metavar="PATH",
        help=f"write {what} as JSON to PATH; --json alone prints it on stdout instead of the summary",
    )  # fmt: skip


#: What ``--verbose`` does, besides the traceback of an input error, on each command that does more.
VERBOSE_HELP = {
    "teachers": "show Ray's and MLflow's own logs and the Ray workers' output here (default: in "
    "<output_dir>/ray_aekd.log)",
    "distill": "show Ray's and MLflow's own logs and the Ray workers' output here (default: in the run "
    "folder's ray_aekd.log)",
    "sweep": "show Ray's, Tune's and MLflow's own logs here (default: in the sweep folder's ray_aekd.log; each "
    "trial's in trials/<trial>.log)",
    "quickstart": "show Ray's and MLflow's own logs and the Ray workers' output here (default: in "
    "<output_dir>/ray_aekd.log)",
    "relabel": "show the Ray workers' output here (default: in Ray's session logs, /tmp/ray/session_latest/logs)",
}


def add_verbose_flag(parser: argparse.ArgumentParser, command: str) -> None:
    """``--verbose``: on every command, the traceback of an input error before its line; on the
    commands in ``VERBOSE_HELP``, their logs on the console too."""
    traceback = "print an input error's traceback before its one line"
    more = VERBOSE_HELP.get(command)
    help_text = f"{more}; and {traceback}" if more else traceback
    parser.add_argument("--verbose", action="store_true", help=help_text)


def overrides(args: argparse.Namespace, shorthands: Mapping[str, str]) -> list[str]:
    """``--set`` items, then the shorthand flags given (``{"output_dir": "output_dir"}``: flag
    attribute -> dotted config key) as items of their own, so that they win."""
    items = list(args.set)
    for attribute, key in shorthands.items():
        value = getattr(args, attribute, None)
        if value is not None:
            items.append(f"{key}={json.dumps(value)}")  # JSON is YAML: the value stays a string
    return items


@contextlib.contextmanager
def tracking_uri_for_this_command(uri: str | None) -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` = ``uri`` while the command runs (Ray processes it starts inherit
    it), then as it was; nothing when ``uri`` is None."""
    if uri is None:
        yield
        return
    before = os.environ.get(TRACKING_ENV)
    os.environ[TRACKING_ENV] = uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = before


def tracking_source(args: argparse.Namespace, config_uri: str | None) -> tuple[str, str]:
    """``(where the tracking URI comes from, the URI)`` for messages: the flag, the environment,
    the config, or MLflow's default."""
    if getattr(args, "tracking_uri", None):
        return "--tracking-uri", args.tracking_uri
    if os.environ.get(TRACKING_ENV):
        return TRACKING_ENV, os.environ[TRACKING_ENV]
    if config_uri:
        return "tracking.uri", config_uri
    return f"tracking.uri (not set: MLflow's default, {DEFAULT_TRACKING_URI})", DEFAULT_TRACKING_URI


def _fix(key: str) -> str:
    """An example of an output location that survives a job, for ``key``."""
    if key == "output_dir":
        return "--output-dir /mnt/shared/runs"
    return f"{key} /mnt/shared/..." if key.startswith("--") else f"--set {key}=/mnt/shared/..."


def check_outputs(
    args: argparse.Namespace, outputs: list[tuple[str, str | None]], config_uri: str | None, tracks: bool = True
) -> None:
    """Refuse output locations that a Ray job's working-directory copy would take with it
    (``ray_aekd._locations``). ``outputs``: ``(key, location)``; ``--json PATH`` is one too."""
    target = getattr(args, "json", None)
    if target not in (None, _STDOUT):
        outputs = [*outputs, ("--json", target)]
    located = [(key, value, _fix(key)) for key, value in outputs]
    check_outputs_survive(located, tracking_source(args, config_uri) if tracks else None)


def config_command(
    args: argparse.Namespace, load: Callable[[], Any], checks: Callable[[Any], None], describe: Any = None
) -> Any:
    """Load the command's config with ``load()``. With ``--print-config`` print it; with
    ``--check`` run ``checks(config)`` too (where outputs go) and say it is fine: then return None
    (the command stops there). Otherwise run ``checks`` and return the config.
    ``describe(config)``: the YAML ``--print-config`` prints (default: the config's)."""
    from ray_aekd.config import dump_yaml
    from ray_aekd.config.common import library_models_checked_later

    later: list[str] = []
    if args.check:  # torchvision:/timm: names: their syntax now, the library asked when the run starts
        with library_models_checked_later() as later:
            config = load()
    else:
        config = load()
    if args.print_config:
        print(describe(config) if describe is not None else dump_yaml(config), end="")
    if args.check or not args.print_config:
        checks(config)
    if args.check:
        checked_later = f" ({', '.join(later)} {'is' if len(later) == 1 else 'are'} checked when the run starts)"
        print(f"config OK: {args.config}" + (checked_later if later else ""))
    return None if args.check or args.print_config else config


@contextlib.contextmanager
def json_stdout(args: argparse.Namespace) -> Iterator[None]:
    """With ``--json`` alone, what the command prints goes to stderr: stdout holds the JSON only."""
    if getattr(args, "json", None) == _STDOUT:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def write_json(args: argparse.Namespace, result: Any) -> None:
    """The result (a dataclass or plain data) as JSON where ``--json`` says; nothing without it."""
    target = getattr(args, "json", None)
    if target is None:
        return
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) and not isinstance(result, type) else result
    if target == _STDOUT:
        print(json.dumps(data, default=str))  # one line: for jq, or json.loads of the whole output
    else:
        Path(target).write_text(json.dumps(data, indent=2, default=str))
