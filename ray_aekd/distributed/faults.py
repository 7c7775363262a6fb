"""Fault injection (``faults`` in a distillation config, or ``RAY_AEKD_FAULTS``): kill a Ray
Train worker or a teacher's actor once, or take the tracking server away, so that tests and
failure drills can watch a run survive. Off unless asked for; see ``config.FaultsConfig``.

A fault fires once per run: the first process to create its marker file in the run folder's
``faults/`` (shared storage on a cluster) fires it; restarted workers and actors find the
marker and go on.

``ray-aekd teachers`` has its own (``faults`` in a teachers config, or ``RAY_AEKD_TEACHER_FAULTS``;
see ``config.TeacherFaultsConfig``): kill one teacher's Tune trial process just after it reported
an epoch with its checkpoint, once per run (marker in ``output_dir/faults/``), with ``die``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

__all__ = ["TeacherFault", "UNREACHABLE_TRACKING_URI", "die", "fire_once"]

#: Where a tracking server that went away "is": a closed port on this machine.
UNREACHABLE_TRACKING_URI = "http://127.0.0.1:9"

#: The exit status of a process killed on purpose (EX_TEMPFAIL: a transient failure).
FAULT_EXIT_CODE = 75


@dataclasses.dataclass(frozen=True)
class TeacherFault:
    """Kill the process of the actor (or task worker) of ``teacher``'s stage that receives the
    stage's ``batch``-th batch of the run (counted over its actors and passes, the validation
    pass first), before running it: Ray restarts the actor and retries the batch."""

    teacher: str
    batch: int
    marker_dir: str


def fire_once(marker_dir: str | Path, name: str) -> bool:
    """True for the one caller that creates ``<marker_dir>/<name>.fired`` first."""
    marker = Path(marker_dir) / f"{name}.fired"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        with marker.open("x") as f:
            f.write(f"{time.time()} pid {os.getpid()}\n")
    except FileExistsError:
        return False
    return True


def die(message: str) -> None:
    """End this process at once, as a pre-empted node or an OOM kill would: no cleanup, no
    exception for anyone to catch."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"[ray-aekd] fault injection: {message}\n")
    stream.flush()
    os._exit(FAULT_EXIT_CODE)
