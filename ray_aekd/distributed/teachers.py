"""``ray-aekd teachers``: train a (deliberately diverse) teacher ensemble concurrently on Ray.

Each teacher is one Ray Tune trial with its own resources (``trials.cpus``, ``trials.gpus``,
fractional GPUs allowed), so M teachers train side by side
on M GPUs, or share them. A teacher can see a subset of the training split and noisy labels
on chosen classes, so that users can build ensembles that genuinely disagree. Every teacher
is saved as a safe checkpoint (``ray_aekd.models.checkpoint``) and logged to MLflow from the
driver (one run per teacher: params, per-epoch metrics, the checkpoint). At the end the
ensemble is evaluated on the validation split and a table is printed.

Training survives a teacher's process dying: every epoch a trial reports a Tune checkpoint
(``state.pt``: model, optimizer, scheduler, epoch, RNG states; tensors and plain containers
only, read back with ``weights_only=True``), and Tune restarts a failed trial up to
``trials.max_failures`` times; the restarted trial resumes after the checkpoint's epoch.
The Tune checkpoints are for resuming only (under ``output_dir/_tune``); the teachers that
distillation reads are the final ``output_dir/<name>/`` checkpoints. A whole run that was
stopped is not resumed: running the command again trains every teacher from the start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Callback
from ray.tune.stopper import Stopper
from torch import nn

from ray_aekd._console import LOG_FILE, capture_logs, tune_verbosity
from ray_aekd.config import TeachersConfig, TeacherSpec, flatten, from_dict, with_env_faults
from ray_aekd.core.step import classification_epoch, evaluate
from ray_aekd.data import augment, normalize, open_source
from ray_aekd.data.labels import corrupt_labels
from ray_aekd.data.sources import ImageSource, TensorSource
from ray_aekd.distributed.epochs import train_optimizer
from ray_aekd.distributed.faults import die, fire_once
from ray_aekd.distributed.pipeline import view_settings
from ray_aekd.distributed.session import connect
from ray_aekd.distributed.tune_logging import MlflowTrialLogger
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointMetadata, load_checkpoint, read_state_dict, save_checkpoint

__all__ = ["STATE_FILE", "TeacherData", "load_split", "train_teachers"]

#: In a teacher trial's Tune checkpoint: its training state after an epoch.
STATE_FILE = "state.pt"


@dataclasses.dataclass
class TeacherData:
    """One teacher's training data (after subset and label noise) and the shared validation set."""

    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_indices: torch.Tensor  # [N] indices in the source, the keys of the augmentation views
    train_labels: torch.Tensor  # [N], possibly noisy
    val_images: torch.Tensor
    val_labels: torch.Tensor
    source: ImageSource


def load_split(config: TeachersConfig) -> tuple[ImageSource, torch.Tensor, torch.Tensor]:
    """The source and its seeded ``(train, val)`` index split."""
    data = config.data
    source = open_source(data.dataset, data.path, download=data.download, size=data.image_size)
    train, val = data.split(len(source), config.seed)
    return source, train, val


