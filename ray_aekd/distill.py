"""``ray-aekd distill``: distil trained teachers into a student on Ray.

The driver checks everything it can before Ray schedules anything (config, data, teacher
checkpoints against the data, the student on one image, the cluster's resources), then:

1. runs the validation split once through the teacher stages (kept: it is small, and the
   teachers' and the ensemble's accuracy come from it, once per run);
2. opens (or, when the run is resumed, reopens) one MLflow run with the flattened config as
   params and the teachers' accuracies;
3. starts a ``TorchTrainer`` whose workers read the streaming training pipeline
   (``ray_aekd.pipeline``) and run ``ray_aekd.train.train_loop``;
4. closes the MLflow run and returns the final metrics.

Running the same config (same ``name`` and ``output_dir``) again resumes from the last
checkpoint; a worker-group failure resumes too, up to ``workers.max_failures`` times.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from ray_aekd.config import DistillConfig, flatten
from ray_aekd.data import normalize, open_source, split_indices
from ray_aekd.data.sources import ImageSource
from ray_aekd.models import build_model, forward_with_feature, model_spec
from ray_aekd.models.checkpoint import CheckpointError, read_metadata
from ray_aekd.pipeline import TeacherStageSpec, ViewClock, distill_dataset, logits_column, teacher_hint_layer
from ray_aekd.session import connect
from ray_aekd.tracking import MLFLOW_URI_SCHEMES, experiment_id, limit_mlflow_retries, resolve_tracking_uri
from ray_aekd.train import train_loop

__all__ = ["DistillResult", "distill", "format_result"]

RUN_ID_FILE = "mlflow_run_id"


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


def _resolve_paths(config: DistillConfig, run_dir: Path) -> DistillConfig:
    """Absolute local paths (workers and actors run elsewhere) and MLflow URIs downloaded."""
    data = config.data
    if data.path is not None and "://" not in data.path:
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    teachers = []
    for i, teacher in enumerate(config.teachers):
        path = teacher.checkpoint
        if path.startswith(MLFLOW_URI_SCHEMES):
            import mlflow.artifacts

            target = run_dir / "teachers" / teacher.name
            target.mkdir(parents=True, exist_ok=True)
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=path, dst_path=str(target), tracking_uri=resolve_tracking_uri(config.tracking.uri)
                )
            except Exception as error:
                raise ValueError(f"teachers.{i}.checkpoint: cannot download {path!r} from MLflow ({error}).") from None
        elif "://" not in path:
            path = str(Path(path).resolve())
        teachers.append(dataclasses.replace(teacher, checkpoint=path))
    return dataclasses.replace(
        config, data=data, teachers=tuple(teachers), output_dir=str(Path(config.output_dir).resolve())
    )


def _check_run(config: DistillConfig, source: ImageSource, num_train: int) -> dict[str, Any]:
    """Teachers fit the data, the student runs on it, batches fit the split. Returns the
    facts the workers need (``info``)."""
    image, _ = source[0]
    x = normalize(image.unsqueeze(0).repeat(2, 1, 1, 1), source.mean, source.std)
    teacher_channels = []
    for i, teacher in enumerate(config.teachers):
        try:
            meta = read_metadata(teacher.checkpoint)
        except (CheckpointError, OSError) as error:
            raise ValueError(f"teachers.{i}.checkpoint: {error}") from None
        if meta.num_classes != source.num_classes or tuple(meta.input_shape) != source.input_shape:
            raise ValueError(
                f"teachers.{i}.checkpoint: {teacher.name!r} was trained for {meta.num_classes} classes and inputs "
                f"{list(meta.input_shape)}, but {config.data.dataset} has {source.num_classes} classes and inputs "
                f"{list(source.input_shape)}."
            )
        if config.distill.hint_weight > 0:
            model = build_model(meta.architecture, meta.num_classes, in_channels=meta.input_shape[0]).eval()
            with torch.no_grad():
                _, feature = forward_with_feature(model, x, teacher_hint_layer(meta.architecture))
            teacher_channels.append((meta.architecture, list(feature.shape[1:])))
    student = build_model(config.student.model, source.num_classes, in_channels=source.input_shape[0]).eval()
    info: dict[str, Any] = {
        "num_classes": source.num_classes,
        "input_shape": list(source.input_shape),
        "mean": list(source.mean),
        "std": list(source.std),
        "class_names": list(source.class_names),
    }
    layer = config.student.hint_layer or model_spec(config.student.model).hint_layer
    try:
        with torch.no_grad():
            if config.distill.hint_weight > 0:
                if layer is None:
                    raise ValueError(f"student.hint_layer: {config.student.model!r} has no default; name one.")
                _, feature = forward_with_feature(student, x, layer)
                for i, (arch, shape) in enumerate(teacher_channels):
                    if list(feature.shape[2:]) != shape[1:]:
                        raise ValueError(
                            f"distill.hint_weight: the student's {layer!r} output {list(feature.shape[1:])} cannot be "
                            f"regressed onto teacher {i} ({arch}) feature {shape}: the spatial sizes differ."
                        )
                info |= {
                    "student_hint_layer": layer,
                    "student_hint_channels": int(feature.shape[1]),
                    "teacher_hint_channels": [shape[0] for _, shape in teacher_channels],
                }
            else:
                student(x)
    except RuntimeError as error:
        raise ValueError(
            f"student.model: {config.student.model!r} does not run on {config.data.dataset} images of shape "
            f"{list(source.input_shape)} ({error})."
        ) from None
    workers = max(1, config.workers.num_workers)
    if config.train.batch_size % workers:
        raise ValueError(
            f"train.batch_size: got {config.train.batch_size}; allowed: a multiple of workers.num_workers = {workers} "
            "(it is the global batch, split evenly across workers)."
        )
    if num_train // workers < config.train.batch_size // workers:
        raise ValueError(
            f"train.batch_size: got {config.train.batch_size}; allowed: at most {num_train // workers * workers} "
            f"(the training split has {num_train} samples for {workers} worker(s))."
        )
    return info


def _stage_specs(config: DistillConfig) -> list[TeacherStageSpec]:
    specs = []
    for teacher in config.teachers:
        layer = None
        if config.distill.hint_weight > 0:
            layer = teacher_hint_layer(read_metadata(teacher.checkpoint).architecture)
        specs.append(
            TeacherStageSpec(
                name=teacher.name,
                checkpoint=teacher.checkpoint,
                num_gpus=teacher.num_gpus,
                num_cpus=teacher.num_cpus,
                actors=teacher.actors,
                batch_size=teacher.batch_size,
                hint_layer=layer,
                stage=teacher.stage if teacher.stage != "auto" else ("actors" if teacher.num_gpus > 0 else "tasks"),
                weights_sha256=read_metadata(teacher.checkpoint).weights_sha256,
            )
        )
    return specs


def _teacher_accuracy(val: ray.data.Dataset, names: list[str]) -> tuple[dict[str, float], float]:
    hits = torch.zeros(len(names) + 1, dtype=torch.float64)
    count = 0
    for batch in val.iter_torch_batches(batch_size=1024):
        logits = torch.stack([batch[logits_column(n)] for n in names])  # [M, B, K]
        labels = batch["label"]
        hits[:-1] += (logits.argmax(-1) == labels).double().sum(-1)
        hits[-1] += (logits.softmax(-1).mean(0).argmax(-1) == labels).double().sum()
        count += len(labels)
    acc = (hits / count).tolist()
    return dict(zip(names, acc[:-1], strict=True)), acc[-1]


# Keys that may change when a run is resumed; anything else would mix two different runs.
_RESUMABLE_KEYS = ("train.epochs", "workers.", "tracking.", "teachers.")


def _has_checkpoint(config: DistillConfig) -> bool:
    """Whether Ray Train will resume this run (a checkpoint under ``output_dir/_train/<name>``)."""
    folder = Path(config.output_dir) / "_train" / config.name
    return config.workers.num_workers > 0 and any(folder.glob("checkpoint_*"))


def _check_resume(config: DistillConfig, run_dir: Path, weights: list[str]) -> None:
    """A resumed run must be the same run: only more epochs, other workers or tracking."""
    saved_file = run_dir / "config.json"
    if not saved_file.exists():
        return
    saved = json.loads(saved_file.read_text())
    now = json.loads(json.dumps(flatten(config)))
    teachers_now = [t.name for t in config.teachers]
    changed = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not k.startswith((*_RESUMABLE_KEYS, "__"))
    )
    if saved.get("__teachers__") not in (None, teachers_now):
        changed.append("teachers")
    if saved.get("__teacher_weights__") not in (None, list(weights)):
        changed.append("teachers.<i>.checkpoint (other weights)")
    if now["train.epochs"] < saved.get("train.epochs", 0):
        changed.append("train.epochs (lower than the run's)")
    if changed:
        raise ValueError(
            f"name: {config.name!r} is a run in {run_dir} that would be resumed, but these keys differ from it: "
            f"{', '.join(changed)}; allowed: only more train.epochs or other workers/tracking settings. "
            "Give a new name for a new run (or delete that folder and output_dir/_train/<name>)."
        )


def _open_run(
    config: DistillConfig,
    run_dir: Path,
    teachers: dict[str, float],
    ensemble: float,
    log: Callable[[str], None],
    resuming: bool,
) -> tuple[str, str | None]:
    """Create (or reopen, when resuming) the run's MLflow run; ``None`` if MLflow is unreachable."""
    uri = resolve_tracking_uri(config.tracking.uri)
    id_file = run_dir / RUN_ID_FILE
    resuming = resuming and id_file.exists()
    try:
        client = MlflowClient(uri)
        if resuming:
            run_id = id_file.read_text().strip()
            client.update_run(run_id, status="RUNNING")
            return uri, run_id
        run = client.create_run(
            experiment_id(client, config.tracking.experiment),
            run_name=config.name,
            tags={"ray_aekd.strategy": config.distill.strategy, "ray_aekd.run_dir": str(run_dir)},
        )
        run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        stamp = int(time.time() * 1000)
        metrics = [Metric(f"teacher/{n}/val/acc1", acc, stamp, 0) for n, acc in teachers.items()]
        client.log_batch(run_id, metrics=[*metrics, Metric("ensemble/val/acc1", ensemble, stamp, 0)])
    except Exception as error:  # an unreachable tracking server must not stop the run
        log(
            f"warning: MLflow at {uri} is not reachable ({type(error).__name__}: {error}); training without it, "
            f"metrics stay in {run_dir}."
        )
        return uri, None
    id_file.write_text(run_id)
    return uri, run_id


