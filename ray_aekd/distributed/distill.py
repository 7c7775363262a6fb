"""``ray-aekd distill``: distil trained teachers into a student on Ray.

``distill`` is a short sequence of named steps:

1. ``_prepare``: every check that needs no cluster (config, data, teacher checkpoints against
   the data, the student on one image, the soft-label cache, a resumed run's settings); then
   ``session.connect`` checks the cluster's resources;
2. ``_write_run_folder``: ``config.json``, ``environment.json``, shared storage checked;
3. ``_soft_labels``: the teacher stages (or the cache) over the validation split once (the
   teachers' and the ensemble's accuracy come from it) and the training split, streamed or kept;
4. ``_open_run``: opens (or, when the run is resumed, reopens) one MLflow run with the
   flattened config as params and the teachers' accuracies;
5. ``_fit``: a ``TorchTrainer`` whose workers read the training data
   (``distributed.pipeline``) and run ``distributed.train.train_loop``;
6. ``_close_run`` and ``_result``: ends the MLflow run, returns and saves the final metrics.

Running the same config (same ``name`` and ``output_dir``) again resumes from the last
checkpoint; a worker-group failure resumes too, up to ``workers.max_failures`` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from ray_aekd._console import LOG_FILE, capture_logs, verbose
from ray_aekd._provenance import environment, environment_tags
from ray_aekd.config import DistillConfig, FaultsConfig, flatten, with_env_faults
from ray_aekd.data import open_source
from ray_aekd.distributed.faults import UNREACHABLE_TRACKING_URI, TeacherFault
from ray_aekd.distributed.pipeline import ViewClock, distill_dataset, fixed_view
from ray_aekd.distributed.prepare import (
    check_run,
    demand_totals,
    resolve_paths,
    run_demands,
    shared_paths,
    stage_specs,
    teacher_accuracy,
)
from ray_aekd.distributed.session import Demand, check_shared, connect
from ray_aekd.distributed.soft_labels import cache_identity, cache_uri, cached_dataset, check_cache, teacher_identity
from ray_aekd.distributed.train import STOPPED_FILE, TIMINGS_FILE, TrialSession, progress_line, train_loop
from ray_aekd.tracking.client import create_run, finish_run, log_metrics, log_run_inputs, reopen_run
from ray_aekd.tracking.runs import (
    RUN_ID_FILE,
    TRACKING_FAILED_FILE,
    TRACKING_URI_FILE,
    dataset_input,
    limit_mlflow_retries,
    open_store,
    resolve_tracking_uri,
    retry_contended,
    system_tags,
)

__all__ = ["DistillResult", "TrialHooks", "distill", "format_result"]


@dataclasses.dataclass
class DistillResult:
    name: str
    strategy: str
    run_dir: str
    mlflow_run_id: str | None
    metrics: dict[str, float]  # the last epoch's metrics
    teachers: dict[str, float]  # teacher name -> val/acc1
    ensemble_acc1: float
    student_checkpoint: str
    seconds: float
    teacher_forward_passes: dict[str, int] = dataclasses.field(default_factory=dict)  # samples per teacher, counted
    soft_label_cache: str | None = None  # the cache the run read its soft labels from
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase; see fit_timings


# Keys that may change when a run is resumed; anything else would mix two different runs.
_RESUMABLE_KEYS = ("train.epochs", "workers.", "tracking.", "teachers.", "faults.")


def train_storage(config: DistillConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``storage_path``, or ``output_dir/_train``."""
    return config.storage_path or str(Path(config.output_dir) / "_train")


def _has_checkpoint(config: DistillConfig) -> bool:
    """Whether the run will resume (a checkpoint under ``<storage>/<name>``: Ray Train's, or
    the one a run in local mode writes itself, on local storage only)."""
    storage = train_storage(config)
    if "://" not in storage:
        return any((Path(storage) / config.name).glob("checkpoint_*"))
    if config.workers.num_workers == 0:
        return False
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage.rstrip("/") + "/" + config.name)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError as error:
        raise ValueError(f"storage_path: cannot list {storage!r} ({error}).") from None
    return any(Path(e.path).name.startswith("checkpoint_") for e in entries)


