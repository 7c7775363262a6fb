"""Safe checkpoints for teachers and students: tensors plus a JSON of metadata.

A checkpoint is a directory (local path or any fsspec URL: ``s3://``, ``gs://``, ...) holding

- ``weights.safetensors``: the ``state_dict`` in the safetensors format (tensors only, readable
  by any safetensors library; loading never runs code), and
- ``metadata.json``: format and version, architecture, number of classes, class names, input
  shape and normalisation (the preprocessing), dataset, metrics, seed, package version,
  provenance (library versions, git commit) and the SHA-256 of the weights file, so that a
  truncated or swapped file is refused before it is parsed.

Checkpoints of format version 1 (``weights.pt``, a torch file of tensors read with
``torch.load(weights_only=True)``) still load; ``save_checkpoint`` writes version 2.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import fsspec
import torch
from safetensors.torch import load as tensors_from_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ray_aekd.models.registry import build_model

__all__ = [
    "CheckpointError",
    "CheckpointMetadata",
    "load_checkpoint",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
]

FORMAT = "ray_aekd.checkpoint"
FORMAT_VERSION = 2
#: The weights file of each format version this version reads.
WEIGHTS_FILES = {1: "weights.pt", 2: "weights.safetensors"}
WEIGHTS, METADATA = WEIGHTS_FILES[FORMAT_VERSION], "metadata.json"


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
    provenance: dict[str, str | None] = field(default_factory=dict)  # library versions, git commit (see provenance)
    format_version: int = FORMAT_VERSION  # 1: weights.pt (torch), 2: weights.safetensors

    @property
    def weights_file(self) -> str:
        return WEIGHTS_FILES[self.format_version]


def save_checkpoint(path: str, model: nn.Module, metadata: CheckpointMetadata) -> CheckpointMetadata:
    """Write ``model``'s state dict (safetensors) and ``metadata`` under ``path``; returns the
    metadata as written (package version, provenance and the weights' hash filled in)."""
    from ray_aekd import __version__
    from ray_aekd._provenance import environment

    # safetensors refuses tensors that share memory (tied weights): each is written on its own
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    data = safetensors_bytes(state, metadata={"format": FORMAT, "architecture": metadata.architecture})
    fields = asdict(metadata) | {
        "package_version": __version__,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "provenance": metadata.provenance or dict(environment()),
        "format_version": FORMAT_VERSION,
    }
    written = CheckpointMetadata(**fields)
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{WEIGHTS}", "wb") as f:
        f.write(data)
    with fs.open(f"{root}/{METADATA}", "w") as f:
        json.dump({"format": FORMAT, **asdict(written)}, f, indent=2)
    return written


def read_metadata(path: str) -> CheckpointMetadata:
    """Read and check ``metadata.json`` of the checkpoint at ``path``."""
    fs, root = fsspec.core.url_to_fs(path)
    meta_path = f"{root}/{METADATA}"
    if not fs.exists(meta_path):
        where = "" if fs.exists(root) else " (the path does not exist)"
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint: {METADATA} is missing{where}.")
    try:
        with fs.open(meta_path, "r") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint: {METADATA} is not valid JSON ({error}).") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint ({METADATA} has no format {FORMAT!r}).")
    if raw.get("format_version") not in WEIGHTS_FILES:
        raise CheckpointError(
            f"{path}: checkpoint format version {raw.get('format_version')!r}; this version reads "
            f"{', '.join(map(str, WEIGHTS_FILES))}."
        )
    raw = {k: v for k, v in raw.items() if k != "format"}
    try:
        meta = CheckpointMetadata(**raw)
    except TypeError as error:
        raise CheckpointError(f"{path}: {METADATA} does not have the expected fields ({error}).") from None
    _check_fields(path, meta)
    # JSON has lists where the dataclass has tuples
    channels, height, width = meta.input_shape
    return replace(
        meta,
        input_shape=(channels, height, width),
        mean=tuple(meta.mean),
        std=tuple(meta.std),
        class_names=tuple(meta.class_names),
    )


