"""MLflow runs of Ray Tune trials, written from the driver (no Ray here: the distributed layer's
Tune callbacks hand over plain values).

- ``TrialRuns``: one MLflow run per trial (``ray-aekd teachers``): params when the trial starts,
  every reported metric whose name has a ``/`` at step ``epoch``, the trial's folder as
  artifacts when it completes. Logging from the driver keeps one writer per store (SQLite
  allows one at a time) and gives each run live per-epoch metrics.
- ``close_stopped_children``: after a sweep, its child runs still RUNNING (trials the scheduler
  stopped, or that died) are given the epochs Tune saw but they had not logged, and are
  marked KILLED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ray_aekd._provenance import environment_tags
from ray_aekd.tracking.client import PARAM_LENGTH, PARAMS_PER_BATCH, log_metric_rows
from ray_aekd.tracking.runs import experiment_id, resolve_tracking_uri, system_tags

__all__ = ["STOPPED_EARLY_TAG", "TrialRuns", "close_stopped_children", "result_metrics"]

#: Tag of a sweep's child run that its trial did not finish (stopped by the scheduler, or died).
STOPPED_EARLY_TAG = "ray_aekd.stopped_early"
#: Metrics of a Tune result that a stopped child run is given, by prefix.
_EPOCH_METRICS = ("val/", "train/", "weights/")


def result_metrics(result: dict[str, Any]) -> list[Metric]:
    """The metrics of one Tune result worth a run's history: every number whose name has a ``/``
    (``train/loss``, ``val/acc1``, ...), at step ``epoch`` (else ``training_iteration``)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    stamp = int(result.get("timestamp", 0) * 1000)
    return [
        Metric(k, float(v), stamp, step)
        for k, v in result.items()
        if "/" in k and isinstance(v, int | float) and not isinstance(v, bool)
    ]


class TrialRuns:
    """One MLflow run per Tune trial, keyed by the trial's id; see the module docstring.

    Args:
        uri: the tracking URI (``None``: ``runs.resolve_tracking_uri``'s default).
        experiment: the experiment the runs go to (created if missing).
        tags: tags of every run (MLflow's system tags and the environment's are added).
    """

    def __init__(self, uri: str | None, experiment: str, tags: dict[str, str] | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self._client = MlflowClient(self.uri)
        self._experiment_id = experiment_id(self._client, experiment)
        self._tags = system_tags((tags or {}) | environment_tags())
        self._runs: dict[str, str] = {}  # trial id -> run id
        self.run_ids: dict[str, str] = {}  # run name -> run id

    def run_id(self, trial_id: str) -> str | None:
        """The run of trial ``trial_id``, or ``None`` when it has none (not started yet)."""
        return self._runs.get(trial_id)

    def start(self, trial_id: str, name: str, params: dict[str, Any]) -> str:
        """Open the trial's run named ``name`` with ``params``; returns its id."""
        run_id = self._client.create_run(self._experiment_id, run_name=name, tags=self._tags).info.run_id
        self._runs[trial_id] = run_id
        self.run_ids[name] = run_id
        values = [Param(k, str(v)[:PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(values), PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=values[i : i + PARAMS_PER_BATCH])
        return run_id

    def log_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Log one Tune result's metrics (``result_metrics``) to the trial's run, if it has one."""
        run_id = self._runs.get(trial_id)
        if run_id is None:
            return
        metrics = result_metrics(result)
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)

    def complete(self, trial_id: str, artifact_dir: str | None = None) -> None:
        """The trial finished: log ``artifact_dir`` (when it is a folder) under ``checkpoint``,
        and mark the run FINISHED."""
        run_id = self._runs.get(trial_id)
        if run_id is None:
            return
        if artifact_dir is not None and Path(artifact_dir).is_dir():
            self._client.log_artifacts(run_id, artifact_dir, "checkpoint")
        self._client.set_terminated(run_id, "FINISHED")

    def fail(self, trial_id: str) -> None:
        """The trial failed for good: mark its run FAILED."""
        run_id = self._runs.get(trial_id)
        if run_id is not None:
            self._client.set_terminated(run_id, "FAILED")


def close_stopped_children(uri: str, parent_id: str, reported: dict[str, list[dict[str, Any]]]) -> None:
    """Mark the children of sweep run ``parent_id`` that are still RUNNING KILLED, tagged
    ``STOPPED_EARLY_TAG``, after logging the epochs of theirs that Tune saw and they lack.

    Args:
        uri: the tracking URI.
        parent_id: the sweep's run (children carry ``mlflow.parentRunId``).
        reported: trial id (a child's ``ray_aekd.trial_id`` tag) -> the trial's Tune results, one
            dict per epoch with ``epoch`` and the metrics; rank 0 logs each epoch after reporting
            it, and a stopped trial is killed right after a report, so the last ones may be missing.
    """
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    for run in runs:
        rows = reported.get(run.data.tags.get("ray_aekd.trial_id", ""))
        if rows is not None:
            logged = {m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")}
            missing = [
                (k, row[k], int(row["epoch"]))
                for row in rows
                if int(row["epoch"]) not in logged
                for k in row
                if str(k).startswith(_EPOCH_METRICS) and row[k] == row[k]  # not NaN
            ]
            log_metric_rows(uri, run.info.run_id, missing, per_call=500)
        client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, "true")
        client.set_terminated(run.info.run_id, "KILLED")