def distill(config: DistillConfig, log: Callable[[str], None] = print) -> DistillResult:
    """Distil ``config.teachers`` into ``config.student`` on Ray; see the module docstring."""
    start = time.perf_counter()
    limit_mlflow_retries()
    run_dir = Path(config.output_dir).resolve() / config.name
    config = _resolve_paths(config, run_dir)
    source = open_source(
        config.data.dataset, config.data.path, download=config.data.download, size=config.data.image_size
    )
    train_idx, val_idx = split_indices(len(source), config.data.val_fraction, config.seed)
    info = _check_run(config, source, len(train_idx))
    stages = _stage_specs(config)
    weights = [s.weights_sha256 for s in stages]
    resuming = _has_checkpoint(config)
    if resuming:
        _check_resume(config, run_dir, weights)
    workers = config.workers
    # actor pools hold their CPUs for the whole run; tasks only while they run (one at a time is enough)
    held = sum(s.num_cpus * s.actors for s in stages if s.stage == "actors")
    transient = max([1.0] + [s.num_cpus for s in stages if s.stage == "tasks"])
    cpus = held + transient + max(1, workers.num_workers) * workers.cpus_per_worker
    gpus = sum(t.num_gpus * t.actors for t in config.teachers) + (workers.num_workers if workers.use_gpu else 0)
    what = f"{len(config.teachers)} teacher pool(s) and {max(1, workers.num_workers)} train worker(s)"
    connect(cpus, gpus, what, hint="lower workers.cpus_per_worker, teachers.<i>.num_cpus or teachers.<i>.actors")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = json.loads(json.dumps(flatten(config))) | {
        "__teachers__": [t.name for t in config.teachers],
        "__teacher_weights__": weights,
    }
    (run_dir / "config.json").write_text(json.dumps(saved, indent=2))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one progress line per epoch comes from rank 0
    context.print_on_execution_start = False

    names = [t.name for t in config.teachers]
    log(
        f"{config.name}: distilling {len(names)} teachers ({', '.join(names)}) into {config.student.model} with "
        f"{config.distill.strategy} on {max(1, workers.num_workers)} worker(s); {len(train_idx)} train / "
        f"{len(val_idx)} validation {config.data.dataset} images"
    )
    val = distill_dataset(source, val_idx.numpy(), stages).materialize()
    teacher_acc, ensemble_acc = _teacher_accuracy(val, names)
    log(
        "teachers val/acc1: "
        + "  ".join(f"{n} {a:.4f}" for n, a in teacher_acc.items())
        + f"   ensemble {ensemble_acc:.4f}"
    )
    uri, run_id = _open_run(config, run_dir, teacher_acc, ensemble_acc, log, resuming)
    if run_id:
        log(f"MLflow: {uri}, experiment {config.tracking.experiment!r}, run {run_id}")
    clock = ViewClock.remote() if config.data.augment else None
    # a seeded permutation: splits (and image folders) are sorted, often by class, and the
    # workers' local shuffle buffer only mixes a few batches
    order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(config.seed))]
    train = distill_dataset(source, order.numpy(), stages, clock=clock, seed=config.seed)
    resources: dict[str, float] = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": dataclasses.asdict(config),
            "info": info,
            "run_dir": str(run_dir),
            "clock": clock,
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers.num_workers, use_gpu=workers.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=str(Path(config.output_dir) / "_train"),
            failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Train's per-report INFO lines repeat every metric; the epoch line from rank 0 says it once
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train, "val": val},
        # the training stream is split evenly across workers; every worker reads all of the
        # validation set and scores its own share of it (see train_loop), so no sample is dropped
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    status = "FAILED"
    try:
        trainer.fit()
        status = "FINISHED"
    finally:
        if clock is not None:
            ray.kill(clock)
        if run_id:
            try:
                MlflowClient(uri).set_terminated(run_id, status)
            except Exception as error:
                log(f"warning: could not mark MLflow run {run_id} {status} ({error}).")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(lines[-1])
    result = DistillResult(
        name=config.name,
        strategy=config.distill.strategy,
        run_dir=str(run_dir),
        mlflow_run_id=run_id,
        metrics=metrics,
        teachers=teacher_acc,
        ensemble_acc1=ensemble_acc,
        student_checkpoint=str(run_dir / "student"),
        seconds=time.perf_counter() - start,
    )
    log(format_result(result))
    return result


def format_result(result: DistillResult) -> str:
    m = result.metrics
    return (
        f"{result.name} ({result.strategy}): val/acc1 {m['val/acc1']:.4f}  val/acc5 {m['val/acc5']:.4f}  "
        f"val/agreement {m['val/agreement']:.4f}  val/ece {m['val/ece']:.4f}  ({result.seconds:.0f} s); "
        f"student saved to {result.student_checkpoint}"
    )
