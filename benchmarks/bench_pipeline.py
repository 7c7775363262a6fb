"""Training throughput of the Ray distillation pipeline against the same work in one process.

    python benchmarks/bench_pipeline.py [--per-class 300] [--epochs 6] [--batch-size 64] [--json out.json]

(a) pipeline: ``ray_aekd.distill.distill`` on a local Ray (one Train worker, one Ray Data
    stage per teacher, augmentation on; on CPU a teacher stage runs as Ray tasks that keep the
    model loaded per worker process, ``teachers.<i>.stage: auto``); per-epoch numbers from the run's
    ``metrics.jsonl``.
(b) inline: one process, no Ray: the same teacher checkpoints, student, data, views
    (``augment`` keyed by (seed, epoch, index)), batch size and ``DistillSettings``; teacher
    forwards under ``torch.inference_mode()``, then ``engine.distill_step``.

Data: a CIFAR-10 subset, ``--per-class`` JPEGs of each class copied from the training tarball
into an image folder outside the repository (``dataset: imagefolder``), so both sides decode
JPEGs every epoch. Teachers and student are random-init CIFAR ResNet-8s (seeded): this
measures speed only.

Throughput is training samples per second of the training pass, from the start of an epoch to
its last optimiser step (pipeline: ``train/samples_per_second``, which includes re-creating the
teacher stages and restarting the streaming pipeline at every epoch). Epoch 1 is
start-up and is dropped; medians are over epochs >= 2. Per-epoch validation (and, for the
pipeline, checkpointing and reporting) is reported beside it, not in it.

Threads: Ray gives every worker process OMP_NUM_THREADS = max(1, floor(num_cpus)), so the
Train worker, each teacher actor and each data task run one torch thread (probed and reported);
the inline loop gets ``--inline-threads`` (default: all cores), so that both sides can use the
whole machine. ``ray.init(num_cpus=4)``: logical CPUs, so that the worker and the three teacher
pools are scheduled together on 2 cores.

Inline runs first, while no Ray is running; then Ray starts for the pipeline and is shut down.
CPU time taken meanwhile by processes outside this one's tree (on a shared machine) is
reported per epoch (``cpu_share.other_processes``, beside ``cpu_share.busy``, the whole
machine's): epochs with a large other share are not clean.
Prints one JSON object on stdout (progress, Ray's and the workers' output go to stderr).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ray_aekd import __version__
from ray_aekd.config import DistillConfig, from_dict
from ray_aekd.core.metrics import SUMS_LENGTH, ensemble_probabilities, validation_metrics, validation_sums
from ray_aekd.core.step import DistillSettings, distill_step, make_optimizer
from ray_aekd.data import normalize, open_source, split_indices
from ray_aekd.data.sources import ImageSource
from ray_aekd.data.views import augment
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TARBALL = Path("/work/shared/data/cifar10-train-jpg.tar.gz")
TARGETS = {"pipeline_over_inline_min": 0.7}
TEACHER_MODELS = ("resnet8", "resnet8", "resnet8")
STUDENT_MODEL = "resnet8"
SEED, VAL_FRACTION = 0, 0.2
RAY_CPUS = 4  # logical: the Train worker (1) and three one-CPU teacher or data tasks at a time
WORKER_CPUS, TEACHER_CPUS, TEACHER_BATCH = 1.0, 1.0, 256
LOSS = {"strategy": "aekd", "tolerance": 0.6, "temperature": 4.0, "ce_weight": 1.0, "kd_weight": 0.9}
OPTIM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}


def say(line: str) -> None:
    print(f"[bench_pipeline] {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """Send everything written to file descriptor 1 (this process, Ray's processes started
    meanwhile, and the worker output Ray forwards) to stderr; yields the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ---------------------------------------------------------------- other load on the machine


