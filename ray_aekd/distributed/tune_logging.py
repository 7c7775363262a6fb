"""A Ray Tune callback that logs each trial as one MLflow run, from the driver.

Logging from the driver keeps one writer per store (SQLite allows one at a time) and gives
each run live per-epoch metrics: params when a trial starts, every reported metric whose name
has a ``/`` (``train/loss``, ``val/acc1``, ...) at step ``epoch``, and the trial's output
folder as artifacts when it completes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from ray_aekd._provenance import environment_tags
from ray_aekd.tracking.runs import experiment_id, resolve_tracking_uri, system_tags

__all__ = ["MlflowTrialLogger"]


class MlflowTrialLogger(Callback):
    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: Callable[[Any], str],
        params: Callable[[Any], dict[str, Any]],
        artifact_dir: Callable[[Any], str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.uri = resolve_tracking_uri(uri)
        self._client = MlflowClient(self.uri)
        self._experiment_id = experiment_id(self._client, experiment)
        self._run_name, self._params, self._artifact_dir = run_name, params, artifact_dir
        self._tags = system_tags((tags or {}) | environment_tags())
        self._runs: dict[str, str] = {}  # trial id -> run id
        self.run_ids: dict[str, str] = {}  # run name -> run id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = self._run_name(trial)
        run = self._client.create_run(self._experiment_id, run_name=name, tags=self._tags)
        self._runs[trial.trial_id] = run.info.run_id
        self.run_ids[name] = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in self._params(trial).items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(run.info.run_id, params=params[i : i + 100])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        stamp = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(k, float(v), stamp, step)
            for k, v in result.items()
            if "/" in k and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            return
        if self._artifact_dir is not None and Path(self._artifact_dir(trial)).is_dir():
            self._client.log_artifacts(run_id, self._artifact_dir(trial), "checkpoint")
        self._client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._runs.get(trial.trial_id)
        if run_id is not None:
            self._client.set_terminated(run_id, "FAILED")
