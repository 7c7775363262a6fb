"""``ray-aekd distill`` and ``quickstart`` end to end on the shared local Ray, with SQLite MLflow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from conftest import teacher_overrides
from mlflow.tracking import MlflowClient
from test_package import RAY_AEKD

from ray_aekd.cli.quickstart import run_quickstart
from ray_aekd.config import DistillConfig, load_config
from ray_aekd.core.step import evaluate
from ray_aekd.data import normalize, open_source, split_indices
from ray_aekd.distributed.distill import distill
from ray_aekd.models.checkpoint import load_checkpoint

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"


def smoke_config(teachers, tmp_path, *extra):
    return load_config(DistillConfig, SMOKE, [*teacher_overrides(teachers), f"output_dir={tmp_path / 'out'}", *extra])


@pytest.mark.slow
def test_two_workers_agree_log_everything_and_resume(local_ray, digits_teachers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = distill(smoke_config(digits_teachers, tmp_path, "tracking.register_model=smoke-student"), log=print)
    run_dir = Path(result.run_dir)

    # every worker computed the same AE-KD weights at every step, within [0, C]
    rank0, rank1 = ((run_dir / "alpha" / f"rank{r}.csv").read_text() for r in (0, 1))
    assert rank0 == rank1
    rows = [list(map(float, line.split(","))) for line in rank0.splitlines()[1:]]
    assert len(rows) == (1438 // 2) // 64  # 1,438 training images over 2 workers, 64 each per step, drop_last
    for row in rows:
        assert sum(row[2:]) == pytest.approx(1.0, abs=1e-6) and max(row[2:]) <= 0.7 + 1e-6

    # the exported student is the one that was evaluated
    student, meta = load_checkpoint(result.student_checkpoint, expect_num_classes=10)
    source = open_source("digits")
    _, val = split_indices(len(source), 0.2, seed=0)
    metrics, _ = evaluate(student, normalize(source.images[val], source.mean, source.std), source.labels[val])
    assert metrics["val/acc1"] == pytest.approx(result.metrics["val/acc1"], abs=1e-6)  # one sample is 3e-3
    assert meta.metrics["val/acc1"] == pytest.approx(result.metrics["val/acc1"])
    assert result.metrics["val/acc1"] > 0.3  # 11 steps from disagreeing teachers: 0.49-0.50 seen, chance is 0.1

    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"
    assert run.data.params["distill.strategy"] == "aekd" and run.data.params["distill.tolerance"] == "0.7"
    for name in ("train/loss", "train/ce", "train/kd", "val/acc1", "val/acc5", "val/loss", "val/agreement",
                 "val/ece", "weights/cnn_a", "teacher/mlp_c/val/acc1", "ensemble/val/acc1"):  # fmt: skip
        assert name in run.data.metrics, name
    weights = sum(run.data.metrics[f"weights/{n}"] for n in ("cnn_a", "cnn_b", "mlp_c"))
    assert weights == pytest.approx(1.0, abs=1e-6)
    artifacts = {
        a.path
        for folder in ("", "plots", "alpha", "checkpoint")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"plots/weights.png", "plots/cosine.png", "alpha/rank0.csv", "checkpoint/weights.safetensors", "cosine.json",
            "metrics.jsonl", "config.json"} <= artifacts  # fmt: skip
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    assert [v.run_id for v in client.search_model_versions("name='smoke-student'")] == [run.info.run_id]
    # the MLflow model is the exported student
    # the MLflow model takes [0, 1] images (its normalisation is inside it)
    x = normalize(source.images[val], source.mean, source.std)
    served = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    torch.testing.assert_close(served(source.images[val].float() / 255.0), student(x), rtol=1e-5, atol=1e-5)
    cosine = json.loads((run_dir / "cosine.json").read_text())["cosine"]
    assert all(cosine[i][i] == pytest.approx(1.0) for i in range(3)) and all(-1 <= c <= 1 for r in cosine for c in r)

    # the same run started again with more epochs resumes after epoch 1, in the same MLflow run
    lines: list[str] = []
    again = distill(
        smoke_config(digits_teachers, tmp_path, "train.epochs=2", "tracking.register_model=smoke-student"),
        log=lines.append,
    )
    assert again.mlflow_run_id == result.mlflow_run_id
    # the student saved after the resumed run is the epoch-2 one, not the one the first run exported
    _, resumed = load_checkpoint(again.student_checkpoint, expect_num_classes=10)
    assert resumed.metrics["val/acc1"] == pytest.approx(again.metrics["val/acc1"])
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [1, 2]
    rank0, rank1 = ((run_dir / "alpha" / f"rank{r}.csv").read_text() for r in (0, 1))
    assert rank0 == rank1 and {line.split(",")[1] for line in rank0.splitlines()[1:]} == {"0", "1"}
    assert len(rank0.splitlines()) == 1 + 2 * len(rows)
    assert run.data.params["train.epochs"] == "1"  # the params of the run as it was started

    # resuming it as another run (another C, another student) is refused, naming the keys
    other = smoke_config(
        digits_teachers, tmp_path, "train.epochs=3", "distill.tolerance=0.9", "student.model=digits_cnn"
    )
    with pytest.raises(ValueError, match=r"differ from it: distill.tolerance, student.model; allowed: only more"):
        distill(other)


def test_unreachable_mlflow_does_not_stop_training(local_ray, digits_teachers, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines: list[str] = []
    config = smoke_config(
        digits_teachers, tmp_path, "tracking.uri=http://127.0.0.1:9", "workers.num_workers=0", "name=offline"
    )
    result = distill(config, log=lines.append)
    assert result.mlflow_run_id is None
    assert any("MLflow at http://127.0.0.1:9 is not reachable" in line for line in lines)
    saved = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert saved[-1]["epoch"] == 1 and saved[-1]["val/acc1"] == result.metrics["val/acc1"]
    assert (Path(result.run_dir) / "student" / "weights.safetensors").exists()

    # the server never saw the run: `ray-aekd upload` to a reachable store creates it there
    from ray_aekd.tracking.upload import upload

    uri = f"sqlite:///{tmp_path / 'later.db'}"
    run_id = upload(result.run_dir, tracking_uri=uri, log=lines.append)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.metrics["val/acc1"] == result.metrics["val/acc1"]
    assert run.data.tags["ray_aekd.uploaded"] == "true" and run.data.tags["ray_aekd.torch"]
    assert (Path(result.run_dir) / "mlflow_run_id").read_text() == run_id


@pytest.mark.slow
def test_quickstart_smoke(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    lines: list[str] = []
    result = run_quickstart(output_dir=tmp_path / "qs", teacher_epochs=2, student_epochs=1, log=lines.append)
    table = lines[-1]
    for row in ("teacher cnn_a", "teacher mlp_c", "teacher ensemble", "student, average", "student, aekd"):
        assert row in table
    average, aekd = result.students["average"].metrics, result.students["aekd"].metrics
    assert [average[f"weights/{n}"] for n in ("cnn_a", "cnn_b", "mlp_c")] == pytest.approx([1 / 3] * 3)
    assert max(aekd[f"weights/{n}"] for n in ("cnn_a", "cnn_b", "mlp_c")) <= 0.6 + 1e-9
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ray-aekd-quickstart")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    assert names == ["cnn_a", "cnn_b", "mlp_c", "quickstart-aekd", "quickstart-average"]


@pytest.mark.slow
def test_distill_bad_input_is_one_line_before_ray(digits_teachers, tmp_path):
    base = ["distill", "--config", str(SMOKE), *[f"--set={s}" for s in teacher_overrides(digits_teachers)]]
    cases = [
        (
            ["--set", "distill.tolerance=0.2"],
            "distill.tolerance: got 0.2; allowed: a number in [1/M, 1] = [0.333333, 1]",
        ),
        (
            ["--set", "train.batch_size=127"],
            "train.batch_size: got 127; allowed: a multiple of workers.num_workers = 2",
        ),
        (
            ["--set", "teachers.1.checkpoint=/nonexistent"],
            "teachers.1.checkpoint: teacher 'cnn_b': /nonexistent is not a ray_aekd",
        ),
        (["--set", "distill.strategy=best"], "distill.strategy: got 'best'; allowed: average, aekd, mgda, upgrad"),
        (["--set", "student.model=resnet9000"], "student.model: Unknown model 'resnet9000'"),
    ]
    for extra, message in cases:
        proc = subprocess.run([RAY_AEKD, *base, *extra], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_teacher_that_does_not_fit_the_data_is_refused(digits_teachers, tmp_path):
    from ray_aekd.models import build_model
    from ray_aekd.models.checkpoint import CheckpointMetadata, save_checkpoint

    save_checkpoint(
        str(tmp_path / "wide"),
        build_model("digits_mlp", 12, in_channels=1),
        CheckpointMetadata(
            architecture="digits_mlp", num_classes=12, input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,), dataset="digits"
        ),  # fmt: skip
    )
    config = smoke_config(digits_teachers, tmp_path, f"teachers.2.checkpoint={tmp_path / 'wide'}")
    with pytest.raises(ValueError, match=r"teachers.2.checkpoint: 'mlp_c' was trained for 12 classes"):
        distill(config)


def test_hint_level_aekd_through_the_pipeline(local_ray, digits_teachers, tmp_path, monkeypatch):
    """Teacher stages emit their hint features; the student learns from logits and hints."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config(
        DistillConfig,
        SMOKE,
        [
            *teacher_overrides(digits_teachers, names=("cnn_a", "cnn_b")),
            f"output_dir={tmp_path / 'out'}",
            "student.model=digits_cnn",
            "distill.hint_weight=0.5",
            "workers.num_workers=0",
            "train.epochs=2",
        ],
    )
    result = distill(config, log=lambda line: None)
    epochs = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert 0 < epochs[1]["train/hint"] < epochs[0]["train/hint"]  # the regressors learn the teachers' features
    assert epochs[1]["train/kd"] < epochs[0]["train/kd"]
    bad = load_config(
        DistillConfig,
        SMOKE,
        [*teacher_overrides(digits_teachers), "student.model=digits_cnn", "distill.hint_weight=0.5"],
    )
    with pytest.raises(ValueError, match=r"cannot be regressed onto teacher 2 \(digits_mlp\)"):
        distill(bad)


