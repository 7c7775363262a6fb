"""MLflow, and nothing else: where runs go and how experiments are found.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else the config's, else ``sqlite:///mlflow.db``
in the working directory (made absolute, so that processes with another working directory
write to the same file).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLFLOW_URI_SCHEMES",
    "experiment_id",
    "local_checkpoint_path",
    "resolve_tracking_uri",
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


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def local_checkpoint_path(path: str, tracking_uri: str | None = None) -> str:
    """A path ``load_checkpoint`` can read: MLflow URIs (``runs:/<run id>/checkpoint``) are
    downloaded through MLflow to a temporary folder; anything else (local, ``s3://``,
    ``gs://``, ...) is returned as it is, for fsspec."""
    if not path.startswith(MLFLOW_URI_SCHEMES):
        return path
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=path, tracking_uri=resolve_tracking_uri(tracking_uri))