def _stack(source: ImageSource, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(source, TensorSource):
        return source.images[indices], source.labels[indices]
    rows = [source[int(i)] for i in indices]
    return torch.stack([image for image, _ in rows]), torch.tensor([label for _, label in rows])


def teacher_data(config: TeachersConfig, spec: TeacherSpec) -> TeacherData:
    source, train, val = load_split(config)
    gen = torch.Generator().manual_seed(spec.seed)
    if spec.subset_fraction < 1:
        keep = max(1, int(round(spec.subset_fraction * len(train))))
        train = train[torch.randperm(len(train), generator=gen)[:keep]].sort().values
    train_images, labels = _stack(source, train)
    if spec.label_noise > 0:
        labels = corrupt_labels(labels, spec.noisy_classes, spec.label_noise, source.num_classes, gen)
    val_images, val_labels = _stack(source, val)
    return TeacherData(train_images, train, labels, val_images, val_labels, source)


def _say(line: str) -> None:
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _train_one(trial_config: dict[str, Any]) -> None:
    """Tune trainable: train teacher ``trial_config["teacher"]`` and save its checkpoint:
    restore -> per epoch (train, validate, report with a checkpoint) -> save.

    Reports a Tune checkpoint (``STATE_FILE``) with every epoch's metrics and, when Tune
    restarts the trial after a failure, resumes after the epoch of the last one."""
    config = from_dict(TeachersConfig, trial_config["config"])
    spec = config.teachers[trial_config["teacher"]]
    torch.manual_seed(spec.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    data = teacher_data(config, spec)
    run = _TeacherRun.build(config, spec, data.source, device)
    val_x = normalize(data.val_images, data.source.mean, data.source.std).to(device)
    val_y = data.val_labels.to(device)
    _restore_teacher(run, spec)
    for epoch in range(run.epoch, config.train.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(data.train_labels), generator=run.order_rng)
        run.metrics = classification_epoch(run.model, _teacher_batches(config, spec, data, order, epoch, device),
                                           run.optimizer)  # fmt: skip
        run.scheduler.step()
        val_metrics, _ = evaluate(run.model, val_x, val_y)
        run.metrics |= val_metrics | {"epoch": epoch + 1, "epoch_seconds": time.perf_counter() - start}
        run.epoch = epoch + 1
        _report_teacher_epoch(run)
        _teacher_fault(config, spec, Path(trial_config["output_dir"]), epoch)
    _save_teacher(config, spec, data.source, run, Path(trial_config["output_dir"]) / spec.name)


@dataclasses.dataclass
class _TeacherRun:
    """One teacher's training state: what its Tune checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order_rng: torch.Generator  # the order of the samples, epoch by epoch
    device: torch.device
    epoch: int = 0  # epochs done
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the last epoch's

    @classmethod
    def build(cls, config: TeachersConfig, spec: TeacherSpec, source: ImageSource, device: torch.device) -> _TeacherRun:
        model = build_model(spec.model, source.num_classes, in_channels=source.input_shape[0]).to(device)
        optimizer, scheduler = train_optimizer(model, config.train)
        return cls(model, optimizer, scheduler, torch.Generator().manual_seed(spec.seed + 1), device)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "metrics": self.metrics,
            "order_rng": self.order_rng.get_state(),
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.order_rng.set_state(state["order_rng"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch, self.metrics = int(state["epoch"]), dict(state["metrics"])


def _restore_teacher(run: _TeacherRun, spec: TeacherSpec) -> None:
    """Resume from the trial's Tune checkpoint, when Tune restarted it after a failure."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        file = Path(folder) / STATE_FILE
        state: dict[str, Any] = read_state_dict(
            file.read_bytes(), STATE_FILE, f"teacher {spec.name!r}'s Tune checkpoint {checkpoint.path}"
        )
    run.load_state_dict(state)
    _say(f"[ray-aekd] teacher {spec.name} resuming from its checkpoint after epoch {run.epoch}")


def _teacher_batches(
    config: TeachersConfig, spec: TeacherSpec, data: TeacherData, order: torch.Tensor, epoch: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's ``(images [B, C, H, W], labels [B])`` in ``order``: the teacher's own
    augmentation views (seeded by its seed and the epoch), normalised, on ``device``."""
    source, batch_size = data.source, config.train.batch_size
    pad, flip = view_settings(source)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        images = data.train_images[idx]
        if config.data.augment:
            images = augment(images, data.train_indices[idx], spec.seed, epoch, pad=pad, flip=flip)
        yield normalize(images, source.mean, source.std).to(device), data.train_labels[idx].to(device)


def _report_teacher_epoch(run: _TeacherRun) -> None:
    """Report the epoch's metrics to Tune with the training state as its checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(run.state_dict(), Path(folder) / STATE_FILE)
        # returns once the checkpoint is in storage and the driver has the result (Tune's
        # function trainables report synchronously): a restart resumes after this epoch
        tune.report(run.metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _teacher_fault(config: TeachersConfig, spec: TeacherSpec, output_dir: Path, epoch: int) -> None:
    """The fault drill (``faults.kill_teacher``): kill this trial's process after the epoch, once per run."""
    faults = config.faults
    doomed = faults.kill_teacher == spec.name and epoch + 1 == faults.kill_teacher_epoch
    if doomed and fire_once(output_dir / "faults", "kill_teacher"):
        die(f"killing the trial process of teacher {spec.name!r} (pid {os.getpid()}) after epoch {epoch + 1}")


def _save_teacher(
    config: TeachersConfig, spec: TeacherSpec, source: ImageSource, run: _TeacherRun, out_dir: Path
) -> None:
    """The teacher's final checkpoint (what distillation reads), with its last ``val/`` metrics."""
    save_checkpoint(
        str(out_dir),
        run.model.cpu(),
        CheckpointMetadata(
            architecture=spec.model,
            num_classes=source.num_classes,
            input_shape=source.input_shape,
            mean=tuple(source.mean),
            std=tuple(source.std),
            dataset=config.data.dataset,
            class_names=source.class_names,
            seed=spec.seed,
            metrics={k: v for k, v in run.metrics.items() if k.startswith("val/")},
        ),
    )


@dataclasses.dataclass
class TeachersResult:
    teachers: dict[str, dict[str, Any]]  # name -> val/acc1, checkpoint, mlflow run id, seconds
    ensemble_acc1: float
    disagreement: float  # share of validation samples on which not all teachers agree
    pairwise_disagreement: float  # mean over teacher pairs of the share of samples they disagree on
    seconds: float


def train_teachers(config: TeachersConfig, log: Callable[[str], None] = print) -> TeachersResult:
    """Train every teacher of ``config`` concurrently, then evaluate the ensemble. Ray's and
    MLflow's log records go to ``ray_aekd.log`` in ``output_dir`` (``ray_aekd.console``)."""
    with capture_logs(Path(config.output_dir).resolve() / LOG_FILE) as logs:
        return _train_teachers(config, log, logs)


def _train_teachers(config: TeachersConfig, log: Callable[[str], None], logs: Path | None) -> TeachersResult:
    """check -> write the output folder -> one Tune trial per teacher -> evaluate the ensemble."""
    start = time.perf_counter()
    config = _with_absolute_data_path(with_env_faults(config))
    source, _, val = load_split(config)  # fails fast on a bad data path, before Ray is used
    _check_teachers_fit(config, source)
    _check_cluster(config)
    output_dir = Path(config.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir / "faults", ignore_errors=True)  # a fault fires once per run: an earlier run's markers go
    (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    names = [t.name for t in config.teachers]
    if config.faults.active:
        log(
            f"fault injection on: kill the trial process of teacher {config.faults.kill_teacher!r} after its epoch "
            f"{config.faults.kill_teacher_epoch}"
        )
    logger = _TeacherLogger(
        uri=config.tracking.uri,
        experiment=config.tracking.experiment,
        run_name=lambda trial: names[trial.config["teacher"]],
        params=lambda trial: _teacher_params(config, trial.config["teacher"]),
        artifact_dir=lambda trial: str(output_dir / names[trial.config["teacher"]]),
    )
    log(f"training {len(names)} teachers ({', '.join(names)}) on Ray; MLflow: {logger.uri}")
    if logs == output_dir / LOG_FILE:  # not when a command around it (quickstart) said where
        log(f"Ray's and MLflow's logs: {logs} (--verbose shows them here)")
    _fit_teachers(config, output_dir, logger, log)
    result = _evaluate_ensemble(config, source, val, output_dir, logger.run_ids, start)
    (output_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    log(format_table(result))
    return result


def _with_absolute_data_path(config: TeachersConfig) -> TeachersConfig:
    """Tune runs each trial in its own working directory: pass the trials an absolute data path."""
    if config.data.path is None or "://" in config.data.path:
        return config
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, path=str(Path(config.data.path).resolve()))
    )


def _fit_teachers(
    config: TeachersConfig, output_dir: Path, logger: MlflowTrialLogger, log: Callable[[str], None]
) -> None:
    """One Tune trial per teacher (``_train_one``), all at once, restarted from their last
    checkpoint up to ``trials.max_failures`` times; raises naming the teachers that failed."""
    res = config.trials
    names = [t.name for t in config.teachers]
    failures = _TeacherFailures(names, res.max_failures, log)
    # keeping only each trial's newest checkpoint (num_to_keep below) makes Tune snapshot its experiment
    # state with every checkpoint, and warn about it when epochs are short; that snapshot took ~10 ms here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner = tune.Tuner(
        tune.with_resources(_train_one, {"cpu": res.cpus, "gpu": res.gpus}),
        param_space={
            "teacher": tune.grid_search(list(range(len(names)))),
            "config": dataclasses.asdict(config),
            "output_dir": str(output_dir),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=len(names), reuse_actors=False),
        run_config=tune.RunConfig(
            name="teachers",
            storage_path=str(output_dir / "_tune"),
            callbacks=[logger, failures, _TeacherDone(names, log)],
            stop=failures,
            verbose=tune_verbosity(),  # Tune's status tables with --verbose; else one line per finished teacher
            # Tune refuses fail_fast with retries (its first failure, even one it would retry, stops
            # the experiment), so: without retries fail fast as before; with them, a failed trial is
            # restarted from its last checkpoint and the others train on, and a teacher whose
            # retries are spent stops the run at once through the stopper (`_TeacherFailures`)
            failure_config=tune.FailureConfig(max_failures=res.max_failures, fail_fast=res.max_failures == 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the newest is the one a restart needs
        ),
    )
    results = tuner.fit()
    trials = [results[i] for i in range(len(results))]
    errors = [(names[(r.config or {})["teacher"]], r.error) for r in trials if r.error is not None]
    if errors:
        raise RuntimeError(
            f"{len(errors)} teacher(s) failed ({', '.join(n for n, _ in errors)}; trials.max_failures = "
            f"{res.max_failures} restarts each); first error: {errors[0][1]}"
        )


def _evaluate_ensemble(
    config: TeachersConfig,
    source: ImageSource,
    val: torch.Tensor,
    output_dir: Path,
    run_ids: dict[str, str],
    start: float,
) -> TeachersResult:
    """Each saved teacher and their ensemble (mean softmax) on the validation split ``val``, and
    how much they disagree."""
    val_images, val_labels = _stack(source, val)
    val_x = normalize(val_images, source.mean, source.std)
    names = [t.name for t in config.teachers]
    teachers: dict[str, dict[str, Any]] = {}
    logits = []
    for name in names:
        model, meta = load_checkpoint(
            str(output_dir / name), expect_num_classes=source.num_classes, expect_input_shape=source.input_shape
        )
        metrics, teacher_logits = evaluate(model, val_x, val_labels)
        logits.append(teacher_logits)
        teachers[name] = {
            "model": meta.architecture,
            "val/acc1": metrics["val/acc1"],
            "checkpoint": str(output_dir / name),
            "mlflow_run_id": run_ids.get(name),
        }
    stacked = torch.stack(logits)  # [M, N, K]
    ensemble = stacked.softmax(-1).mean(0).argmax(-1)
    votes = stacked.argmax(-1)  # [M, N]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    return TeachersResult(
        teachers=teachers,
        ensemble_acc1=float((ensemble == val_labels).float().mean()),
        disagreement=float((votes != votes[:1]).any(0).float().mean()),
        pairwise_disagreement=float(sum((votes[i] != votes[j]).float().mean() for i, j in pairs) / len(pairs))
        if pairs
        else 0.0,
        seconds=time.perf_counter() - start,
    )


class _TeacherLogger(MlflowTrialLogger):
    """One MLflow run per teacher, also across restarts: Tune calls ``on_trial_start`` again for a
    restarted trial, whose run goes on (its epochs after the checkpoint follow the ones logged)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.trial_run_id(trial) is None:
            super().on_trial_start(iteration, trials, trial, **info)


class _TeacherDone(Callback):
    """One line per teacher when it has trained all its epochs."""

    def __init__(self, names: list[str], log: Callable[[str], None]) -> None:
        self.names, self.log = names, log

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        self.log(
            f"[ray-aekd] teacher {self.names[trial.config['teacher']]}: {result.get('epoch', 0)} epochs, "
            f"val/acc1 {result.get('val/acc1', float('nan')):.4f}"
        )


class _TeacherFailures(Callback, Stopper):
    """Says when Tune restarts a failed teacher, and stops the whole run (as ``fail_fast`` would)
    once a teacher has failed for good, its ``max_failures`` restarts spent."""

    def __init__(self, names: list[str], max_failures: int, log: Callable[[str], None]) -> None:
        self.names, self.max_failures, self.log = names, max_failures, log
        self.failed: list[str] = []

    def _name(self, trial: Any) -> str:
        return self.names[trial.config["teacher"]]

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch") if trial.checkpoint is not None else None
        limit = "no limit" if self.max_failures < 0 else f"at most {self.max_failures}"
        where = f"from its checkpoint after epoch {epoch}" if epoch else "from the start: it had no checkpoint yet"
        self.log(
            f"[ray-aekd] teacher {self._name(trial)} failed (restart {trial.num_failures}, trials.max_failures: "
            f"{limit}); restarting it {where}"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed.append(self._name(trial))

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool(self.failed)


def format_table(result: TeachersResult) -> str:
    lines = ["", f"{'teacher':<16}{'model':<16}{'val/acc1':>9}  checkpoint"]
    for name, row in result.teachers.items():
        lines.append(f"{name:<16}{row['model']:<16}{row['val/acc1']:>9.4f}  {row['checkpoint']}")
    lines += [
        f"{'ensemble':<32}{result.ensemble_acc1:>9.4f}",
        f"teachers disagree on {result.disagreement:.1%} of validation samples "
        f"(pairwise {result.pairwise_disagreement:.1%}); {result.seconds:.0f} s in all",
    ]
    return "\n".join(lines)


def _teacher_params(config: TeachersConfig, index: int) -> dict[str, Any]:
    shared = {k: v for k, v in flatten(config).items() if not k.startswith("teachers.")}
    own = {f"teacher.{k}": v for k, v in flatten(config.teachers[index]).items()}
    return shared | own


def _check_teachers_fit(config: TeachersConfig, source: ImageSource) -> None:
    """Every teacher's classes exist in the data and its model runs on one of its images."""
    image, _ = source[0]
    x = normalize(image.unsqueeze(0), source.mean, source.std)
    for i, spec in enumerate(config.teachers):
        bad = [c for c in spec.noisy_classes if c >= source.num_classes]
        if bad:
            raise ValueError(
                f"teachers.{i}.noisy_classes: got {bad}; allowed: class indices below {source.num_classes} "
                f"({config.data.dataset} has {source.num_classes} classes)."
            )
        model = build_model(spec.model, source.num_classes, in_channels=source.input_shape[0]).eval()
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError as error:
            raise ValueError(
                f"teachers.{i}.model: {spec.model!r} does not run on {config.data.dataset} images of shape "
                f"{list(source.input_shape)} ({error})."
            ) from None


def _check_cluster(config: TeachersConfig) -> None:
    """Refuse, before anything is scheduled, resources that this Ray cluster does not have."""
    res = config.trials
    connect(
        res.cpus,
        res.gpus,
        f"trials.gpus = {res.gpus:g} and trials.cpus = {res.cpus:g}: each teacher would",
        "lower them (fractional GPUs share one), or set trials.gpus to 0 for CPU",
        local_cpus=res.cpus * len(config.teachers),
    )
