"""A small run costs its work: one Train worker runs in this process (Train's local mode),
repeating views are made once with their teachers' logits and kept in Ray's object store, the
console holds the product's lines and the rest goes to a log file, and the run records where
its time went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import teacher_overrides
from mlflow.tracking import MlflowClient

from ray_aekd.config import DistillConfig, load_config
from ray_aekd.distributed.distill import distill
from ray_aekd.models.checkpoint import load_checkpoint

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"
NUM_TRAIN, NUM_VAL = 1438, 359  # digits at val_fraction 0.2


def one_worker(teachers, tmp_path, *extra):
    return load_config(
        DistillConfig,
        SMOKE,
        [*teacher_overrides(teachers), f"output_dir={tmp_path / 'out'}", "workers.num_workers=1", "data.views=2",
         "data.deterministic=true", *extra],
    )  # fmt: skip


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_worker_runs_here_reuses_its_views_is_quiet_and_resumes(
    local_ray, digits_teachers, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = distill(one_worker(digits_teachers, tmp_path, "train.epochs=3"), log=print)
    run_dir = Path(result.run_dir)
    out = capsys.readouterr().out.splitlines()

    # 3 epochs over 2 views: each teacher ran once per view and once on the validation split, not per epoch
    assert result.teacher_forward_passes == {n: 2 * NUM_TRAIN + NUM_VAL for n in ("cnn_a", "cnn_b", "mlp_c")}
    assert [e["epoch"] for e in _epochs(run_dir)] == [1, 2, 3]
    assert any("in this process (Ray Train's local mode)" in line for line in out)
    assert any("once over 2 view(s) of the training split, kept in Ray's object store" in line for line in out)
    # the console: the product's lines, one per epoch; Ray's and MLflow's records are in the log file it names
    assert [line.split("  ")[0] for line in out if " epoch " in line] == [
        f"[ray-aekd] smoke epoch {e}/3" for e in (1, 2, 3)
    ]
    assert not [line for line in out if " INFO " in line or "WARNING" in line or "pid=" in line]
    log_file = run_dir / "ray_aekd.log"
    assert f"Ray's and MLflow's logs: {log_file} (--verbose shows them here)" in out
    assert "mlflow" in log_file.read_text()
    # where the time went: the phases add up to the wall time, and the steps are a share of it
    timings = json.loads((run_dir / "result.json").read_text())["timings"]
    assert timings["epochs"] == 3 and 0 < timings["steps"] < timings["total"]
    parts = ("prepare", "ray_start", "teachers", "mlflow_open", "fit", "other")
    assert sum(timings[k] for k in parts) == pytest.approx(timings["total"], abs=0.01)
    assert timings["training_share"] == pytest.approx(timings["steps"] / timings["total"], abs=1e-3)

    # started again with more epochs, it resumes from the checkpoint it wrote itself (local mode keeps none)
    again = distill(one_worker(digits_teachers, tmp_path, "train.epochs=5"), log=print)
    out = capsys.readouterr().out
    assert "resuming smoke from its last checkpoint" in out
    assert [e["epoch"] for e in _epochs(run_dir)] == [1, 2, 3, 4, 5]
    assert again.mlflow_run_id == result.mlflow_run_id
    history = MlflowClient(uri).get_metric_history(result.mlflow_run_id, "val/acc1")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert (tmp_path / "out" / "_train" / "smoke" / "checkpoint_local" / "state.pt").exists()
    _, resumed = load_checkpoint(again.student_checkpoint, expect_num_classes=10)  # the epoch-5 student
    assert resumed.metrics["val/acc1"] == pytest.approx(again.metrics["val/acc1"])


@pytest.mark.slow
def test_views_kept_in_memory_train_exactly_as_the_streaming_teachers(local_ray, digits_teachers, tmp_path):
    """The kept views are the same pixels and logits the teachers compute every epoch when streaming."""
    runs = {}
    for mode in ("memory", "stream"):
        result = distill(one_worker(digits_teachers, tmp_path, "train.epochs=3", f"cache.mode={mode}", f"name={mode}"))
        runs[mode] = (_epochs(Path(result.run_dir)), (Path(result.run_dir) / "alpha" / "rank0.csv").read_text())
        # memory: once per view (2); stream: once per epoch (3)
        assert result.teacher_forward_passes["cnn_a"] == (2 if mode == "memory" else 3) * NUM_TRAIN + NUM_VAL
    (memory, alpha_memory), (stream, alpha_stream) = runs["memory"], runs["stream"]
    assert alpha_memory == alpha_stream  # every step's AE-KD weights
    for key in ("train/loss", "val/acc1", "val/agreement", "weights/cnn_a"):
        assert [e[key] for e in memory] == [e[key] for e in stream], key
