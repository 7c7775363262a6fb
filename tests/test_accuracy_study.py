"""The accuracy study (``benchmarks/accuracy.py``) end to end on its smoke setting: real digits,
teachers trained on Ray Tune, every strategy and seed through ``distill``, SQLite MLflow.

C is given (``--tolerance``) rather than tuned, to keep CI under its time budget: the tuning
sweep is ``run_sweep`` (tested in test_sweep.py) on a ``data.tuning_fraction`` split (tested in
test_data.py); the full study runs it."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

# end to end on Ray: `pytest -m "not slow"` leaves it out (CONTRIBUTING.md)
pytestmark = pytest.mark.slow

STUDY = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py"
LABELS = {"none", "average", "aekd_c0.6", "aekd_best", "mgda"}


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("accuracy_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _student_runs(client: MlflowClient, experiment: str) -> list:
    return [r for r in _runs(client, experiment) if "study.strategy" in r.data.tags]


def test_study_reports_every_strategy_over_seeds_from_its_runs_and_reuses_them(study, local_ray, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over --tracking-uri
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "--smoke",
        "--scenarios",
        "digits_biased",
        "--seeds",
        "0",
        "1",
        "--tolerance",
        "0.8",
        "--output-dir",
        str(out),
    ]
    assert study.main([*argv, "--tracking-uri", uri]) == 0

    report = json.loads((out / "results.json").read_text())
    assert report["invocations"][-1]["failed"] == [] and report["invocations"][-1]["machine"]["cpu_count"] >= 1
    result = report["scenarios"]["digits_biased"]
    best = result["best_tolerance"]
    # C = 0.8 is no other row's (0.6, 1): it gets a row of its own, and no sweep ran
    assert best == 0.8 and result["tolerance_given"] and result["best_same_as"] is None
    assert result["tuning_acc1"] == {} and not (out / "digits_biased" / "sweep").exists()
    table = result["summary"]["strategies"]
    assert set(table) == LABELS

    # the table is the runs' own last-epoch metrics, as MLflow has them, over both seeds
    client = MlflowClient(uri)
    runs = {
        (r.data.tags["study.strategy"], int(r.data.tags["study.seed"])): r
        for r in _student_runs(client, study.EXPERIMENT)
    }
    assert set(runs) == {(label, seed) for label in LABELS for seed in (0, 1)}
    for label, row in table.items():
        values = [runs[label, seed].data.metrics["val/acc1"] for seed in (0, 1)]
        assert row["val/acc1"]["values"] == pytest.approx(values)
        assert row["val/acc1"]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["val/acc1"]["std"] == pytest.approx(statistics.stdev(values))
        params = runs[label, 0].data.params
        strategy, tolerance, kd_weight = study.STRATEGIES[label]
        assert params["distill.strategy"] == strategy and float(params["distill.kd_weight"]) == kd_weight
        assert float(params["distill.tolerance"]) == (best if tolerance is None else tolerance)
        assert params["data.split_seed"] == "0" and params["data.tuning_fraction"] == "0.0"  # the evaluation split
    diff = result["summary"]["minus_average_acc1"]["aekd_c0.6"]
    per_seed = [
        runs["aekd_c0.6", s].data.metrics["val/acc1"] - runs["average", s].data.metrics["val/acc1"] for s in (0, 1)
    ]
    assert diff["mean"] == pytest.approx(statistics.fmean(per_seed)) and diff["wins"] == sum(d > 0 for d in per_seed)

    # every student read its seed's soft labels for the fixed split: 1438 train / 359 evaluation
    cache_manifest = out / "digits_biased" / "caches" / "seed0" / "manifest.json"
    student_manifest = json.loads(cache_manifest.read_text())
    assert (student_manifest["train_samples"], student_manifest["val_samples"]) == (1438, 359)

    # plots on disk and in the scenario's summary run, with the tables
    for name in ("accuracy", "conflict", "alpha_aekd_c0.6", "alpha_aekd_best", "alpha_mgda"):
        png = Path(result["plots"][name])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = client.get_run(result["summary_run_id"])
    logged = {a.path for a in client.list_artifacts(summary.info.run_id, "plots")}
    assert {"plots/accuracy.png", "plots/gradient_conflict.png", "plots/alpha_mgda.png"} <= logged
    assert summary.data.metrics["average/val/acc1/mean"] == pytest.approx(table["average"]["val/acc1"]["mean"])
    markdown = (out / "results.md").read_text()
    assert "| average |" in markdown and "| AE-KD, C = 0.8 (given) |" in markdown

    # run again: every teacher set, cache and student is reused, nothing is trained twice
    before = len(_runs(client, study.EXPERIMENT))  # teachers, students, summary
    assert study.main([*argv, "--tracking-uri", uri]) == 0
    assert len(_runs(client, study.EXPERIMENT)) == before
    assert json.loads(cache_manifest.read_text())["created"] == student_manifest["created"]
    again = json.loads((out / "results.json").read_text())["scenarios"]["digits_biased"]
    assert again["summary"] == result["summary"] and again["summary_run_id"] == result["summary_run_id"]
