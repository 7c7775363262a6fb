"""``ray-aekd evaluate``: score any model on a held-out set, and ``ray-aekd export``.

A model is anything a teacher can be (``models.sources``): a checkpoint folder, a weights
file with ``--arch``, a ``.pt2`` program, a TorchScript file, or an MLflow model (a URI or a
local folder). Its kind is read from the form of ``--model`` (an explicit ``kind:`` prefix
wins). Data:

- ``digits``: the held-out 20% of scikit-learn's digits (``val_fraction`` 0.2, ``split_seed``
  0: the split every digits config in ``tune_configs/`` validates on; digits has no test split);
- ``cifar10:ROOT`` / ``cifar100:ROOT``: the test split (torchvision's extracted folders);
- ``imagefolder:DIR``: every image under ``DIR/<class>/``, at its own size or ``--size``;
- ``config:FILE``: the validation split of that distillation config.

Printed: acc@1, acc@5, ECE, NLL, per-class accuracy and the number of samples (``--json``: one
JSON object). With a tracking URI (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``) an evaluation
run is logged with the metrics, the dataset as an input, a confusion matrix and a reliability
diagram.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_aekd.core.metrics import SUMS_LENGTH, calibration_bins, validation_metrics, validation_sums
from ray_aekd.data.sources import DataSourceError, ImageSource, cifar_source, digits_source, open_source
from ray_aekd.data.views import split_indices
from ray_aekd.models.export import export_program, with_preprocess
from ray_aekd.models.preprocess import Preprocess
from ray_aekd.models.sources import (
    SOURCE_KINDS,
    LoadedModel,
    ModelSource,
    ModelSourceError,
    check_on_batch,
    load_source,
)

__all__ = ["EvalData", "Evaluation", "evaluate_model", "export_model", "load_model", "open_eval_data", "parse_model"]

_MODEL_ALLOWED = (
    "a checkpoint folder, a weights file (.pt/.pth/.safetensors) with --arch, an exported program (.pt2), a "
    "TorchScript file (torchscript:FILE), an MLflow model (models:/<name>@<alias>, models:/<model id>, "
    "runs:/<run id>/<path>, or a local MLflow model folder); or kind:LOCATION with kind one of "
    + ", ".join(SOURCE_KINDS)
)
_DATA_ALLOWED = "digits, cifar10:ROOT, cifar100:ROOT, imagefolder:DIR or config:FILE"


@dataclasses.dataclass
class EvalData:
    """Images to score: ``source[indices]``, and how to name them."""

    source: ImageSource
    indices: torch.Tensor  # [N]
    description: str  # e.g. "cifar10 test split (10,000 images under /data)"
    location: str  # where the data lives (for the MLflow dataset input)
    class_names_known: bool = True  # False: stand-in names of a checkpoint that records none


@dataclasses.dataclass
class Evaluation:
    model: str
    data: str
    num_samples: int
    acc1: float
    acc5: float
    ece: float
    nll: float
    per_class: dict[str, float]  # class name -> accuracy (NaN: no sample of that class)
    class_names: list[str]
    confusion: list[list[int]]  # [K, K]: rows true class, columns predicted
    seconds: float
    mlflow_run_id: str | None = None
    predictions: list[int] = dataclasses.field(default_factory=list)  # per sample, in the data's order

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("predictions")
        return out


def parse_model(spec: str, arch: str | None = None, preprocess: Preprocess | None = None) -> ModelSource:
    """``--model`` (and ``--arch``) as a ``ModelSource``; the kind from a ``kind:`` prefix or the form."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in SOURCE_KINDS and not rest.startswith("//"):
        location = rest
    elif spec.startswith(("models:/", "runs:/")):
        kind, location = "mlflow", spec
    else:
        location = spec
        path = Path(spec)
        if path.is_dir():
            kind = "mlflow" if (path / "MLmodel").is_file() else "checkpoint"
        elif path.suffix == ".pt2":
            kind = "exported"
        elif arch is not None:
            kind = "model"
        elif path.is_file() and _is_torchscript(path):
            kind = "torchscript"
        elif path.suffix in (".pt", ".pth", ".safetensors"):
            raise ValueError(
                f"--model: got {spec!r}, a weights file; allowed: a weights file with --arch NAME (the architecture "
                "it is for: a registry name, torchvision:<name> or timm:<name>)."
            )
        else:
            kind = "checkpoint"  # a remote folder (s3://...) or a path that does not exist: said when loading
    if kind == "model" and arch is None:
        raise ValueError(f"--arch: got none for --model {spec!r}; allowed: the architecture the weights are for.")
    if arch is not None and kind != "model":
        raise ValueError(f"--arch: got {arch!r} for a {kind} model; allowed: --arch only with a weights file.")
    return ModelSource(kind=kind, location=location, architecture=arch, preprocess=preprocess)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold Python-like code under ``<name>/code/``; torch.save files do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def open_eval_data(spec: str, size: int | None = None) -> EvalData:
    """``--data`` as images and indices (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    source: ImageSource
    try:
        if spec == "digits":
            source = digits_source()
            _, held_out = split_indices(len(source), 0.2, seed=0)
            return EvalData(source, held_out, f"digits held-out split ({len(held_out)} images, split_seed 0)",
                            "sklearn.datasets.load_digits")  # fmt: skip
        if kind in ("cifar10", "cifar100") and rest:
            source = cifar_source(kind, rest, train=False)
            return EvalData(source, torch.arange(len(source)), f"{kind} test split ({len(source)} images)", rest)
        if kind == "imagefolder" and rest:
            source = open_source("imagefolder", rest, size=size)
            return EvalData(source, torch.arange(len(source)), f"image folder {rest} ({len(source)} images)", rest)
        if kind == "config" and rest:
            return _config_data(rest)
    except DataSourceError as error:
        raise ValueError(f"--data: {' '.join(str(error).split())}") from None
    raise ValueError(f"--data: got {spec!r}; allowed: {_DATA_ALLOWED}.")


def _config_data(path: str) -> EvalData:
    from ray_aekd.config import DistillConfig, load_config

    config = load_config(DistillConfig, path)
    data = config.data
    source = open_source(data.dataset, data.path, download=data.download, size=data.image_size)
    _, val = data.split(len(source), config.seed)
    where = data.path or data.dataset
    return EvalData(source, val, f"the validation split of {path} ({len(val)} {data.dataset} images)", where)


def load_model(source: ModelSource, data: EvalData, tracking_uri: str | None = None) -> LoadedModel:
    """Load ``source`` for ``data`` and check it on two of its images; MLflow URIs are
    downloaded first. Class names the model records must be the data's."""
    images = torch.stack([data.source[int(i)][0] for i in data.indices[:2]])
    if source.kind == "mlflow" and source.location.startswith(("models:/", "runs:/")):
        from ray_aekd.tracking.runs import download_model, resolve_tracking_uri

        target = Path(tempfile.mkdtemp(prefix="ray-aekd-model-"))
        try:
            folder = download_model(source.location, target, resolve_tracking_uri(tracking_uri))
        except ValueError as error:
            raise ValueError(f"--model: {error}.") from None
        source = dataclasses.replace(source, location=folder)
    default = Preprocess(data.source.mean, data.source.std)
    what = source.describe()
    try:
        loaded = load_source(
            source, num_classes=data.source.num_classes, in_channels=data.source.input_shape[0],
            default_preprocess=default,
        )  # fmt: skip
        check_on_batch(loaded, images, data.source.num_classes, what)
    except (ModelSourceError, OSError) as error:
        raise ValueError(f"--model: {' '.join(str(error).split()).rstrip('.')}; allowed: {_MODEL_ALLOWED}.") from None
    names = tuple(data.source.class_names)
    if loaded.class_names and tuple(loaded.class_names) != names:
        raise ValueError(
            f"--model: {what} was trained on classes {list(loaded.class_names)}, but the data has {list(names)}; "
            "allowed: data with the model's classes, in the same order."
        )
    return loaded


