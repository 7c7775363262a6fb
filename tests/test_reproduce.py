"""The same config and seed reproduce a run: bitwise with one worker, and within a stated
tolerance with two; every run records what it was made with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import teacher_overrides
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ray_aekd.config import DistillConfig, load_config
from ray_aekd.distributed.distill import distill

# end to end on Ray: `pytest -m "not slow"` leaves it out (CONTRIBUTING.md)
pytestmark = pytest.mark.slow

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"
# Two workers: the gradient all-reduce and the AE-KD statistics are sums of two partial sums, so
# floating-point reduction order is the only freedom; allowed difference after two epochs:
MULTI_WORKER_ATOL = 1e-5


def run(teachers, tmp_path, name, workers):
    overrides = [
        *teacher_overrides(teachers), f"output_dir={tmp_path / 'out'}", f"name={name}", "train.epochs=2",
        f"workers.num_workers={workers}", f"train.batch_size={64 * workers}", "data.deterministic=true",
    ]  # fmt: skip
    result = distill(load_config(DistillConfig, SMOKE, overrides), log=lambda line: None)
    run_dir = Path(result.run_dir)
    weights = load_file(str(run_dir / "student" / "weights.safetensors"))
    alpha = (run_dir / "alpha" / "rank0.csv").read_text()
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, weights, alpha, epochs


def test_one_worker_reproduces_bitwise_and_runs_record_their_environment(
    local_ray, digits_teachers, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    first, weights_a, alpha_a, epochs_a = run(digits_teachers, tmp_path, "once", 1)
    _, weights_b, alpha_b, epochs_b = run(digits_teachers, tmp_path, "again", 1)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bitwise
    assert alpha_a == alpha_b  # every step's weights
    for a, b in zip(epochs_a, epochs_b, strict=True):  # every epoch's metrics but the timings
        timed = ("epoch_seconds", "train/samples_per_second")
        assert {k: v for k, v in a.items() if k not in timed} == {k: v for k, v in b.items() if k not in timed}

    # the resolved config, the versions and the commit are kept with the run
    run_dir = Path(first.run_dir)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__.split("+")[0] and env["ray"] and env["ray_aekd"] and env["python"]
    assert "git_commit" in env
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train.epochs"] == 2 and saved["data.deterministic"] is True
    tags = MlflowClient(uri).get_run(first.mlflow_run_id).data.tags
    assert tags["ray_aekd.version"] == env["ray_aekd"] and tags["ray_aekd.torch"] == env["torch"]
    assert tags.get("ray_aekd.git_commit") == env["git_commit"]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(first.mlflow_run_id)}
    assert {"environment.json", "config.json"} <= artifacts


def test_two_workers_reproduce_within_reduction_order(local_ray, digits_teachers, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, weights_a, _, epochs_a = run(digits_teachers, tmp_path, "two-a", 2)
    _, weights_b, _, epochs_b = run(digits_teachers, tmp_path, "two-b", 2)
    largest = max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a)
    print(f"two workers: largest weight difference between the runs {largest:.3g}")
    assert largest <= MULTI_WORKER_ATOL
    assert len(epochs_a) == len(epochs_b) == 2
