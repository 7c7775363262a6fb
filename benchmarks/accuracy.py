"""Accuracy study: does AE-KD give a better student than averaging, on real data?

    python benchmarks/accuracy.py [--scenarios digits digits_biased cifar10] [--seeds 0 1 2]
                                  [--output-dir runs/accuracy] [--cifar-archive FILE] [--data-dir DIR]
                                  [--tracking-uri URI] [--experiment NAME] [--smoke]

For each scenario, through ray_aekd's own API (the same code as ``ray-aekd teachers``,
``relabel``, ``sweep`` and ``distill``), on one local Ray:

1. train the teachers, or reuse the ones a previous run of this script trained with the same
   settings (``<output-dir>/<scenario>/teachers``);
2. choose C with a Tune sweep of AE-KD over ``sweep_tolerances``, judged on a *tuning split*
   carved out of the training split (``data.tuning_fraction``): the evaluation split is never
   read while tuning;
3. distil one student per strategy and seed, all on the same fixed evaluation split
   (``data.split_seed``; the seed changes the student's initialisation, the batch order and the
   augmentation views): ``none`` (cross-entropy only: ``kd_weight`` 0), ``average``, ``aekd`` at
   C = 0.6 (the authors' default) and at the sweep's best C, and ``mgda`` (C = 1). Each seed's
   soft labels are computed once (``ray-aekd relabel``) and read by all its runs;
4. report mean and sample standard deviation over seeds of ``val/acc1``, ``val/agreement`` and
   ``val/ece`` (last epoch) and seconds per run, the per-seed difference AE-KD minus average, and
   plots: accuracy per strategy with error bars, the teachers' weights α over training (mean over
   seeds) and the teachers' gradient-conflict matrix (mean cosine between the teachers' gradients
   on the student, over the ``average`` runs).

Everything goes to one MLflow experiment (``--experiment``, default ``ray-aekd-accuracy``): the
teachers, the sweep (parent and trials), every student (tagged ``study.scenario``,
``study.strategy``, ``study.seed``) and one summary run per scenario with the tables, the
numbers as metrics and the plots. Files: ``<output-dir>/results.json``, ``results.md`` (the
tables of every scenario run into that folder so far) and ``<scenario>/plots/*.png``. Run
again, the script reuses every teacher set, sweep, soft-label cache and student already
finished with the same settings (wherever MLflow is), so an interrupted study continues.

Scenarios (``--smoke`` shrinks epochs, seeds and the sweep to a test-sized run):

- ``digits``: scikit-learn's bundled digits (1,797 8x8 images, no network), 20% held out for
  evaluation; three teachers (two CNNs, one MLP), each on its own 80% of the training split.
- ``digits_biased``: the same, but each teacher has 70% of the labels of its own classes
  replaced by other classes (0-3, 4-6, 7-9): three teachers, each wrong on different classes.
- ``cifar10``: the real CIFAR-10 training JPEGs (``--cifar-archive``, extracted under
  ``--data-dir``, never into the repository); 5,000 images held out for evaluation; three
  ``small_cnn32`` teachers (0.24 M parameters) on their own 80% of the rest, a ``small_cnn8``
  student (16 k); about 80-90 minutes on 2 CPU cores (teachers about 18, each student run 2-3).

Left out: the paper's full setting (ResNet-56 teachers, ResNet-20 student, 240 epochs on
CIFAR-100) needs GPUs; ``--scenarios`` takes only the three above. Exits 1 if a run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
EXPERIMENT = "ray-aekd-accuracy"
OPTIM = {"momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
LOSS = {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 0.9, "space": "batch_mean"}
AUTHORS_TOLERANCE = 0.6


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One dataset and teacher ensemble of the study, and how its students train."""

    name: str
    about: str
    data: dict[str, Any]  # DataConfig keys shared by teachers and students (split_seed fixes the evaluation split)
    teachers: list[dict[str, Any]]  # TeacherSpec keys
    teacher_train: dict[str, Any]  # TrainConfig keys for the teachers
    student: str
    student_train: dict[str, Any]  # TrainConfig keys for the students
    views: int  # augmentation views in each seed's soft-label cache
    sweep_tolerances: list[float]  # C values of the tuning sweep
    tuning_fraction: float  # share of the training split the sweep validates on
    sweep_concurrency: int
    seeds: tuple[int, ...]  # student seeds, unless --seeds says otherwise
    teacher_cpus: float = 0.5


