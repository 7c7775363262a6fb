"""MLflow logging from processes that write to one SQLite store at the same moment, as a
sweep's trials do: every run keeps what it logged."""

from __future__ import annotations

import multiprocessing
import time

from mlflow.tracking import MlflowClient

from ray_aekd.tracking import dataset_input, experiment_id, log_dataset


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
