"""A Ray Tune callback that logs each trial as one MLflow run, from the driver.

The Ray half only: it turns Tune's callback calls into calls on ``tracking.trial_runs.TrialRuns``
(params when a trial starts, every reported metric whose name has a ``/`` at step ``epoch``,
the trial's output folder as artifacts when it completes), which holds the MLflow half.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from ray_aekd.tracking.trial_runs import TrialRuns

__all__ = ["MlflowTrialLogger"]


class MlflowTrialLogger(Callback):
    """One MLflow run per trial.

    Args:
        uri: the tracking URI (``None``: the default store).
        experiment: the experiment of the runs.
        run_name: a trial's run name, from the trial.
        params: a trial's params, from the trial.
        artifact_dir: a trial's folder, logged as its run's ``checkpoint`` artifacts when it completes.
        tags: tags of every run.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: Callable[[Any], str],
        params: Callable[[Any], dict[str, Any]],
        artifact_dir: Callable[[Any], str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.runs = TrialRuns(uri, experiment, tags)
        self._run_name, self._params, self._artifact_dir = run_name, params, artifact_dir

    @property
    def uri(self) -> str:
        return self.runs.uri

    @property
    def run_ids(self) -> dict[str, str]:
        """Run name -> MLflow run id, of every trial started so far."""
        return self.runs.run_ids

    def trial_run_id(self, trial: Any) -> str | None:
        """The MLflow run of ``trial``, or ``None`` when it has none yet."""
        return self.runs.run_id(trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.runs.start(trial.trial_id, self._run_name(trial), self._params(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.runs.log_result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        folder = self._artifact_dir(trial) if self._artifact_dir is not None else None
        self.runs.complete(trial.trial_id, folder)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.runs.fail(trial.trial_id)
