"""Where a command's outputs survive it.

``ray job submit --working-dir .`` runs the command inside Ray's temporary copy of the working
directory (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>/``), which Ray deletes with
the job. A relative ``output_dir`` or ``sqlite:///mlflow.db`` resolves into that copy, and the
run folders, checkpoints and MLflow store vanish when the job ends. ``check_outputs_survive``
refuses such locations before any Ray work, naming the key, the value and the fix. Standard
library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["JOB_COPY_MARKER", "check_outputs_survive", "job_working_copy", "local_path", "tracking_store_path"]

#: The folders of a Ray job's working-directory copy, in this order, in its path.
JOB_COPY_MARKER = ("runtime_resources", "working_dir_files")


def job_working_copy(cwd: str | Path | None = None) -> Path | None:
    """The root of the Ray job working-directory copy that ``cwd`` (default: the current
    directory) is in, or None when it is not in one."""
    parts = Path(os.getcwd() if cwd is None else cwd).parts
    for i in range(len(parts) - len(JOB_COPY_MARKER)):
        if parts[i : i + len(JOB_COPY_MARKER)] == JOB_COPY_MARKER:
            return Path(*parts[: i + len(JOB_COPY_MARKER) + 1])  # .../working_dir_files/_ray_pkg_<hash>
    return None


def local_path(location: str) -> str | None:
    """The local filesystem path of an output location, or None for remote storage
    (``s3://``, ``gs://``, any ``scheme://`` other than ``file://``)."""
    if location.startswith("file://"):
        return location[len("file://") :]
    return None if "://" in location else location


def tracking_store_path(uri: str) -> str | None:
    """The local file or folder an MLflow tracking URI writes to (``sqlite:///x.db`` -> ``x.db``,
    ``sqlite:////abs/x.db`` -> ``/abs/x.db``, ``file:x``, a plain path), or None for a server."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :]
    if uri.startswith("file:"):
        rest = uri[len("file:") :]
        return rest[2:] if rest.startswith("//") else rest
    if uri.startswith("databricks") or ":" in uri.split("/", 1)[0]:
        return None  # a server: http(s)://, databricks, ...
    return uri


def _inside(path: str, copy: Path, cwd: Path) -> bool:
    full = Path(path) if os.path.isabs(path) else cwd / path
    full = Path(os.path.normpath(full))
    return full == copy or copy in full.parents


def check_outputs_survive(
    outputs: Iterable[tuple[str, str | None, str]], tracking: tuple[str, str] | None, cwd: str | Path | None = None
) -> None:
    """Raise ``ValueError`` if this process runs in a Ray job's working-directory copy and an
    output would be written inside it.

    Args:
        outputs: ``(key, location, example fix)`` of each output location (``("output_dir",
            "runs/distill", "--output-dir /mnt/shared/runs")``); None locations are skipped.
        tracking: ``(where it came from, URI)`` of the MLflow tracking URI the command logs to
            (``("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")``), or None when it logs nothing.
        cwd: the working directory (default: the current one).
    """
    here = Path(os.getcwd() if cwd is None else cwd)
    copy = job_working_copy(here)
    if copy is None:
        return
    why = (
        f"this command runs in Ray's temporary copy of the working directory ({copy}), which is deleted when the "
        "job ends, and"
    )
    for key, location, fix in outputs:
        path = None if location is None else local_path(location)
        if path is not None and _inside(path, copy, here):
            raise ValueError(
                f"{key}: got {location!r}; {why} this path is inside it, so what the job writes there would vanish; "
                f"allowed: an absolute path on storage that outlives the job (e.g. {fix}), or s3://, gs://."
            )
    if tracking is not None:
        source, uri = tracking
        path = tracking_store_path(uri)
        if path is not None and _inside(path, copy, here):
            raise ValueError(
                f"{source}: got {uri!r}; {why} this MLflow store is inside it, so the job's runs would vanish; "
                "allowed: a tracking server (--tracking-uri http://<head>:5000, or MLFLOW_TRACKING_URI on the "
                "cluster) or a SQLite file on storage that outlives the job (--tracking-uri "
                "sqlite:////mnt/shared/mlflow.db, four slashes: an absolute path)."
            )
