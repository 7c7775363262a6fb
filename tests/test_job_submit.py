"""`ray-aekd distill` submitted with `ray job submit` to a running (token-authenticated) Ray head."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import teacher_overrides
from mlflow.tracking import MlflowClient
from ray_head import ray_head

# end to end on Ray: `pytest -m "not slow"` leaves it out (CONTRIBUTING.md)
pytestmark = pytest.mark.slow

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def test_distill_runs_unchanged_as_a_ray_job(digits_teachers, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    shutil.copy(SMOKE, workdir / "distill_smoke.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        "ray-aekd", "distill", "--config", "distill_smoke.yaml",
        *[f"--set={item}" for item in teacher_overrides(digits_teachers)],
        f"--set=output_dir={tmp_path / 'out'}", "--set=name=as-a-job",
    ]  # fmt: skip
    with ray_head(tmp_path) as env:
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(
            [RAY, "job", "list", "--address", env["RAY_ADDRESS"]],
            env=no_token | {"HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0  # authentication is on: no token, no job server
        proc = subprocess.run(
            [RAY, "job", "submit", "--address", env["RAY_ADDRESS"], "--working-dir", str(workdir),
             "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}), "--", *command],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    assert "[ray-aekd] as-a-job epoch 1/1" in proc.stdout  # the progress line reaches the submitter
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-aekd-smoke").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("as-a-job", "FINISHED")]
    assert 0 < runs[0].data.metrics["val/acc1"] <= 1
    assert (tmp_path / "out" / "as-a-job" / "student" / "weights.safetensors").exists()