def _digits_teachers(noise: float) -> list[dict[str, Any]]:
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    models = [("cnn_a", "digits_cnn"), ("cnn_b", "digits_cnn"), ("mlp_c", "digits_mlp")]
    out = []
    for seed, ((name, model), classes) in enumerate(zip(models, groups, strict=True), start=1):
        spec: dict[str, Any] = {"name": name, "model": model, "seed": seed, "subset_fraction": 0.8}
        if noise > 0:
            spec |= {"label_noise": noise, "noisy_classes": classes}
        out.append(spec)
    return out


def scenarios(smoke: bool, data_dir: Path, archive: Path) -> dict[str, Callable[[], Scenario]]:
    """Builders of the study's scenarios (a builder may extract data, so only chosen ones run)."""
    t_epochs, s_epochs = (2, 2) if smoke else (30, 20)
    # smoke: two C values that are no row of their own, so that the sweep's best gets one
    tolerances = [0.5, 0.8] if smoke else [0.45, 0.6, 0.8, 1.0]
    digits_data = {"dataset": "digits", "val_fraction": 0.2, "split_seed": 0, "augment": True}

    def digits(name: str, noise: float, about: str) -> Scenario:
        return Scenario(
            name=name,
            about=about,
            data=digits_data,
            teachers=_digits_teachers(noise),
            teacher_train={"epochs": t_epochs, "batch_size": 64, "lr": 0.05, **OPTIM},
            student="digits_mlp",
            student_train={"epochs": s_epochs, "batch_size": 64, "lr": 0.05, **OPTIM},
            views=2 if smoke else 4,
            sweep_tolerances=tolerances,
            tuning_fraction=0.2,
            sweep_concurrency=2,
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),  # runs take seconds here: more seeds, tighter error bars
        )

    def cifar10() -> Scenario:
        path = extract_cifar10(archive, data_dir)
        return Scenario(
            name="cifar10",
            about="CIFAR-10 training JPEGs, 5,000 held out; three small_cnn32 teachers, a small_cnn8 student",
            data={"dataset": "imagefolder", "path": str(path), "val_fraction": 0.1, "split_seed": 0, "augment": True},
            teachers=[
                {"name": f"cnn32_{k}", "model": "small_cnn32", "seed": k, "subset_fraction": 0.8} for k in (1, 2, 3)
            ],
            teacher_train={"epochs": 2 if smoke else 10, "batch_size": 128, "lr": 0.1, **OPTIM},
            student="small_cnn8",
            student_train={"epochs": 1 if smoke else 6, "batch_size": 128, "lr": 0.1, **OPTIM},
            views=2,
            sweep_tolerances=tolerances if smoke else [0.45, 0.6, 0.8],
            tuning_fraction=0.1,
            sweep_concurrency=2,
            seeds=(0, 1) if smoke else (0, 1, 2),
            teacher_cpus=0.66,
        )

    return {
        "digits": lambda: digits(
            "digits", 0.0, "bundled digits, 359 of 1,797 held out; three teachers (2 CNNs, 1 MLP), each on its own 80%"
        ),
        "digits_biased": lambda: digits(
            "digits_biased",
            0.7,
            "bundled digits; each teacher has 70% wrong labels on its own classes (0-3, 4-6, 7-9)",
        ),
        "cifar10": cifar10,
    }


#: The strategies of the study: label -> (strategy, tolerance or None for the sweep's best, kd_weight).
STRATEGIES: dict[str, tuple[str, float | None, float]] = {
    "none": ("average", 1.0, 0.0),
    "average": ("average", 1.0, LOSS["kd_weight"]),
    "aekd_c0.6": ("aekd", AUTHORS_TOLERANCE, LOSS["kd_weight"]),
    "aekd_best": ("aekd", None, LOSS["kd_weight"]),
    "mgda": ("mgda", 1.0, LOSS["kd_weight"]),
}
METRICS = ("val/acc1", "val/agreement", "val/ece")


