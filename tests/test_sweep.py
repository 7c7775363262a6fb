"""``ray-aekd sweep`` end to end on the shared local Ray: trials, MLflow parent and children,
the soft-label cache made once, and ``ray-aekd compare`` on the result."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from conftest import teacher_overrides
from mlflow.tracking import MlflowClient

from ray_aekd.cli import main
from ray_aekd.config.sweep import load_sweep
from ray_aekd.distributed.sweep import run_sweep
from ray_aekd.models.checkpoint import load_checkpoint

# end to end on Ray: `pytest -m "not slow"` leaves it out (CONTRIBUTING.md)
pytestmark = pytest.mark.slow

SWEEP_SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "sweep_smoke.yaml"
NUM_TRAIN, NUM_VAL = 1438, 359


def test_smoke_sweep_logs_a_parent_with_its_trials_and_compare_ranks_them(
    local_ray, digits_teachers, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    teachers = teacher_overrides(digits_teachers)[0].replace("teachers=", "overrides.teachers=")
    sweep, base = load_sweep(str(SWEEP_SMOKE), [teachers, f"output_dir={tmp_path / 'sweeps'}"])
    result = run_sweep(sweep, base)

    # two trials, C = 1/3 and C = 1 for M = 3 teachers; both finished with a student
    assert sorted(t["values"]["distill.tolerance_fraction"] for t in result.trials) == [0.0, 1.0]
    assert [t["status"] for t in result.trials] == ["FINISHED", "FINISHED"]
    # the teachers ran once per sample and view (2 views) and once on the validation split; no trial ran them
    assert result.relabel_forward_passes == 3 * (NUM_TRAIN * 2 + NUM_VAL)
    assert [t["teacher_forward_passes"] for t in result.trials] == [0, 0]
    assert result.teacher_forward_passes == result.relabel_forward_passes
    best = result.best
    assert best is not None and best["metrics"]["val/acc1"] == max(t["metrics"]["val/acc1"] for t in result.trials)
    student, _ = load_checkpoint(best["student_checkpoint"], expect_num_classes=10)
    assert sum(p.numel() for p in student.parameters()) > 0
    out = capsys.readouterr().out
    assert f"best student checkpoint: {best['student_checkpoint']}" in out
    assert "epoch 1/1  val/acc1" in out  # a progress line per trial and epoch

    client = MlflowClient(uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-smoke"
    assert parent.data.tags["ray_aekd.sweep"] == "true"
    assert parent.data.params["space.distill.tolerance_fraction"] == '{"grid": [0.0, 1.0]}'
    assert float(parent.data.params["best.distill.tolerance_fraction"]) == best["values"]["distill.tolerance_fraction"]
    assert parent.data.metrics["val/acc1"] == pytest.approx(best["metrics"]["val/acc1"])
    assert parent.data.tags["ray_aekd.best_run_id"] == best["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "summary.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/acc1_vs_tolerance.png", "plots/acc1_vs_temperature.png"}
    table = list(csv.DictReader(io.StringIO((tmp_path / "sweeps" / "sweep-smoke" / "trials.csv").read_text())))
    assert len(table) == 2 and sorted(float(r["C"]) for r in table) == pytest.approx([1 / 3, 1.0])

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        fraction = float(child.data.params["sweep.distill.tolerance_fraction"])
        assert float(child.data.params["distill.tolerance"]) == pytest.approx(1 / 3 + fraction * 2 / 3)
        # the metrics of a plain distillation run
        for name in ("val/acc1", "val/agreement", "val/ece", "train/loss", "weights/cnn_a", "ensemble/val/acc1"):
            assert name in child.data.metrics, name
        assert child.data.metrics["teacher_forward_passes"] == 0
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc1")] == [1]

    # compare ranks the sweep's trials from MLflow and saves a plot
    assert main(["compare", "--sweep", parent.info.run_id, "--output-dir", str(tmp_path / "cmp")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["rank", "run", "strategy", "C", "T"]
    assert lines[1].split()[1] == best["name"] and lines[1].split()[0] == "1"
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
