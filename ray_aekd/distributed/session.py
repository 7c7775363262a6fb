"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` or a local one sized for the run, and
refusing work the cluster cannot place before anything is scheduled (Ray would wait forever)."""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from ray_aekd import _console as console

__all__ = ["Demand", "check_demands", "check_shared", "connect", "label_matches"]


@dataclasses.dataclass(frozen=True)
class Demand:
    """What one kind of actor or task of a run asks Ray for, for the checks in ``connect``.

    ``resources`` is per actor or task, CPUs and GPUs included (``{"CPU": 1, "GPU": 1,
    "teacher_gpu": 1}``); ``held`` ones (actor pools, train workers) hold them for the whole run,
    ``count`` at a time, while tasks hold theirs only while they run (one at a time is enough).
    """

    key: str  # the config key that sets it, for the error message ("teachers.0", "workers")
    what: str  # "teacher 'cnn_a'", "train worker"
    resources: Mapping[str, float]
    label_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    count: int = 1
    held: bool = True
    gpu_key: str = ""  # the key that asks for its GPUs and its value ("teachers.0.gpus", "1")
    gpu_value: str = ""


def connect(
    num_cpus: float,
    num_gpus: float,
    what: str,
    hint: str,
    local_cpus: float | None = None,
    log_to_driver: bool | None = None,
    demands: Sequence[Demand] = (),
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
        log_to_driver: echo the workers' output here (default: only with ``--verbose``, see
            ``ray_aekd.console``; a sweep turns it off in any case: its trials run
            concurrently and it prints one line per trial and epoch itself).
        demands: the run's actors and tasks; each must fit on one alive node that has its
            labels, and the custom resources they hold together must exist in the cluster.
    """
    if log_to_driver is None:
        log_to_driver = console.log_to_driver()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            _check_local_gpus(num_gpus, demands)  # before a local Ray takes 20 s to start
            wanted = num_cpus if local_cpus is None else local_cpus
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted) + 1), log_to_driver=log_to_driver)
    if demands:  # first: one actor or worker that fits on no node says which key asked for what
        check_demands(demands, [n for n in ray.nodes() if n.get("Alive")])
    total = ray.cluster_resources()
    for name, need in (("GPU", num_gpus), ("CPU", num_cpus)):
        have = total.get(name, 0)
        if need > have:
            raise ValueError(f"{what} need {need:g} {name}(s), but this Ray cluster has {have:g}; {hint}.")


def _check_local_gpus(num_gpus: float, demands: Sequence[Demand]) -> None:
    """Refuse GPUs this machine does not have, when a local Ray is about to start for the run."""
    if num_gpus <= 0:
        return
    import torch

    have = torch.cuda.device_count()
    asking = next((d for d in demands if d.resources.get("GPU", 0) > 0 and d.gpu_key), None)
    if num_gpus <= have or asking is None:
        return  # enough, or no key to name: the cluster check after ray.init says it
    raise ValueError(
        f"{asking.gpu_key}: got {asking.gpu_value}; allowed: GPUs this machine has ({have}; the run would need "
        f"{num_gpus:g}), since no RAY_ADDRESS names a cluster: set it to 0 (teachers.<i>.gpus, workers.gpus) "
        "to run on CPU, or submit the run to a cluster with GPUs."
    )


