"""One sweep over (C, T), with and without the soft-label cache: wall time and teacher forward passes.

    python benchmarks/bench_sweep.py [--per-class 200] [--epochs 8] [--views 2] [--teacher-model resnet56]
                                     [--concurrency 2] [--order cached-first] [--out FILE] [--quick]

The same sweep (``ray_aekd.sweep.run_sweep``, grid search, ``distill.tolerance_fraction`` x
``distill.temperature``, 4 x 2 = 8 trials by default, the same ``data.views`` V,
``trials.max_concurrent``, seed and data) runs twice in one process on one local Ray:

(a) cached: ``soft_label_cache: true``. ``relabel`` runs the teachers once over V views of the
    training split and once over the validation split, then every trial reads the Parquet cache
    and runs no teacher;
(b) uncached: ``soft_label_cache: false``. Every trial runs the teachers online, on view
    ``epoch mod V`` (``data.views`` is set for both, so both see the same pixels), every epoch
    (``--uncached-mode stream``, the default) or once per view, kept in memory (``auto``).

Measured per sweep: wall seconds around ``run_sweep`` (from its start to its end: the checks,
the relabel of (a), every trial, the MLflow parent run and its plots), the relabel's own seconds
(from the cache's manifest) and the teacher forward passes the teacher stages counted (per
teacher, samples run through it; ``teacher_forward_passes`` sums them over the M teachers). Per
trial: its counted passes, its distillation seconds, its epochs' seconds, its val/acc1.

Targets (from the issue): with the cache, teacher passes do not depend on the number of trials
(each cached trial counts 0; the relabel counts N_train x V + N_val per teacher, so
M x (N_train x V + N_val) in all), and the cached sweep takes at most half the uncached wall time.

Order: the cached sweep runs first by default (``--order``). Both share one Ray session, and the
second sweep finds Ray's worker pool warm, the JPEGs in the page cache and MLflow's SQLite
schema made; putting the baseline second gives any such advantage to it, so the ratio errs
against the cache. Only one pair is run (a sweep is many minutes); the CPU share taken by
processes outside this one's tree during each sweep is reported (``cpu_share.other_processes``),
as a shared machine makes the wall times noisy.

Data, teachers and helpers come from ``bench_pipeline.py`` (imported, not copied): a CIFAR-10
JPEG subset (``--per-class`` images of each class, extracted from the training tarball outside
the repository; nothing is downloaded) and M random-init teachers (``--teacher-model``, seeded):
this measures speed only, accuracies are noise. A heavier teacher than the student is the point:
the cache can only save what the teachers cost, and each trial also pays Ray Train's start-up
(tens of seconds on 2 cores), which the cache does not touch.

Duration on 2 cores (measured on a shared machine, so rough): a trial costs about 100 s of
wall time beyond its epochs' work at 2 trials at once (Tune's trial, Ray Train's worker group,
the first epoch's pipeline start, checkpoints and MLflow), the same with or without the cache.
With the defaults an uncached epoch of two concurrent trials takes about 37 s (measured) and a
cached one about 10 s (estimated from the student's step), so the uncached sweep takes about 27
minutes, the cached one about 14 (relabel included), some 42 minutes in all; the ratio then
lands near 0.45-0.5, as the fixed per-trial cost is a large share of the cached sweep. Fewer
epochs or images shorten the run and raise the ratio. ``--quick``: 2 trials per sweep on 160
images, about 4-7 minutes.

Left out: ASHA (it would stop trials at different epochs in the two sweeps), GPUs, remote
storage for the cache, repeats. Prints one JSON object on stdout (progress, Ray's and Tune's
output go to stderr); also to ``--out``. Exits 1 when a sweep failed or a trial did not finish.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from ray_aekd.data import open_source, split_indices

# the data subset, teachers, CPU monitor and machine/version info of the pipeline benchmark
sys.path.insert(0, str(Path(__file__).resolve().parent))
bench_pipeline = importlib.import_module("bench_pipeline")

SEED, VAL_FRACTION = bench_pipeline.SEED, bench_pipeline.VAL_FRACTION
EXPERIMENT = "bench-sweep"
TARGETS = {"cached_over_uncached_wall_max": 0.5}
LOSS = {"strategy": "aekd", "ce_weight": 1.0, "kd_weight": 0.9}
OPTIM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
WORKER_CPUS, TEACHER_CPUS, TEACHER_BATCH, TRIAL_CPUS = 1.0, 1.0, 256, 0.1
# full run / --quick; a flag given on the command line wins over both
DEFAULTS = {
    "per_class": (200, 16),
    "epochs": (8, 3),
    "views": (2, 2),
    "teacher_model": ("resnet56", "resnet8"),
    "tolerance_fractions": ("0,0.33,0.67,1", "0,1"),
    "temperatures": ("2,4", "4"),
}


def say(line: str) -> None:
    print(f"[bench_sweep] {line}", file=sys.stderr, flush=True)


def numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: comma-separated numbers such as 0,0.5,1") from None
    if not values:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: at least one number")
    return values


# ---------------------------------------------------------------- configs


def write_configs(
    work: Path, data_path: Path, teacher_paths: list[Path], args: argparse.Namespace, uri: str
) -> dict[str, Path]:
    """A base distillation config and the two sweep configs (identical but for the cache), as YAML."""
    base = {
        "seed": SEED,
        "teachers": [
            {"name": p.name, "checkpoint": str(p), "cpus": TEACHER_CPUS, "batch_size": TEACHER_BATCH}
            for p in teacher_paths
        ],
        "student": {"model": args.student_model},
        "distill": {**LOSS, "tolerance": 1.0, "temperature": 4.0},  # the sweep sets both
        "data": {
            "dataset": "imagefolder",
            "path": str(data_path),
            "val_fraction": VAL_FRACTION,
            "augment": True,
            "views": args.views,
        },
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, **OPTIM},
        "workers": {"num_workers": 1, "cpus": WORKER_CPUS},
        "tracking": {"uri": uri, "experiment": EXPERIMENT},
    }
    (work / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    paths = {}
    for mode, cached in (("cached", True), ("uncached", False)):
        sweep = {
            "name": f"bench-{mode}",
            "base": "base.yaml",
            "output_dir": str(work / mode),
            "space": {
                "distill.tolerance_fraction": {"grid": args.tolerance_fractions},
                "distill.temperature": {"grid": args.temperatures},
            },
            "search": {"algorithm": "grid"},
            "num_samples": 1,
            "trials": {"cpus": TRIAL_CPUS, "max_concurrent": args.concurrency},
            "soft_label_cache": cached,
        }
        if not cached:  # the baseline: the teachers every epoch (stream), or once per view per trial (auto)
            sweep["overrides"] = {"cache": {"mode": args.uncached_mode}}
        paths[mode] = work / f"sweep_{mode}.yaml"
        paths[mode].write_text(yaml.safe_dump(sweep, sort_keys=False))
    return paths


# ---------------------------------------------------------------- one sweep


def trial_details(sweep_dir: Path, trial: dict[str, Any]) -> dict[str, Any]:
    """One trial's counted passes, seconds and per-epoch seconds (from its run folder)."""
    run_dir = sweep_dir / "trials" / trial["name"]
    out: dict[str, Any] = {
        "name": trial["name"],
        "values": trial["values"],
        "status": trial["status"],
        "epochs": trial["epochs"],
        "teacher_forward_passes": trial["teacher_forward_passes"],
        "val_acc1": trial["metrics"].get("val/acc1"),
        "error": trial.get("error"),
    }
    result = run_dir / "result.json"
    if result.exists():
        done = json.loads(result.read_text())
        out["teacher_forward_passes_per_teacher"] = done["teacher_forward_passes"]
        out["distill_seconds"] = done["seconds"]
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        out["epoch_seconds"] = [line["epoch_seconds"] for line in lines]
        out["samples_per_second"] = [line["train/samples_per_second"] for line in lines]
        if "distill_seconds" in out:
            out["outside_epochs_seconds"] = out["distill_seconds"] - sum(out["epoch_seconds"])
    return out


