"""The per-worker training function of a distillation run (Ray Train, ``TorchTrainer``).

Thin by design, as in Ray's examples: restore (build the student, resume from
``ray.train.get_checkpoint()`` if there is one) -> per epoch: set the view clock,
``epochs.train_epoch`` over the worker's shard, ``epochs.validate_epoch``, report -> finish
(rank 0 exports the student). The epoch functions know nothing of Ray. The AE-KD weights are
made identical on every worker by all-reducing the ``[M, K]`` gradient means (or the
``[M, M]`` Gram) inside the step. Rank 0 alone writes the run folder and logs to MLflow.

Run folder (``output_dir/<name>/``, shared storage on a multi-node cluster):
``metrics.jsonl`` (one line per epoch), ``alpha/rank<r>.csv`` (per-step weights, written by
every rank so that anyone can check they agree), ``cosine.json``, ``plots/``, ``student/``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
import torch.distributed as dist
from torch import nn

from ray_aekd.config import DistillConfig, from_dict
from ray_aekd.core.losses import HintRegressors
from ray_aekd.core.step import DistillSettings, HintStudent
from ray_aekd.core.weighting import NonFiniteLogitsError
from ray_aekd.distributed.epochs import (
    EpochTotals,
    StudentBatch,
    train_epoch,
    train_metrics,
    train_optimizer,
    validate_epoch,
)
from ray_aekd.distributed.faults import UNREACHABLE_TRACKING_URI, die, fire_once
from ray_aekd.distributed.pipeline import feature_column, logits_column
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointMetadata, read_state_dict, save_checkpoint
from ray_aekd.models.export import with_preprocess
from ray_aekd.models.preprocess import Preprocess
from ray_aekd.tracking.plots import plot_cosine_matrix, plot_weights
from ray_aekd.tracking.runs import RunLogger, limit_mlflow_retries, model_signature

__all__ = ["STATE_FILE", "STOPPED_FILE", "TIMINGS_FILE", "progress_line", "train_loop"]

STATE_FILE = "state.pt"
DONE_FILE = "finished"
#: In a run folder: why the run stopped (non-finite logits); every worker that starts after it exists returns
#: at once, so a worker-group restart does not train on into the same NaN, and the driver raises its text.
STOPPED_FILE = "stopped.txt"
#: In a run folder: where rank 0's time went, one JSON line per event (loop start, epoch, finish); the
#: driver folds it into ``result.json``'s ``timings``.
TIMINGS_FILE = "timings.jsonl"


def _record_time(run_dir: Path, event: str, **fields: float) -> None:
    with (run_dir / TIMINGS_FILE).open("a") as f:
        f.write(json.dumps({"event": event, "at": time.time(), **fields}) + "\n")


class TrainSession:
    """What the loop asks of Ray Train: its rank, device, data shards, reports, checkpoint."""

    def world(self) -> tuple[int, int]:
        context = ray.train.get_context()
        return context.get_world_rank(), context.get_world_size()

    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    def dataset_shard(self, name: str) -> Any:
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)

    def checkpoint(self) -> Any:
        return ray.train.get_checkpoint()


class TrialSession(TrainSession):
    """The loop run directly in a Ray Tune trial's process (one worker, no worker group): Ray
    refuses ``ray.train.*`` calls inside a Tune trial, so the datasets are handed over here and
    the reports go to Tune. No checkpoint comes from Ray: the loop keeps its own (local mode)."""

    def __init__(self, datasets: dict[str, Any]) -> None:
        self.datasets = datasets

    def world(self) -> tuple[int, int]:
        return 0, 1

    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def dataset_shard(self, name: str) -> Any:
        return self.datasets[name]

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        ray.tune.report(metrics)

    def checkpoint(self) -> Any:
        return None


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _build_student(config: DistillConfig, info: dict[str, Any]) -> nn.Module:
    student = build_model(config.student.model, info["num_classes"], in_channels=info["input_shape"][0])
    if config.distill.hint_weight == 0:
        return student
    regressors = HintRegressors(info["student_hint_channels"], info["teacher_hint_channels"])
    return HintStudent(student, info["student_hint_layer"], regressors)


def _plain_student(model: nn.Module) -> nn.Module:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner.student if isinstance(inner, HintStudent) else inner


def _truncate_csv(path: Path, keep_before_epoch: int) -> None:
    """Drop the rows of epochs >= ``keep_before_epoch`` (written after the last checkpoint)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[1]) < keep_before_epoch]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def _truncate_jsonl(path: Path, keep_before_epoch: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= keep_before_epoch]
    path.write_text("".join(line + "\n" for line in kept))


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function: restore -> per epoch (train, validate, report) -> finish.

    ``loop_config``: ``config`` (the resolved DistillConfig as plain data), ``info`` (data and
    model facts measured by the driver), ``run_dir``, ``clock`` (a ViewClock; rank 0 also tells
    it how far the epoch is), ``tracking_uri``, ``mlflow_run_id``, ``source_size`` (samples in
    the source: the length of the per-epoch tally of which samples the workers got)."""
    limit_mlflow_retries()
    config = from_dict(DistillConfig, loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    if (run_dir / STOPPED_FILE).exists():  # restarted after a stop: nothing to train (see STOPPED_FILE)
        return
    worker = _Worker.start(config, run_dir, loop_config)
    state = _restore(worker)
    logged = _open_run_files(worker, state.epoch)
    worker.open_shards()
    for epoch in range(state.epoch, config.train.epochs):
        _run_epoch(worker, state, epoch, logged)
    worker.logger.flush()
    if worker.rank == 0 and not (run_dir / DONE_FILE).exists():
        finishing = time.perf_counter()
        _finish(config, worker.info, state.model, run_dir, state.cosine(), worker.logger, worker.val_shard)
        _record_time(run_dir, "finish", seconds=time.perf_counter() - finishing)


@dataclasses.dataclass
class _Worker:
    """One worker's part of the run, fixed for its whole loop (read from ``loop_config`` once)."""

    config: DistillConfig
    info: dict[str, Any]
    run_dir: Path
    clock: Any  # the ViewClock actor
    session: TrainSession
    rank: int
    world: int
    device: torch.device
    logger: RunLogger  # rank 0's; replaced by a failing one when a fault drill takes MLflow away
    source_size: int
    views: int  # kept training views (0: one stream whose teachers run every epoch)
    local: bool  # Train's local mode: the loop runs in the driver's process
    train_dir: str | None
    train_shards: list[Any] = dataclasses.field(default_factory=list)  # see open_shards
    val_shard: Any = None

    @classmethod
    def start(cls, config: DistillConfig, run_dir: Path, loop_config: dict[str, Any]) -> _Worker:
        session = loop_config.get("session") or TrainSession()
        rank, world = session.world()
        if rank == 0:
            _record_time(run_dir, "loop_start")
        return cls(
            config=config,
            info=loop_config["info"],
            run_dir=run_dir,
            clock=loop_config["clock"],
            session=session,
            rank=rank,
            world=world,
            device=session.device(),
            logger=RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"] if rank == 0 else None, run_dir),
            source_size=loop_config["source_size"],
            views=loop_config.get("train_views", 0),
            local=bool(loop_config.get("local_mode")),
            train_dir=loop_config.get("train_dir"),
        )

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.config.teachers]

    @property
    def alpha_path(self) -> Path:
        return self.run_dir / "alpha" / f"rank{self.rank}.csv"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def batch_size(self) -> int:
        """This worker's share of the global batch."""
        return self.config.train.batch_size // max(1, self.config.workers.num_workers)

    def open_shards(self) -> None:
        """This worker's data: one training stream whose teacher stages run every epoch, or V views
        made once, read in turn (``distill.SoftLabelData``); and the whole validation split."""
        views = [self.session.dataset_shard(f"train_view{v}") for v in range(self.views)]
        self.train_shards = views or [self.session.dataset_shard("train")]
        self.val_shard = self.session.dataset_shard("val")

    @property
    def local_checkpoint(self) -> Path | None:
        """In local mode, where Train keeps no checkpoint, the one the loop keeps itself."""
        return Path(self.train_dir) / LOCAL_CHECKPOINT / STATE_FILE if self.local and self.train_dir else None

    @functools.cached_property
    def settings(self) -> DistillSettings:
        distill = self.config.distill
        return DistillSettings(
            strategy=distill.strategy,
            tolerance=distill.tolerance,
            temperature=distill.temperature,
            ce_weight=distill.ce_weight,
            kd_weight=distill.kd_weight,
            space=distill.space,  # type: ignore[arg-type]
            normalize=distill.normalize,
            hint_weight=distill.hint_weight,
            weights=distill.fixed_weights,
        )


