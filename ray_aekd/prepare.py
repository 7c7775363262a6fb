"""The driver's work before a distillation touches Ray: resolve paths, check the teachers
against the data and the student on one image, describe the teacher stages, and score the
teachers on the validation split. Shared by ``ray-aekd distill`` and ``ray-aekd relabel``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ray
import torch

from ray_aekd.config import DistillConfig
from ray_aekd.data import normalize
from ray_aekd.data.sources import ImageSource
from ray_aekd.models import build_model, forward_with_feature, model_spec
from ray_aekd.models.checkpoint import CheckpointError, load_checkpoint, read_metadata
from ray_aekd.pipeline import _TASK_CPUS, TeacherStageSpec, logits_column, teacher_hint_layer
from ray_aekd.session import Demand
from ray_aekd.tracking import MLFLOW_URI_SCHEMES, resolve_tracking_uri

__all__ = [
    "check_run",
    "demand_totals",
    "resolve_paths",
    "run_demands",
    "shared_paths",
    "stage_specs",
    "teacher_accuracy",
]


def resolve_paths(config: DistillConfig, run_dir: Path) -> DistillConfig:
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
    storage = config.storage_path
    if storage is not None and "://" not in storage:
        storage = str(Path(storage).resolve())
    return dataclasses.replace(
        config,
        data=data,
        teachers=tuple(teachers),
        output_dir=str(Path(config.output_dir).resolve()),
        storage_path=storage,
    )


_CHECKPOINT_ALLOWED = (
    "a ray_aekd checkpoint (a folder or URI holding metadata.json and a tensors-only weights.pt that matches its "
    "hash, as `ray-aekd teachers` writes)"
)


def _sentence(error: Exception) -> str:
    """An error's text as the middle of a ``key: ...; allowed: ...`` line (one line, no final period)."""
    return " ".join(str(error).split()).rstrip(".")


def check_run(config: DistillConfig, source: ImageSource, num_train: int) -> dict[str, Any]:
    """Teachers fit the data, the student runs on it, batches fit the split. Returns the
    facts the workers need (``info``)."""
    image, _ = source[0]
    x = normalize(image.unsqueeze(0).repeat(2, 1, 1, 1), source.mean, source.std)
    teacher_channels = []
    for i, teacher in enumerate(config.teachers):
        key = f"teachers.{i}.checkpoint"
        try:
            meta = read_metadata(teacher.checkpoint)
        except (CheckpointError, OSError) as error:
            raise ValueError(f"{key}: {_sentence(error)}; allowed: {_CHECKPOINT_ALLOWED}.") from None
        if meta.num_classes != source.num_classes or tuple(meta.input_shape) != source.input_shape:
            raise ValueError(
                f"{key}: {teacher.name!r} was trained for {meta.num_classes} classes and inputs "
                f"{list(meta.input_shape)}, but {config.data.dataset} has {source.num_classes} classes and inputs "
                f"{list(source.input_shape)}; allowed: a teacher trained for {source.num_classes} classes and inputs "
                f"{list(source.input_shape)} (the teachers and the student read the same images)."
            )
        try:  # the whole checkpoint, as the teacher stages will read it: hash, tensors only, fits its architecture
            model, meta = load_checkpoint(teacher.checkpoint)
        except (ValueError, OSError) as error:  # CheckpointError is a ValueError
            raise ValueError(f"{key}: {_sentence(error)}; allowed: {_CHECKPOINT_ALLOWED}.") from None
        if config.distill.hint_weight > 0:
            with torch.no_grad():
                _, feature = forward_with_feature(model, x, teacher_hint_layer(meta.architecture))
            teacher_channels.append((meta.architecture, list(feature.shape[1:])))
        del model
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
        shape = list(source.input_shape)
        raise ValueError(
            f"student.model: got {config.student.model!r}, which does not run on {config.data.dataset} images of "
            f"shape {shape} ({_sentence(error)}); allowed: a model that takes {shape} inputs (digits_mlp and "
            "digits_cnn are made for the 8x8 digits, the CIFAR nets for 32x32 images)."
        ) from None
    workers = max(1, config.workers.num_workers)
    batch = config.train.batch_size
    if batch % workers:
        at_least = f", so at least {workers}" if batch < workers else ""
        raise ValueError(
            f"train.batch_size: got {batch}; allowed: a multiple of workers.num_workers = {workers}{at_least} "
            "(it is the global batch, split evenly across workers)."
        )
    if num_train // workers < batch // workers:
        raise ValueError(
            f"train.batch_size: got {batch}; allowed: at most {num_train // workers * workers} "
            f"(the training split has {num_train} samples for {workers} worker(s))."
        )
    steps = config.train.epochs * ((num_train // workers) // (batch // workers))  # full batches per worker
    kill_step = config.faults.kill_worker_step
    if config.faults.kill_worker_rank is not None and kill_step >= steps:
        raise ValueError(
            f"faults.kill_worker_step: got {kill_step}; allowed: a step of the run, 0 to {steps - 1} "
            f"({config.train.epochs} epoch(s) of {steps // config.train.epochs} steps): the fault could never fire."
        )
    return info


def stage_specs(config: DistillConfig) -> list[TeacherStageSpec]:
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
                resources=tuple(sorted(teacher.resources.items())),
                label_selector=tuple(sorted(teacher.label_selector.items())),
            )
        )
    return specs