def evaluate_model(
    source: ModelSource,
    data: EvalData,
    *,
    batch_size: int = 256,
    tracking_uri: str | None = None,
    experiment: str = "ray-aekd-eval",
    track: bool = False,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Score ``source`` on ``data``; log an MLflow evaluation run when ``track``."""
    import time

    start = time.perf_counter()
    loaded = load_model(source, data, tracking_uri)
    k = data.source.num_classes
    sums = torch.zeros(SUMS_LENGTH, dtype=torch.float64)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    predictions = []
    indices = data.indices.tolist()
    with torch.inference_mode():
        for first in range(0, len(indices), batch_size):
            chunk = [data.source[i] for i in indices[first : first + batch_size]]
            images = torch.stack([image for image, _ in chunk])
            labels = torch.tensor([label for _, label in chunk])
            logits = loaded(images).float()
            sums += validation_sums(logits, labels)
            predicted = logits.argmax(-1)
            confusion += torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
            predictions += predicted.tolist()
    metrics = validation_metrics(sums, prefix="")
    per_true = confusion.sum(1)
    per_class = {
        name: (float(confusion[c, c]) / float(per_true[c])) if per_true[c] else float("nan")
        for c, name in enumerate(data.source.class_names)
    }
    result = Evaluation(
        model=source.describe(),
        data=data.description,
        num_samples=len(indices),
        acc1=metrics["acc1"],
        acc5=metrics["acc5"],
        ece=metrics["ece"],
        nll=metrics["loss"],
        per_class=per_class,
        class_names=list(data.source.class_names),
        confusion=confusion.tolist(),
        seconds=time.perf_counter() - start,
        predictions=predictions,
    )
    if track:
        result.mlflow_run_id = _log_evaluation(result, data, sums, tracking_uri, experiment, log)
    return result


def format_evaluation(result: Evaluation) -> str:
    lines = [
        f"model: {result.model}",
        f"data:  {result.data}",
        f"acc@1 {result.acc1:.4f}   acc@5 {result.acc5:.4f}   ECE {result.ece:.4f}   NLL {result.nll:.4f}   "
        f"samples {result.num_samples}   ({result.seconds:.1f} s)",
        "per-class accuracy:",
    ]
    width = max(len(n) for n in result.class_names)
    counts = [sum(row) for row in result.confusion]
    for (name, acc), count in zip(result.per_class.items(), counts, strict=True):
        lines.append(f"  {name:<{width}}  {acc:.4f}  ({count} samples)" if count else f"  {name:<{width}}  -  (none)")
    if result.mlflow_run_id:
        lines.append(f"MLflow run: {result.mlflow_run_id}")
    return "\n".join(lines)


def _log_evaluation(
    result: Evaluation, data: EvalData, sums: torch.Tensor, tracking_uri: str | None, experiment: str, log: Callable
) -> str:
    """One MLflow run: params (model, data), metrics (eval/...), the dataset as an input,
    per_class.json, confusion.png and reliability.png."""
    import hashlib

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from ray_aekd._provenance import environment_tags
    from ray_aekd.tracking.plots import plot_confusion_matrix, plot_reliability
    from ray_aekd.tracking.runs import dataset_input, experiment_id, log_dataset, resolve_tracking_uri, system_tags

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    run = client.create_run(
        experiment_id(client, experiment),
        run_name=f"evaluate {Path(result.model.split(' ', 2)[-1]).name}",
        tags=system_tags({"ray_aekd.kind": "evaluation"} | environment_tags()),
    )
    run_id = run.info.run_id
    stamp = int(time_ms())
    metrics = {f"eval/{k}": getattr(result, k) for k in ("acc1", "acc5", "ece", "nll")}
    metrics["eval/num_samples"] = float(result.num_samples)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
        params=[Param("model", result.model[:6000]), Param("data", result.data[:6000])],
    )
    digest = hashlib.sha256(json.dumps([data.location, len(data.source), list(data.source.class_names)]).encode())
    digest.update(data.indices.numpy().astype("int64").tobytes())
    profile = {"samples": result.num_samples, "num_classes": len(result.class_names)}
    name = data.description.split(" ")[0]
    log_dataset(client, run_id, dataset_input(name, digest.hexdigest()[:16], data.location, "evaluation", profile))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        title = f"{result.model}\non {result.data}"
        plot_confusion_matrix(np.array(result.confusion), result.class_names, root / "confusion.png", title)
        counts, confidence, accuracy = (t.numpy() for t in calibration_bins(sums))
        plot_reliability(counts, confidence, accuracy, result.ece, root / "reliability.png", title)
        (root / "evaluation.json").write_text(json.dumps(result.to_json(), indent=2))
        client.log_artifacts(run_id, folder)
    client.set_terminated(run_id, "FINISHED")
    log(f"MLflow: {uri}, experiment {experiment!r}, run {run_id}")
    return run_id


def time_ms() -> float:
    import time

    return time.time() * 1000


def export_model(source: ModelSource, output: str | Path, data: EvalData | None = None,
                 tracking_uri: str | None = None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Write ``source`` as a ``torch.export`` program with its preprocessing inside: float32
    ``[N, C, H, W]`` in ``[0, 1]`` -> logits ``[N, K]``; returns the path and its metadata.
    ``data`` gives the classes, input shape and example images when the model file does not."""
    if source.kind == "torchscript":
        raise ValueError("--model: a TorchScript module cannot be re-exported with torch.export; allowed: "
                         "a checkpoint, weights with --arch, an exported program or an MLflow model.")  # fmt: skip
    if data is None:
        if source.kind != "checkpoint":
            raise ValueError(f"--data: got none for a {source.kind} model; allowed: {_DATA_ALLOWED} (the data the "
                             "model is for: its classes, image size and example images).")  # fmt: skip
        from ray_aekd.models.checkpoint import read_metadata

        meta = read_metadata(source.location)
        data = _checkpoint_data(meta)
    loaded = load_model(source, data, tracking_uri)
    inner = loaded.module
    names = data.source.class_names if data.class_names_known else ()  # never made-up names
    wrapped, metadata = with_preprocess(inner, loaded.preprocess, names, data.source.input_shape, data.source.name)
    metadata["num_classes"] = data.source.num_classes
    images = torch.stack([data.source[int(i)][0] for i in data.indices[:4]])
    example = images.float() / 255.0
    if example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)
    try:
        path = export_program(wrapped, example, metadata, output)
    except Exception as error:  # torch.export's own errors: graph breaks, data-dependent control flow
        raise ValueError(f"--model: {source.describe()} cannot be exported with torch.export "
                         f"({' '.join(str(error).split())[:300]}).") from None  # fmt: skip
    return path, metadata


def _checkpoint_data(meta: Any) -> EvalData:
    """Stand-in data for a checkpoint exported without ``--data``: its classes and shape, with
    uniform random example images (only their shape matters for tracing)."""
    from ray_aekd.data.sources import TensorSource

    images = torch.randint(0, 256, (4, *meta.input_shape), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)  # fmt: skip
    names = meta.class_names or tuple(str(i) for i in range(meta.num_classes))
    source = TensorSource(meta.dataset, images, torch.zeros(4, dtype=torch.int64), names, meta.mean, meta.std)
    return EvalData(source, torch.arange(4), f"{meta.dataset} (from the checkpoint's metadata)", meta.dataset,
                    class_names_known=bool(meta.class_names))  # fmt: skip
