"""``ray-aekd teachers`` end to end on digits, on the shared local Ray, with a SQLite MLflow store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from test_package import RAY_AEKD

from ray_aekd.config import TeachersConfig, load_config
from ray_aekd.distributed.teachers import train_teachers
from ray_aekd.models.checkpoint import load_checkpoint
from ray_aekd.tracking.runs import local_checkpoint_path

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "teachers_smoke.yaml"


@pytest.mark.slow
def test_teachers_train_checkpoint_and_log(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns next to the SQLite store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = load_config(TeachersConfig, SMOKE, [f"output_dir={tmp_path / 'teachers'}"])
    lines: list[str] = []
    result = train_teachers(config, log=lines.append)

    assert set(result.teachers) == {"a", "b"}
    # real learning on real data: the MLP teacher is far above chance (10 %) after 2 epochs
    assert result.teachers["a"]["val/acc1"] > 0.3
    assert 0.0 <= result.disagreement <= 1.0 and "ensemble" in lines[-1]
    for name in ("a", "b"):
        model, meta = load_checkpoint(str(tmp_path / "teachers" / name), expect_num_classes=10)
        assert meta.dataset == "digits" and meta.input_shape == (1, 8, 8)
        assert meta.metrics["val/acc1"] == pytest.approx(result.teachers[name]["val/acc1"], abs=1e-6)
    summary = json.loads((tmp_path / "teachers" / "summary.json").read_text())
    assert summary["ensemble_acc1"] == pytest.approx(result.ensemble_acc1)

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-aekd-smoke").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["train.epochs"] == "2" and run.data.params["teacher.name"] == run.info.run_name
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert artifacts == {"checkpoint/metadata.json", "checkpoint/weights.safetensors"}
        # the logged checkpoint loads straight from its MLflow URI
        _, meta = load_checkpoint(local_checkpoint_path(f"runs:/{run.info.run_id}/checkpoint"))
        assert meta.metrics["val/acc1"] == pytest.approx(result.teachers[run.info.run_name]["val/acc1"], abs=1e-6)


def test_more_gpus_than_the_cluster_has_is_refused_at_once(local_ray, tmp_path):
    config = load_config(TeachersConfig, SMOKE, ["trials.gpus=1", f"output_dir={tmp_path / 'never'}"])
    with pytest.raises(ValueError, match=r"trials.gpus = 1 .* need 1 GPU\(s\), but this Ray cluster has 0"):
        train_teachers(config)
    assert not (tmp_path / "never").exists()


def test_cli_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  - {name: a, model: resnet8}\ntrain: {epochs: 0}\n")
    proc = subprocess.run([RAY_AEKD, "teachers", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.epochs: got 0; allowed: an integer >= 1" in proc.stderr


def test_teachers_that_do_not_fit_the_data_are_refused_before_ray(tmp_path):
    config = load_config(TeachersConfig, SMOKE, ["teachers.0.noisy_classes=[2, 42]"])
    with pytest.raises(ValueError, match=r"teachers.0.noisy_classes: got \[42\]; allowed: class indices below 10"):
        train_teachers(config)
    for label in ("x", "y"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (12, 10)).save(tmp_path / label / f"{i}.png")
    folder = load_config(
        TeachersConfig, SMOKE, ["data.dataset=imagefolder", f"data.path={tmp_path}", "teachers.0.noisy_classes=[0]"]
    )
    with pytest.raises(ValueError, match=r"teachers.0.model: 'digits_mlp' does not run on imagefolder images"):
        train_teachers(folder)
