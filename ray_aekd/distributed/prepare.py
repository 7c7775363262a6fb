"""The driver's work before a distillation touches Ray: resolve paths, check the teachers
against the data and the student on one image, describe the teacher stages, and score the
teachers on the validation split. Shared by ``ray-aekd distill`` and ``ray-aekd relabel``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import ray
import torch

from ray_aekd.config import DistillConfig, DistillTeacher
from ray_aekd.data import normalize
from ray_aekd.data.sources import ImageSource
from ray_aekd.distributed.pipeline import _TASK_CPUS, TeacherStageSpec, logits_column, teacher_hint_layer
from ray_aekd.distributed.session import Demand
from ray_aekd.models import build_model, forward_with_feature, model_spec
from ray_aekd.models.checkpoint import CheckpointError, read_metadata
from ray_aekd.models.preprocess import Preprocess
from ray_aekd.models.sources import LoadedModel, ModelSourceError, check_on_batch, load_source
from ray_aekd.tracking.runs import MLFLOW_URI_SCHEMES, download_model, resolve_tracking_uri

__all__ = [
    "check_run",
    "demand_totals",
    "load_teacher",
    "sample_images",
    "teacher_key",
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
        path = teacher.location
        key = f"teachers.{i}.{teacher_key(teacher)}"
        if path.startswith(MLFLOW_URI_SCHEMES):  # an MLflow URI; a local MLflow model folder is a path
            target = run_dir / "teachers" / teacher.name
            made = _first_missing(target)
            try:
                path = download_model(path, target, resolve_tracking_uri(config.tracking.uri))
            except ValueError as error:
                if made is not None:  # a bad input leaves no folder behind
                    shutil.rmtree(made, ignore_errors=True)
                raise ValueError(
                    f"{key}: teacher {teacher.name!r}: {_sentence(error)}; allowed: {_ALLOWED[teacher.source_kind]}."
                ) from None
        elif "://" not in path:
            path = str(Path(path).resolve())
        teachers.append(teacher.with_location(path))
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


def _first_missing(folder: Path) -> Path | None:
    """The top-most folder on the way to ``folder`` that does not exist yet (None: all exist)."""
    missing = None
    for path in [folder, *folder.parents]:
        if path.exists():
            return missing
        missing = path
    return missing


_CHECKPOINT_ALLOWED = (
    "a ray_aekd checkpoint (a folder or URI holding metadata.json and the tensors-only weights file "
    "(weights.safetensors, or weights.pt before version 2) that matches its hash, as `ray-aekd teachers` writes)"
)
#: What each kind of teacher source allows, for error lines.
_ALLOWED = {
    "checkpoint": _CHECKPOINT_ALLOWED,
    "model": "a state dict (.pt/.pth of tensors only, or .safetensors) that fits the architecture named by model, "
    "for the data's classes",
    "exported": "a torch.export program (.pt2, tensors and graph only) with a dynamic batch dimension, for the data's "
    "images and classes",
    "torchscript": "a TorchScript file (torch.jit.save of a scripted or traced module) for the data's images and "
    "classes",
    "mlflow": "an MLflow PyTorch model in the pt2 format (MLflow 3's default), for the data's images and classes",
}


def teacher_key(teacher: DistillTeacher) -> str:
    """The config key that holds a teacher's file: ``weights`` for a ``model`` teacher."""
    return "weights" if teacher.source_kind == "model" else teacher.source_kind


def sample_images(source: ImageSource, count: int = 2) -> torch.Tensor:
    """The first ``count`` images of ``source``, uint8 ``[count, C, H, W]`` (real data for checks)."""
    return torch.stack([source[i][0] for i in range(min(count, len(source)))])


def load_teacher(teacher: DistillTeacher, source: ImageSource, key: str) -> LoadedModel:
    """Load ``teacher`` (paths resolved) for ``source``'s data and run it on two real images;
    every failure is one ``key: ...; allowed: ...`` line naming the teacher and its file."""
    spec = teacher.source()
    default = Preprocess(source.mean, source.std)
    try:
        loaded = load_source(
            spec, num_classes=source.num_classes, in_channels=source.input_shape[0], default_preprocess=default
        )
        check_on_batch(loaded, sample_images(source), source.num_classes, spec.describe())
    except (ModelSourceError, OSError) as error:
        raise ValueError(
            f"{key}: teacher {teacher.name!r}: {_sentence(error)}; allowed: {_ALLOWED[spec.kind]}."
        ) from None
    if loaded.class_names and tuple(loaded.class_names) != tuple(source.class_names):
        raise ValueError(
            f"{key}: teacher {teacher.name!r}: {spec.describe()} was trained on classes "
            f"{_names(loaded.class_names)}, but the data has {_names(source.class_names)}; allowed: a teacher "
            "for the data's classes, in the same order."
        )
    return loaded