def test_a_run_saved_before_a_config_key_existed_resumes_and_a_changed_split_does_not(digits_teachers, tmp_path):
    from ray_aekd.config import flatten
    from ray_aekd.distributed.distill import _check_resume

    config = smoke_config(digits_teachers, tmp_path)
    saved = json.loads(json.dumps(flatten(config)))
    for key in ("data.split_seed", "data.tuning_fraction"):  # a run folder from before these keys
        del saved[key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _check_resume(config, tmp_path, [])  # the defaults are what that run had: no error
    tuned = smoke_config(digits_teachers, tmp_path, "data.tuning_fraction=0.2")
    with pytest.raises(ValueError, match=r"these keys differ from it: data.tuning_fraction; allowed: only more"):
        _check_resume(tuned, tmp_path, [])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "check"),
    [
        (["distill.strategy=fixed", "distill.fixed_weights=[0.6, 0.4, 0.0]"], lambda w: w == [0.6, 0.4, 0.0]),
        (["distill.strategy=authors_svm", "distill.tolerance=0.6"], lambda w: max(w) <= 0.6 + 1e-6),
        (["distill.strategy=upgrad"], lambda w: min(w) >= 0 and sum(w) >= 1 - 1e-6),
    ],
    ids=["fixed", "authors_svm", "upgrad"],
)
def test_the_study_baselines_run_through_the_product(local_ray, digits_teachers, tmp_path, monkeypatch, extra, check):
    """Every strategy of the weighting study is one a config can name: the run's logged weights
    are the strategy's. (In local mode, to keep the suite short: the weights come from the
    all-reduced Gram, so workers agree for every strategy as the two-worker AE-KD test shows.)"""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = ["train.epochs=1", "workers.num_workers=0", *extra]
    result = distill(smoke_config(digits_teachers, tmp_path, *overrides), log=lambda line: None)
    rank0 = (Path(result.run_dir) / "alpha" / "rank0.csv").read_text()
    rows = [list(map(float, line.split(","))) for line in rank0.splitlines()[1:]]
    assert rows and all(check([round(w, 6) for w in row[2:]]) for row in rows), rows[:3]
    assert 0.0 < result.metrics["val/acc1"] <= 1.0
