"""Docs generated from the code (docs/configuration.md, docs/cli.md): write them, or check that the
committed file is what would be written (the tests do; a stale file fails them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_or_check"]


def write_or_check(module: str, doc: Path, render: Callable[[], str], argv: list[str] | None = None) -> int:
    """``python -m <module> [PATH] [--check]``: write ``render()`` to PATH (default ``doc``), or with
    ``--check`` exit 1 when PATH differs from it."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=__doc__)
    parser.add_argument("path", nargs="?", default=str(doc), help=f"the file to write (default {doc})")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not what would be written")
    args = parser.parse_args(argv)
    text, path = render(), Path(args.path)
    if args.check:
        if (path.read_text() if path.is_file() else "") != text:
            print(f"{path} is out of date: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0