@dataclasses.dataclass
class _TrainState:
    """What a checkpoint restores: the student (and hint regressors), optimizer, schedule,
    progress and the running sum of the teachers' gradient cosines."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cosine_sum: torch.Tensor  # [M, M]
    cosine_steps: int = 0
    epoch: int = 0  # epochs done
    step: int = 0  # steps done

    def cosine(self) -> torch.Tensor:
        """The mean cosine between the teachers' gradients over every step so far, ``[M, M]``."""
        return self.cosine_sum / max(1, self.cosine_steps)

    def add_cosines(self, gram: torch.Tensor) -> None:
        """Add the cosines of the per-step Grams ``gram [S, M, M]`` (float64, on the host)."""
        diag = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
        self.cosine_sum += (gram / (diag[:, :, None] * diag[:, None, :])).sum(0)
        self.cosine_steps += len(gram)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (``STATE_FILE``): tensors and plain data only."""
        state = {
            "student": _plain_student(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "cosine_sum": self.cosine_sum,
            "cosine_steps": self.cosine_steps,
            "rng": torch.get_rng_state(),
        }
        inner = _unwrapped(self.model)
        if isinstance(inner, HintStudent):
            state["regressors"] = inner.regressors.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _plain_student(self.model).load_state_dict(state["student"])
        if "regressors" in state:
            inner = _unwrapped(self.model)
            assert isinstance(inner, HintStudent)  # a hinted run's checkpoint (_check_resume: the same config)
            inner.regressors.load_state_dict(state["regressors"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.cosine_sum, self.cosine_steps = state["cosine_sum"], int(state["cosine_steps"])
        torch.set_rng_state(state["rng"])


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _restore(worker: _Worker) -> _TrainState:
    """The same initial student on every worker, its optimizer, and the newest checkpoint's state
    when there is one (``_resume_state``)."""
    config = worker.config
    torch.manual_seed(config.seed)  # same initial student on every worker
    model = worker.session.prepare_model(_build_student(config, worker.info))
    optimizer, scheduler = train_optimizer(model, config.train)
    num = len(config.teachers)
    state = _TrainState(model, optimizer, scheduler, cosine_sum=torch.zeros(num, num, dtype=torch.float64))
    saved = _resume_state(worker.session.checkpoint(), worker.train_dir, worker.local)
    if saved is not None:
        state.load_state_dict(saved)
    return state


def _open_run_files(worker: _Worker, start_epoch: int) -> set[int]:
    """Start (or, when resuming, cut back to ``start_epoch``) the run folder's per-epoch files;
    returns the epochs MLflow has already (rank 0)."""
    alpha_path, metrics_path, rank = worker.alpha_path, worker.metrics_path, worker.rank
    alpha_path.parent.mkdir(parents=True, exist_ok=True)
    if start_epoch == 0:
        alpha_path.unlink(missing_ok=True)
        if rank == 0:
            metrics_path.unlink(missing_ok=True)
    else:
        _truncate_csv(alpha_path, start_epoch)
        if rank == 0:
            _truncate_jsonl(metrics_path, start_epoch)
    if rank == 0 and start_epoch < worker.config.train.epochs:  # epochs left: the exported student will be stale
        (worker.run_dir / DONE_FILE).unlink(missing_ok=True)
    # epochs MLflow has already: after a worker-group restart, the epochs since the last checkpoint
    # Train had recorded (possibly all of them: it records a reported checkpoint asynchronously) are
    # trained again, and must not be logged twice; MLflow keeps the first attempt's values
    logged = worker.logger.logged_steps("val/acc1") if rank == 0 else set()
    if not alpha_path.exists():
        alpha_path.write_text(",".join(["step", "epoch", *worker.names]) + "\n")
    return logged


def _run_epoch(worker: _Worker, state: _TrainState, epoch: int, logged: set[int]) -> None:
    """One epoch on this worker: train on its shard, validate, then write, report and log the metrics."""
    started = time.perf_counter()
    _begin_epoch(worker, epoch)
    totals = _train_epoch(worker, state, epoch)
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    state.scheduler.step()
    totals = totals.reduced(_all_reduce_sum)
    alpha = torch.stack(totals.weights).double().cpu()  # [S, M], one host read per epoch
    state.add_cosines(torch.stack(totals.grams).double().cpu())  # [S, M, M]
    train_seconds = time.perf_counter() - started
    if not torch.isfinite(totals.sums).all():
        raise FloatingPointError(f"epoch {epoch}: the training loss is not finite ({totals.sums.tolist()}).")

    evaluated = time.perf_counter()
    info = worker.info
    val_rows = worker.val_shard.iter_torch_batches(batch_size=512, device=worker.device)
    val_batches = _student_batches(val_rows, worker.names)
    metrics: dict[str, Any] = validate_epoch(
        _plain_student(state.model), val_batches, info["mean"], info["std"], worker.rank, worker.world, worker.device,
        _all_reduce_sum,
    )  # fmt: skip
    hinted = worker.config.distill.hint_weight > 0
    metrics |= train_metrics(totals, alpha, worker.names, hinted, lr, train_seconds)
    metrics["epoch_seconds"] = time.perf_counter() - started

    _append_alpha(worker.alpha_path, alpha, state.step, epoch)
    reported = time.perf_counter()
    state.epoch = epoch + 1
    _report(worker, state, metrics)
    logging = time.perf_counter()
    if worker.rank == 0 and epoch + 1 not in logged:  # after the checkpoint is committed; the next epoch does not wait
        worker.logger.log_metrics_later(metrics, step=epoch + 1)
    if worker.rank == 0:
        first_step = totals.first_step_at - started if totals.first_step_at is not None else 0.0
        done = time.perf_counter()
        _record_time(
            worker.run_dir, "epoch", epoch=epoch + 1, steps=train_seconds, first_step=first_step,
            eval=reported - evaluated, report=logging - reported, mlflow=done - logging,
        )  # fmt: skip


def _begin_epoch(worker: _Worker, epoch: int) -> None:
    """Set the view clock to ``epoch`` (rank 0) and wait for every worker; when a fault drill
    takes the tracking server away from this epoch on, rank 0's logger starts failing."""
    if worker.rank == 0:
        ray.get(worker.clock.set.remote(epoch))
    _barrier()  # nobody reads epoch e's views before the clock says e
    faults = worker.config.faults
    down = faults.mlflow_down_epoch is not None and epoch + 1 >= faults.mlflow_down_epoch
    if worker.rank == 0 and down and worker.logger.uri != UNREACHABLE_TRACKING_URI:  # the server goes away
        worker.logger.flush()
        run_id = worker.logger.run_id if worker.logger.enabled else None
        worker.logger = RunLogger(UNREACHABLE_TRACKING_URI, run_id, worker.run_dir)