def run_demands(config: DistillConfig, *, teachers: bool, workers: bool) -> list[Demand]:
    """The actors and tasks a run asks Ray for: the teacher stages (not when a distillation
    reads a soft-label cache) and the train workers, for ``session.connect``'s checks."""
    demands = []
    if teachers:
        for i, t in enumerate(config.teachers):
            pool = t.stage == "actors" or (t.stage == "auto" and t.num_gpus > 0)
            demands.append(
                Demand(
                    key=f"teachers.{i}",
                    what=f"teacher {t.name!r} {'actor' if pool else 'task'}",
                    resources={"CPU": t.num_cpus} | ({"GPU": t.num_gpus} if t.num_gpus else {}) | t.resources,
                    label_selector=t.label_selector,
                    count=t.actors if pool else 1,
                    held=pool,  # an actor pool holds its resources for the whole run; tasks while they run
                    gpu_key=f"teachers.{i}.num_gpus" if t.num_gpus else "",
                    gpu_value=f"{t.num_gpus:g}",
                )
            )
    if workers:
        w = config.workers
        demands.append(
            Demand(
                key="workers",
                what="train worker",
                resources={"CPU": w.cpus_per_worker} | ({"GPU": 1.0} if w.use_gpu else {}) | w.resources,
                label_selector=w.label_selector,
                count=max(1, w.num_workers),
                gpu_key="workers.use_gpu" if w.use_gpu else "",
                gpu_value="true",
            )
        )
    return demands


def shared_paths(config: DistillConfig, written: Path, tracking_uri: str) -> dict[str, str]:
    """Config key -> local path that every node of a cluster must see (``session.check_shared``):
    ``written``, a file the driver has just put in the run folder, what workers and teacher
    actors read, and the file of a SQLite tracking store that exists (rank 0 logs to it from
    its node; the caller makes sure it exists). ``config`` has resolved paths."""
    paths = {"output_dir": str(written)}
    database = Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:////") else None
    if database is not None and database.exists():
        paths["tracking.uri"] = str(database)
    if config.data.path is not None:
        paths["data.path"] = config.data.path
    if config.cache.path is None:
        paths |= {f"teachers.{i}.checkpoint": t.checkpoint for i, t in enumerate(config.teachers)}
    else:
        paths["cache.path"] = config.cache.path
    if config.storage_path is not None:
        paths["storage_path"] = config.storage_path
    return paths


def demand_totals(demands: list[Demand]) -> tuple[float, float]:
    """``(CPUs, GPUs)`` held at once: actor pools and workers, plus one task at a time (a data
    task reading and augmenting with ``_TASK_CPUS``, or a teacher task)."""
    held = [d for d in demands if d.held]
    transient = max([_TASK_CPUS] + [d.resources["CPU"] for d in demands if not d.held])
    cpus = sum(d.resources["CPU"] * d.count for d in held) + transient
    return cpus, sum(d.resources.get("GPU", 0.0) * d.count for d in held)


def teacher_accuracy(val: ray.data.Dataset, names: list[str]) -> tuple[dict[str, float], float]:
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
