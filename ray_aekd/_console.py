"""What a command prints: ray_aekd's own lines. Ray's, MLflow's and Python's log records and
warnings go to a log file in the run folder instead, whose path the command prints; with
``--verbose`` (or ``RAY_AEKD_VERBOSE=1``) everything stays on the console, the Ray workers'
output included.

Only the driver's loggers are redirected here. What Ray's worker processes print reaches the
console only when ``ray.init(log_to_driver=...)`` says so (``log_to_driver()``); otherwise it
stays in Ray's own session logs (``/tmp/ray/session_latest/logs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOG_FILE", "VERBOSE_ENV", "capture_logs", "log_to_driver", "set_verbose", "tune_verbosity", "verbose"]

#: The log file's name in a run folder (``output_dir/<name>/``), sweep folder or teachers' folder.
LOG_FILE = "ray_aekd.log"
#: ``1``: keep everything on the console (what ``--verbose`` sets, so that Ray's processes see it too).
VERBOSE_ENV = "RAY_AEKD_VERBOSE"

#: Loggers whose records are internals for a user of ray_aekd. Children (``ray.data``,
#: ``ray.train``, ``mlflow.store``) go with them unless they have handlers of their own.
_FOREIGN = ("ray", "mlflow", "alembic", "py.warnings", "filelock", "urllib3", "torch", "fsspec", "pyarrow")

_active: list[Path] = []  # the file of the outermost capture in progress


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_verbose(flag: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if flag else "0"


def tune_verbosity() -> int:
    """``RunConfig(verbose=...)`` for Ray Tune: its status tables only with ``--verbose``. Quiet,
    Tune's newer console output still prints an experiment box at the start whatever the
    verbosity (Ray 2.60), so the older one, silent at 0, is asked for unless the user chose."""
    if verbose():
        return 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return 0


def log_to_driver() -> bool:
    """Whether Ray should echo its worker processes' output on this console."""
    return verbose()


@contextlib.contextmanager
def capture_logs(path: Path) -> Iterator[Path | None]:
    """While the block runs, send the foreign loggers' records and Python warnings to ``path``
    (appended) instead of the console; yields the file, or None when verbose. Inside another
    capture it changes nothing and yields the outer file (the quickstart's log holds its runs')."""
    if verbose() or _active:
        yield _active[0] if _active else None
        return
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = list(_FOREIGN) + [  # children configured with console handlers of their own
        name
        for name in logging.root.manager.loggerDict
        if name.startswith(tuple(f"{n}." for n in _FOREIGN)) and logging.getLogger(name).handlers
    ]
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate) for name in names}
    for name in names:
        _redirect(logging.getLogger(name), handler)
    logging.captureWarnings(True)  # warnings.warn -> logger py.warnings
    _active.append(path)
    try:
        yield path
    finally:
        _active.clear()
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


class _LazyFileHandler(logging.FileHandler):
    """A log file made, folder included, at the first record: a command refused before it
    made its run folder leaves nothing behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):  # noqa: ANN202 (logging's own signature)
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _redirect(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.handlers[:] = [
        old
        for old in logger.handlers
        if not isinstance(old, logging.StreamHandler) or isinstance(old, logging.FileHandler)
    ]
    logger.addHandler(handler)
    logger.propagate = False