def _train_epoch(worker: _Worker, state: _TrainState, epoch: int) -> EpochTotals:
    """``epochs.train_epoch`` over this worker's shard of ``epoch``; a non-finite logit stops the
    run (``STOPPED_FILE`` says which teacher and step)."""
    config, batch_size = worker.config, worker.batch_size
    batches = worker.train_shards[epoch % len(worker.train_shards)].iter_torch_batches(
        batch_size=batch_size,
        device=worker.device,
        drop_last=True,
        local_shuffle_buffer_size=4 * batch_size,
        local_shuffle_seed=config.seed * 1000 + epoch,
    )
    view = epoch % worker.views if worker.views else None
    hinted = config.distill.hint_weight > 0
    reduce = _all_reduce_mean if worker.world > 1 else None
    before_step, after_step = _step_hooks(worker, epoch, state.step)
    try:
        totals = train_epoch(
            state.model, _student_batches(batches, worker.names, hinted, view, epoch), state.optimizer,
            worker.settings, worker.info["mean"], worker.info["std"], worker.source_size, state.step, worker.device,
            reduce, before_step, after_step,
        )  # fmt: skip
    except NonFiniteLogitsError as error:
        names = worker.names
        who = f"teacher {names[error.teachers[0]]!r}" if error.teachers else "the student"
        message = (
            f"{who} produced non-finite logits (NaN or Inf) at step {error.step} (epoch {epoch + 1}); stopping. "
            + ("Check that teacher's checkpoint and inputs." if error.teachers else "Lower train.lr.")
        )
        (worker.run_dir / STOPPED_FILE).write_text(message + "\n")
        raise FloatingPointError(message) from None
    if not totals.steps:
        raise ValueError(
            f"epoch {epoch}: worker {worker.rank} got no full batch of {batch_size} samples; lower train.batch_size "
            "or use fewer workers."
        )
    state.step += totals.steps
    return totals


