"""``ray-aekd teachers`` survives a teacher's process dying: Tune restarts the trial, which resumes
from the checkpoint it reported with its last epoch, on the shared local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ray_aekd.config import ConfigError, TeachersConfig, load_config, with_env_faults
from ray_aekd.distributed.teachers import train_teachers
from ray_aekd.models.checkpoint import load_checkpoint, read_state_dict

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "teachers_smoke.yaml"
# the smoke config's teacher b, and a twin of it (same model, seed and data) that nobody kills:
# b resumed from its checkpoint must end where an uninterrupted b ends
TEACHERS = (
    "teachers=[{name: b, model: digits_cnn, seed: 2, subset_fraction: 0.5}, "
    "{name: b_twin, model: digits_cnn, seed: 2, subset_fraction: 0.5}]"
)


def _trial_epochs(tune_dir: Path) -> dict[str, list[int]]:
    """Teacher name -> the epochs its Tune trial reported, in order, across restarts."""
    out = {}
    for result in tune_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        names = [t["name"] for t in rows[0]["config"]["config"]["teachers"]]
        out[names[rows[0]["config"]["teacher"]]] = [r["epoch"] for r in rows]
    return out


def _trial_output(ray) -> str:
    """What the Ray workers of this session printed (the test session's Ray does not echo it)."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "".join(path.read_text(errors="replace") for path in logs.glob("worker-*.out"))


@pytest.mark.slow
def test_a_killed_teacher_trial_resumes_from_its_checkpoint(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns next to the SQLite store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # from the environment, as a drill would: b's process dies just after it reported epoch 1
    monkeypatch.setenv("RAY_AEKD_TEACHER_FAULTS", "{kill_teacher: b, kill_teacher_epoch: 1}")
    out = tmp_path / "teachers"
    config = load_config(TeachersConfig, SMOKE, [TEACHERS, f"output_dir={out}"])
    assert config.train.epochs == 2 and config.trials.max_failures == 2  # the smoke config, the default
    lines: list[str] = []
    result = train_teachers(config, log=lines.append)

    assert (out / "faults" / "kill_teacher.fired").exists()  # b's process really died
    assert "fault injection on: kill the trial process of teacher 'b' after its epoch 1" in lines
    assert (
        "[ray-aekd] teacher b failed (restart 1, trials.max_failures: at most 2); restarting it from its "
        "checkpoint after epoch 1"
    ) in lines
    assert "[ray-aekd] teacher b resuming from its checkpoint after epoch 1" in _trial_output(local_ray)
    # every teacher reported each epoch once: b went on at epoch 2 instead of starting again at 1
    assert _trial_epochs(out / "_tune" / "teachers") == {"b": [1, 2], "b_twin": [1, 2]}

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-aekd-smoke").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["b", "b_twin"]  # one run for b across its restart
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [1, 2]

    # b's final checkpoint loads, and b scores as its uninterrupted twin, with the same weights: the
    # model, optimizer, schedule, sample order and RNG all came back from the checkpoint
    b, meta = load_checkpoint(str(out / "b"), expect_num_classes=10, expect_input_shape=(1, 8, 8))
    twin, _ = load_checkpoint(str(out / "b_twin"))
    assert result.teachers["b"]["val/acc1"] == pytest.approx(result.teachers["b_twin"]["val/acc1"], abs=1e-6)
    assert meta.metrics["val/acc1"] == pytest.approx(result.teachers["b"]["val/acc1"], abs=1e-6)
    for name, tensor in b.state_dict().items():
        torch.testing.assert_close(tensor, twin.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    # the Tune checkpoint a restart reads holds tensors and plain data only
    saved = next((out / "_tune" / "teachers").glob("*/checkpoint_*/state.pt"))
    state = read_state_dict(saved.read_bytes(), saved.name, "b's Tune checkpoint")  # weights_only: no code
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "metrics", "order_rng", "rng"}


def test_teacher_faults_from_the_environment_are_checked_like_config_keys():
    config = load_config(TeachersConfig, SMOKE)
    assert not config.faults.active
    on = with_env_faults(config, {"RAY_AEKD_TEACHER_FAULTS": "{kill_teacher: a, kill_teacher_epoch: 2}"})
    assert (on.faults.kill_teacher, on.faults.kill_teacher_epoch) == ("a", 2)
    # a distillation's faults variable is not the teachers'
    assert with_env_faults(config, {"RAY_AEKD_FAULTS": "{kill_worker_rank: 1}"}) == config
    for raw, message in [
        ("{kill_teacher: c}", r"RAY_AEKD_TEACHER_FAULTS: faults.kill_teacher: got 'c'; allowed: one of the teachers"),
        ("{kill_teacher: a, kill_teacher_epoch: 3}",
         r"faults.kill_teacher_epoch: got 3; allowed: an epoch of the run \(1 to train.epochs = 2\)"),
        ("{kill_teacher_epoch: 0}", r"faults.kill_teacher_epoch: got 0; allowed: an integer >= 1"),
        ("{kill_worker_rank: 1}", r"RAY_AEKD_TEACHER_FAULTS: faults: unknown key\(s\) kill_worker_rank"),
        ("[1]", r"RAY_AEKD_TEACHER_FAULTS: got '\[1\]'; allowed: a YAML mapping"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            with_env_faults(config, {"RAY_AEKD_TEACHER_FAULTS": raw})
