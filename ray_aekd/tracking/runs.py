"""MLflow, and nothing else: where runs go and how experiments are found.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else the config's, else ``sqlite:///mlflow.db``
in the working directory (made absolute, so that processes with another working directory
write to the same file).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLFLOW_URI_SCHEMES",
    "RunLogger",
    "RUN_ID_FILE",
    "TRACKING_FAILED_FILE",
    "TRACKING_URI_FILE",
    "dataset_input",
    "download_model",
    "model_signature",
    "system_tags",
    "log_student_model",
    "open_store",
    "experiment_id",
    "limit_mlflow_retries",
    "log_dataset",
    "local_checkpoint_path",
    "resolve_tracking_uri",
    "retry_contended",
]

#: Checkpoint locations that MLflow resolves (``runs:/<run id>/checkpoint``, registered models, ...).
MLFLOW_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(config_uri: str | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


#: In a run folder: the tracking server failed during the run (what failed, and how to upload).
TRACKING_FAILED_FILE = "mlflow_failed.txt"
#: In a run folder: the MLflow run id, and the tracking URI the run logs to.
RUN_ID_FILE = "mlflow_run_id"
TRACKING_URI_FILE = "mlflow_tracking_uri"


#: Seconds to wait between attempts when another process got to a SQLite store first.
CONTENDED_BACKOFF = (0.2, 0.5, 1.0, 2.0, 4.0)
#: What SQLite says then: a write lock held too long, or the same dataset inserted by two runs at
#: once (a sweep's trials log the same training data as their input at the same moment).
_CONTENDED = ("database is locked", "UNIQUE constraint failed: datasets.")


def retry_contended(fn: Callable[[], Any]) -> Any:
    """Call ``fn``, a call that is safe to repeat; while it fails because another process wrote
    to the same SQLite store at the same moment, wait and try again (about 8 s in all). Any
    other error, or the last one, is raised."""
    for delay in (*CONTENDED_BACKOFF, None):
        try:
            return fn()
        except Exception as error:
            if delay is None or not any(text in str(error) for text in _CONTENDED):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_store(uri: str) -> None:
    """Create a local SQLite store now (MLflow creates it on first use); anything else, or a
    store that cannot be opened, is left to the first real call."""
    if uri.startswith("sqlite:"):
        with contextlib.suppress(Exception):  # reported where the run is opened
            MlflowClient(uri).search_experiments(max_results=1)


#: Beside a local SQLite store's database file: the folder that holds its experiments' artifacts.
ARTIFACTS_DIR = "mlartifacts"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts (students, plots, checkpoints).

    For a local SQLite store (``sqlite:////abs/path/mlflow.db``) it is a folder next to the
    database file, ``<db folder>/mlartifacts/<experiment>``: artifacts then live as long as the
    store. MLflow's own default is ``./mlruns`` in the working directory, which ``ray job submit``
    deletes with the job's copy of the working directory. For any other store (a tracking server,
    which has its own ``--artifacts-destination``) None: the server decides.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix + "/"):
        return None
    folder = Path(uri[len(prefix) :]).parent / ARTIFACTS_DIR / quote(experiment, safe="")
    return folder.as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if it does not exist (with ``artifact_location``)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another process created it just now
        if experiment is None:
            raise
        return experiment.experiment_id


def local_checkpoint_path(path: str, tracking_uri: str | None = None) -> str:
    """A path ``load_checkpoint`` can read: MLflow URIs (``runs:/<run id>/checkpoint``) are
    downloaded through MLflow to a temporary folder; anything else (local, ``s3://``,
    ``gs://``, ...) is returned as it is, for fsspec."""
    if not path.startswith(MLFLOW_URI_SCHEMES):
        return path
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=path, tracking_uri=resolve_tracking_uri(tracking_uri))