class CpuMonitor(threading.Thread):
    """Samples /proc every 0.5 s: how busy the machine is (``/proc/stat``, exact) and how much
    of that is processes outside this process's tree (another user's tests; Ray's processes
    started here count as ours). A foreign process loses its last half second when it ends
    between two samples, so the foreign share is a lower bound."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop_event = threading.Event()
        self._last, self._last_stat = self._sample(), self._stat()
        self.series: list[tuple[float, float, float]] = [(time.perf_counter(), 0.0, 0.0)]  # t, foreign, busy (s)

    def _stat(self) -> tuple[float, float]:
        """(busy, total) CPU seconds of the whole machine since boot."""
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        total = sum(values) / self._tick
        return total - (values[3] + values[4]) / self._tick, total  # idle and iowait are not busy

    def _sample(self) -> dict[int, tuple[int, float]]:
        """pid -> (parent pid, user + system CPU seconds)."""
        out = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    raw = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = raw[raw.rindex(")") + 2 :].split()
                    out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick)
        return out

    @staticmethod
    def _foreign(sample: dict[int, tuple[int, float]]) -> set[int]:
        me, ours, theirs = os.getpid(), set(), set()
        for pid in sample:
            chain, cur = [], pid
            while cur not in ours and cur not in theirs and cur != me and cur in sample and cur > 1:
                chain.append(cur)
                cur = sample[cur][0]
            (ours if cur == me or cur in ours else theirs).update(chain)
        return theirs

    def run(self) -> None:
        while not self._stop_event.wait(0.5):
            sample, stat = self._sample(), self._stat()
            foreign = sum(
                max(0.0, sample[pid][1] - self._last[pid][1]) for pid in self._foreign(sample) if pid in self._last
            )
            busy = stat[0] - self._last_stat[0]
            self._last, self._last_stat = sample, stat
            t, foreign_sum, busy_sum = self.series[-1]
            self.series.append((time.perf_counter(), foreign_sum + foreign, busy_sum + busy))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def _at(self, t: float, column: int) -> float:
        times = [row[0] for row in self.series]
        i = bisect.bisect_left(times, t)
        if i == 0 or i == len(self.series):
            return self.series[min(i, len(self.series) - 1)][column]
        (t0, *a), (t1, *b) = self.series[i - 1], self.series[i]
        return a[column - 1] + (b[column - 1] - a[column - 1]) * (t - t0) / (t1 - t0)

    def shares(self, start: float, end: float) -> dict[str, float | None]:
        """Over [start, end], as shares of the machine's CPU time (0..1): ``busy`` (everything)
        and ``other_processes`` (not this process tree)."""
        capacity = (end - start) * (os.cpu_count() or 1)
        if capacity <= 0:
            return {"busy": None, "other_processes": None}
        return {
            "busy": (self._at(end, 2) - self._at(start, 2)) / capacity,
            "other_processes": (self._at(end, 1) - self._at(start, 1)) / capacity,
        }


# ---------------------------------------------------------------- data and teachers


def cifar_subset(tarball: Path, data_dir: Path, per_class: int) -> Path:
    """Extract ``tarball`` (``train/<class>/<image>.jpg``) into ``data_dir`` if it is not there,
    then copy the first ``per_class`` files (by name) of every class into ``cifar10-sub-<N>``
    next to it. Both are reused when complete."""
    root = data_dir / "train"
    if not root.is_dir():
        say(f"extracting {tarball} into {data_dir} ...")
        partial = data_dir.with_name(data_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with tarfile.open(tarball) as archive:
            archive.extractall(partial, filter="data")
        data_dir.mkdir(parents=True, exist_ok=True)
        (partial / "train").rename(root)
        shutil.rmtree(partial)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    subset = data_dir.parent / f"cifar10-sub-{per_class}"
    files = {c: sorted((root / c).iterdir())[:per_class] for c in classes}
    short = [c for c, fs in files.items() if len(fs) < per_class]
    if short:
        raise SystemExit(f"--per-class {per_class}: classes {short} have fewer images in {root}.")

    def names(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    complete = names(subset) == classes and all(names(subset / c) == [f.name for f in fs] for c, fs in files.items())
    if not complete:
        partial = subset.with_name(subset.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for c, fs in files.items():
            (partial / c).mkdir(parents=True)
            for f in fs:
                shutil.copyfile(f, partial / c / f.name)
        shutil.rmtree(subset, ignore_errors=True)
        partial.rename(subset)
    return subset


def make_teachers(folder: Path, source: ImageSource) -> list[Path]:
    """Random-init teachers (torch seeds 1000 + i), saved as ray_aekd checkpoints for ``source``."""
    paths = []
    for i, arch in enumerate(TEACHER_MODELS):
        torch.manual_seed(1000 + i)
        model = build_model(arch, source.num_classes, in_channels=source.input_shape[0])
        path = folder / f"t{i}"
        save_checkpoint(
            str(path),
            model,
            CheckpointMetadata(
                architecture=arch,
                num_classes=source.num_classes,
                input_shape=source.input_shape,
                mean=tuple(source.mean),
                std=tuple(source.std),
                dataset="imagefolder",
                class_names=tuple(source.class_names),
                seed=1000 + i,
            ),
        )
        paths.append(path)
    return paths


# ---------------------------------------------------------------- (b) inline


def load_batch(source: ImageSource, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [source[int(i)] for i in indices]
    return torch.stack([image for image, _ in rows]), torch.tensor([label for _, label in rows], dtype=torch.int64)


def run_inline(
    source: ImageSource,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    teacher_paths: list[Path],
    epochs: int,
    batch_size: int,
    threads: int,
) -> dict[str, Any]:
    """The pipeline's work in one process; per-epoch times of the training pass, split by phase."""
    from ray_aekd.distributed.pipeline import view_settings  # a plain function; nothing of Ray runs

    torch.set_num_threads(threads)
    setup_start = time.perf_counter()
    teachers = []
    for path in teacher_paths:
        model, meta = load_checkpoint(
            str(path), expect_num_classes=source.num_classes, expect_input_shape=source.input_shape
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        teachers.append((model.eval(), meta.mean, meta.std))
    torch.manual_seed(SEED)  # the train loop's seeding of the student
    student = build_model(STUDENT_MODEL, source.num_classes, in_channels=source.input_shape[0])
    optimizer, scheduler = make_optimizer(
        student, OPTIM["lr"], OPTIM["momentum"], OPTIM["weight_decay"], OPTIM["schedule"], epochs
    )
    settings = DistillSettings(**LOSS)
    mean, std = tuple(source.mean), tuple(source.std)
    pad, flip = view_settings(source)
    # validation as the pipeline has it: decoded and through the teachers once, at start-up
    val_images, val_labels = load_batch(source, val_idx)
    val_x = normalize(val_images, mean, std)
    with torch.inference_mode():
        val_teachers = torch.stack([t(normalize(val_images, m, s)) for t, m, s in teachers])
    val_ensemble = ensemble_probabilities(val_teachers)
    setup_seconds = time.perf_counter() - setup_start

    rows, step = [], 0
    for epoch in range(epochs):
        phases = dict.fromkeys(("load", "augment", "teachers", "step"), 0.0)
        started = time.perf_counter()
        student.train()
        order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(SEED * 1000 + epoch))]
        loss_sum, samples = torch.zeros((), dtype=torch.float64), 0
        for first in range(0, len(order) - batch_size + 1, batch_size):  # drop_last, as the workers do
            idx = order[first : first + batch_size]
            t0 = time.perf_counter()
            images, labels = load_batch(source, idx)
            t1 = time.perf_counter()
            images = augment(images, idx, SEED, epoch, pad=pad, flip=flip)
            x = normalize(images, mean, std)
            t2 = time.perf_counter()
            with torch.inference_mode():
                logits = torch.stack([t(normalize(images, m, s)) for t, m, s in teachers])
            teacher_logits = logits.clone()  # an ordinary tensor, as the pipeline's batches are
            t3 = time.perf_counter()
            out = distill_step(student, x, labels, teacher_logits, optimizer, settings, None, step)
            loss_sum += out["loss"].double() * len(labels)
            t4 = time.perf_counter()
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[name] += seconds
            samples += len(labels)
            step += 1
        scheduler.step()
        train_seconds = time.perf_counter() - started
        student.eval()
        with torch.inference_mode():
            sums = torch.zeros(SUMS_LENGTH, dtype=torch.float64)
            for first in range(0, len(val_x), 512):
                chunk = slice(first, first + 512)
                sums += validation_sums(student(val_x[chunk]), val_labels[chunk], val_ensemble[chunk])
            val = validation_metrics(sums)
        epoch_seconds = time.perf_counter() - started
        rows.append(
            {
                "epoch": epoch + 1,
                "interval": (started, started + train_seconds),
                "samples": samples,
                "train_seconds": train_seconds,
                "samples_per_second": samples / train_seconds,
                "epoch_seconds": epoch_seconds,
                "samples_per_second_incl_validation": samples / epoch_seconds,
                "phase_seconds": phases,
                "train_loss": float(loss_sum) / samples,
                "val_acc1": val["val/acc1"],
            }
        )
        say(f"inline epoch {epoch + 1}/{epochs}: {samples / train_seconds:.0f} samples/s  {epoch_seconds:.2f}s")
    steady = rows[1:]
    return {
        "threads": torch.get_num_threads(),
        "interval": (setup_start, time.perf_counter()),
        "setup_seconds": setup_seconds,
        "median_samples_per_second": statistics.median(r["samples_per_second"] for r in steady),
        "median_samples_per_second_incl_validation": statistics.median(
            r["samples_per_second_incl_validation"] for r in steady
        ),
        "median_phase_share": {
            name: statistics.median(r["phase_seconds"][name] / r["train_seconds"] for r in steady)
            for name in rows[0]["phase_seconds"]
        },
        "epochs": rows,
    }