def _step_hooks(worker: _Worker, epoch: int, first: int) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """Before each step: the fault drill that kills a worker (``faults.kill_worker_*``); after it:
    rank 0 tells the view clock how far the epoch is, every 0.5 s (the driver's progress bar)."""
    faults, fault_dir, rank = worker.config.faults, worker.run_dir / "faults", worker.rank
    next_tick = 0.0

    def before_step(step: int) -> None:
        doomed = rank == faults.kill_worker_rank and step == faults.kill_worker_step
        if doomed and fire_once(fault_dir, "kill_worker"):
            die(f"killing Train worker rank {rank} (pid {os.getpid()}) before step {step}, in epoch {epoch + 1}")

    def after_step(step: int) -> None:
        nonlocal next_tick
        if rank == 0 and time.perf_counter() >= next_tick:
            worker.clock.advance.remote(epoch, step - first)
            next_tick = time.perf_counter() + 0.5

    return before_step, after_step


def _student_batches(
    batches: Iterable[dict[str, torch.Tensor]],
    names: list[str],
    hinted: bool = False,
    view: int | None = None,
    epoch: int = 0,
) -> Iterator[StudentBatch]:
    """Ray Data batches (columns ``image``, ``label``, ``index``, ``logits/<teacher>``, with hints
    ``feature/<teacher>``) as ``StudentBatch``es. With ``view``, the first batch's rows must all
    be of that view (checked once an epoch: a sync)."""
    for i, batch in enumerate(batches):
        if view is not None and i == 0 and bool((batch["view"] != view).any()):
            raise RuntimeError(f"epoch {epoch + 1} read rows of another view than {view}; a bug.")
        yield StudentBatch(
            images=batch["image"],
            labels=batch["label"],
            index=batch["index"],
            teacher_logits=torch.stack([batch[logits_column(n)] for n in names]),
            teacher_features=[batch[feature_column(n)] for n in names] if hinted else None,
        )