def _names(names: tuple[str, ...] | list[str], limit: int = 6) -> str:
    shown = ", ".join(map(str, list(names)[:limit]))
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


_LOADED: dict[tuple[Any, ...], LoadedModel] = {}


def teacher_facts(teacher: DistillTeacher, source: ImageSource, key: str) -> LoadedModel:
    """``load_teacher``, kept per process for the file as it is now (size and mtime), so the
    driver's checks and ``stage_specs`` load each teacher once."""
    path = Path(teacher.location)
    stamp: tuple[Any, ...] | None = None  # what the file or folder was when loaded: sizes and times
    if "://" not in teacher.location and path.exists():
        stamp = (path.stat().st_size, path.stat().st_mtime_ns)
    if path.is_dir():
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())
    cache_key = (teacher.source(), stamp, source.num_classes, source.input_shape, source.mean, source.std)
    if stamp is None or cache_key not in _LOADED:
        loaded = load_teacher(teacher, source, key)
        if stamp is None:
            return loaded
        if len(_LOADED) >= 16:  # bounded: drop the oldest
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[cache_key] = loaded
    return _LOADED[cache_key]


def _sentence(error: Exception) -> str:
    """An error's text as the middle of a ``key: ...; allowed: ...`` line (one line, no final period)."""
    return " ".join(str(error).split()).rstrip(".")


def check_run(config: DistillConfig, source: ImageSource, num_train: int) -> dict[str, Any]:
    """Teachers fit the data, the student runs on it, batches fit the split. Returns the
    facts the workers need (``info``)."""
    hint_features = [_check_teacher(config, source, i) for i in range(len(config.teachers))]
    info: dict[str, Any] = {
        "num_classes": source.num_classes,
        "input_shape": list(source.input_shape),
        "mean": list(source.mean),
        "std": list(source.std),
        "class_names": list(source.class_names),
    }
    info |= _check_student(config, source, [f for f in hint_features if f is not None])
    _check_batches(config, num_train)
    return info


def _check_teacher(config: DistillConfig, source: ImageSource, i: int) -> tuple[str, list[int]] | None:
    """Teacher ``i`` was made for this data (a checkpoint's metadata) and loads; with hints, its
    ``(architecture, hint feature shape [C, H, W])``, else None."""
    teacher = config.teachers[i]
    key = f"teachers.{i}.{teacher_key(teacher)}"
    if teacher.source_kind == "checkpoint" and teacher.preprocess is None:
        try:
            meta = read_metadata(teacher.checkpoint)  # type: ignore[arg-type]
        except (CheckpointError, OSError) as error:
            raise ValueError(
                f"{key}: teacher {teacher.name!r}: {_sentence(error)}; allowed: {_CHECKPOINT_ALLOWED}."
            ) from None
        if meta.num_classes != source.num_classes or tuple(meta.input_shape) != source.input_shape:
            raise ValueError(
                f"{key}: {teacher.name!r} was trained for {meta.num_classes} classes and inputs "
                f"{list(meta.input_shape)}, but {config.data.dataset} has {source.num_classes} classes and inputs "
                f"{list(source.input_shape)}; allowed: a teacher trained for {source.num_classes} classes and "
                f"inputs {list(source.input_shape)} (the teachers and the student read the same images)."
            )
    loaded = teacher_facts(teacher, source, key)  # the whole file, as the teacher stage will read it
    if config.distill.hint_weight == 0:
        return None
    if loaded.architecture is None:
        raise ValueError(
            f"{key}: teacher {teacher.name!r} is a {teacher.source_kind} model, whose layers cannot be named "
            "for hints; allowed: checkpoint or model + weights teachers when distill.hint_weight > 0."
        )
    with torch.no_grad():
        teacher_x = loaded.preprocess(sample_images(source))
        _, feature = forward_with_feature(loaded.module, teacher_x, teacher_hint_layer(loaded.architecture))
    return loaded.architecture, list(feature.shape[1:])