def run_one(mode: str, sweep_file: Path) -> dict[str, Any]:
    """Run one sweep config; its wall time, counted passes and trials (or the error)."""
    from ray_aekd.config.sweep import load_sweep
    from ray_aekd.distributed.soft_labels import read_manifest
    from ray_aekd.distributed.sweep import run_sweep

    sweep, base = load_sweep(sweep_file)
    sweep_dir = Path(sweep.output_dir) / sweep.name
    say(f"{mode}: sweep {sweep.name}, {sweep.trials.max_concurrent} trial(s) at once, output under {sweep_dir}")
    start = time.perf_counter()
    try:
        result = run_sweep(sweep, base, log=lambda line: say(f"{mode}: {line}"))
    except Exception as error:  # report it beside the other sweep's figures
        wall = time.perf_counter() - start
        say(f"{mode}: FAILED after {wall:.0f} s: {type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(error).__name__}: {error}", "wall_seconds": wall, "interval": (start, start + wall)}
    wall = time.perf_counter() - start
    trials = [trial_details(sweep_dir, t) for t in result.trials]
    out: dict[str, Any] = {
        "wall_seconds": wall,
        "sweep_seconds": result.seconds,
        "trials": len(trials),
        "finished_trials": sum(t["status"] == "FINISHED" for t in trials),
        "teacher_forward_passes": result.teacher_forward_passes,
        "relabel_forward_passes": result.relabel_forward_passes,
        "cache_forward_passes": result.cache_forward_passes,
        "trial_forward_passes": [t["teacher_forward_passes"] for t in trials],
        "best": None
        if result.best is None
        else {
            "trial": result.best["name"],
            "values": result.best["values"],
            "val_acc1": result.best["metrics"]["val/acc1"],
        },
        "mlflow_run_id": result.mlflow_run_id,
        "sweep_dir": str(sweep_dir),
        "interval": (start, start + wall),
    }
    seconds = [t["distill_seconds"] for t in trials if "distill_seconds" in t]
    epochs = [s for t in trials for s in t.get("epoch_seconds", [])[1:]]
    firsts = [t["epoch_seconds"][0] for t in trials if t.get("epoch_seconds")]
    outside = [t["outside_epochs_seconds"] for t in trials if "outside_epochs_seconds" in t]
    out["trial_seconds"] = {
        "median_distill": statistics.median(seconds) if seconds else None,
        "median_first_epoch": statistics.median(firsts) if firsts else None,
        "median_later_epoch": statistics.median(epochs) if epochs else None,
        "median_outside_epochs": statistics.median(outside) if outside else None,
    }
    if sweep.soft_label_cache:
        manifest = read_manifest(base["cache"]["path"]) or {}
        out["cache_path"] = base["cache"]["path"]
        out["relabel_seconds"] = manifest.get("seconds")
        out["relabel_forward_passes_per_teacher"] = manifest.get("teacher_forward_passes")
    out["trial_details"] = trials
    say(
        f"{mode}: {out['finished_trials']}/{len(trials)} trials finished in {wall:.0f} s; "
        f"{result.teacher_forward_passes} teacher forward passes"
        + (f" (relabel {out['relabel_seconds']:.0f} s)" if out.get("relabel_seconds") else "")
    )
    return out