def _append_alpha(path: Path, alpha: torch.Tensor, step: int, epoch: int) -> None:
    """Append the epoch's per-step teacher weights ``alpha [S, M]`` (its last step: ``step - 1``)."""
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        first = step - len(alpha)
        for i, row in enumerate(alpha.tolist()):
            writer.writerow([first + i, epoch, *(f"{w:.8g}" for w in row)])


def _report(worker: _Worker, state: _TrainState, metrics: dict[str, Any]) -> None:
    """Rank 0 saves the training state (Train's checkpoint, or in local mode the loop's own) and
    appends the epoch to ``metrics.jsonl``; every worker reports the metrics to Train."""
    report_checkpoint = None
    with tempfile.TemporaryDirectory() as folder:
        if worker.rank == 0:
            if worker.local_checkpoint is not None:  # local mode: Train keeps no checkpoint of its own
                _save_atomically(state.state_dict(), worker.local_checkpoint)
            else:
                torch.save(state.state_dict(), Path(folder) / STATE_FILE)
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            with worker.metrics_path.open("a") as f:
                f.write(json.dumps({"epoch": state.epoch, "step": state.step, **metrics}) + "\n")
        worker.session.report({"epoch": state.epoch, **metrics}, checkpoint=report_checkpoint)


#: Under ``<storage_path>/<name>/``: the checkpoint of a run in Train's local mode, which keeps none itself.
LOCAL_CHECKPOINT = "checkpoint_local"


def _read_state(path: Path) -> dict[str, Any]:
    return read_state_dict(path.read_bytes(), path.name, f"the checkpoint {path}")  # tensors and plain data only


