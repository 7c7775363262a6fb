"""MLflow, and nothing else: where runs go and how experiments are found.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else the config's, else ``sqlite:///mlflow.db``
in the working directory (made absolute, so that processes with another working directory
write to the same file).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

__all__ = ["DEFAULT_TRACKING_URI", "experiment_id", "resolve_tracking_uri"]

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
