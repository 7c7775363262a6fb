"""Fault injection (``faults`` / ``RAY_AEKD_FAULTS``): a run survives a killed Train worker, a
killed teacher actor and a tracking server that goes away, on the shared local Ray."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import teacher_overrides
from mlflow.tracking import MlflowClient
from test_package import RAY_AEKD

from ray_aekd.config import ConfigError, DistillConfig, load_config, with_env_faults
from ray_aekd.distributed.distill import distill

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"
TRAIN, VAL = 1438, 359  # digits split sizes with val_fraction 0.2


def smoke(teachers, tmp_path, *extra):
    return load_config(DistillConfig, SMOKE, [*teacher_overrides(teachers), f"output_dir={tmp_path / 'out'}", *extra])


def epochs_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_killed_train_worker_restarts_from_its_checkpoint(local_ray, digits_teachers, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # from the environment, as a drill on a real cluster would: rank 1 dies before step 15, in
    # epoch 2 (11 steps per epoch: 2 workers x 64 samples per step, 1438 samples)
    monkeypatch.setenv("RAY_AEKD_FAULTS", "{kill_worker_rank: 1, kill_worker_step: 15}")
    lines: list[str] = []
    config = smoke(digits_teachers, tmp_path, "train.epochs=3", "workers.max_failures=1", "name=worker-kill")
    result = distill(config, log=lines.append)
    run_dir = Path(result.run_dir)
    assert (run_dir / "faults" / "kill_worker.fired").exists()  # the worker really died
    assert any("fault injection on: kill Train worker rank 1 before step 15" in line for line in lines)
    # all epochs, each once, in the run folder and in MLflow: one continuous history
    rows = epochs_of(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [11, 22, 33]
    history = MlflowClient(uri).get_metric_history(result.mlflow_run_id, "val/acc1")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert MlflowClient(uri).get_run(result.mlflow_run_id).info.status == "FINISHED"
    # the per-step weights of the restarted epoch replaced the lost ones: 33 steps, no gaps
    steps = [int(line.split(",")[0]) for line in (run_dir / "alpha" / "rank0.csv").read_text().splitlines()[1:]]
    assert steps == list(range(33))
    assert all(r["train/samples"] == r["train/distinct_samples"] == 1408 for r in rows)
    assert all(r["train/repeated_samples"] == 0 for r in rows)
    assert (run_dir / "student" / "weights.safetensors").exists()


@pytest.mark.slow
def test_a_killed_teacher_actor_is_restarted_and_no_sample_is_lost(local_ray, digits_teachers, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # cnn_a runs as an actor pool; the actor that receives the stage's 3rd batch of the run dies
    # before running it: the validation pass has 2 batches of 256, so it is the training pass's first
    config = smoke(
        digits_teachers, tmp_path, "teachers.0.stage=actors", "faults.kill_teacher=cnn_a",
        "faults.kill_teacher_batch=3", "train.epochs=2", "workers.num_workers=0", "name=teacher-kill",
    )  # fmt: skip
    result = distill(config, log=print)
    run_dir = Path(result.run_dir)
    assert (run_dir / "faults" / "kill_teacher.fired").exists()
    # every sample went through every teacher exactly once per epoch (counted by the stages):
    # the killed actor's batch was retried by its restarted actor, once
    assert result.teacher_forward_passes == {n: 2 * TRAIN + VAL for n in ("cnn_a", "cnn_b", "mlp_c")}
    rows = epochs_of(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train/samples"] == r["train/distinct_samples"] == 1408 for r in rows)
    assert all(r["train/repeated_samples"] == 0 for r in rows)


@pytest.mark.slow
def test_mlflow_going_away_keeps_the_run_and_upload_fills_it_in(local_ray, digits_teachers, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = smoke(
        digits_teachers, tmp_path, "faults.mlflow_down_epoch=2", "train.epochs=3", "workers.num_workers=0",
        "name=mlflow-down",
    )  # fmt: skip
    lines: list[str] = []
    result = distill(config, log=lines.append)
    run_dir = Path(result.run_dir)
    assert [r["epoch"] for r in epochs_of(run_dir)] == [1, 2, 3]  # training finished, all kept locally
    # the driver says what happened on rank 0, and how to finish the job
    warning = [line for line in lines if "MLflow at http://127.0.0.1:9 failed while logging metrics" in line]
    assert warning and f"`ray-aekd upload {run_dir}` logs it when the server is back" in warning[0]
    client = MlflowClient(uri)
    run_id = result.mlflow_run_id
    assert [m.step for m in client.get_metric_history(run_id, "val/acc1")] == [1]  # the server went away
    assert client.get_run(run_id).info.status == "RUNNING"

    proc = subprocess.run([RAY_AEKD, "upload", str(run_dir)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 epoch(s) logged (1 were there already)" in proc.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "val/acc1")
    assert sorted(m.step for m in history) == [1, 2, 3]  # one continuous history, no duplicate
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [r["val/acc1"] for r in epochs_of(run_dir)]
    assert run.data.metrics["teacher_forward_passes"] == 3 * (3 * TRAIN + VAL)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoint", "plots", "alpha", "metrics.jsonl"}
    # a second upload adds nothing
    again = subprocess.run([RAY_AEKD, "upload", str(run_dir), "--tracking-uri", uri], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert "0 epoch(s) logged (3 were there already)" in again.stdout, again.stderr[-2000:]
    assert len(client.get_metric_history(run_id, "val/acc1")) == 3
    assert not (run_dir / "mlflow_failed.txt").exists()  # uploaded: nothing left to say


@pytest.mark.slow
def test_non_finite_teacher_logits_stop_the_run_naming_the_teacher(local_ray, digits_teachers, tmp_path, capsys):
    """A teacher whose finite weights overflow to Inf on some real images, but not on the two that
    the checks before Ray run it on (they catch a teacher that is never finite): the first
    training step does, on the Train worker, and the command says which teacher and which step in
    one line (exit status 1). With a restart allowed, the restarted worker group does not train on
    into the same NaN: it returns at once and the run stops."""
    from ray_aekd.cli import main
    from ray_aekd.data.sources import digits_source
    from ray_aekd.models.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(digits_teachers["mlp_c"])
    pixel = 54  # blank in the source's first two images, inked in about half of all digits
    assert int(digits_source().images[:2].flatten(1)[:, pixel].max()) == 0
    with torch.no_grad():  # hidden unit 0 fires (hugely) only where that pixel is inked
        model.body[1].weight[0].zero_()
        model.body[1].weight[0, pixel] = 1e20
        model.body[1].bias[0] = 0.5e20  # normalised blank pixel: (0 - 0.3) / 0.4 = -0.75 -> -0.25e20, ReLU 0
        model.head.weight[:, 0] = 1e30  # 1e30 x >= 1e19 overflows float32
    save_checkpoint(str(tmp_path / "overflow"), model, meta)
    overrides = [*teacher_overrides(digits_teachers), f"teachers.2.checkpoint={tmp_path / 'overflow'}",
                 f"output_dir={tmp_path / 'out'}", "workers.num_workers=1", "train.batch_size=64", "name=nan",
                 "workers.max_failures=1",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    code = main(["distill", "--config", str(SMOKE), *[f"--set={item}" for item in overrides]])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last == (
        "ray-aekd distill: stopped: teacher 'mlp_c' produced non-finite logits (NaN or Inf) at step 0 (epoch 1); "
        "stopping. Check that teacher's checkpoint and inputs."
    )


def test_faults_from_the_environment_are_checked_like_config_keys(digits_teachers, tmp_path):
    config = smoke(digits_teachers, tmp_path)
    assert not config.faults.active
    on = with_env_faults(config, {"RAY_AEKD_FAULTS": "{kill_teacher: cnn_b, kill_teacher_batch: 2}"})
    assert (on.faults.kill_teacher, on.faults.kill_teacher_batch) == ("cnn_b", 2)
    for raw, message in [
        ("{kill_teacher: nobody}", r"RAY_AEKD_FAULTS: faults.kill_teacher: got 'nobody'; allowed: one of the teachers"),
        ("{kill_worker_rank: 2}", r"faults.kill_worker_rank: got 2; allowed: a rank below workers.num_workers = 2"),
        ("{kill_wroker_rank: 1}", r"RAY_AEKD_FAULTS: faults: unknown key\(s\) kill_wroker_rank"),
        ("[1, 2]", r"RAY_AEKD_FAULTS: got '\[1, 2\]'; allowed: a YAML mapping"),
        ("{mlflow_down_epoch: 0}", r"faults.mlflow_down_epoch: got 0; allowed: an integer >= 1"),
        ("{mlflow_down_epoch: 2}", r"faults.mlflow_down_epoch: got 2; allowed: an epoch of the run \(1 to train"),
    ]:
        with pytest.raises(ConfigError, match=message):
            with_env_faults(config, {"RAY_AEKD_FAULTS": raw})
    # a teacher fault in a run that reads the soft-label cache could never fire
    cached = smoke(digits_teachers, tmp_path, "cache.path=/tmp/cache", "data.views=2")
    with pytest.raises(ConfigError, match=r"faults.kill_teacher: got 'cnn_a'; allowed: null when cache.path is set"):
        with_env_faults(cached, {"RAY_AEKD_FAULTS": "{kill_teacher: cnn_a}"})


def test_a_worker_fault_past_the_last_step_is_refused_before_ray(digits_teachers, tmp_path, capsys):
    from ray_aekd.cli import main

    overrides = [*teacher_overrides(digits_teachers), f"output_dir={tmp_path / 'out'}",
                 "faults={kill_worker_rank: 0, kill_worker_step: 11}"]  # fmt: skip
    assert main(["distill", "--config", str(SMOKE), *[f"--set={item}" for item in overrides]]) == 2
    assert capsys.readouterr().err.strip() == (
        "ray-aekd distill: error: faults.kill_worker_step: got 11; allowed: a step of the run, 0 to 10 "
        "(1 epoch(s) of 11 steps): the fault could never fire."
    )
    assert not (tmp_path / "out").exists()