# ---------------------------------------------------------------- (a) pipeline


class LineWatcher(threading.Thread):
    """Notes when each line of ``path`` appears (polled every 50 ms): epoch ends as the
    driver sees them, checkpoint and report included."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.times = path, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._poll()
            time.sleep(0.05)
        self._poll()

    def _poll(self) -> None:
        with contextlib.suppress(OSError):
            count = sum(1 for line in self.path.read_text().splitlines() if line.strip())
            now = time.perf_counter()
            self.times += [now] * max(0, count - len(self.times))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def thread_probe() -> dict[str, Any]:
    """torch intra-op threads in Ray processes holding what the Train worker and a teacher
    actor hold (Ray sets OMP_NUM_THREADS from the CPUs it assigns)."""
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> tuple[str | None, int]:
            return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    out = {}
    for label, cpus in (("train_worker", WORKER_CPUS), ("teacher_task", TEACHER_CPUS)):
        actor = Probe.options(num_cpus=cpus).remote()
        env, threads = ray.get(actor.threads.remote())
        ray.kill(actor)
        out[label] = {"num_cpus": cpus, "OMP_NUM_THREADS": env, "torch_threads": threads}
    return out


def run_pipeline(
    data_path: Path,
    teacher_paths: list[Path],
    output_dir: Path,
    epochs: int,
    batch_size: int,
    soft_limit: int | None = None,
) -> dict[str, Any]:
    import mlflow
    import ray

    from ray_aekd.distributed.distill import distill

    uri = f"sqlite:///{output_dir / 'mlflow.db'}"
    experiment = "bench-pipeline"
    client = mlflow.tracking.MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:  # artifacts beside the db, not in the working directory
        client.create_experiment(experiment, artifact_location=(output_dir / "mlartifacts").as_uri())
    config = from_dict(
        DistillConfig,
        {
            "teachers": [
                {
                    "name": p.name,
                    "checkpoint": str(p),
                    "cpus": TEACHER_CPUS,
                    "actors": 1,
                    "batch_size": TEACHER_BATCH,
                }
                for p in teacher_paths
            ],
            "student": {"model": STUDENT_MODEL},
            "distill": LOSS,
            "data": {"dataset": "imagefolder", "path": str(data_path), "augment": True, "val_fraction": VAL_FRACTION},
            "train": {"epochs": epochs, "batch_size": batch_size, **OPTIM},
            "workers": {"num_workers": 1, "cpus": WORKER_CPUS},
            "tracking": {"uri": uri, "experiment": experiment},
            "name": "bench",
            "output_dir": str(output_dir / "pipeline"),
            "seed": SEED,
        },
    )
    # A Ray temp dir of this run's own. Ray Train's placement-group cleaner finds "the" local
    # cluster through <tmp>/ray/ray_current_cluster, which a `ray start` elsewhere on the machine
    # writes; it then asked that cluster for this run's controller, took it for dead and removed
    # the worker group's placement group mid-run (seen on a shared machine). Workers inherit this.
    # Ray's sockets live under <RAY_TMPDIR>/ray/session_<date>_<pid>/sockets/ (at most 107 characters)
    ray_tmp = output_dir if len(str(output_dir)) <= 36 else Path(tempfile.mkdtemp(prefix="ray-aekd-bench-"))
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    init_start = time.perf_counter()
    system = {"num_workers_soft_limit": soft_limit} if soft_limit is not None else None
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, _system_config=system)
    try:
        init_seconds = time.perf_counter() - init_start
        threads = thread_probe()
        watcher = LineWatcher(output_dir / "pipeline" / "bench" / "metrics.jsonl")
        watcher.start()
        start = time.perf_counter()
        try:
            result = distill(config, log=lambda line: say(f"distill: {line}"))
        finally:
            watcher.stop()
        total_seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    lines = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    rows, previous_step = [], 0
    ends = [start, *watcher.times]
    for i, line in enumerate(lines):
        samples = (line["step"] - previous_step) * batch_size  # one worker: its batch is the global batch
        previous_step = line["step"]
        train_seconds = samples / line["train/samples_per_second"]
        cycle = ends[i + 1] - ends[i] if i + 1 < len(ends) else None
        # the training pass ended (epoch_seconds - train_seconds) before the line was written
        end = ends[i + 1] - (line["epoch_seconds"] - train_seconds) if i + 1 < len(ends) else None
        rows.append(
            {
                "epoch": line["epoch"],
                "interval": (end - train_seconds, end) if end is not None else None,
                "samples": samples,
                "train_seconds": train_seconds,
                "samples_per_second": line["train/samples_per_second"],
                "epoch_seconds": line["epoch_seconds"],
                "samples_per_second_incl_validation": samples / line["epoch_seconds"],
                "cycle_seconds": cycle,
                "train_loss": line["train/loss"],
                "val_acc1": line["val/acc1"],
            }
        )
    steady = rows[1:]
    cycles = [r["cycle_seconds"] for r in steady if r["cycle_seconds"]]
    return {
        "threads": threads,
        "ray_init_seconds": init_seconds,
        "distill_seconds": total_seconds,
        "first_epoch_end_seconds": (watcher.times[0] - start) if watcher.times else None,
        "after_last_epoch_seconds": (start + total_seconds - watcher.times[-1]) if watcher.times else None,
        "median_samples_per_second": statistics.median(r["samples_per_second"] for r in steady),
        "median_samples_per_second_incl_validation": statistics.median(
            r["samples_per_second_incl_validation"] for r in steady
        ),
        "median_cycle_samples_per_second": statistics.median(
            r["samples"] / r["cycle_seconds"] for r in steady if r["cycle_seconds"]
        )
        if cycles
        else None,
        "run_dir": result.run_dir,
        "ray_logs": str(ray_tmp / "ray" / "session_latest" / "logs"),
        "interval": (start, start + total_seconds),
        "epochs": rows,
    }


# ---------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), None)
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        info["memory_gib"] = round(int(next(ln for ln in meminfo if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    return info


def versions() -> dict[str, Any]:
    import mlflow
    import ray

    out: dict[str, Any] = {
        "ray_aekd": __version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
        if commit.returncode == 0:
            out["git"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=300, help="images per CIFAR-10 class (10 classes)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each side; epoch 1 is dropped")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (global = per worker here)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("/tmp/cifar10-jpg"), help="where the tarball is extracted"
    )
    parser.add_argument("--tarball", type=Path, default=TARBALL, help="CIFAR-10 training JPEGs, train/<class>/*.jpg")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/ray-aekd-bench-pipeline"), help="scratch output")
    parser.add_argument(
        "--inline-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the inline loop (all cores)"
    )
    parser.add_argument(
        "--ray-soft-limit",
        type=int,
        default=None,
        help="experiment: Ray's num_workers_soft_limit (idle worker processes kept); default: Ray's own",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.epochs < 4:
        parser.error("--epochs must be >= 4: epoch 1 is dropped and at least 3 steady-state epochs are measured")
    wall_start = time.perf_counter()
    info = machine()

    with stdout_to_stderr() as real_stdout:
        output_dir = args.output_dir.resolve()
        for name in ("teachers", "pipeline", "mlartifacts", "mlflow.db", "ray"):  # only what this script writes
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        data_path = cifar_subset(args.tarball, args.data_dir.resolve(), args.per_class)
        source = open_source("imagefolder", str(data_path))
        train_idx, val_idx = split_indices(len(source), VAL_FRACTION, SEED)  # the split distill() makes
        if len(train_idx) < args.batch_size:
            parser.error(f"--batch-size {args.batch_size} exceeds the {len(train_idx)} training samples")
        teacher_paths = make_teachers(output_dir / "teachers", source)
        say(f"{len(source)} images in {data_path}: {len(train_idx)} train / {len(val_idx)} val; {args.epochs} epochs")

        monitor = CpuMonitor()
        monitor.start()
        try:
            say(f"(b) inline, {args.inline_threads} torch threads ...")
            inline = run_inline(
                source, train_idx, val_idx, teacher_paths, args.epochs, args.batch_size, args.inline_threads
            )
            say("(a) Ray pipeline ...")
            pipeline = run_pipeline(
                data_path, teacher_paths, output_dir, args.epochs, args.batch_size, args.ray_soft_limit
            )
        finally:
            monitor.stop()
        cpu = {}
        for side, out in (("inline", inline), ("pipeline", pipeline)):
            cpu[side] = monitor.shares(*out.pop("interval"))
            for row in out["epochs"]:
                interval = row.pop("interval")
                row["cpu_share"] = monitor.shares(*interval) if interval else None
            say(f"{side}: machine {cpu[side]['busy']:.0%} busy, other processes {cpu[side]['other_processes']:.0%}")

        ratio = pipeline["median_samples_per_second"] / inline["median_samples_per_second"]
        result = {
            "metric": (
                "training samples/s over the training pass of an epoch (first batch request to last optimiser step; "
                "pipeline: train/samples_per_second, which includes re-creating the teacher stages and restarting "
                "the streaming pipeline each epoch); median over epochs >= 2 (epoch 1 is start-up). *_incl_validation: "
                "over epoch_seconds (+ per-epoch student validation); pipeline cycle: between consecutive metrics "
                "lines as the driver sees them (+ checkpoint and report)."
            ),
            "setting": {
                "dataset": "imagefolder: CIFAR-10 training JPEGs, the first --per-class files of each class",
                "data_path": str(data_path),
                "per_class": args.per_class,
                "samples": {
                    "total": len(source),
                    "train": len(train_idx),
                    "val": len(val_idx),
                    "per_epoch": len(train_idx) // args.batch_size * args.batch_size,
                },
                "teachers": [
                    {"name": p.name, "model": arch, "weights": f"random init, torch seed {1000 + i}"}
                    for i, (p, arch) in enumerate(zip(teacher_paths, TEACHER_MODELS, strict=True))
                ],
                "student": STUDENT_MODEL,
                "M": len(teacher_paths),
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "steady_state_epochs": args.epochs - 1,
                "augment": True,
                "loss": LOSS,
                "optimizer": OPTIM,
                "ray": {
                    "logical_cpus": RAY_CPUS,
                    "train_workers": 1,
                    "cpus_per_worker": WORKER_CPUS,
                    "teacher_num_cpus": TEACHER_CPUS,
                    "actors_per_teacher": 1,
                    "teacher_batch_size": TEACHER_BATCH,
                    "num_workers_soft_limit": args.ray_soft_limit or "Ray's default",
                },
                "torch_threads": {"inline": inline["threads"], "pipeline": pipeline["threads"]},
            },
            "machine": info | {"loadavg_at_end": os.getloadavg()},
            "cpu_share": cpu,
            "versions": versions(),
            "pipeline_samples_per_second": pipeline["median_samples_per_second"],
            "inline_samples_per_second": inline["median_samples_per_second"],
            "ratio": ratio,
            "ratio_incl_validation": pipeline["median_samples_per_second_incl_validation"]
            / inline["median_samples_per_second_incl_validation"],
            "targets": TARGETS,
            "meets_target": ratio >= TARGETS["pipeline_over_inline_min"],
            "pipeline": pipeline,
            "inline": inline,
            "wall_seconds": time.perf_counter() - wall_start,
        }
        say(
            f"pipeline {result['pipeline_samples_per_second']:.0f} samples/s, inline "
            f"{result['inline_samples_per_second']:.0f} samples/s: ratio {ratio:.2f} (target >= "
            f"{TARGETS['pipeline_over_inline_min']}); {result['wall_seconds']:.0f} s in all"
        )
        text = json.dumps(result, indent=2)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        print(text, file=real_stdout, flush=True)
        real_stdout.close()


if __name__ == "__main__":
    main()
