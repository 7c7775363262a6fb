"""``ray-aekd quickstart``: the whole product on one machine, no network, a few minutes.

1. Train three small teachers on scikit-learn's bundled digits, each with noisy labels on its
   own four classes and 80 % of the training split, so that they disagree (``ray-aekd
   teachers``; reused when ``output_dir/teachers`` already holds them for the same settings).
2. Distil a student from them twice on Ray, with ``average`` and with ``aekd`` weighting
   (``ray-aekd distill``), each logged as one MLflow run.
3. Print the teachers, the ensemble and both students side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray_aekd._console import LOG_FILE, capture_logs
from ray_aekd.config import ConfigError, DistillConfig, TeachersConfig, canonicalize, from_dict
from ray_aekd.distributed.distill import DistillResult, distill
from ray_aekd.distributed.session import connect
from ray_aekd.distributed.teachers import TeachersResult, train_teachers

__all__ = ["QuickstartResult", "format_quickstart", "run_quickstart", "teachers_config"]

EXPERIMENT = "ray-aekd-quickstart"

TEACHERS: list[dict[str, Any]] = [
    {"name": "cnn_a", "model": "digits_cnn", "seed": 1, "label_noise": 0.4, "noisy_classes": [0, 1, 2, 3]},
    {"name": "cnn_b", "model": "digits_cnn", "seed": 2, "label_noise": 0.4, "noisy_classes": [3, 4, 5, 6]},
    {"name": "mlp_c", "model": "digits_mlp", "seed": 3, "label_noise": 0.4, "noisy_classes": [6, 7, 8, 9]},
]


@dataclasses.dataclass
class QuickstartResult:
    teachers: TeachersResult | None  # None when reused
    teacher_acc1: dict[str, float]
    ensemble_acc1: float
    students: dict[str, DistillResult]
    seconds: float


def teachers_config(output_dir: Path, epochs: int, seed: int) -> TeachersConfig:
    return from_dict(
        TeachersConfig,
        {
            "seed": seed,
            "output_dir": str(output_dir / "teachers"),
            "data": {"dataset": "digits", "val_fraction": 0.2},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
            "trials": {"cpus": 0.5},
            "tracking": {"experiment": EXPERIMENT},
            "teachers": [dict(t, subset_fraction=0.8) for t in TEACHERS],
        },
    )


def distill_config(output_dir: Path, strategy: str, epochs: int, seed: int, workers: int) -> DistillConfig:
    return from_dict(
        DistillConfig,
        {
            "name": f"quickstart-{strategy}",
            "seed": seed,
            "output_dir": str(output_dir / "students"),
            # blocks in a fixed order: the quickstart prints the same table on every run; 5 augmented views,
            # each made once with its teachers' logits, kept in Ray's object store and read by 4 of the 20 epochs
            "data": {"dataset": "digits", "val_fraction": 0.2, "deterministic": True, "views": 5},
            "student": {"model": "digits_mlp"},
            "distill": {"strategy": strategy, "tolerance": 0.6, "temperature": 4.0},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
            "workers": {"num_workers": workers, "cpus": 0.5},
            "tracking": {"experiment": EXPERIMENT},
            "teachers": [{"name": t["name"], "checkpoint": str(output_dir / "teachers" / t["name"])} for t in TEACHERS],
        },
    )


def _reusable_teachers(config: TeachersConfig) -> dict[str, Any] | None:
    """The summary of teachers trained earlier with exactly this config, if any."""
    folder = Path(config.output_dir)
    try:
        saved = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:  # a folder saved under older key names (resources.cpus_per_teacher, ...) still matches
        if from_dict(TeachersConfig, canonicalize(TeachersConfig, saved, warn=False)) != config:
            return None
    except ConfigError:
        return None
    if not all((folder / t["name"] / "metadata.json").exists() for t in TEACHERS):
        return None
    return summary


def run_quickstart(
    output_dir: str | Path = "runs/quickstart",
    teacher_epochs: int = 30,
    student_epochs: int = 20,
    workers: int = 1,
    seed: int = 0,
    strategies: Sequence[str] = ("average", "aekd"),
    log: Callable[[str], None] = print,
) -> QuickstartResult:
    """Teachers (trained or reused), then one student per strategy; returns everything measured."""
    for key, value, low in (("--teacher-epochs", teacher_epochs, 1), ("--student-epochs", student_epochs, 1),
                            ("--workers", workers, 0), ("--seed", seed, 0)):  # fmt: skip
        if value < low:
            raise ValueError(f"{key}: got {value}; allowed: an integer >= {low}.")
    start = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    t_config = teachers_config(output_dir, teacher_epochs, seed)
    with capture_logs(output_dir / LOG_FILE) as logs:
        if logs is not None:  # the quickstart's inputs are checked above: nothing refuses it after this
            log(f"Ray's and MLflow's logs: {logs} (--verbose shows them here)")
        return _run(output_dir, t_config, student_epochs, workers, seed, strategies, log, start)


def _run(
    output_dir: Path,
    t_config: TeachersConfig,
    student_epochs: int,
    workers: int,
    seed: int,
    strategies: Sequence[str],
    log: Callable[[str], None],
    start: float,
) -> QuickstartResult:
    # one Ray for both steps, with room for a distillation run (3 teacher pools, the workers)
    connect(0, 0, "the quickstart", "", local_cpus=3.5)
    reused = _reusable_teachers(t_config)
    trained: TeachersResult | None = None
    if reused is None:
        trained = train_teachers(t_config, log=log)
        # students distilled from earlier teachers must not be resumed with these ones
        shutil.rmtree(output_dir / "students", ignore_errors=True)
        teacher_acc = {name: row["val/acc1"] for name, row in trained.teachers.items()}
        ensemble = trained.ensemble_acc1
    else:
        log(f"reusing the teachers in {t_config.output_dir} (delete that folder to train them again)")
        teacher_acc = {name: row["val/acc1"] for name, row in reused["teachers"].items()}
        ensemble = reused["ensemble_acc1"]
    students = {}
    for strategy in strategies:
        config = distill_config(output_dir, strategy, student_epochs, seed, workers)
        students[strategy] = distill(config, log=log)
    result = QuickstartResult(trained, teacher_acc, ensemble, students, time.perf_counter() - start)
    log(format_quickstart(result))
    return result


def format_quickstart(result: QuickstartResult) -> str:
    lines = ["", f"{'model':<24}{'val/acc1':>9}{'agreement':>11}{'val/ece':>9}  mean teacher weights"]
    for name, acc in result.teacher_acc1.items():
        lines.append(f"{'teacher ' + name:<24}{acc:>9.4f}")
    lines.append(f"{'teacher ensemble':<24}{result.ensemble_acc1:>9.4f}")
    for strategy, student in result.students.items():
        m = student.metrics
        weights = "  ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("weights/"))
        label = f"student, {strategy}"
        lines.append(f"{label:<24}{m['val/acc1']:>9.4f}{m['val/agreement']:>11.4f}{m['val/ece']:>9.4f}  {weights}")
    store = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"  # where the runs went
    lines.append(
        f"{result.seconds:.0f} s in all. MLflow experiment {EXPERIMENT!r}: mlflow ui --backend-store-uri {store}"
    )
    return "\n".join(lines)
