"""The MLflow calls the Ray layer makes, one run at a time, by id: create or reopen a run, log
params and metrics, set tags, finish it.

Each function opens an ``MlflowClient`` on the store ``uri`` (cheap: MLflow keeps one store per
URI) and raises what MLflow raises: the callers decide whether a failure stops them (it never
stops a training run; see ``ray_aekd.distributed.distill``). ``retry=True`` repeats each call
while another process holds the same SQLite store (``runs.retry_contended``), as a sweep's
trials do when they open their runs at the same moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ray_aekd.tracking.runs import experiment_id, log_dataset, retry_contended

__all__ = [
    "PARAM_LENGTH",
    "create_run",
    "finish_run",
    "log_artifacts",
    "log_metric_rows",
    "log_metrics",
    "log_params",
    "log_run_inputs",
    "reopen_run",
    "set_tags",
]

#: Characters of a param value MLflow keeps (longer values are cut).
PARAM_LENGTH = 6000
#: Params per ``log_batch`` call (MLflow's limit).
PARAMS_PER_BATCH = 100


def _call(fn: Callable[[], Any], retry: bool) -> Any:
    return retry_contended(fn) if retry else fn()


def create_run(uri: str, experiment: str, name: str, tags: dict[str, str]) -> str:
    """A new RUNNING run named ``name`` in ``experiment`` (created if missing); returns its id.
    ``tags`` are set as given (add ``runs.system_tags`` for the ones MLflow's fluent API sets)."""
    client = MlflowClient(uri)
    return client.create_run(experiment_id(client, experiment), run_name=name, tags=tags).info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """Mark an existing run RUNNING again (a resumed distillation logs on into it)."""
    MlflowClient(uri).update_run(run_id, status="RUNNING")


def log_params(uri: str, run_id: str, values: dict[str, Any], retry: bool = False) -> None:
    """Log ``values`` as params (``str(value)``, cut to ``PARAM_LENGTH``), 100 per call."""
    client = MlflowClient(uri)
    params = [Param(k, str(v)[:PARAM_LENGTH]) for k, v in values.items()]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        _call(partial(client.log_batch, run_id, params=params[i : i + PARAMS_PER_BATCH]), retry)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0, retry: bool = False) -> None:
    """Log ``metrics`` (name -> value) at ``step``, stamped now, in one call."""
    log_metric_rows(uri, run_id, [(k, v, step) for k, v in metrics.items()], retry=retry)


def log_metric_rows(
    uri: str, run_id: str, rows: Iterable[tuple[str, float, int]], per_call: int = 1000, retry: bool = False
) -> None:
    """Log ``(name, value, step)`` rows, stamped now, ``per_call`` to a call (none: no call)."""
    client = MlflowClient(uri)
    stamp = int(time.time() * 1000)
    metrics = [Metric(str(k), float(v), stamp, int(step)) for k, v, step in rows]
    for i in range(0, len(metrics), per_call):
        _call(partial(client.log_batch, run_id, metrics=metrics[i : i + per_call]), retry)


def log_run_inputs(
    uri: str, run_id: str, params: dict[str, Any], metrics: dict[str, float], dataset: Any = None, retry: bool = False
) -> None:
    """What a new run starts with: its ``dataset`` input (``runs.dataset_input``; always retried,
    as ``runs.log_dataset``), its ``params``, and ``metrics`` at step 0."""
    if dataset is not None:
        log_dataset(MlflowClient(uri), run_id, dataset)
    log_params(uri, run_id, params, retry=retry)
    log_metrics(uri, run_id, metrics, step=0, retry=retry)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on the run, one call each."""
    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifacts(
    uri: str, run_id: str, files: Iterable[str | Path] = (), folders: dict[str, str | Path] | None = None
) -> None:
    """Log each of ``files`` at the run's artifact root, then each folder of ``folders``
    (artifact path -> local folder) under its artifact path."""
    client = MlflowClient(uri)
    for file in files:
        client.log_artifact(run_id, str(file))
    for artifact_path, folder in (folders or {}).items():
        client.log_artifacts(run_id, str(folder), artifact_path)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End the run with ``status``: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    MlflowClient(uri).set_terminated(run_id, status)