def say(line: str) -> None:
    print(f"[accuracy] {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def extract_cifar10(archive: Path, data_dir: Path) -> Path:
    """The ``train/`` image-folder tree of the CIFAR-10 JPEG archive, extracted once under
    ``data_dir`` (outside the repository)."""
    target = data_dir / "cifar10-train-jpg"
    done = target / ".extracted"
    if done.exists():
        return target / "train"
    if not archive.is_file():
        raise SystemExit(
            f"--cifar-archive: {str(archive)!r} does not exist; allowed: the CIFAR-10 training JPEG archive "
            f"(train/<class>/<image>.jpg), e.g. {DEFAULT_ARCHIVE}."
        )
    if target.resolve().is_relative_to(REPO):
        raise SystemExit(f"--data-dir: {str(data_dir)!r} is inside the repository; allowed: a folder outside it.")
    say(f"extracting {archive} to {target} (once)")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    if not (target / "train").is_dir():
        raise SystemExit(f"--cifar-archive: {str(archive)!r} holds no train/ folder of class folders.")
    done.write_text("ok\n")
    return target / "train"


# ---------------------------------------------------------------- steps


def _fingerprint(data: Any) -> str:
    """A short hash of a config's plain data, ignoring ``tracking`` (where MLflow is does not
    change what is trained)."""
    return hashlib.sha256(json.dumps(_untracked(data), sort_keys=True).encode()).hexdigest()[:16]


def _untracked(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _untracked(v) for k, v in data.items() if k != "tracking"}
    if isinstance(data, list):
        return [_untracked(v) for v in data]
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def train_or_reuse_teachers(scenario: Scenario, folder: Path, uri: str, experiment: str) -> dict[str, Any]:
    """The teachers' summary (accuracies, checkpoints); trains them unless this exact set exists."""
    from ray_aekd.config import TeachersConfig, from_dict
    from ray_aekd.distributed.teachers import train_teachers

    config = from_dict(
        TeachersConfig,
        {
            "teachers": scenario.teachers,
            "data": scenario.data,
            "train": scenario.teacher_train,
            "trials": {"cpus": scenario.teacher_cpus},
            "tracking": {"uri": uri, "experiment": experiment},
            "output_dir": str(folder / "teachers"),
            "seed": 0,
        },
    )
    saved = _read_json(folder / "teachers" / "config.json")
    summary = _read_json(folder / "teachers" / "summary.json")
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    if saved is not None and _untracked(saved) == _untracked(wanted) and summary is not None:
        say(f"{scenario.name}: reusing the teachers in {folder / 'teachers'}")
        return summary
    # an earlier set (maybe half-trained: its summary is written last), and the students, caches
    # and sweeps made from it, must not be mixed with these
    for stale in ("teachers", "students", "caches", "sweep"):
        shutil.rmtree(folder / stale, ignore_errors=True)
    result = train_teachers(config, log=lambda line: say(f"{scenario.name} teachers: {line}"))
    return dataclasses.asdict(result)


def distill_base(scenario: Scenario, teachers: dict[str, Any], uri: str, experiment: str) -> dict[str, Any]:
    """The distillation config (plain data) every student of the scenario starts from."""
    return {
        "teachers": [
            {"name": name, "checkpoint": row["checkpoint"], "cpus": 0.5, "batch_size": 512}
            for name, row in teachers["teachers"].items()
        ],
        "student": {"model": scenario.student},
        "distill": {"strategy": "aekd", "tolerance": AUTHORS_TOLERANCE, **LOSS},
        "data": {**scenario.data, "views": scenario.views},
        "train": scenario.student_train,
        "workers": {"num_workers": 0},
        "tracking": {"uri": uri, "experiment": experiment},
    }


def sweep_settings(scenario: Scenario, folder: Path) -> dict[str, Any]:
    """The tuning sweep's config (plain data): AE-KD over C on the tuning split, seed 0."""
    return {
        "base": "(accuracy study)",
        "name": f"{scenario.name}-tune-c",
        "output_dir": str(folder / "sweep"),
        "overrides": {
            "data": {"tuning_fraction": scenario.tuning_fraction},
            "workers": {"num_workers": 1, "cpus": 0.5},
            "seed": 0,
        },
        "space": {"distill.tolerance": {"grid": scenario.sweep_tolerances}},
        "search": {"algorithm": "grid"},
        "scheduler": {"type": "none"},
        "metric": "val/acc1",
        "trials": {"max_concurrent": scenario.sweep_concurrency},
        "soft_label_cache": True,
    }


def tune_tolerance(scenario: Scenario, base: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Sweep C for AE-KD on the tuning split (seed 0); returns the best C and every trial's score."""
    from ray_aekd.config import from_dict
    from ray_aekd.config.sweep import SweepConfig
    from ray_aekd.distributed.sweep import run_sweep

    sweep_data = sweep_settings(scenario, folder)
    key = _fingerprint([sweep_data, base])
    found = _read_json(folder / "sweep" / "best.json")
    if found is not None and found.get("fingerprint") == key:
        say(f"{scenario.name}: reusing the tuning sweep (best C = {found['tolerance']:g})")
        return found
    shutil.rmtree(folder / "sweep", ignore_errors=True)
    sweep = from_dict(SweepConfig, sweep_data)
    merged = _merge(base, sweep_data["overrides"]) | {
        "cache": {"path": str(folder / "sweep" / sweep.name / "soft_labels")}  # the trials' soft labels, made once
    }
    say(f"{scenario.name}: tuning C over {scenario.sweep_tolerances} on a tuning split of the training split")
    result = run_sweep(sweep, merged, log=lambda line: say(f"{scenario.name} sweep: {line}"))
    if result.best is None:
        raise RuntimeError(f"{scenario.name}: no trial of the tuning sweep finished; see {folder / 'sweep'}.")
    scores = {
        str(t["values"]["distill.tolerance"]): t["metrics"].get("val/acc1")
        for t in result.trials
        if t["status"] == "FINISHED"
    }
    best = {
        "fingerprint": key,
        "tolerance": float(result.best["values"]["distill.tolerance"]),
        "tuning_acc1": scores,
        "mlflow_run_id": result.mlflow_run_id,
        "seconds": result.seconds,
    }
    (folder / "sweep" / "best.json").write_text(json.dumps(best, indent=2))
    return best


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def student_config(base: dict[str, Any], folder: Path, label: str, tolerance: float, seed: int) -> dict[str, Any]:
    strategy, _, kd_weight = STRATEGIES[label]
    return _merge(
        base,
        {
            "distill": {"strategy": strategy, "tolerance": tolerance, "kd_weight": kd_weight},
            "cache": {"path": str(folder / "caches" / f"seed{seed}")},
            "name": f"{folder.name}-{label}-seed{seed}",
            "output_dir": str(folder / "students"),
            "seed": seed,
        },
    )


def relabel_seed(config_data: dict[str, Any], scenario: Scenario, seed: int) -> float:
    """Write (or keep) this seed's soft-label cache: the teachers' logits for its views.
    Returns the seconds the cache took to make (when it was made)."""
    from ray_aekd.config import DistillConfig, from_dict
    from ray_aekd.distributed.soft_labels import relabel

    config = from_dict(DistillConfig, config_data)
    log = lambda line: say(f"{scenario.name} relabel seed {seed}: {line}")  # noqa: E731
    try:
        manifest = relabel(config, log=log)  # keeps a cache made for these teachers, data and views
    except ValueError as error:  # one made for other settings (say, other views): make it again
        log(f"remaking the cache ({error})")
        manifest = relabel(config, log=log, overwrite=True)
    return float(manifest["seconds"])


def run_student(config_data: dict[str, Any], scenario: Scenario, label: str, seed: int, uri: str) -> dict[str, Any]:
    """One distillation run, or the saved result of an identical finished one."""
    from mlflow.tracking import MlflowClient

    from ray_aekd.config import DistillConfig, from_dict
    from ray_aekd.distributed.distill import distill

    folder = Path(config_data["output_dir"]) / config_data["name"]
    saved_file = folder / "study_result.json"
    key = _fingerprint(config_data)
    saved = _read_json(saved_file)
    if saved is not None and saved.get("fingerprint") == key:
        return saved
    shutil.rmtree(folder, ignore_errors=True)
    config = from_dict(DistillConfig, config_data)
    result = distill(config, log=lambda line: say(f"{scenario.name} {label} seed {seed}: {line}"))
    row = {
        "fingerprint": key,
        "scenario": scenario.name,
        "strategy": label,
        "seed": seed,
        "tolerance": config.distill.tolerance,
        "metrics": {k: result.metrics[k] for k in METRICS},
        "seconds": result.seconds,
        "run_dir": result.run_dir,
        "mlflow_run_id": result.mlflow_run_id,
        "teachers": result.teachers,
        "ensemble_acc1": result.ensemble_acc1,
    }
    if result.mlflow_run_id is not None:
        client = MlflowClient(uri)
        for tag, value in (("scenario", scenario.name), ("strategy", label), ("seed", seed)):
            client.set_tag(result.mlflow_run_id, f"study.{tag}", str(value))
    saved_file.write_text(json.dumps(row, indent=2))
    return row


# ---------------------------------------------------------------- summary


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per strategy: mean and std over seeds of each metric and of the seconds per run; and the
    per-seed difference of AE-KD (each C) and MGDA minus average in val/acc1."""
    table: dict[str, Any] = {}
    for label in labels:
        mine = sorted((r for r in rows if r["strategy"] == label), key=lambda r: r["seed"])
        table[label] = {
            "tolerance": mine[0]["tolerance"],
            "seeds": [r["seed"] for r in mine],
            **{
                m: mean_std([r["metrics"][m] for r in mine]) | {"values": [r["metrics"][m] for r in mine]}
                for m in METRICS
            },  # fmt: skip
            "seconds": mean_std([r["seconds"] for r in mine]),
        }
    average = {r["seed"]: r["metrics"]["val/acc1"] for r in rows if r["strategy"] == "average"}
    differences = {}
    for label in labels:
        if label in ("none", "average"):
            continue
        diffs = [r["metrics"]["val/acc1"] - average[r["seed"]] for r in rows if r["strategy"] == label]
        differences[label] = mean_std(diffs) | {"wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}
    return {"strategies": table, "minus_average_acc1": differences}


def display_name(label: str, tolerance: float, given: bool = False) -> str:
    return {
        "none": "none (CE only)",
        "average": "average",
        "aekd_c0.6": "AE-KD, C = 0.6",
        "aekd_best": f"AE-KD, C = {tolerance:g} " + ("(given)" if given else "(sweep's best)"),
        "mgda": "MGDA (C = 1)",
    }[label]


def markdown(result: dict[str, Any]) -> str:
    """The tables of one scenario, as Markdown."""
    summary = result["summary"]
    given = result.get("tolerance_given", False)
    lines = [
        f"### {result['scenario']}",
        "",
        result["about"] + ".",
        "",
        "Teachers (val/acc1 on the evaluation split): "
        + ", ".join(f"{n} {a:.4f}" for n, a in result["teachers"].items())
        + f"; ensemble {result['ensemble_acc1']:.4f}.",
        f"C given with --tolerance: {result['best_tolerance']:g} (no tuning sweep)."
        if result.get("tolerance_given")
        else f"Sweep's best C on the tuning split: {result['best_tolerance']:g} "
        f"(tuning val/acc1: {', '.join(f'C={c}: {a:.4f}' for c, a in result['tuning_acc1'].items())}).",
        "",
        "| strategy | val/acc1 | val/agreement | val/ece | s / run | Δ val/acc1 vs average, per seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    n = None
    for label, row in summary["strategies"].items():
        n = row["val/acc1"]["n"]
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS]
        diff = summary["minus_average_acc1"].get(label)
        delta = ""
        if diff:
            ties = f", {diff['ties']} tied" if diff["ties"] else ""
            delta = f"{diff['mean']:+.4f} ± {diff['std']:.4f} (higher on {diff['wins']} of {diff['n']}{ties})"
        seconds = f"{row['seconds']['mean']:.0f}"
        lines.append(f"| {display_name(label, row['tolerance'], given)} | {' | '.join(cells)} | {seconds} | {delta} |")
    lines += ["", f"Mean ± sample standard deviation over {n} seeds ({', '.join(map(str, result['seeds']))})."]
    took = result["compute_seconds"]
    lines.append(
        f"Wall time ({os.cpu_count()} CPU cores, {platform.machine()}): {took['total'] / 60:.0f} min in all: "
        f"teachers {took['teachers']:.0f} s, "
        f"tuning sweep {took['sweep']:.0f} s, soft labels {took['relabel']:.0f} s, students {took['students']:.0f} s."
    )
    if result.get("best_same_as"):
        row = display_name(result["best_same_as"], result["best_tolerance"])
        lines.append(f"The sweep chose C = {result['best_tolerance']:g}: the {row} row is also the sweep's best C.")
    return "\n".join(lines) + "\n"


def plot_scenario(result: dict[str, Any], rows: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """Accuracy with error bars, α over training (mean over seeds) and the conflict matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ray_aekd.tracking.plots import plot_cosine_matrix, plot_weights

    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    out = {}
    table = result["summary"]["strategies"]
    given = result.get("tolerance_given", False)
    labels = list(table)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    means = [table[k]["val/acc1"]["mean"] for k in labels]
    stds = [table[k]["val/acc1"]["std"] for k in labels]
    # points, not bars: the axis does not start at 0, and a bar's length would say it did
    ax.errorbar(range(len(labels)), means, yerr=stds, fmt="o", color="#2c5d8f", capsize=6, markersize=7,
                label="mean ± std")  # fmt: skip
    for i, label in enumerate(labels):
        values = table[label]["val/acc1"]["values"]
        ax.scatter([i + 0.12] * len(values), values, color="black", s=9, zorder=3)
    ax.axhline(result["ensemble_acc1"], color="grey", linestyle="--", linewidth=0.8, label="teacher ensemble")
    ax.set_xticks(range(len(labels)), [display_name(k, table[k]["tolerance"], given) for k in labels], rotation=20,
                  ha="right", fontsize=8)  # fmt: skip
    low = min(min(table[k]["val/acc1"]["values"] + [m - s]) for k, m, s in zip(labels, means, stds, strict=True))
    high = max(max(table[k]["val/acc1"]["values"] + [m + s]) for k, m, s in zip(labels, means, stds, strict=True))
    high = max(high, result["ensemble_acc1"])
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, high + 0.03))
    ax.set_ylabel("student val/acc1")
    ax.set_title(f"{result['scenario']}: student val/acc1 over {len(result['seeds'])} seeds (small dots: each seed)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out["accuracy"] = plots / "accuracy.png"
    fig.savefig(out["accuracy"], dpi=110)
    plt.close(fig)

    names = list(result["teachers"])
    for label in ("aekd_best", "aekd_c0.6", "mgda"):
        tables = []
        for row in rows:
            if row["strategy"] != label:
                continue
            with (Path(row["run_dir"]) / "alpha" / "rank0.csv").open() as f:
                tables.append(np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2))
        if not tables:
            continue
        steps = min(len(t) for t in tables)
        alpha = np.mean([t[:steps, 2:] for t in tables], axis=0)
        out[f"alpha_{label}"] = plots / f"alpha_{label}.png"
        name = display_name(label, table[label]["tolerance"], given)
        title = f"{result['scenario']}: {name}, mean of {len(tables)} seeds"
        plot_weights(tables[0][:steps, 0], alpha, names, out[f"alpha_{label}"], title)

    cosines = [
        np.array(json.loads((Path(r["run_dir"]) / "cosine.json").read_text())["cosine"])
        for r in rows
        if r["strategy"] == "average"
    ]
    out["conflict"] = plots / "gradient_conflict.png"
    plot_cosine_matrix(np.mean(cosines, axis=0), names, out["conflict"])
    return out