def _check_resume(config: DistillConfig, run_dir: Path, weights: list[str]) -> None:
    """A resumed run must be the same run: only more epochs, other workers or tracking."""
    saved_file = run_dir / "config.json"
    if not saved_file.exists():
        return
    now = json.loads(json.dumps(flatten(config)))
    # a key added to ray_aekd after the run was saved counts as its default (the run had no other)
    defaults = json.loads(json.dumps(flatten(DistillConfig(teachers=()))))
    saved = {k: v for k, v in defaults.items() if k in now} | json.loads(saved_file.read_text())
    teachers_now = [t.name for t in config.teachers]
    changed = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not k.startswith((*_RESUMABLE_KEYS, "__"))
    )
    if saved.get("__teachers__") not in (None, teachers_now):
        changed.append("teachers")
    if saved.get("__teacher_weights__") not in (None, list(weights)):
        changed.append("teachers (other weights, kinds or preprocessing)")
    if now["train.epochs"] < saved.get("train.epochs", 0):
        changed.append("train.epochs (lower than the run's)")
    if changed:
        raise ValueError(
            f"name: {config.name!r} is a run in {run_dir} that would be resumed, but these keys differ from it: "
            f"{', '.join(changed)}; allowed: only more train.epochs or other workers/tracking settings. "
            "Give a new name for a new run (or delete that folder and its checkpoints under storage_path/<name>)."
        )


def _open_run(
    config: DistillConfig,
    run_dir: Path,
    teachers: dict[str, float],
    ensemble: float,
    log: Callable[[str], None],
    resuming: bool,
    trial: TrialHooks | None = None,
    dataset: Any = None,
) -> tuple[str, str | None]:
    """Create (or reopen, when resuming) the run's MLflow run; ``None`` if MLflow is unreachable."""
    uri = resolve_tracking_uri(config.tracking.uri)
    (run_dir / TRACKING_URI_FILE).write_text(uri)  # where this run logs: `ray-aekd upload` goes there
    id_file = run_dir / RUN_ID_FILE
    resuming = resuming and id_file.exists()

    def create() -> str:
        if resuming:
            run_id = id_file.read_text().strip()
            reopen_run(uri, run_id)
            return run_id
        tags = (
            {"ray_aekd.strategy": config.distill.strategy, "ray_aekd.run_dir": str(run_dir)}
            | environment_tags()
            | (trial.tags if trial else {})
            | ({"mlflow.parentRunId": trial.parent_run_id} if trial and trial.parent_run_id else {})
        )
        return create_run(uri, config.tracking.experiment, config.name, system_tags(tags))

    try:
        run_id = retry_contended(create)  # a sweep's trials open their runs at the same moment
        if not resuming:
            params = flatten(config) | (trial.params if trial else {})
            metrics = {f"teacher/{n}/val/acc1": acc for n, acc in teachers.items()} | {"ensemble/val/acc1": ensemble}
            log_run_inputs(uri, run_id, params, metrics, dataset, retry=True)
    except Exception as error:  # an unreachable tracking server must not stop the run
        log(
            f"warning: MLflow at {uri} is not reachable ({type(error).__name__}: {error}); training without it, "
            f"metrics stay in {run_dir}; `ray-aekd upload {run_dir}` logs them when the server is back."
        )
        return uri, None
    id_file.write_text(run_id)
    return uri, run_id


@dataclasses.dataclass(frozen=True)
class TrialHooks:
    """How a Ray Tune trial (``ray_aekd.sweep``) runs a distillation: inside an existing Ray
    session, as a child of the sweep's MLflow run, reporting every epoch to Tune."""

    parent_run_id: str | None = None  # the sweep's MLflow run (tag mlflow.parentRunId)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra MLflow params (the sampled values)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    callbacks: tuple[Any, ...] = ()  # Ray Train callbacks (Tune's TuneReportCallback)


def distill(
    config: DistillConfig, log: Callable[[str], None] = print, trial: TrialHooks | None = None
) -> DistillResult:
    """Distil ``config.teachers`` into ``config.student`` on Ray; see the module docstring.
    Ray's and MLflow's log records go to ``ray_aekd.log`` in the run folder (``ray_aekd.console``)."""
    with capture_logs(Path(config.output_dir).resolve() / config.name / LOG_FILE) as logs:
        return _distill(config, log, trial, logs)