def _resume_state(checkpoint: Any, train_dir: str | None, local: bool) -> dict[str, Any] | None:
    """The newest checkpoint of this run (by epoch), or None: Ray Train's (a restarted worker
    group, or a run started again), and, on local storage (``train_dir``), the one a run in
    local mode wrote; in local mode, where Train hands out none, every ``checkpoint_*`` there."""
    states = []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            states.append(_read_state(Path(folder) / STATE_FILE))
    if train_dir is not None:
        pattern = "checkpoint_*" if local else LOCAL_CHECKPOINT
        states += [_read_state(path) for path in Path(train_dir).glob(f"{pattern}/{STATE_FILE}")]
    return max(states, key=lambda state: int(state["epoch"]), default=None)


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` so that a crash leaves the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def progress_line(config: DistillConfig, epoch: int, metrics: dict[str, Any]) -> str:
    """The console line of epoch ``epoch`` (0-based) of a run (the driver prints it)."""
    weights = " ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in metrics.items() if k.startswith("weights/"))
    return (
        f"[ray-aekd] {config.name} epoch {epoch + 1}/{config.train.epochs}  "
        f"train/loss {metrics['train/loss']:.4f}  val/acc1 {metrics['val/acc1']:.4f}  "
        f"val/agreement {metrics['val/agreement']:.4f}  val/ece {metrics['val/ece']:.4f}  "
        f"α {weights}  {metrics['train/samples_per_second']:.0f} samples/s  {metrics['epoch_seconds']:.1f}s"
    )


def _finish(
    config: DistillConfig,
    info: dict[str, Any],
    model: nn.Module,
    run_dir: Path,
    cosine: torch.Tensor,
    logger: RunLogger,
    val_shard: Any,
) -> None:
    """Rank 0, after the last epoch: export the student, write the plots, log artifacts."""
    names = [t.name for t in config.teachers]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = {k: v for k, v in lines[-1].items() if k.startswith("val/")} if lines else {}
    student = _plain_student(model)
    save_checkpoint(
        str(run_dir / "student"),
        student.cpu(),
        CheckpointMetadata(
            architecture=config.student.model,
            num_classes=info["num_classes"],
            input_shape=tuple(info["input_shape"]),
            mean=tuple(info["mean"]),
            std=tuple(info["std"]),
            dataset=config.data.dataset,
            class_names=tuple(info["class_names"]),
            seed=config.seed,
            metrics=final,
        ),
    )
    (run_dir / "cosine.json").write_text(json.dumps({"teachers": names, "cosine": cosine.tolist()}, indent=2))
    with (run_dir / "alpha" / "rank0.csv").open() as f:
        table = np.array([[float(x) for x in row] for row in list(csv.reader(f))[1:]])
    if len(table):
        title = f"{config.name}: {config.distill.strategy}, C = {config.distill.tolerance:g}"
        plot_weights(table[:, 0], table[:, 2:], names, run_dir / "plots" / "weights.png", title)
    plot_cosine_matrix(cosine.numpy(), names, run_dir / "plots" / "cosine.png")
    logger.log_artifacts(str(run_dir / "plots"), "plots")
    logger.log_artifacts(str(run_dir / "alpha"), "alpha")
    logger.log_artifacts(str(run_dir / "student"), "checkpoint")
    for name in ("metrics.jsonl", "cosine.json", "config.json", "environment.json"):
        if (run_dir / name).exists():
            logger.log_artifact(str(run_dir / name))
    # the MLflow model takes [0, 1] images (preprocessing inside); its input example is real validation images
    wrapped, metadata = with_preprocess(
        student.eval(), Preprocess(tuple(info["mean"]), tuple(info["std"])), info["class_names"],
        info["input_shape"], config.data.dataset,
    )  # fmt: skip
    example = (next(iter(val_shard.iter_torch_batches(batch_size=4)))["image"].float() / 255.0).numpy()
    signature = model_signature(info["input_shape"], info["num_classes"])
    logger.log_model(wrapped, "student", example, config.tracking.register_model, signature, metadata)
    (run_dir / DONE_FILE).write_text("finished\n")  # last: a failure above is redone on resume
