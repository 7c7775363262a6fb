"""The per-worker training function of a distillation run (Ray Train, ``TorchTrainer``).

Thin by design: config dict -> dataclasses -> build the student -> resume from
``ray.train.get_checkpoint()`` if there is one -> per epoch: set the view clock, loop
``engine.distill_step`` over the worker's shard, evaluate, report. The AE-KD weights are
made identical on every worker by all-reducing the ``[M, K]`` gradient means (or the
``[M, M]`` Gram) inside the step. Rank 0 alone writes the run folder and logs to MLflow.

Run folder (``output_dir/<name>/``, shared storage on a multi-node cluster):
``metrics.jsonl`` (one line per epoch), ``alpha/rank<r>.csv`` (per-step weights, written by
every rank so that anyone can check they agree), ``cosine.json``, ``plots/``, ``student/``.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
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
from ray_aekd.core.metrics import SUMS_LENGTH, ensemble_probabilities, validation_metrics, validation_sums
from ray_aekd.core.step import DistillSettings, HintStudent, distill_step, make_optimizer
from ray_aekd.core.weighting import NonFiniteLogitsError
from ray_aekd.data.views import normalize
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
    """Ray Train worker function. ``loop_config``: ``config`` (the resolved DistillConfig as
    plain data), ``info`` (data and model facts measured by the driver), ``run_dir``,
    ``clock`` (a ViewClock; rank 0 also tells it how far the epoch is), ``tracking_uri``,
    ``mlflow_run_id``, ``source_size`` (samples in the source:
    the length of the per-epoch tally of which samples the workers got)."""
    limit_mlflow_retries()
    config = from_dict(DistillConfig, loop_config["config"])
    info = loop_config["info"]
    run_dir = Path(loop_config["run_dir"])
    if (run_dir / STOPPED_FILE).exists():  # restarted after a stop: nothing to train (see STOPPED_FILE)
        return
    clock = loop_config["clock"]
    names = [t.name for t in config.teachers]
    num_teachers = len(names)
    session = loop_config.get("session") or TrainSession()
    rank, world = session.world()
    if rank == 0:
        _record_time(run_dir, "loop_start")
    device = session.device()
    logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"] if rank == 0 else None, run_dir)

    torch.manual_seed(config.seed)  # same initial student on every worker
    model = session.prepare_model(_build_student(config, info))
    train = config.train
    optimizer, scheduler = make_optimizer(
        model, train.lr, train.momentum, train.weight_decay, train.schedule, train.epochs, train.milestones
    )
    start_epoch, step = 0, 0
    cosine_sum = torch.zeros(num_teachers, num_teachers, dtype=torch.float64)
    cosine_steps = 0
    local = bool(loop_config.get("local_mode"))  # Train's local mode: the loop runs in the driver's process
    train_dir = loop_config.get("train_dir")
    state = _resume_state(session.checkpoint(), train_dir, local)
    if state is not None:
        _plain_student(model).load_state_dict(state["student"])
        if "regressors" in state:
            inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            inner.regressors.load_state_dict(state["regressors"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        cosine_sum, cosine_steps = state["cosine_sum"], int(state["cosine_steps"])
        torch.set_rng_state(state["rng"])

    alpha_path = run_dir / "alpha" / f"rank{rank}.csv"
    metrics_path = run_dir / "metrics.jsonl"
    alpha_path.parent.mkdir(parents=True, exist_ok=True)
    if start_epoch == 0:
        alpha_path.unlink(missing_ok=True)
        if rank == 0:
            metrics_path.unlink(missing_ok=True)
    else:
        _truncate_csv(alpha_path, start_epoch)
        if rank == 0:
            _truncate_jsonl(metrics_path, start_epoch)
    if rank == 0 and start_epoch < train.epochs:  # epochs left to train: the exported student will be stale
        (run_dir / DONE_FILE).unlink(missing_ok=True)
    # epochs MLflow has already: after a worker-group restart, the epochs since the last checkpoint
    # Train had recorded (possibly all of them: it records a reported checkpoint asynchronously) are
    # trained again, and must not be logged twice; MLflow keeps the first attempt's values
    logged = logger.logged_steps("val/acc1") if rank == 0 else set()
    if not alpha_path.exists():
        alpha_path.write_text(",".join(["step", "epoch", *names]) + "\n")

    settings = DistillSettings(
        strategy=config.distill.strategy,
        tolerance=config.distill.tolerance,
        temperature=config.distill.temperature,
        ce_weight=config.distill.ce_weight,
        kd_weight=config.distill.kd_weight,
        space=config.distill.space,  # type: ignore[arg-type]
        normalize=config.distill.normalize,
        hint_weight=config.distill.hint_weight,
    )
    reduce = _all_reduce_mean if world > 1 else None
    hinted = settings.hint_weight > 0
    mean, std = tuple(info["mean"]), tuple(info["std"])
    batch_size = train.batch_size // max(1, config.workers.num_workers)
    # one stream whose teacher stages run every epoch, or V views made once, read in turn (distill._training_sets)
    views = loop_config.get("train_views", 0)
    train_shards = [session.dataset_shard(f"train_view{v}") for v in range(views)] or [
        session.dataset_shard("train")
    ]
    val_shard = session.dataset_shard("val")
    faults, fault_dir = config.faults, run_dir / "faults"
    local_checkpoint = Path(train_dir) / LOCAL_CHECKPOINT / STATE_FILE if local and train_dir else None

    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        if rank == 0:
            ray.get(clock.set.remote(epoch))
        _barrier()  # nobody reads epoch e's views before the clock says e
        model.train()
        down = faults.mlflow_down_epoch is not None and epoch + 1 >= faults.mlflow_down_epoch
        if rank == 0 and down and logger.uri != UNREACHABLE_TRACKING_URI:  # the server goes away
            logger.flush()
            logger = RunLogger(UNREACHABLE_TRACKING_URI, logger.run_id if logger.enabled else None, run_dir)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # samples, loss, ce, kd (and hint)
        tally = torch.zeros(loop_config["source_size"], dtype=torch.int64, device=device)  # times each sample came
        hint_sum = torch.zeros((), dtype=torch.float64, device=device)
        weights, grams = [], []
        batches = train_shards[epoch % len(train_shards)].iter_torch_batches(
            batch_size=batch_size,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=config.seed * 1000 + epoch,
        )
        first_step = None
        epoch_first_step, next_tick = step, 0.0
        for batch in batches:
            doomed = rank == faults.kill_worker_rank and step == faults.kill_worker_step
            if doomed and fire_once(fault_dir, "kill_worker"):
                die(f"killing Train worker rank {rank} (pid {os.getpid()}) before step {step}, in epoch {epoch + 1}")
            if views and first_step is None and bool((batch["view"] != epoch % views).any()):  # once an epoch: a sync
                raise RuntimeError(f"epoch {epoch + 1} read rows of another view than {epoch % views}; a bug.")
            images = normalize(batch["image"], mean, std)
            labels = batch["label"]
            tally.index_add_(0, batch["index"], torch.ones_like(batch["index"]))
            teacher_logits = torch.stack([batch[logits_column(n)] for n in names])
            features = [batch[feature_column(n)] for n in names] if hinted else None
            try:
                out = distill_step(model, images, labels, teacher_logits, optimizer, settings, reduce, step, features)
            except NonFiniteLogitsError as error:
                who = f"teacher {names[error.teachers[0]]!r}" if error.teachers else "the student"
                message = (
                    f"{who} produced non-finite logits (NaN or Inf) at step {step} (epoch {epoch + 1}); stopping. "
                    + ("Check that teacher's checkpoint and inputs." if error.teachers else "Lower train.lr.")
                )
                (run_dir / STOPPED_FILE).write_text(message + "\n")
                raise FloatingPointError(message) from None
            count = labels.shape[0]
            sums += torch.stack([torch.tensor(count, device=device), out["loss"] * count, out["ce"] * count,
                                 out["kd"] * count]).double()  # fmt: skip
            if hinted:
                hint_sum += out["hint"].double() * count
            weights.append(torch.stack([out[f"weight/{m}"] for m in range(num_teachers)]))
            grams.append(out["gram"])
            step += 1
            if rank == 0 and time.perf_counter() >= next_tick:  # for the driver's progress bar
                clock.advance.remote(epoch, step - epoch_first_step)
                next_tick = time.perf_counter() + 0.5
            if first_step is None:
                first_step = time.perf_counter() - started  # reading the first batch, then one step
        if not weights:
            raise ValueError(
                f"epoch {epoch}: worker {rank} got no full batch of {batch_size} samples; lower train.batch_size "
                "or use fewer workers."
            )
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        scheduler.step()
        sums = _all_reduce_sum(sums)
        hint_sum = _all_reduce_sum(hint_sum)
        tally = _all_reduce_sum(tally)
        alpha = torch.stack(weights).double().cpu()  # [S, M], one host read per epoch
        gram = torch.stack(grams).double().cpu()  # [S, M, M]
        diag = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
        cosine_sum += (gram / (diag[:, :, None] * diag[:, None, :])).sum(0)
        cosine_steps += len(grams)
        train_seconds = time.perf_counter() - started
        if not torch.isfinite(sums).all():
            raise FloatingPointError(f"epoch {epoch}: the training loss is not finite ({sums.tolist()}).")

        evaluated = time.perf_counter()
        val_sums = torch.zeros(SUMS_LENGTH, dtype=torch.float64, device=device)
        model.eval()
        student = _plain_student(model)
        with torch.inference_mode():
            # every worker sees the whole (small, materialised) validation set and scores the
            # samples with index % world == rank, so that none is dropped or counted twice
            for batch in val_shard.iter_torch_batches(batch_size=512, device=device):
                mine = batch["index"] % world == rank
                logits = student(normalize(batch["image"][mine], mean, std))
                teacher_logits = torch.stack([batch[logits_column(n)][mine] for n in names])
                val_sums += validation_sums(logits, batch["label"][mine], ensemble_probabilities(teacher_logits))
        metrics: dict[str, Any] = validation_metrics(_all_reduce_sum(val_sums))
        samples = float(sums[0])
        metrics |= {
            "train/loss": float(sums[1]) / samples,
            "train/ce": float(sums[2]) / samples,
            "train/kd": float(sums[3]) / samples,
        }
        if hinted:
            metrics["train/hint"] = float(hint_sum) / samples
        metrics |= {f"weights/{name}": float(alpha[:, m].mean()) for m, name in enumerate(names)}
        metrics |= {
            "train/samples": samples,  # what the workers trained on (full batches only)
            "train/distinct_samples": float((tally > 0).sum()),  # = train/samples when none came twice
            "train/repeated_samples": float((tally > 1).sum()),  # samples that came twice or more this epoch
            "lr": lr,
            "train/samples_per_second": samples / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }

        with alpha_path.open("a", newline="") as f:
            writer = csv.writer(f)
            first = step - len(alpha)
            for i, row in enumerate(alpha.tolist()):
                writer.writerow([first + i, epoch, *(f"{w:.8g}" for w in row)])
        report_checkpoint = None
        reported = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
                state = {
                    "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "cosine_sum": cosine_sum,
                    "cosine_steps": cosine_steps,
                    "rng": torch.get_rng_state(),
                }
                if isinstance(inner, HintStudent):
                    state["regressors"] = inner.regressors.state_dict()
                if local_checkpoint is not None:  # local mode: Train keeps no checkpoint of its own
                    _save_atomically(state, local_checkpoint)
                else:
                    torch.save(state, Path(folder) / STATE_FILE)
                    report_checkpoint = ray.train.Checkpoint.from_directory(folder)
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"epoch": epoch + 1, "step": step, **metrics}) + "\n")
            session.report({"epoch": epoch + 1, **metrics}, checkpoint=report_checkpoint)
        logging = time.perf_counter()
        if rank == 0 and epoch + 1 not in logged:  # after the checkpoint is committed; the next epoch does not wait
            logger.log_metrics_later(metrics, step=epoch + 1)
        if rank == 0:
            done = time.perf_counter()
            _record_time(
                run_dir, "epoch", epoch=epoch + 1, steps=train_seconds, first_step=first_step or 0.0,
                eval=reported - evaluated, report=logging - reported, mlflow=done - logging,
            )  # fmt: skip

    logger.flush()
    if rank == 0 and not (run_dir / DONE_FILE).exists():
        finishing = time.perf_counter()
        _finish(config, info, model, run_dir, cosine_sum / max(1, cosine_steps), logger, val_shard)
        _record_time(run_dir, "finish", seconds=time.perf_counter() - finishing)


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