def _distill(
    config: DistillConfig, log: Callable[[str], None], trial: TrialHooks | None, logs: Path | None
) -> DistillResult:
    """prepare -> connect -> write the run folder -> soft labels -> open tracking -> fit -> result."""
    start = time.perf_counter()
    limit_mlflow_retries()
    run = _prepare(config)
    timings = {"prepare": time.perf_counter() - start}
    if trial is None:  # a sweep has checked its cluster already
        connect(*_resources(run.config), hint=_RESOURCE_HINT, demands=_demands(run.config))
    timings["ray_start"] = time.perf_counter() - start - timings["prepare"]
    local = local_mode(run.config)
    mark = time.perf_counter()
    _write_run_folder(run, check_storage=trial is None)  # a sweep has checked its folders already
    _announce(run, local, logs if trial is None else None, log)
    labels = _soft_labels(run, log)
    timings["teachers"] = time.perf_counter() - mark  # the validation split, and kept training views
    mark = time.perf_counter()
    dataset = training_dataset(run.config, run.source, run.train_idx, run.val_idx)
    uri, run_id = _open_run(
        run.config, run.run_dir, labels.teacher_acc, labels.ensemble_acc, log, run.resuming, trial, dataset
    )
    timings["mlflow_open"] = time.perf_counter() - mark
    if run_id:
        log(f"MLflow: {uri}, experiment {run.config.tracking.experiment!r}, run {run_id}")
    loop_config = _loop_config(run, labels, uri, run_id, local)
    trainer = _trainer(run, loop_config, labels, trial, local)
    status, fit_started, mark = "FAILED", time.time(), time.perf_counter()
    try:
        _fit(run, trainer, loop_config, labels, trial, local, log)
        status = "FINISHED"
    finally:
        timings["fit"] = time.perf_counter() - mark
        forwards = ray.get(labels.clock.forwards.remote())
        ray.kill(labels.clock)
        if run_id:
            _close_run(run, uri, run_id, status, forwards, log)
    failed = run.run_dir / TRACKING_FAILED_FILE
    if failed.exists():  # rank 0 lost MLflow during the run: say so where the user is looking
        log("warning: " + failed.read_text().strip())
    result = _result(run, run_id, labels, forwards, start, timings, fit_started)
    log(format_result(result))
    return result


@dataclasses.dataclass
class _Run:
    """A distillation run as the driver prepared it, before Ray schedules anything."""

    config: DistillConfig  # faults from the environment applied, paths resolved
    run_dir: Path
    source: Any
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    info: dict[str, Any]  # data and model facts the workers need (prepare.check_run)
    stages: list[Any]  # one teacher stage spec per teacher
    teacher_identities: list[str]  # what makes each teacher's logits (see _prepare)
    cache: str | None  # the soft-label cache the run reads, if any
    resuming: bool

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.config.teachers]


def _prepare(config: DistillConfig) -> _Run:
    """Every check that needs no cluster: config, data, teachers against the data, the student on
    one image, the soft-label cache, and whether (and that) the run resumes the same run."""
    config = with_env_faults(config)
    run_dir = Path(config.output_dir).resolve() / config.name
    config = resolve_paths(config, run_dir)
    source = open_source(
        config.data.dataset, config.data.path, download=config.data.download, size=config.data.image_size
    )
    train_idx, val_idx = config.data.split(len(source), config.seed)
    info = check_run(config, source, len(train_idx))
    stages = stage_specs(config, source)
    # what makes each teacher's logits (file digest, and kind and preprocessing where they matter): a resumed
    # run with other teachers is refused
    identities = [teacher_identity(t, s) for t, s in zip(config.teachers, stages, strict=True)]
    weights = [json.dumps(i, sort_keys=True) if len(i) > 2 else i["weights_sha256"] for i in identities]
    cache = cache_uri(config) if config.cache.path is not None else None
    if cache is not None:  # refuse a missing or stale cache before anything is scheduled
        check_cache(cache, cache_identity(config, source, train_idx, val_idx, stages))
    resuming = _has_checkpoint(config)
    if resuming:
        _check_resume(config, run_dir, weights)
    return _Run(config, run_dir, source, train_idx, val_idx, info, stages, weights, cache, resuming)


