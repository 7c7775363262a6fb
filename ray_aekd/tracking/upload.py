"""``ray-aekd upload RUN_DIR``: log a run folder to MLflow after the fact.

A distillation keeps everything in its run folder (``config.json``, ``metrics.jsonl``,
``result.json``, ``alpha/``, ``plots/``, ``student/``) whether or not MLflow was reachable. When
the tracking server was down for part or all of a run, this puts the run in MLflow as if it had
been up: into the run the distillation opened (``mlflow_run_id``), or a new one when there is
none, logging only the epochs the run does not have yet, so that its history has each epoch
once. Artifacts and the model are logged when the run has no ``checkpoint/`` artifact yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ray_aekd._provenance import environment_tags
from ray_aekd.models.checkpoint import load_checkpoint
from ray_aekd.models.export import with_preprocess
from ray_aekd.models.preprocess import Preprocess
from ray_aekd.tracking.client import create_run, log_metric_rows, log_params
from ray_aekd.tracking.runs import (
    RUN_ID_FILE,
    TRACKING_FAILED_FILE,
    TRACKING_URI_FILE,
    log_student_model,
    model_signature,
    resolve_tracking_uri,
    system_tags,
)

__all__ = ["upload", "upload_tracking_uri"]

_NOT_METRICS = ("epoch", "step")


def upload(run_dir: str | Path, tracking_uri: str | None = None, log: Callable[[str], None] = print) -> str:
    """Log the run folder ``run_dir`` to MLflow (``tracking_uri``, else the store the run logged
    to, from ``mlflow_tracking_uri`` in the folder, else ``MLFLOW_TRACKING_URI``, else the run's
    ``tracking.uri``, else ``sqlite:///mlflow.db``); returns the MLflow run id."""
    run_dir = Path(run_dir).resolve()
    config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not config_file.is_file() or not metrics_file.is_file():
        raise ValueError(
            f"run_dir: got {str(run_dir)!r}; allowed: a ray_aekd run folder (with config.json and metrics.jsonl)."
        )
    saved = json.loads(config_file.read_text())
    uri = upload_tracking_uri(run_dir, tracking_uri)
    try:
        return _upload(run_dir, saved, uri, log)
    except (MlflowException, OSError) as error:  # refused, unreachable (connection, DNS)
        raise ValueError(
            f"tracking.uri: the upload to MLflow at {uri} failed ({type(error).__name__}: {error}); run it again when "
            "the server answers (it logs only what the run lacks)."
        ) from None


def upload_tracking_uri(run_dir: str | Path, tracking_uri: str | None = None) -> str:
    """The MLflow store ``upload(run_dir, tracking_uri)`` logs to: ``tracking_uri``, else the one
    in the folder's ``mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, the run's ``tracking.uri``
    or ``sqlite:///mlflow.db``."""
    if tracking_uri is not None:
        return tracking_uri
    run_dir = Path(run_dir).resolve()
    used, config_file = run_dir / TRACKING_URI_FILE, run_dir / "config.json"
    if used.is_file():
        return used.read_text().strip()
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return resolve_tracking_uri(saved.get("tracking.uri"))


def _example_images(saved: dict[str, Any], shape: tuple[int, ...], log: Callable[[str], None]) -> np.ndarray:
    """Four images of the run's data in [0, 1] (the model's input example), or, where the data
    cannot be opened here, four uniform random images of its shape (said on the console)."""
    from ray_aekd.data import open_source

    try:
        source = open_source(saved["data.dataset"], saved.get("data.path"), size=saved.get("data.image_size"))
        images = torch.stack([source[i][0] for i in range(min(4, len(source)))])
        return (images.float() / 255.0).numpy()
    except (ValueError, OSError, KeyError) as error:
        log(f"upload: the run's data cannot be opened here ({error}); the model's input example is random images")
        return np.random.default_rng(0).random((4, *shape), dtype=np.float32)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _upload(run_dir: Path, saved: dict[str, Any], uri: str, log: Callable[[str], None]) -> str:
    """The run to log into -> the epochs (and once-only metrics) it lacks -> artifacts and the
    model, when it has none -> FINISHED, when the run folder says the run finished."""
    client = MlflowClient(uri)
    run_id = _target_run(client, run_dir, saved, uri, log)
    logged = {m.step for m in client.get_metric_history(run_id, "val/acc1")}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    missing = [row for row in rows if row["epoch"] not in logged]
    metrics = [
        (k, float(v), int(row["epoch"]))
        for row in missing
        for k, v in row.items()
        if k not in _NOT_METRICS and isinstance(v, int | float)
    ]
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is not None:
        have = client.get_run(run_id).data.metrics
        metrics += [(k, v, 0) for k, v in _once_metrics(result).items() if k not in have]
    log_metric_rows(uri, run_id, metrics, per_call=1000)
    logged_files = _log_files_and_model(client, run_id, run_dir, saved, uri, log)
    if result is not None:
        client.set_terminated(run_id, "FINISHED")
    (run_dir / RUN_ID_FILE).write_text(run_id)
    (run_dir / TRACKING_FAILED_FILE).unlink(missing_ok=True)  # the run is in MLflow now
    log(
        f"uploaded {run_dir} to MLflow at {uri}: run {run_id}, {len(missing)} epoch(s) logged"
        + (f" ({len(rows) - len(missing)} were there already)" if len(rows) > len(missing) else "")
        + (", artifacts and the student model" if logged_files else "")
        + ("" if result is not None else "; the run folder has no result.json (the run did not finish): left RUNNING")
    )
    return run_id


def _target_run(
    client: MlflowClient, run_dir: Path, saved: dict[str, Any], uri: str, log: Callable[[str], None]
) -> str:
    """The run the distillation opened (``mlflow_run_id`` in the folder), or, when there is none
    or the store does not have it, a new one with the run's config as params."""
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if run_id is not None:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException:
            log(f"run {run_id} of {run_dir} is not in {uri}; creating a new one")
    tags = {
        "ray_aekd.strategy": str(saved.get("distill.strategy")),
        "ray_aekd.run_dir": str(run_dir),
        "ray_aekd.uploaded": "true",
    }
    run_id = create_run(
        uri,
        saved.get("tracking.experiment", "ray-aekd"),
        saved.get("name", run_dir.name),
        system_tags(tags | environment_tags(_read_json(run_dir / "environment.json"))),
    )
    log_params(uri, run_id, {k: v for k, v in saved.items() if not k.startswith("__")})
    return run_id


def _once_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics a distillation logs once, at step 0: the teachers' and the ensemble's accuracy
    and the teachers' forward passes."""
    once = {f"teacher/{n}/val/acc1": a for n, a in result["teachers"].items()}
    once |= {"ensemble/val/acc1": result["ensemble_acc1"]}
    once |= {"teacher_forward_passes": float(sum(result.get("teacher_forward_passes", {}).values()))}
    return {k: float(v) for k, v in once.items()}


def _log_files_and_model(
    client: MlflowClient, run_id: str, run_dir: Path, saved: dict[str, Any], uri: str, log: Callable[[str], None]
) -> bool:
    """When the run has no ``checkpoint/`` artifact yet and the folder has a student: its plots,
    weights, checkpoint and files as artifacts, and the student as an MLflow model. Returns
    whether it logged them."""
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    student = run_dir / "student"
    if "checkpoint" in artifacts or not student.is_dir():
        return False
    for folder, name in (("plots", "plots"), ("alpha", "alpha"), ("student", "checkpoint")):
        if (run_dir / folder).is_dir():
            client.log_artifacts(run_id, str(run_dir / folder), name)
    for name in ("metrics.jsonl", "cosine.json", "config.json", "environment.json"):
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))
    model, meta = load_checkpoint(str(student))
    wrapped, metadata = with_preprocess(model.eval(), Preprocess(meta.mean, meta.std), meta.class_names,
                                        meta.input_shape, meta.dataset)  # fmt: skip
    signature = model_signature(meta.input_shape, meta.num_classes)
    example = _example_images(saved, meta.input_shape, log)
    log_student_model(
        uri, run_id, wrapped, "student", example, saved.get("tracking.register_model"), signature, metadata
    )
    return True