def check_demands(demands: Sequence[Demand], nodes: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` if some demand fits on no node (resources and labels together), or
    the custom resources held at once exceed the cluster's. ``nodes``: ``ray.nodes()`` entries."""
    for demand in demands:
        if not any(_fits(demand, node) for node in nodes):
            raise ValueError(
                f"{demand.key}: a {demand.what} needs {_describe(demand.resources)}"
                + (f" on a node labelled {_describe(demand.label_selector)}" if demand.label_selector else "")
                + ", but no node of this Ray cluster offers that (nodes: "
                + "; ".join(_describe_node(n) for n in nodes)
                + f"). Change {demand.key}.custom_resources / {demand.key}.label_selector (or its CPUs/GPUs"
                + (f": {demand.gpu_key} is {demand.gpu_value}" if demand.gpu_key else "")
                + "), or add such a node; Ray would wait for one forever."
            )
    for demand in (d for d in demands if d.held):  # all of them at once, on the nodes with their labels
        labelled = [n for n in nodes if label_matches(demand.label_selector, n.get("Labels", {}))]
        room = sum(_units(demand, node) for node in labelled)
        if room < demand.count:
            where = f"on nodes labelled {_describe(demand.label_selector)}" if demand.label_selector else "in it"
            raise ValueError(
                f"{demand.key}: the run holds {demand.count} {demand.what}s of {_describe(demand.resources)} at once, "
                f"but this Ray cluster has room for {room} {where}; lower their number or what each asks for, "
                "or add nodes; Ray would wait for them forever."
            )
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.get("Resources", {}).items():
            totals[name] = totals.get(name, 0.0) + amount
    needed: dict[str, float] = {}
    for name in {r for d in demands for r in d.resources if r not in ("CPU", "GPU")}:
        held = sum(d.resources.get(name, 0.0) * d.count for d in demands if d.held)
        needed[name] = held + max([d.resources.get(name, 0.0) for d in demands if not d.held] + [0.0])
    for name, need in sorted(needed.items()):
        if need > totals.get(name, 0.0):
            keys = sorted({d.key for d in demands if name in d.resources})
            raise ValueError(
                f"{', '.join(keys)}: the run holds {need:g} {name!r} at once, but this Ray cluster has "
                f"{totals.get(name, 0.0):g}; lower the amounts or the actors/workers that ask for it."
            )


def label_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether node ``labels`` satisfy a Ray label selector: ``value``, ``!value``,
    ``in(a,b)`` or ``!in(a,b)`` per key."""
    for key, condition in selector.items():
        negate = condition.startswith("!")
        condition = condition[1:] if negate else condition
        if condition.startswith("in(") and condition.endswith(")"):
            allowed = {v.strip() for v in condition[3:-1].split(",")}
        else:
            allowed = {condition}
        if (labels.get(key) in allowed) == negate:
            return False
    return True


def _units(demand: Demand, node: Mapping[str, Any]) -> int:
    """How many of ``demand``'s actors or workers ``node`` could hold on its own."""
    offered = node.get("Resources", {})
    asked = [(name, amount) for name, amount in demand.resources.items() if amount > 0]
    if not asked:
        return demand.count
    return min(int(offered.get(name, 0.0) / amount + 1e-9) for name, amount in asked)


def _fits(demand: Demand, node: Mapping[str, Any]) -> bool:
    offered = node.get("Resources", {})
    enough = all(offered.get(name, 0.0) >= amount for name, amount in demand.resources.items() if amount > 0)
    return enough and label_matches(demand.label_selector, node.get("Labels", {}))


def _describe(mapping: Mapping[str, Any]) -> str:
    items = (f"{k}: {v:g}" if isinstance(v, float | int) else f"{k}: {v}" for k, v in mapping.items())
    return "{" + ", ".join(items) + "}"


def _describe_node(node: Mapping[str, Any]) -> str:
    offered = {
        k: v
        for k, v in node.get("Resources", {}).items()
        if not k.startswith("node:") and k not in ("memory", "object_store_memory")
    }
    labels = {k: v for k, v in node.get("Labels", {}).items() if not k.startswith("ray.io/")}
    where = f"{node.get('NodeManagerAddress', '?')} {_describe(offered)}"
    return where + (f" labels {_describe(labels)}" if labels else "")


@ray.remote(num_cpus=0)
def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def check_shared(paths: Mapping[str, str], tracking_uri: str | None = None) -> None:
    """On a multi-node cluster, refuse local paths (config key -> path that exists here) that
    some node does not see: run folders, checkpoints and data must be on storage every node
    mounts at the same path. URIs (``s3://``...) are left to the code that opens them. Refuse
    too a tracking server on this machine's loopback address: workers elsewhere cannot reach it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {k: v for k, v in paths.items() if v is not None and "://" not in v}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    host = urllib.parse.urlparse(tracking_uri or "").hostname
    if host in ("localhost", "127.0.0.1", "::1"):
        raise ValueError(
            f"tracking.uri: {tracking_uri} (MLFLOW_TRACKING_URI wins over it) is this machine's loopback address; "
            f"allowed on this {len(nodes)}-node cluster: an address every node reaches (the MLflow server's private "
            "IP or service name), since rank 0 logs from whichever node it runs on."
        )
    if not local:
        return
    refs = [
        _missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            list(local.values())
        )
        for n in nodes
    ]
    try:
        missing = ray.get(refs, timeout=120)
    except ray.exceptions.GetTimeoutError:
        return  # a node too busy to answer is not evidence of a missing mount; the run goes on
    for key, path in local.items():
        blind = [n["NodeManagerAddress"] for n, gone in zip(nodes, missing, strict=True) if path in gone]
        if blind:
            raise ValueError(
                f"{key}: {path} is not visible on node(s) {', '.join(blind)} of this Ray cluster; allowed: a path "
                "on storage every node mounts at the same place (NFS, EFS, Filestore, a ReadWriteMany volume), "
                "or a URI (s3://, gs://) where the key takes one."
            )
