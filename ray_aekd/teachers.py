"""``ray-aekd teachers``: train a (deliberately diverse) teacher ensemble concurrently on Ray.

Each teacher is one Ray Tune trial with its own resources (``resources.cpus_per_teacher``,
``resources.gpus_per_teacher``, fractional GPUs allowed), so M teachers train side by side
on M GPUs, or share them. A teacher can see a subset of the training split and noisy labels
on chosen classes, so that users can build ensembles that genuinely disagree. Every teacher
is saved as a safe checkpoint (``ray_aekd.models.checkpoint``) and logged to MLflow from the
driver (one run per teacher: params, per-epoch metrics, the checkpoint). At the end the
ensemble is evaluated on the validation split and a table is printed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from ray_aekd.config import TeachersConfig, TeacherSpec, flatten, from_dict
from ray_aekd.data import augment, normalize, open_source
from ray_aekd.data.labels import corrupt_labels
from ray_aekd.data.sources import ImageSource, TensorSource
from ray_aekd.engine import classification_epoch, evaluate, make_optimizer
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from ray_aekd.pipeline import view_settings
from ray_aekd.session import connect
from ray_aekd.tune_logging import MlflowTrialLogger

__all__ = ["TeacherData", "load_split", "train_teachers"]


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


def _train_one(trial_config: dict[str, Any]) -> None:
    """Tune trainable: train teacher ``trial_config["teacher"]`` and save its checkpoint."""
    config = from_dict(TeachersConfig, trial_config["config"])
    spec = config.teachers[trial_config["teacher"]]
    out_dir = Path(trial_config["output_dir"]) / spec.name
    torch.manual_seed(spec.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    data = teacher_data(config, spec)
    source = data.source
    pad, flip = view_settings(source)
    model = build_model(spec.model, source.num_classes, in_channels=source.input_shape[0]).to(device)
    train = config.train
    optimizer, scheduler = make_optimizer(
        model, train.lr, train.momentum, train.weight_decay, train.schedule, train.epochs, train.milestones
    )
    val_x = normalize(data.val_images, source.mean, source.std).to(device)
    val_y = data.val_labels.to(device)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    metrics: dict[str, float] = {}
    for epoch in range(train.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(data.train_labels), generator=gen)

        def batches(order: torch.Tensor = order, epoch: int = epoch):
            for i in range(0, len(order), train.batch_size):
                idx = order[i : i + train.batch_size]
                images = data.train_images[idx]
                if config.data.augment:
                    images = augment(images, data.train_indices[idx], spec.seed, epoch, pad=pad, flip=flip)
                yield normalize(images, source.mean, source.std).to(device), data.train_labels[idx].to(device)

        metrics = classification_epoch(model, batches(), optimizer)
        scheduler.step()
        val_metrics, _ = evaluate(model, val_x, val_y)
        metrics |= val_metrics | {"epoch": epoch + 1, "epoch_seconds": time.perf_counter() - start}
        tune.report(metrics)
    save_checkpoint(
        str(out_dir),
        model.cpu(),
        CheckpointMetadata(
            architecture=spec.model,
            num_classes=source.num_classes,
            input_shape=source.input_shape,
            mean=tuple(source.mean),
            std=tuple(source.std),
            dataset=config.data.dataset,
            class_names=source.class_names,
            seed=spec.seed,
            metrics={k: v for k, v in metrics.items() if k.startswith("val/")},
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
    """Train every teacher of ``config`` concurrently, then evaluate the ensemble."""
    start = time.perf_counter()
    if config.data.path is not None and "://" not in config.data.path:
        # Tune runs each trial in its own working directory: pass the trials an absolute path
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, path=str(Path(config.data.path).resolve()))
        )
    source, _, val = load_split(config)  # fails fast on a bad data path, before Ray is used
    _check_teachers_fit(config, source)
    _check_cluster(config)
    output_dir = Path(config.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    res = config.resources
    trainable = tune.with_resources(_train_one, {"cpu": res.cpus_per_teacher, "gpu": res.gpus_per_teacher})
    names = [t.name for t in config.teachers]
    logger = MlflowTrialLogger(
        uri=config.tracking.uri,
        experiment=config.tracking.experiment,
        run_name=lambda trial: names[trial.config["teacher"]],
        params=lambda trial: _teacher_params(config, trial.config["teacher"]),
        artifact_dir=lambda trial: str(output_dir / names[trial.config["teacher"]]),
    )
    log(f"training {len(names)} teachers ({', '.join(names)}) on Ray; MLflow: {logger.uri}")
    tuner = tune.Tuner(
        trainable,
        param_space={
            "teacher": tune.grid_search(list(range(len(names)))),
            "config": dataclasses.asdict(config),
            "output_dir": str(output_dir),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=len(names), reuse_actors=False),
        run_config=tune.RunConfig(
            name="teachers",
            storage_path=str(output_dir / "_tune"),
            callbacks=[logger],
            verbose=1,
            failure_config=tune.FailureConfig(fail_fast=True),
        ),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} teacher(s) failed; first error: {errors[0]}")

    val_images, val_labels = _stack(source, val)
    val_x = normalize(val_images, source.mean, source.std)
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
            "mlflow_run_id": logger.run_ids.get(name),
        }
    stacked = torch.stack(logits)  # [M, N, K]
    ensemble = stacked.softmax(-1).mean(0).argmax(-1)
    votes = stacked.argmax(-1)  # [M, N]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    result = TeachersResult(
        teachers=teachers,
        ensemble_acc1=float((ensemble == val_labels).float().mean()),
        disagreement=float((votes != votes[:1]).any(0).float().mean()),
        pairwise_disagreement=float(sum((votes[i] != votes[j]).float().mean() for i, j in pairs) / len(pairs))
        if pairs
        else 0.0,
        seconds=time.perf_counter() - start,
    )
    (output_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    log(format_table(result))
    return result


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
    res = config.resources
    connect(
        res.cpus_per_teacher,
        res.gpus_per_teacher,
        f"resources.gpus_per_teacher = {res.gpus_per_teacher:g} and resources.cpus_per_teacher = "
        f"{res.cpus_per_teacher:g}: each teacher would",
        "lower them (fractional GPUs share one), or set gpus_per_teacher to 0 for CPU",
        local_cpus=res.cpus_per_teacher * len(config.teachers),
    )