def _check_student(
    config: DistillConfig, source: ImageSource, teacher_features: list[tuple[str, list[int]]]
) -> dict[str, Any]:
    """The student runs on two of the data's images; with hints, its hint feature can be
    regressed onto each teacher's (``teacher_features``: architecture, shape), and the facts the
    workers need to build the regressors are returned."""
    image, _ = source[0]
    x = normalize(image.unsqueeze(0).repeat(2, 1, 1, 1), source.mean, source.std)
    student = build_model(config.student.model, source.num_classes, in_channels=source.input_shape[0]).eval()
    layer = config.student.hint_layer or model_spec(config.student.model).hint_layer
    try:
        with torch.no_grad():
            if config.distill.hint_weight == 0:
                student(x)
                return {}
            if layer is None:
                raise ValueError(f"student.hint_layer: {config.student.model!r} has no default; name one.")
            _, feature = forward_with_feature(student, x, layer)
    except RuntimeError as error:
        shape = list(source.input_shape)
        raise ValueError(
            f"student.model: got {config.student.model!r}, which does not run on {config.data.dataset} images of "
            f"shape {shape} ({_sentence(error)}); allowed: a model that takes {shape} inputs (digits_mlp and "
            "digits_cnn are made for the 8x8 digits, the CIFAR nets for 32x32 images)."
        ) from None
    for i, (arch, shape) in enumerate(teacher_features):
        if list(feature.shape[2:]) != shape[1:]:
            raise ValueError(
                f"distill.hint_weight: the student's {layer!r} output {list(feature.shape[1:])} cannot be "
                f"regressed onto teacher {i} ({arch}) feature {shape}: the spatial sizes differ."
            )
    return {
        "student_hint_layer": layer,
        "student_hint_channels": int(feature.shape[1]),
        "teacher_hint_channels": [shape[0] for _, shape in teacher_features],
    }


def _check_batches(config: DistillConfig, num_train: int) -> None:
    """The global batch splits evenly across the workers and fits the training split, and a
    worker-kill fault drill names a step the run has."""
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


def stage_specs(config: DistillConfig, source: ImageSource) -> list[TeacherStageSpec]:
    """One stage per teacher (paths resolved), each with its preprocessing made explicit."""
    specs = []
    for i, teacher in enumerate(config.teachers):
        loaded = teacher_facts(teacher, source, f"teachers.{i}.{teacher_key(teacher)}")
        layer = (
            teacher_hint_layer(loaded.architecture) if config.distill.hint_weight > 0 and loaded.architecture else None
        )
        specs.append(
            TeacherStageSpec(
                name=teacher.name,
                source=dataclasses.replace(teacher.source(), preprocess=loaded.preprocess),
                num_classes=source.num_classes,
                in_channels=source.input_shape[0],
                num_gpus=teacher.gpus,
                num_cpus=teacher.cpus,
                actors=teacher.actors,
                batch_size=teacher.batch_size,
                hint_layer=layer,
                stage="actors" if teacher.runs_as_actors else "tasks",
                weights_sha256=loaded.digest,
                resources=tuple(sorted(teacher.custom_resources.items())),
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
            pool = t.runs_as_actors
            demands.append(
                Demand(
                    key=f"teachers.{i}",
                    what=f"teacher {t.name!r} {'actor' if pool else 'task'}",
                    resources={"CPU": t.cpus} | ({"GPU": t.gpus} if t.gpus else {}) | t.custom_resources,
                    label_selector=t.label_selector,
                    count=t.actors if pool else 1,
                    held=pool,  # an actor pool holds its resources for the whole run; tasks while they run
                    gpu_key=f"teachers.{i}.gpus" if t.gpus else "",
                    gpu_value=f"{t.gpus:g}",
                )
            )
    if workers:
        w = config.workers
        demands.append(
            Demand(
                key="workers",
                what="train worker",
                resources={"CPU": w.cpus} | ({"GPU": w.gpus} if w.gpus else {}) | w.custom_resources,
                label_selector=w.label_selector,
                count=max(1, w.num_workers),
                gpu_key="workers.gpus" if w.gpus else "",
                gpu_value=f"{w.gpus:g}",
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
        paths |= {f"teachers.{i}.{teacher_key(t)}": t.location for i, t in enumerate(config.teachers)}
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
