"""The MLflow half of runs opened from the driver (``tracking.client``, ``tracking.trial_runs``),
against a local SQLite store, without Ray: what a user sees in MLflow after a run or a sweep."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from ray_aekd.tracking.client import (
    create_run,
    finish_run,
    log_metrics,
    log_run_inputs,
    reopen_run,
    set_tags,
)
from ray_aekd.tracking.runs import dataset_input
from ray_aekd.tracking.trial_runs import STOPPED_EARLY_TAG, TrialRuns, close_stopped_children


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def test_a_run_opened_by_id_gets_every_param_its_metrics_and_its_status(tmp_path):
    uri, client = _store(tmp_path)
    run_id = create_run(uri, "runs", "r1", {"ray_aekd.strategy": "aekd"})
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 7000}  # more than one batch of 100
    dataset = dataset_input("digits", "abc123", "sklearn", "training", {"samples": 10})
    log_run_inputs(uri, run_id, params, {"ensemble/val/acc1": 0.9}, dataset, retry=True)
    log_metrics(uri, run_id, {"val/acc1": 0.5}, step=3)
    set_tags(uri, run_id, {"ray_aekd.best_trial": "t1"})
    finish_run(uri, run_id, "FINISHED")

    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.tags["ray_aekd.strategy"] == "aekd" and run.data.tags["ray_aekd.best_trial"] == "t1"
    assert len(run.data.params) == 251 and run.data.params["p249"] == "249"
    assert run.data.params["long"] == "x" * 6000  # MLflow's limit: cut, not refused
    assert run.data.metrics == {"ensemble/val/acc1": 0.9, "val/acc1": 0.5}
    assert [m.step for m in client.get_metric_history(run_id, "val/acc1")] == [3]
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == ["abc123"]

    reopen_run(uri, run_id)  # a resumed distillation logs on into the same run
    assert client.get_run(run_id).info.status == "RUNNING"


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_each_trial_is_one_run_with_its_params_epochs_and_artifacts(tmp_path):
    uri, client = _store(tmp_path)
    runs = TrialRuns(uri, "teachers", tags={"team": "x"})
    assert runs.run_id("t1") is None
    runs.start("t1", "teacher_a", {"teacher.name": "teacher_a", "train.epochs": 2})
    runs.start("t2", "teacher_b", {"teacher.name": "teacher_b", "train.epochs": 2})
    for epoch in (1, 2):
        result = {"epoch": epoch, "val/acc1": 0.4 + epoch / 10, "done": False, "train/ok": True, "timestamp": 1.0}
        runs.log_result("t1", result)
    runs.log_result("unknown", {"epoch": 1, "val/acc1": 0.1})  # a trial without a run: nothing logged
    folder = tmp_path / "teacher_a"
    folder.mkdir()
    (folder / "metadata.json").write_text("{}")
    runs.complete("t1", str(folder))
    runs.fail("t2")

    a, b = client.get_run(runs.run_id("t1")), client.get_run(runs.run_id("t2"))
    assert runs.run_ids == {"teacher_a": a.info.run_id, "teacher_b": b.info.run_id}
    assert (a.info.status, b.info.status) == ("FINISHED", "FAILED")
    assert a.data.params["teacher.name"] == "teacher_a" and a.data.tags["team"] == "x"
    history = client.get_metric_history(a.info.run_id, "val/acc1")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.5), (2, 0.6)]
    assert set(a.data.metrics) == {"val/acc1"}  # booleans and names without a "/" are not metrics
    assert [f.path for f in client.list_artifacts(a.info.run_id, "checkpoint")] == ["checkpoint/metadata.json"]


def test_a_sweeps_stopped_children_get_their_missing_epochs_and_are_marked_killed(tmp_path):
    uri, client = _store(tmp_path)
    parent = create_run(uri, "sweep", "s", {"ray_aekd.sweep": "true"})
    stopped = create_run(uri, "sweep", "s-t1", {"mlflow.parentRunId": parent, "ray_aekd.trial_id": "t1"})
    finished = create_run(uri, "sweep", "s-t2", {"mlflow.parentRunId": parent, "ray_aekd.trial_id": "t2"})
    log_metrics(uri, stopped, {"val/acc1": 0.5}, step=1)  # rank 0 logged epoch 1; it was killed after epoch 2
    finish_run(uri, finished)
    reported = {
        "t1": [
            {"epoch": 1, "val/acc1": 0.9, "trial_id": "t1"},
            {"epoch": 2, "val/acc1": 0.6, "train/loss": math.nan, "weights/a": 0.3, "trial_id": "t1"},
        ]
    }
    close_stopped_children(uri, parent, reported)

    run = client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags[STOPPED_EARLY_TAG] == "true"
    # epoch 1 kept as rank 0 logged it (not twice), epoch 2 added; NaN and non-metric columns left out
    assert [(m.step, m.value) for m in client.get_metric_history(stopped, "val/acc1")] == [(1, 0.5), (2, 0.6)]
    assert set(run.data.metrics) == {"val/acc1", "weights/a"}
    other = client.get_run(finished)
    assert other.info.status == "FINISHED" and STOPPED_EARLY_TAG not in other.data.tags
    assert client.get_run(parent).info.status == "RUNNING"


def test_a_sweep_that_cannot_close_its_stopped_trials_says_so(tmp_path):
    """Marking stopped trials KILLED is best effort, but a failure is a warning, not silence."""
    from ray_aekd.distributed.sweep import _close_children

    lines: list[str] = []
    _close_children(f"sqlite:///{tmp_path / 'mlflow.db'}", "no-such-parent-run", None, lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: could not mark the stopped trials' MLflow runs KILLED")
    assert "no-such-parent-run" in lines[0]