def _write_run_folder(run: _Run, check_storage: bool) -> None:
    """The run folder with ``config.json`` and ``environment.json`` (markers of an earlier run of
    this name cleared); with ``check_storage``, the folders every node writes are checked to be
    shared. Ray Data's console output is turned down (rank 0 prints one line per epoch)."""
    config, run_dir = run.config, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.resuming:  # a fault fires once per run: markers of an earlier run of this name go
        shutil.rmtree(run_dir / "faults", ignore_errors=True)
        (run_dir / TRACKING_FAILED_FILE).unlink(missing_ok=True)  # a new run: its MLflow failures only
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # a stop of an earlier attempt was fixed, or this is new
    saved = json.loads(json.dumps(flatten(config))) | {
        "__teachers__": run.names,
        "__teacher_weights__": run.teacher_identities,
    }
    (run_dir / "config.json").write_text(json.dumps(saved, indent=2))
    (run_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    if config.storage_path is not None and "://" not in config.storage_path:
        Path(config.storage_path).mkdir(parents=True, exist_ok=True)
    if check_storage:
        tracking_uri = resolve_tracking_uri(config.tracking.uri)
        open_store(tracking_uri)  # a SQLite store's file must exist to be checked
        check_shared(shared_paths(config, run_dir / "config.json", tracking_uri), tracking_uri)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one progress line per epoch comes from rank 0
    context.print_on_execution_start = False
    # blocks in a fixed order (slower: a slow block holds up the ones behind it) when runs must repeat exactly
    context.execution_options.preserve_order = config.data.deterministic


def _announce(run: _Run, local: bool, logs: Path | None, log: Callable[[str], None]) -> None:
    """What the run is about to do, on the console; ``logs``: where Ray's and MLflow's logs go,
    said when it is the run folder's own file (not when a command around the run said where)."""
    config, names = run.config, run.names
    log(
        f"{config.name}: distilling {len(names)} teachers ({', '.join(names)}) into {config.student.model} with "
        f"{config.distill.strategy} "
        + ("in this process (Ray Train's local mode)" if local else f"on {config.workers.num_workers} Train worker(s)")
        + f"; {len(run.train_idx)} train / "
        f"{len(run.val_idx)} validation {config.data.dataset} images"
        + (f"; soft labels from the cache at {run.cache}" if run.cache else "")
    )
    if logs == run.run_dir / LOG_FILE:
        log(f"Ray's and MLflow's logs: {logs} (--verbose shows them here)")
    if run.resuming:
        log(f"resuming {config.name} from its last checkpoint under {train_storage(config)}")
    if config.faults.active:
        log(f"fault injection on: {_describe_faults(config.faults)}")


@dataclasses.dataclass
class _Labels:
    """The run's data with its teachers' logits, and what the teachers scored on it."""

    clock: Any  # the ViewClock actor: the epoch for the views, and the teachers' forward-pass counts
    val: Any  # the validation split (materialised)
    train_sets: dict[str, Any]  # {"train": stream} or {"train_view<v>": view v}
    teacher_acc: dict[str, float]
    ensemble_acc: float

    def datasets(self) -> dict[str, Any]:
        return self.train_sets | {"val": self.val}


def _soft_labels(run: _Run, log: Callable[[str], None]) -> _Labels:
    """Start the teachers' stages (or the cache reads): the validation split once, the training
    split as a stream or as kept views (``SoftLabelData``); log the teachers' accuracy."""
    config, faults = run.config, run.config.faults
    fault = None
    if faults.kill_teacher is not None:
        fault = TeacherFault(faults.kill_teacher, faults.kill_teacher_batch, str(run.run_dir / "faults"))
    clock = ViewClock.remote()  # type: ignore[attr-defined]  # the epoch for the views, and the teachers' forward-pass counts
    # a seeded permutation: splits (and image folders) are sorted, often by class, and the
    # workers' local shuffle buffer only mixes a few batches
    train_idx = run.train_idx
    order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(config.seed))]
    data = SoftLabelData(config, run.source, run.stages, run.cache, clock, fault)
    val, train_sets = data.make(run.val_idx, order, run.info, log)
    teacher_acc, ensemble_acc = teacher_accuracy(val, run.names)
    log(
        "teachers val/acc1: "
        + "  ".join(f"{n} {a:.4f}" for n, a in teacher_acc.items())
        + f"   ensemble {ensemble_acc:.4f}"
    )
    return _Labels(clock, val, train_sets, teacher_acc, ensemble_acc)