def log_summary(result: dict[str, Any], plots: dict[str, Path], folder: Path, uri: str, experiment: str) -> str:
    """One MLflow run per scenario with the numbers as metrics, the tables and the plots."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ray_aekd._provenance import environment_tags
    from ray_aekd.tracking.runs import experiment_id

    client = MlflowClient(uri)
    id_file = folder / "summary_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    try:
        run_id = client.get_run(run_id).info.run_id if run_id else None
    except mlflow.exceptions.MlflowException:
        run_id = None
    if run_id is None:
        tags = {"study": "accuracy", "study.scenario": result["scenario"], **environment_tags()}
        run = client.create_run(experiment_id(client, experiment), run_name=f"accuracy-{result['scenario']}", tags=tags)
        run_id = run.info.run_id
        id_file.write_text(run_id + "\n")
    for label, row in result["summary"]["strategies"].items():
        for metric in (*METRICS, "seconds"):
            for stat in ("mean", "std"):
                client.log_metric(run_id, f"{label}/{metric}/{stat}", row[metric][stat])
    client.set_tag(run_id, "study.seeds", ",".join(map(str, result["seeds"])))
    client.log_metric(run_id, "best_tolerance", result["best_tolerance"])
    client.log_metric(run_id, "ensemble_acc1", result["ensemble_acc1"])
    (folder / "results.md").write_text(markdown(result))
    (folder / "results.json").write_text(json.dumps(result, indent=2))
    client.log_artifact(run_id, str(folder / "results.md"))
    client.log_artifact(run_id, str(folder / "results.json"))
    for path in plots.values():
        client.log_artifact(run_id, str(path), "plots")
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------- main


def run_scenario(
    scenario: Scenario, seeds: list[int], out: Path, uri: str, experiment: str, given_tolerance: float | None = None
) -> dict[str, Any]:
    """Teachers, C (tuned by the sweep, or ``given_tolerance``), every strategy and seed, the
    summary, its plots and its MLflow run."""
    start = time.perf_counter()
    folder = out / scenario.name
    folder.mkdir(parents=True, exist_ok=True)
    say(f"{scenario.name}: {scenario.about}")
    teachers = train_or_reuse_teachers(scenario, folder, uri, experiment)
    base = distill_base(scenario, teachers, uri, experiment)
    if given_tolerance is None:
        tuned = tune_tolerance(scenario, base, folder)
    else:  # chosen elsewhere (an earlier `ray-aekd sweep`): no tuning sweep here
        say(f"{scenario.name}: C = {given_tolerance:g} as given by --tolerance; no tuning sweep")
        tuned = {"tolerance": given_tolerance, "tuning_acc1": {}, "seconds": 0.0}
    best = tuned["tolerance"]
    # C = 0.6 or C = 1 (MGDA) are rows of their own already: the same runs, not run twice
    same_as = next((k for k, c in (("aekd_c0.6", AUTHORS_TOLERANCE), ("mgda", 1.0)) if math.isclose(best, c)), None)
    labels = [k for k in STRATEGIES if not (k == "aekd_best" and same_as)]
    rows, relabel_seconds = [], []
    for seed in seeds:
        configs = {}
        for label in labels:
            tolerance = STRATEGIES[label][1]
            configs[label] = student_config(base, folder, label, best if tolerance is None else tolerance, seed)
        relabel_seconds.append(relabel_seed(configs["average"], scenario, seed))
        for label, config in configs.items():
            row = run_student(config, scenario, label, seed, uri)
            say(
                f"{scenario.name} seed {seed} {label}: val/acc1 {row['metrics']['val/acc1']:.4f}, "
                f"agreement {row['metrics']['val/agreement']:.4f}, ece {row['metrics']['val/ece']:.4f} "
                f"({row['seconds']:.0f} s)"
            )
            rows.append(row)
    first = rows[0]
    result = {
        "scenario": scenario.name,
        "about": scenario.about,
        "seeds": seeds,
        "teachers": first["teachers"],
        "ensemble_acc1": first["ensemble_acc1"],
        "best_tolerance": best,
        "best_same_as": same_as,
        "tuning_acc1": tuned["tuning_acc1"],
        "tolerance_given": given_tolerance is not None,
        # what each step took when it ran (a rerun that reuses it takes seconds)
        "compute_seconds": {
            "teachers": teachers["seconds"],
            "sweep": tuned["seconds"],
            "relabel": sum(relabel_seconds),
            "students": sum(r["seconds"] for r in rows),
            "total": teachers["seconds"] + tuned["seconds"] + sum(relabel_seconds) + sum(r["seconds"] for r in rows),
        },
        "settings": dataclasses.asdict(scenario),
        "summary": summarise(rows, labels),
        "runs": rows,
    }
    plots = plot_scenario(result, rows, folder)
    result["plots"] = {k: str(v) for k, v in plots.items()}
    result["seconds"] = time.perf_counter() - start
    result["summary_run_id"] = log_summary(result, plots, folder, uri, experiment)
    say(f"{scenario.name}: done in {result['seconds']:.0f} s\n" + markdown(result))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["digits", "digits_biased", "cifar10"],
                        choices=["digits", "digits_biased", "cifar10"])  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="student seeds for every scenario (default: 0-4 on digits, 0-2 on CIFAR-10)")  # fmt: skip
    parser.add_argument("--output-dir", default="runs/accuracy")
    parser.add_argument("--cifar-archive", default=str(DEFAULT_ARCHIVE), help="the CIFAR-10 training JPEG tarball")
    parser.add_argument("--data-dir", default=str(Path.home() / ".cache" / "ray_aekd"),
                        help="where the archive is extracted (outside the repository)")  # fmt: skip
    parser.add_argument("--tracking-uri", default=None, help="MLflow store, as tracking.uri: MLFLOW_TRACKING_URI "
                        "wins over it, as everywhere in ray_aekd (default: sqlite:///mlflow.db)")  # fmt: skip
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="use this C for the tuned-C row instead of running the tuning sweep (e.g. one chosen "
                        "by an earlier `ray-aekd sweep`); in [1/3, 1] for the study's three teachers")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="test-sized: 1-2 epochs, 2 seeds, 2 C values in the sweep")
    args = parser.parse_args(argv)
    if args.tolerance is not None and not 1 / 3 - 1e-9 <= args.tolerance <= 1:
        parser.error(f"--tolerance: got {args.tolerance}; allowed: a number in [1/3, 1] (C for M = 3 teachers)")
    if args.seeds is not None and (
        len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2 or min(args.seeds) < 0
    ):
        parser.error(
            f"--seeds: got {args.seeds}; allowed: at least 2 distinct integers >= 0 (for a standard deviation)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from ray_aekd.tracking.runs import open_store, resolve_tracking_uri

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # bench_pipeline, for the machine's description
        sys.path.insert(0, here)
    machine = importlib.import_module("bench_pipeline").machine
    from ray_aekd._provenance import environment

    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(args.tracking_uri)
    open_store(uri)
    builders = scenarios(args.smoke, Path(args.data_dir).expanduser().resolve(), Path(args.cifar_archive))
    chosen = [builders[name]() for name in args.scenarios]  # extracts the data before Ray starts
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # a Ray temp dir of the study's own: Ray Train finds "the" local cluster through
        # <tmp>/ray/ray_current_cluster, which another `ray start` on the machine may rewrite mid-run
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-aekd-acc-"))
        # logical CPUs for a sweep's concurrent trials with their workers and teacher tasks
        ray.init(num_cpus=max(os.cpu_count() or 1, 6), include_dashboard=False)
    start = time.perf_counter()
    results, failed = {}, []
    for scenario in chosen:
        try:
            seeds = list(scenario.seeds) if args.seeds is None else args.seeds
            results[scenario.name] = run_scenario(scenario, seeds, out, uri, args.experiment, args.tolerance)
        except Exception as error:  # one scenario's failure does not lose the others' results
            failed.append(scenario.name)
            say(f"{scenario.name}: FAILED: {type(error).__name__}: {error}")
    invocation = {
        "command": "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tracking_uri": uri,
        "experiment": args.experiment,
        "machine": machine(),
        "environment": environment(),
        "seconds": time.perf_counter() - start,
        "failed": failed,
        "scenarios": sorted(results),
    }
    # scenarios of earlier invocations into the same output dir stay (one command per scenario works)
    report = _read_json(out / "results.json") or {}
    report = {
        "invocations": [*report.get("invocations", []), invocation],
        "scenarios": {**report.get("scenarios", {}), **results},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text("\n".join(markdown(r) for r in report["scenarios"].values()))
    say(f"wrote {out / 'results.json'} and {out / 'results.md'} ({invocation['seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