def download_model(uri: str, target: Path, tracking_uri: str) -> str:
    """Download the MLflow model or artifact at ``uri`` (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``models:/<model id>``, ``runs:/<run id>/<path>``) into
    ``target``; returns the local folder. Raises ``ValueError`` naming the URI and the store."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    target.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the console keeps one line per event
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri)
    except (MlflowException, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot download {uri!r} from MLflow at {tracking_uri} ({first})") from None


class RunLogger:
    """Logs to one existing MLflow run, and never stops training when MLflow is unreachable.

    The first failed call prints one warning and turns MLflow logging off for the rest of the
    process; the caller keeps its own copy of everything in the run folder (``metrics.jsonl``,
    ``alpha/``, ``plots/``, ``student/``), which can be logged later.
    """

    def __init__(self, uri: str, run_id: str | None, run_dir: str | Path | None = None) -> None:
        self.uri, self.run_id, self.run_dir = uri, run_id, run_dir
        self._client: MlflowClient | None = None
        self._enabled = run_id is not None
        self._pending: list[Future[None]] = []
        self._thread: ThreadPoolExecutor | None = None

    def log_metrics_later(self, metrics: dict[str, float], step: int) -> None:
        """``log_metrics`` on a background thread, in order: the training loop does not wait for
        the tracking server. ``flush`` waits for what is queued."""
        if not self._enabled:
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._pending.append(self._thread.submit(self.log_metrics, dict(metrics), step))

    def flush(self) -> None:
        """Wait until every ``log_metrics_later`` call has been made (each fails softly, as ``_call``)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if not self._enabled:
            return
        try:
            if self._client is None:  # built here: opening the store can fail too
                self._client = MlflowClient(self.uri)
            retry_contended(fn)
        except Exception as error:  # any MLflow/network failure: warn once, keep training
            later = f"`ray-aekd upload {self.run_dir}`" if self.run_dir else "`ray-aekd upload <run folder>`"
            message = (
                f"MLflow at {self.uri} failed while logging {what} ({type(error).__name__}: {error}); "
                "training goes on and MLflow logging is off until the run ends or its workers restart; everything "
                "stays in the run folder, "
                f"and {later} logs it when the server is back."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            if self.run_dir is not None:  # the driver repeats it at the end; upload removes it
                with contextlib.suppress(OSError):
                    (Path(self.run_dir) / TRACKING_FAILED_FILE).write_text(message + "\n")
            self._enabled = False

    def logged_steps(self, metric: str) -> set[int]:
        """The steps ``metric`` has in the run already (empty when MLflow is off or fails)."""
        steps: set[int] = set()

        def read() -> None:
            steps.update(m.step for m in self._client.get_metric_history(self.run_id, metric))  # type: ignore[union-attr, arg-type]

        self._call(f"the history of {metric}", read)
        return steps

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self._call("metrics", lambda: self._client.log_batch(self.run_id, metrics=batch))  # type: ignore[union-attr, arg-type]

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._call(
            f"artifacts {local_dir}",
            lambda: self._client.log_artifacts(self.run_id, local_dir, artifact_path),  # type: ignore[union-attr, arg-type]
        )

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._call(
            f"artifact {local_path}",
            lambda: self._client.log_artifact(self.run_id, local_path, artifact_path),  # type: ignore[union-attr]
        )

    def log_model(
        self,
        model: Any,
        name: str,
        input_example: Any,
        registered_model_name: str | None = None,
        signature: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Log ``model`` as an MLflow PyTorch model (``pt2``, a ``torch.export`` graph traced on
        ``input_example``: no pickled Python objects)."""

        self._call(
            "the model",
            lambda: log_student_model(
                self.uri,
                self.run_id,  # type: ignore[arg-type]
                model,
                name,
                input_example,
                registered_model_name,
                signature,
                metadata,
            ),
        )


def system_tags(tags: dict[str, str] | None = None) -> dict[str, str]:
    """``tags`` plus the system tags MLflow's fluent API sets and a client-created run lacks:
    ``mlflow.user``, ``mlflow.source.name``/``type`` (MLflow's own context providers) and
    ``mlflow.source.git.commit`` (the ray_aekd checkout's commit, when it is one)."""
    from mlflow.tracking.context.registry import resolve_tags

    from ray_aekd._provenance import environment

    out = resolve_tags(dict(tags or {}))
    commit = environment().get("git_commit")
    if commit and "mlflow.source.git.commit" not in out:
        out["mlflow.source.git.commit"] = commit
    return {k: str(v) for k, v in out.items()}


def dataset_input(name: str, digest: str, source: str, context: str, profile: dict[str, Any]) -> Any:
    """An MLflow dataset input (``client.log_inputs``): the data a run read, with its digest.

    Args:
        name: e.g. ``digits`` or ``imagefolder``.
        digest: a short hash of what was read (source, split indices).
        source: where the data lives (a path, or ``sklearn.datasets.load_digits``).
        context: ``training`` or ``evaluation`` (tag ``mlflow.data.context``).
        profile: small JSON-able facts (samples, classes, split).
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
        profile=json.dumps(profile),
    )  # fmt: skip
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])


def log_dataset(client: MlflowClient, run_id: str, dataset: Any) -> None:
    """Log ``dataset`` (from ``dataset_input``) as run ``run_id``'s input. Runs that log the same
    dataset at the same moment (a sweep's trials) race to insert it; the loser tries again."""
    retry_contended(lambda: client.log_inputs(run_id, datasets=[dataset]))


def model_signature(input_shape: tuple[int, ...] | list[int], num_classes: int) -> Any:
    """MLflow signature of a classifier that takes ``[0, 1]`` images: float32 ``[-1, C, H, W]``
    in, float32 logits ``[-1, K]`` out (-1: any batch size)."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        # unnamed: a named input is parsed into a dict when served, which the PyTorch flavor refuses
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def log_student_model(
    uri: str,
    run_id: str,
    model: Any,
    name: str,
    input_example: Any,
    registered_model_name: str | None = None,
    signature: Any = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Log ``model`` to run ``run_id`` as an MLflow PyTorch model (``pt2``: a ``torch.export``
    graph, no pickled objects), with ``signature`` and ``metadata``; raises what MLflow raises.

    MLflow's model logging is fluent: it reads a process-wide tracking URI, which
    ``mlflow.set_tracking_uri`` also copies into ``MLFLOW_TRACKING_URI``. Both are put back
    afterwards, so that a caller's process (the driver, in local mode) keeps its own settings.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = getattr(tracking_utils, "_tracking_uri", None)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                model,
                name=name,
                registered_model_name=registered_model_name,
                input_example=input_example,
                signature=signature,
                metadata=metadata,
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
    finally:
        tracking_utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def limit_mlflow_retries() -> None:
    """Fail fast against an unreachable tracking server (MLflow retries HTTP calls for minutes
    by default); the user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