def _check_fields(path: str, meta: CheckpointMetadata) -> None:
    """The fields the loaders rely on have the types and sizes they need (the JSON is data from
    anywhere: a wrong type must be an error here, not a crash in a teacher actor)."""

    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def numbers(v: object) -> bool:
        return isinstance(v, list | tuple) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)

    shape = meta.input_shape
    shape_ok = isinstance(shape, list | tuple) and len(shape) == 3 and all(map(whole, shape))
    channels = shape[0] if shape_ok else None
    checks = [  # evaluated in order: a later check may rely on an earlier one
        ("architecture", lambda: isinstance(meta.architecture, str) and bool(meta.architecture), "a model name"),
        ("num_classes", lambda: whole(meta.num_classes), "an integer >= 1"),
        ("input_shape", lambda: shape_ok, "[C, H, W], three integers >= 1"),
        ("mean", lambda: numbers(meta.mean) and len(meta.mean) in (1, channels), "one number, or one per channel"),
        ("std", lambda: numbers(meta.std) and len(meta.std) in (1, channels) and all(s > 0 for s in meta.std),
         "one number > 0, or one per channel"),
        ("weights_sha256", lambda: isinstance(meta.weights_sha256, str), "a hex string"),
        ("class_names", lambda: isinstance(meta.class_names, list | tuple)
         and all(isinstance(c, str) for c in meta.class_names)
         and len(meta.class_names) in (0, meta.num_classes), "a list of num_classes strings, or []"),
        ("provenance", lambda: isinstance(meta.provenance, dict), "a mapping"),
    ]  # fmt: skip
    for name, ok, allowed in checks:
        if not ok():
            raise CheckpointError(
                f"{path} is not a ray_aekd checkpoint: {METADATA} has {name} = {getattr(meta, name)!r} "
                f"(expected {allowed})."
            )


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unpickling_detail(error: Exception) -> str:
    """What torch's ``weights_only`` loader refused, without its advice to load with
    ``weights_only=False`` (which would run the code)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keep = [
        line.replace("Please file an issue with the following so that we can make `weights_only=True` "
                     "compatible with your use case: ", "")
        for line in lines
        if not line.startswith(("Weights only load failed", "Check the documentation"))
    ]  # fmt: skip
    if not lines:
        return type(error).__name__
    return _one_line(" ".join(keep) or lines[0])


def key_differences(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, reshaped)`` keys of ``state`` against the state dict ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, reshaped


def _misfit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """How ``state`` differs from the state dict ``expected``, in a few words; ``""`` if it fits."""
    missing, unexpected, reshaped = key_differences(expected, state)
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the {len(expected)} tensors it needs are missing, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, e.g. {k!r} {list(state[k].shape)} for {list(expected[k].shape)}"
        )
    return "; ".join(parts)


def read_state_dict(
    data: bytes, filename: str, where: str, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of a weights file's bytes: safetensors (by the ``.safetensors`` suffix) or a
    torch file read with ``weights_only=True`` (nothing is unpickled but tensors and plain
    containers). ``where`` names the file's owner in errors."""
    if filename.endswith(".safetensors"):
        try:
            state: Any = tensors_from_safetensors(data)  # the format holds tensors only: no code
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise CheckpointError(
                f"{where} is damaged: {filename} is not a readable safetensors file ({_one_line(str(error))})."
            ) from None
        return {k: v.to(map_location) for k, v in state.items()}
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{where} is unsafe: {filename} holds more than tensors and is refused (nothing was unpickled; "
            f"{_unpickling_detail(error)})."
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{where} is damaged: {filename} is not a readable torch file ({_one_line(str(error))})."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: {filename} holds a {type(state).__name__}, not a state dict of tensors.")
    return state


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
            altered weights), pickled objects in the weights, NaN or Inf in the weights,
            a state dict that does not fit the architecture, or metadata that disagrees with the expectations.
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
    weights_file = meta.weights_file
    weights_path = f"{root}/{weights_file}"
    if not fs.exists(weights_path):
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint: {weights_file} is missing.")
    with fs.open(weights_path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.weights_sha256:
        raise CheckpointError(
            f"{path} is damaged: {weights_file} does not match the hash in {METADATA} (truncated or altered; "
            f"{len(data)} bytes, sha256 {digest[:12]}..., expected {meta.weights_sha256[:12]}...)."
        )
    state = read_state_dict(data, weights_file, path, map_location)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a ray_aekd checkpoint: {weights_file} is not a state dict of tensors.")
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        which = f"its tensor {non_finite[0]!r} holds" if len(non_finite) == 1 else f"{len(non_finite)} tensors hold"
        more = f", e.g. {non_finite[0]!r}" if len(non_finite) > 1 else ""
        raise CheckpointError(f"{path} is damaged: {which} NaN or Inf{more}.")
    try:
        model = build_model(meta.architecture, meta.num_classes, in_channels=meta.input_shape[0])
    except ValueError as error:
        raise CheckpointError(
            f"{path} does not load: {METADATA} names architecture {meta.architecture!r} ({error})"
        ) from None
    misfit = _misfit(model.state_dict(), state)
    if misfit:
        raise CheckpointError(
            f"{path} does not load: its weights do not fit architecture {meta.architecture!r} ({misfit})."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} does not load: its weights do not fit architecture {meta.architecture!r} "
            f"({_one_line(str(error))})."
        ) from None
    return model.eval(), meta
