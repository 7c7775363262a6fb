"""What a run was made with: package, library and Python versions, and the git commit of the
ray_aekd source when it is a git checkout. Written to ``environment.json`` in every run folder
and set as MLflow tags (``ray_aekd.version``, ``ray_aekd.git_commit``, ...)."""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ray_aekd import __version__

__all__ = ["environment", "environment_tags"]

_LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "numpy", "scipy")


def _git(*args: str) -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str | None]:
    """``{"ray_aekd": "0.2.0", "python": "3.11.7", "torch": ..., "git_commit": sha or None,
    "git_dirty": "true"/"false" or None, "platform": ...}``."""
    out: dict[str, str | None] = {"ray_aekd": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    # the commit of the ray_aekd checkout itself, not of a repository that happens to hold an install
    top = _git("rev-parse", "--show-toplevel")
    is_checkout = top is not None and (Path(top) / "ray_aekd").resolve() == Path(__file__).resolve().parent
    commit = _git("rev-parse", "HEAD") if is_checkout else None
    out["git_commit"] = commit
    # tracked files changed since that commit (a run from an edited checkout is not that commit)
    changed = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    out["git_dirty"] = None if commit is None else str(bool(changed)).lower()
    out["platform"] = platform.platform()
    return out


def environment_tags(env: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``env`` (default: this process's ``environment()``; or one read back from a run's
    ``environment.json``) as MLflow tags ``ray_aekd.<key>`` (``ray_aekd.version`` for the package)."""
    env = environment() if env is None else env
    tags = {("ray_aekd.version" if k == "ray_aekd" else f"ray_aekd.{k}"): v for k, v in env.items()}
    return {k: str(v) for k, v in tags.items() if v is not None}