def start_ray(num_cpus: int, attempts: int = 3) -> None:
    """A local Ray of ``num_cpus`` logical CPUs; on a busy machine its start can time out, so try again."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as error:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            if attempt == attempts:
                raise
            say(f"Ray did not start (attempt {attempt} of {attempts}: {error}); trying again in 10 s")
            time.sleep(10)


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a few-minute smoke: tiny data, 3 epochs, ResNet-8 teachers, 2 trials")
    add("--per-class", type=int, help="CIFAR-10 images per class (10 classes); full 200, quick 16")
    add("--epochs", type=int, help="epochs of every trial; full 8, quick 3")
    add("--views", type=int, help="data.views V of both sweeps (epoch e sees view e mod V); full 2, quick 2")
    add("--teacher-model", help="registry name of the M teachers; full resnet56, quick resnet8")
    add("--teachers", type=int, default=3, help="number of teachers M (default 3)")
    add("--student-model", default="resnet8", help="registry name of the student (default resnet8)")
    add("--tolerance-fractions", type=numbers, help="grid of distill.tolerance_fraction; full 0,0.33,0.67,1, quick 0,1")
    add("--temperatures", type=numbers, help="grid of distill.temperature; full 2,4, quick 4")
    add("--batch-size", type=int, default=64, help="training batch (default 64)")
    add("--concurrency", type=int, default=2, help="trials.max_concurrent of both sweeps (default 2)")
    add("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default 3 x concurrency)")
    add(
        "--uncached-mode",
        choices=("stream", "auto"),
        default="stream",
        help="cache.mode of the uncached sweep's trials: stream (teachers every epoch, the baseline) or auto "
        "(each trial runs them once per view and keeps the views in memory)",
    )
    add("--order", choices=("cached-first", "uncached-first"), default="cached-first", help="which sweep runs first")
    add("--data-dir", type=Path, default=Path("/tmp/cifar10-jpg"), help="where the tarball is (or gets) extracted")
    add("--tarball", type=Path, default=bench_pipeline.TARBALL, help="CIFAR-10 training JPEGs, train/<class>/*.jpg")
    add("--work-dir", type=Path, default=Path("/tmp/ray-aekd-bench-sweep"), help="scratch: configs, runs, MLflow")
    add("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            value = quick if args.quick else full
            setattr(args, key, numbers(value) if key in ("tolerance_fractions", "temperatures") else value)
    for key in ("per_class", "epochs", "views", "teachers", "batch_size", "concurrency"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1; got {getattr(args, key)}")
    ray_cpus = args.ray_cpus or 3 * args.concurrency
    need = math.ceil((WORKER_CPUS + TEACHER_CPUS + TRIAL_CPUS) * args.concurrency)
    if ray_cpus < need:
        parser.error(f"--ray-cpus {ray_cpus}: {args.concurrency} concurrent trials need {need} (worker, task, driver)")

    wall_start = time.perf_counter()
    info = bench_pipeline.machine()
    with bench_pipeline.stdout_to_stderr() as real_stdout:
        work = args.work_dir.resolve()
        for name in ("teachers", "cached", "uncached", "mlartifacts", "mlflow.db", "ray"):  # only what this writes
            target = work / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        data_path = bench_pipeline.cifar_subset(args.tarball, args.data_dir.resolve(), args.per_class)
        source = open_source("imagefolder", str(data_path))
        train_idx, val_idx = split_indices(len(source), VAL_FRACTION, SEED)  # the split every trial makes
        n_train, n_val = len(train_idx), len(val_idx)
        if n_train < args.batch_size:
            parser.error(f"--batch-size {args.batch_size} exceeds the {n_train} training samples")
        bench_pipeline.TEACHER_MODELS = (args.teacher_model,) * args.teachers  # what make_teachers builds
        teacher_paths = bench_pipeline.make_teachers(work / "teachers", source)
        trials = len(args.tolerance_fractions) * len(args.temperatures)
        say(
            f"{len(source)} images in {data_path}: {n_train} train / {n_val} val; {args.teachers} x "
            f"{args.teacher_model} teachers, {args.student_model} student; {trials} trials x {args.epochs} epochs, "
            f"V = {args.views}, {args.concurrency} at once, Ray with {ray_cpus} logical CPUs"
        )

        import mlflow
        import ray

        uri = f"sqlite:///{work / 'mlflow.db'}"
        client = mlflow.tracking.MlflowClient(uri)
        if client.get_experiment_by_name(EXPERIMENT) is None:  # artifacts beside the db, not in the working directory
            client.create_experiment(EXPERIMENT, artifact_location=(work / "mlartifacts").as_uri())
        sweep_files = write_configs(work, data_path, teacher_paths, args, uri)

        # a Ray temp dir of this run's own (see bench_pipeline.run_pipeline: another cluster on the
        # machine must not be taken for this one); Ray's socket paths must stay under 107 characters
        ray_tmp = work if len(str(work)) <= 36 else Path(tempfile.mkdtemp(prefix="ray-aekd-bench-"))
        os.environ["RAY_TMPDIR"] = str(ray_tmp)
        order = ("cached", "uncached") if args.order == "cached-first" else ("uncached", "cached")
        monitor = bench_pipeline.CpuMonitor()
        monitor.start()
        runs: dict[str, dict[str, Any]] = {}
        try:
            start_ray(ray_cpus)
            try:
                for mode in order:
                    runs[mode] = run_one(mode, sweep_files[mode])
            finally:
                ray.shutdown()
        finally:
            monitor.stop()
        for out in runs.values():
            out["cpu_share"] = monitor.shares(*out.pop("interval"))

        per_teacher = n_train * args.views + n_val
        expected_cache = args.teachers * per_teacher
        expected_trial = args.teachers * (n_train * args.epochs + n_val)
        cached, uncached = runs["cached"], runs["uncached"]
        complete = all("error" not in r and r["finished_trials"] == r["trials"] == trials for r in runs.values())
        ratio = cached["wall_seconds"] / uncached["wall_seconds"] if complete else None
        independent = (
            complete
            and all(p == 0 for p in cached["trial_forward_passes"])
            and cached["relabel_forward_passes"] == cached["teacher_forward_passes"] == expected_cache
            and all(v == per_teacher for v in (cached.get("relabel_forward_passes_per_teacher") or {"-": -1}).values())
        )
        result = {
            "metric": (
                "wall seconds of run_sweep (checks, relabel for the cached sweep, all trials, MLflow parent run) and "
                "teacher forward passes counted by the teacher stages (samples per teacher, summed over teachers)"
            ),
            "setting": {
                "dataset": "imagefolder: CIFAR-10 training JPEGs, the first --per-class files of each class",
                "data_path": str(data_path),
                "per_class": args.per_class,
                "samples": {"total": len(source), "train": n_train, "val": n_val},
                "teachers": [
                    {"name": p.name, "model": args.teacher_model, "weights": f"random init, torch seed {1000 + i}"}
                    for i, p in enumerate(teacher_paths)
                ],
                "student": args.student_model,
                "M": args.teachers,
                "grid": {
                    "distill.tolerance_fraction": args.tolerance_fractions,
                    "distill.temperature": args.temperatures,
                },
                "trials": trials,
                "epochs": args.epochs,
                "views": args.views,
                "uncached_cache_mode": args.uncached_mode,
                "batch_size": args.batch_size,
                "loss": LOSS,
                "optimizer": OPTIM,
                "ray": {
                    "logical_cpus": ray_cpus,
                    "max_concurrent_trials": args.concurrency,
                    "train_workers": 1,
                    "cpus_per_worker": WORKER_CPUS,
                    "teacher_num_cpus": TEACHER_CPUS,
                    "teacher_stage": "auto (tasks on CPU)",
                    "teacher_batch_size": TEACHER_BATCH,
                    "trial_cpus": TRIAL_CPUS,
                },
                "order": list(order),
                "tracking_uri": uri,
            },
            "machine": info | {"loadavg_at_end": os.getloadavg()},
            "versions": bench_pipeline.versions(),
            "expected_forward_passes": {
                "cache_per_teacher": per_teacher,
                "cache_total": expected_cache,
                "formula_cache": "M x (N_train x V + N_val)",
                "uncached_per_trial": expected_trial,
                "formula_uncached_per_trial": "M x (N_train x epochs + N_val)",
            },
            "cached": cached,
            "uncached": uncached,
            "wall_ratio_cached_over_uncached": ratio,
            "targets": TARGETS,
            "targets_met": {
                "passes_independent_of_trials": bool(independent),
                "wall_ratio": ratio is not None and ratio <= TARGETS["cached_over_uncached_wall_max"],
            },
            "complete": complete,
            "wall_seconds": time.perf_counter() - wall_start,
        }
        say(
            f"cached {cached['wall_seconds']:.0f} s, {cached.get('teacher_forward_passes')} passes; uncached "
            f"{uncached['wall_seconds']:.0f} s, {uncached.get('teacher_forward_passes')} passes; ratio "
            + (f"{ratio:.2f}" if ratio is not None else "n/a (a sweep did not complete)")
            + f" (target <= {TARGETS['cached_over_uncached_wall_max']}); {result['wall_seconds']:.0f} s in all"
        )
        text = json.dumps(result, indent=2)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        print(text, file=real_stdout, flush=True)
        real_stdout.close()
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