def _loop_config(run: _Run, labels: _Labels, uri: str, run_id: str | None, local: bool) -> dict[str, Any]:
    """What every worker's ``train_loop`` gets (see its docstring)."""
    storage = train_storage(run.config)
    return {
        "config": dataclasses.asdict(run.config),
        "info": run.info,
        "run_dir": str(run.run_dir),
        "clock": labels.clock,
        "tracking_uri": uri,
        "mlflow_run_id": run_id,
        "source_size": len(run.source),
        "train_views": 0 if "train" in labels.train_sets else len(labels.train_sets),
        "local_mode": local,
        "train_dir": None if "://" in storage else str(Path(storage) / run.config.name),
    }


def _trainer(
    run: _Run, loop_config: dict[str, Any], labels: _Labels, trial: TrialHooks | None, local: bool
) -> TorchTrainer:
    """The ``TorchTrainer`` of the run: its workers, their resources, restarts and checkpoints."""
    config, workers = run.config, run.config.workers
    resources: dict[str, float] = {"CPU": workers.cpus} | workers.custom_resources
    if workers.use_gpu:
        resources["GPU"] = workers.gpus  # 1, or a share of one GPU for a single worker
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(  # type: ignore[call-arg]
            num_workers=0 if local else workers.num_workers,
            use_gpu=workers.use_gpu,
            resources_per_worker=resources,
            label_selector=workers.label_selector or None,
        ),
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=config.name,
            storage_path=train_storage(config),
            failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Train's per-report INFO lines repeat every metric; the epoch line from rank 0 says it once
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(trial.callbacks) if trial and not local else None,  # local mode runs none
        ),
        datasets=labels.datasets(),
        # the training stream is split evenly across workers; every worker reads all of the
        # validation set and scores its own share of it (see train_loop), so no sample is dropped
        dataset_config=ray.train.DataConfig(datasets_to_split=list(labels.train_sets)),
    )


def _fit(
    run: _Run,
    trainer: TorchTrainer,
    loop_config: dict[str, Any],
    labels: _Labels,
    trial: TrialHooks | None,
    local: bool,
    log: Callable[[str], None],
) -> None:
    """Train the student: Ray Train's worker group, or, in local mode inside a Tune trial (where
    Ray refuses ``ray.train.*``), the loop in this process. Outside a sweep the driver prints the
    epoch lines. A worker that stopped on NaN/Inf is raised as ``FloatingPointError`` with its
    reason (see ``train.STOPPED_FILE``), not as a worker's traceback."""
    stopped = run.run_dir / STOPPED_FILE
    steps = len(run.train_idx) // run.config.train.batch_size
    printer = (
        EpochPrinter(run.config, run.run_dir / "metrics.jsonl", labels.clock, steps, log) if trial is None else None
    )
    try:
        if printer is not None:  # a sweep prints one line per trial and epoch itself
            printer.start()
        if local and trial is not None:  # in a Tune trial Ray refuses ray.train.*: the loop runs here directly
            train_loop(loop_config | {"session": TrialSession(labels.datasets())})
        else:
            trainer.fit()  # returns when the group restarted after a stop: its workers return at once
        if stopped.exists():
            raise FloatingPointError(stopped.read_text().strip())
    except ray.train.WorkerGroupError as error:
        if not stopped.exists():
            raise
        raise FloatingPointError(stopped.read_text().strip()) from error  # not a worker's traceback
    finally:
        if printer is not None:
            printer.stop()


def _close_run(
    run: _Run, uri: str, run_id: str, status: str, forwards: dict[str, int], log: Callable[[str], None]
) -> None:
    """Log the teachers' forward passes and end the MLflow run with ``status``; a tracking server
    that does not answer only warns (``ray-aekd upload`` completes the run later)."""
    try:
        where = UNREACHABLE_TRACKING_URI if run.config.faults.mlflow_down_epoch else uri
        log_metrics(where, run_id, {"teacher_forward_passes": float(sum(forwards.values()))})
        finish_run(where, run_id, status)
    except Exception as error:
        log(
            f"warning: could not mark MLflow run {run_id} {status} ({error}); "
            f"`ray-aekd upload {run.run_dir}` completes it when the server is back."
        )


