"""MLflow logging from processes that write to one SQLite store at the same moment, as a
sweep's trials do: every run keeps what it logged; and logging that does not hold up training."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from mlflow.tracking import MlflowClient

from ray_aekd.tracking.runs import RunLogger, dataset_input, experiment_id, log_dataset


def _open_run_with_input(args: tuple[str, str, float]) -> str:
    uri, digest, start = args
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "trials"))
    while time.time() < start:  # all processes insert the dataset together
        pass
    log_dataset(client, run.info.run_id, dataset_input("digits", digest, "sklearn", "training", {"samples": 1437}))
    return run.info.run_id


def test_trials_logging_the_same_dataset_at_once_all_keep_it_as_their_input(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("trials")
    run_ids = []
    # spawn: a fresh interpreter per process, as Ray's trial processes are
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        for round_ in range(4):  # without the retry about 4 in 10 of these lose the race
            start = time.time() + 2.0
            run_ids += pool.map(_open_run_with_input, [(uri, f"digest{round_}", start)] * 3)
    client = MlflowClient(uri)
    for run_id in run_ids:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] != []
        assert inputs[0].dataset.digest.startswith("digest")


def test_metrics_logged_in_the_background_arrive_in_order_and_a_lost_server_only_warns(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "background"))
    logger = RunLogger(uri, run.info.run_id, tmp_path)
    for step in (1, 2, 3):
        logger.log_metrics_later({"val/acc1": step / 10}, step=step)
    logger.flush()
    history = client.get_metric_history(run.info.run_id, "val/acc1")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    gone = RunLogger("http://127.0.0.1:9", run.info.run_id, tmp_path)  # nothing listens there
    with pytest.warns(RuntimeWarning, match="MLflow at http://127.0.0.1:9 failed while logging metrics"):
        gone.log_metrics_later({"val/acc1": 0.4}, step=4)
        gone.flush()  # the training loop goes on: no exception
    assert not gone.enabled and (tmp_path / "mlflow_failed.txt").exists()


def test_artifacts_of_a_local_store_live_next_to_its_database_not_in_the_working_directory(tmp_path, monkeypatch):
    """``ray job submit`` runs the driver in a temporary copy of the working directory; MLflow's
    default artifact root (``./mlruns``) would put the student model and plots there, lost with the job."""
    job_cwd = tmp_path / "working_dir_copy"
    job_cwd.mkdir()
    monkeypatch.chdir(job_cwd)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    client = MlflowClient(f"sqlite:///{db}")
    run = client.create_run(experiment_id(client, "my experiment"))
    client.log_text(run.info.run_id, "hello", "plots/note.txt")
    experiment_dir = tmp_path / "store" / "mlartifacts" / "my%20experiment"
    assert (experiment_dir / run.info.run_id / "artifacts" / "plots" / "note.txt").read_text() == "hello"
    assert not any(job_cwd.iterdir())
    assert experiment_id(client, "my experiment") == run.info.experiment_id  # found again, not created twice
