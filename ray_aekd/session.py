"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` or a local one sized for the run."""

from __future__ import annotations

import math
import os

import ray

__all__ = ["connect"]


def connect(
    num_cpus: float,
    num_gpus: float,
    what: str,
    hint: str,
    local_cpus: float | None = None,
    log_to_driver: bool = True,
) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as ``ray job submit`` sets it) or start a
    local Ray, then refuse, before anything is scheduled, work that cannot fit on it.

    Args:
        num_cpus, num_gpus: what the work needs at once.
        what: the work, for the error message ("3 teacher pool(s) and 2 train worker(s)").
        hint: which config keys lower the need.
        local_cpus: logical CPUs for a local Ray (default: enough for ``num_cpus``). Ray's CPU
            count is a scheduling budget, not a thread limit: a laptop gets enough of them for
            the workers, teacher actors and data tasks of the run to be scheduled together.
        log_to_driver: echo the workers' output here (a sweep turns it off: its trials run
            concurrently and it prints one line per trial and epoch itself).
    """
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            wanted = num_cpus if local_cpus is None else local_cpus
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted) + 1), log_to_driver=log_to_driver)
    total = ray.cluster_resources()
    for name, need in (("GPU", num_gpus), ("CPU", num_cpus)):
        have = total.get(name, 0)
        if need > have:
            raise ValueError(f"{what} need {need:g} {name}(s), but this Ray cluster has {have:g}; {hint}.")