def _result(
    run: _Run,
    run_id: str | None,
    labels: _Labels,
    forwards: dict[str, int],
    start: float,
    driver_timings: dict[str, float],
    fit_started: float,
) -> DistillResult:
    """The run's result (the last epoch's metrics, where the time went: ``fit_timings``), also
    written to ``result.json``."""
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    result = DistillResult(
        name=run.config.name,
        strategy=run.config.distill.strategy,
        run_dir=str(run.run_dir),
        mlflow_run_id=run_id,
        metrics=json.loads(lines[-1]),
        teachers=labels.teacher_acc,
        ensemble_acc1=labels.ensemble_acc,
        student_checkpoint=str(run.run_dir / "student"),
        seconds=time.perf_counter() - start,
        teacher_forward_passes=forwards,
        soft_label_cache=run.cache,
        timings=fit_timings(driver_timings, run.run_dir / TIMINGS_FILE, fit_started, time.perf_counter() - start),
    )
    (run.run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result


#: Epoch lines a run prints at most (every epoch up to this many; else every ceil(E / this)-th and the
#: last; all of them with --verbose): every epoch is in metrics.jsonl and MLflow in any case.
MAX_EPOCH_LINES = 10


class EpochPrinter(threading.Thread):
    """Prints a run's epoch lines on the driver as rank 0 appends them to ``metrics.jsonl``, and,
    on a terminal, a progress bar of the current epoch (from the ``ViewClock``, which rank 0
    tells how far it is). The workers print nothing: their output is Ray's, and stays in its
    logs unless ``--verbose``."""

    def __init__(
        self, config: DistillConfig, metrics: Path, clock: Any, steps: int, log: Callable[[str], None]
    ) -> None:
        super().__init__(daemon=True)
        self.config, self.metrics, self.clock, self.log = config, metrics, clock, log
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.bar = sys.stdout.isatty()
        self.steps = max(1, steps)  # per epoch, on each worker
        self.printed = len(self._lines())  # a resumed run's earlier epochs were printed by its first attempt

    def _lines(self) -> list[dict[str, Any]]:
        try:
            text = self.metrics.read_text()
        except OSError:
            return []
        lines = []
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                lines.append(json.loads(line))
        return lines

    def poll(self) -> None:
        with self.lock:  # stop() polls once more while the thread may still be in its last poll
            self._poll()

    def _poll(self) -> None:
        lines = self._lines()
        epochs = self.config.train.epochs
        every = 1 if verbose() else math.ceil(epochs / MAX_EPOCH_LINES)
        for line in lines:
            if line["epoch"] > self.printed:
                if line["epoch"] % every == 0 or line["epoch"] == epochs:
                    if self.bar:
                        sys.stdout.write("\r\033[K")
                    self.log(progress_line(self.config, line["epoch"] - 1, line))
                self.printed = line["epoch"]
        if self.bar and not self.done.is_set():
            with contextlib.suppress(Exception):  # the clock is gone when the run ends
                epoch, step = ray.get(self.clock.position.remote(), timeout=5)
                if epoch + 1 > self.printed and step > 0:
                    width = 30
                    filled = min(width, width * step // self.steps)
                    sys.stdout.write(
                        f"\r  epoch {epoch + 1}/{self.config.train.epochs} [{'#' * filled}{'.' * (width - filled)}] "
                        f"{step}/{self.steps} steps"
                    )
                    sys.stdout.flush()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        self.poll()  # the last epochs
        if self.bar:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()


def local_mode(config: DistillConfig) -> bool:
    """Whether the training loop runs in this process (Train's local mode): asked for
    (``workers.num_workers: 0``), or one CPU worker on a one-node cluster, where a worker group
    would only add its start-up (in a sweep's trial too: the loop then reports to Tune itself).
    Kept as a worker group: restarts (``workers.max_failures``), placement, GPUs, fault drills."""
    workers = config.workers
    if workers.num_workers == 0:
        return True
    return (
        workers.num_workers == 1
        and not workers.use_gpu
        and not workers.custom_resources
        and not workers.label_selector
        and workers.max_failures == 0
        and config.faults.kill_worker_rank is None
        and sum(1 for node in ray.nodes() if node.get("Alive")) == 1
    )


#: Share of Ray's object store that ``cache.mode: auto`` lets the kept training views take.
MEMORY_SHARE = 0.5
#: The ``view`` column of validation rows kept with the training views (they are not augmented).
VAL_VIEW = -1


@dataclasses.dataclass
class SoftLabelData:
    """The data a run's workers read, with its teachers' logits: made by the teacher stages, or
    read from a disk cache (``cache.path``). The training split is either one stream whose
    teachers (or cache reads) run every epoch, or, when its views repeat and are kept
    (``cache.mode``), V views made once, together with the validation split in one pass, and
    materialised in Ray's object store; epoch e reads view ``e mod V``."""

    config: DistillConfig
    source: Any
    stages: list[Any]
    cache: str | None
    clock: Any
    fault: TeacherFault | None

    def _pass(self, indices: torch.Tensor, view: int | None, augment: bool, clock: Any = None) -> Any:
        names = [t.name for t in self.config.teachers]
        seed, views = self.config.seed, self.config.data.views
        if self.cache is not None:
            if view == VAL_VIEW:  # with a view column, as the training views it is kept with
                fixed = {"view": VAL_VIEW, "augment": False, "seed": seed, "pad": 0, "flip": False}
                val = cached_dataset(self.source, indices.numpy(), self.cache, names, "val")
                return val.map_batches(fixed_view, fn_kwargs=fixed, batch_format="numpy")  # type: ignore[arg-type]
            return cached_dataset(self.source, indices.numpy(), self.cache, names, "train", clock, seed, views,
                                  view=view if augment else None)  # fmt: skip
        return distill_dataset(
            self.source, indices.numpy(), self.stages, clock=clock, seed=seed, views=views, counter=self.clock,
            fault=self.fault, view=view, augment=augment and view != VAL_VIEW,
        )  # fmt: skip

    def make(
        self, val_idx: torch.Tensor, order: torch.Tensor, info: dict[str, Any], log: Callable[[str], None]
    ) -> tuple[Any, dict[str, Any]]:
        """``(validation dataset, {name: training dataset}})``: ``{"train": stream}`` or
        ``{"train_view<v>": view v}``; both materialised except the stream."""
        config = self.config
        views = config.data.repeating_views()
        channels, height, width = info["input_shape"]
        per_sample = channels * height * width + 24 + len(config.teachers) * info["num_classes"] * 4
        needed = ((views or 0) * len(order) + len(val_idx)) * per_sample  # images, ids, logits
        room = MEMORY_SHARE * ray.cluster_resources().get("object_store_memory", 0.0)
        mode = config.cache.mode
        hinted = config.distill.hint_weight > 0
        keep = mode == "memory" or (mode == "auto" and views is not None and not hinted and needed <= room)
        where = "the cache is read" if self.cache else "the teachers run"
        if not keep:
            why = {
                "stream": "cache.mode is stream",
                "auto": "data.views is null: each epoch sees a new view" if views is None
                else "hint features are not kept" if hinted
                else f"{views} view(s) need {needed / 2**20:.0f} MiB, more than half of Ray's object store",
            }[mode]  # fmt: skip
            log(f"soft labels: {where} every epoch ({why}).")
            val = self._pass(val_idx, VAL_VIEW if self.cache else None, augment=False).materialize()
            clock = self.clock if config.data.augment else None
            return val, {"train": self._pass(order, None, config.data.augment, clock)}
        assert views is not None  # DistillConfig.validate: memory needs repeating views
        log(
            f"soft labels: {where} once over {views} view(s) of the training split, kept in Ray's object store "
            f"({needed / 2**20:.1f} MiB) for every epoch."
        )
        # each part is its own execution: a union of them interleaves their blocks; task teacher stages keep
        # their models loaded between executions
        val = self._pass(val_idx, VAL_VIEW, augment=False).materialize()
        train = [self._pass(order, view, config.data.augment).materialize() for view in range(views)]
        return val, {f"train_view{v}": dataset for v, dataset in enumerate(train)}


def fit_timings(driver: dict[str, float], events_file: Path, fit_started: float, total: float) -> dict[str, float]:
    """Where a run's wall time went, in seconds: the driver's phases (``prepare``: config, data and
    teacher checks; ``ray_start``; ``teachers_val``: the teachers on the validation split;
    ``mlflow_open``; ``fit``), ``fit`` broken down from rank 0's events of this attempt
    (``worker_start``: until the training function ran; ``steps``, ``first_step`` of them,
    ``eval``, ``report`` (checkpoint and ``ray.train.report``), ``mlflow``, ``finish``: saving and
    logging the student; ``fit_other``: the rest, e.g. restarts and shutting the workers down),
    ``other``, ``total``, and ``training_share`` = steps / total."""
    out = dict(driver)
    events = []
    if events_file.exists():
        events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    events = [e for e in events if e["at"] >= fit_started]
    starts = [e for e in events if e["event"] == "loop_start"]
    epochs = [e for e in events if e["event"] == "epoch"]
    if starts:
        out["worker_start"] = starts[0]["at"] - fit_started
    for key in ("steps", "eval", "report", "mlflow"):
        out[key] = sum(e[key] for e in epochs)
    out["epochs"] = len(epochs)
    out["first_step"] = epochs[0]["first_step"] if epochs else 0.0
    out["finish"] = sum(e["seconds"] for e in events if e["event"] == "finish")
    inside = sum(out.get(k, 0.0) for k in ("worker_start", "steps", "eval", "report", "mlflow", "finish"))
    out["fit_other"] = driver.get("fit", 0.0) - inside
    out["other"] = total - sum(driver.values())
    out["total"] = total
    out["training_share"] = out["steps"] / total if total > 0 else 0.0
    return {k: round(v, 4) for k, v in out.items()}


def training_dataset(config: DistillConfig, source: Any, train_idx: torch.Tensor, val_idx: torch.Tensor) -> Any:
    """The run's data as an MLflow dataset input: where it is, and a digest of the source and
    the split (two runs with the same digest read the same samples)."""
    data = config.data
    where = data.path or ("sklearn.datasets.load_digits" if data.dataset == "digits" else data.dataset)
    facts = {
        "dataset": data.dataset,
        "path": data.path,
        "image_size": data.image_size,
        "samples": len(source),
        "classes": list(source.class_names),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    for indices in (train_idx, val_idx):
        digest.update(indices.sort().values.numpy().astype("int64").tobytes())
    profile = {"train_samples": len(train_idx), "val_samples": len(val_idx), "num_classes": source.num_classes,
               "input_shape": list(source.input_shape)}  # fmt: skip
    return dataset_input(data.dataset, digest.hexdigest()[:16], where, "training", profile)


_RESOURCE_HINT = "lower workers.cpus, teachers.<i>.cpus or teachers.<i>.actors"


def _demands(config: DistillConfig) -> list[Demand]:
    return run_demands(config, teachers=config.cache.path is None, workers=True)


def _resources(config: DistillConfig) -> tuple[float, float, str]:
    """``(CPUs, GPUs, what)`` one distillation run needs at once (from the config alone)."""
    cpus, gpus = demand_totals(_demands(config))
    workers = max(1, config.workers.num_workers)
    stages = "the soft-label cache" if config.cache.path is not None else f"{len(config.teachers)} teacher stage(s)"
    return cpus, gpus, f"{stages} and {workers} train worker(s)"


def _describe_faults(faults: FaultsConfig) -> str:
    parts = []
    if faults.kill_worker_rank is not None:
        parts.append(f"kill Train worker rank {faults.kill_worker_rank} before step {faults.kill_worker_step}")
    if faults.kill_teacher is not None:
        parts.append(f"kill a process of teacher {faults.kill_teacher!r} at its batch {faults.kill_teacher_batch}")
    if faults.mlflow_down_epoch is not None:
        parts.append(f"tracking server unreachable from epoch {faults.mlflow_down_epoch}")
    return "; ".join(parts) + " (once each)"


def format_result(result: DistillResult) -> str:
    m = result.metrics
    return (
        f"{result.name} ({result.strategy}): val/acc1 {m['val/acc1']:.4f}  val/acc5 {m['val/acc5']:.4f}  "
        f"val/agreement {m['val/agreement']:.4f}  val/ece {m['val/ece']:.4f}  ({result.seconds:.0f} s); "
        f"student saved to {result.student_checkpoint}"
    )
