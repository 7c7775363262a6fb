"""Safe checkpoints for teachers and students: tensors plus a JSON of metadata.

A checkpoint is a directory (local path or any fsspec URL: ``s3://``, ``gs://``, ...)
holding ``weights.pt``, a ``state_dict`` of tensors only, read back with
``torch.load(weights_only=True)`` so that loading never runs code, and ``metadata.json``:
format, architecture, number of classes, class names, input shape and normalisation,
dataset, metrics, seed, package version, and the SHA-256 of ``weights.pt`` so that a
truncated or swapped file is refused before it is parsed.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import fsspec
import torch
from torch import nn

from ray_aekd.models.registry import build_model

__all__ = ["CheckpointError", "CheckpointMetadata", "load_checkpoint", "read_metadata", "save_checkpoint"]

FORMAT = "ray_aekd.checkpoint"
FORMAT_VERSION = 1
WEIGHTS, METADATA = "weights.pt", "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, not ours, damaged, unsafe, or not what was expected."""


@dataclass(frozen=True)
class CheckpointMetadata:
    architecture: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    class_names: tuple[str, ...] = ()
    seed: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    package_version: str = ""
    weights_sha256: str = ""


def save_checkpoint(path: str, model: nn.Module, metadata: CheckpointMetadata) -> CheckpointMetadata:
    """Write ``model``'s state dict and ``metadata`` under ``path``; returns the metadata as
    written (with the package version and the weights' hash filled in)."""
    from ray_aekd import __version__

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    fields = asdict(metadata) | {"package_version": __version__, "weights_sha256": hashlib.sha256(data).hexdigest()}
    written = CheckpointMetadata(**fields)
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{WEIGHTS}", "wb") as f:
        f.write(data)
    with fs.open(f"{root}/{METADATA}", "w") as f:
        json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(written)}, f, indent=2)
    return written


def read_metadata(path: str) -> CheckpointMetadata:
    """Read and check ``metadata.json`` of the checkpoint at ``path``."""
    fs, root = fsspec.core.url_to_fs(path)
    meta_path = f"{root}/{METADATA}"
    if not fs.exists(meta_path):
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint: {METADATA} is missing.")
    try:
        with fs.open(meta_path, "r") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: {METADATA} is not valid JSON ({error}).") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint ({METADATA} has no format {FORMAT!r}).")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {raw.get('format_version')!r}; this version reads {FORMAT_VERSION}."
        )
    raw = {k: v for k, v in raw.items() if k not in ("format", "format_version")}
    try:
        meta = CheckpointMetadata(**raw)
    except TypeError as error:
        raise CheckpointError(f"{path}: {METADATA} does not have the expected fields ({error}).") from None
    # JSON has lists where the dataclass has tuples
    return replace(
        meta,
        input_shape=tuple(meta.input_shape),
        mean=tuple(meta.mean),
        std=tuple(meta.std),
        class_names=tuple(meta.class_names),
    )


def load_checkpoint(
    path: str,
    expect_num_classes: int | None = None,
    expect_input_shape: Sequence[int] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, CheckpointMetadata]:
    """Load a checkpoint safely, checking it against what the caller expects.

    Returns:
        The model in eval mode and its metadata.

    Raises:
        CheckpointError: missing files, not our format, hash mismatch (truncated or
            altered weights), pickled objects in the weights, a state dict that does not
            fit the architecture, or metadata that disagrees with the expectations.
    """
    meta = read_metadata(path)
    if expect_num_classes is not None and meta.num_classes != expect_num_classes:
        raise CheckpointError(
            f"{path} has num_classes = {meta.num_classes}, but {expect_num_classes} classes are expected."
        )
    if expect_input_shape is not None and tuple(meta.input_shape) != tuple(expect_input_shape):
        raise CheckpointError(
            f"{path} expects input shape {list(meta.input_shape)}, but the data has {list(expect_input_shape)}."
        )
    fs, root = fsspec.core.url_to_fs(path)
    weights_path = f"{root}/{WEIGHTS}"
    if not fs.exists(weights_path):
        raise CheckpointError(f"{path}: {WEIGHTS} is missing.")
    with fs.open(weights_path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.weights_sha256:
        raise CheckpointError(
            f"{path}: {WEIGHTS} does not match the hash in {METADATA} (truncated or altered; "
            f"{len(data)} bytes, sha256 {digest[:12]}..., expected {meta.weights_sha256[:12]}...)."
        )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CheckpointError(
            f"{path}: {WEIGHTS} holds more than tensors and is refused (nothing is unpickled): {error}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: {WEIGHTS} is not a state dict of tensors.")
    model = build_model(meta.architecture, meta.num_classes, in_channels=meta.input_shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta.architecture!r}: {error}") from None
    return model.eval(), meta
