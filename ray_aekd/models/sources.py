"""Where a trained classifier comes from: the five kinds of model a teacher (or ``ray-aekd
evaluate --model``) can be, loaded safely into one shape.

==============  ==========================================================================
kind            location
==============  ==========================================================================
``checkpoint``  a ray_aekd checkpoint folder (``ray_aekd.models.checkpoint``)
``model``       a state dict file (``.pt``/``.pth``, read with ``weights_only=True``, or
                ``.safetensors``) for ``architecture``: a registry name, ``torchvision:<name>``
                or ``timm:<name>``; ``state_dict``/``model`` wrappings and DDP's ``module.``
                prefix are unwrapped
``exported``    a ``torch.export`` program (``.pt2``) with a dynamic batch dimension; its
                records are checked to be tensors, JSON or text before torch reads it (a guard:
                the graph is still interpreted by torch, so load programs you trust)
``torchscript`` a scripted or traced module (TorchScript runs its own code: load files you trust)
``mlflow``      a local MLflow PyTorch model folder (``MLmodel`` + ``data/model.pt2``), as the
                tracking layer downloads it; pickled MLflow models are refused, pt2 ones
                checked as ``exported``
==============  ==========================================================================

Every kind becomes a ``LoadedModel``: a module that takes preprocessed images, its
``Preprocess`` (declared, or the kind's default), the number of classes and class names when
the file knows them, and a digest of its file (soft-label caches and resumed runs compare it).
Models that ray_aekd wrote with their preprocessing inside (``ray-aekd export``, the student's
MLflow model) say so in their metadata and take ``[0, 1]`` images by default. Pure torch: the
tracking layer turns MLflow URIs into folders before anything here runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ray_aekd._names import SOURCE_KINDS as _SOURCE_KINDS
from ray_aekd.models.checkpoint import CheckpointError, key_differences, load_checkpoint, read_state_dict
from ray_aekd.models.preprocess import IDENTITY_STATS, Preprocess
from ray_aekd.models.registry import build_model

__all__ = [
    "EXTRA_FILE",
    "SOURCE_KINDS",
    "LoadedModel",
    "ModelSource",
    "ModelSourceError",
    "check_on_batch",
    "load_source",
    "ray_aekd_metadata",
]

#: The keys that name a model's source, in configs (``teachers.<i>.<kind>``) and for ``--model``.
SOURCE_KINDS = _SOURCE_KINDS  # the tuple the config checks without importing torch
#: The metadata ray_aekd stores inside the files it exports (``.pt2`` extra file, TorchScript extra file).
EXTRA_FILE = "ray_aekd.json"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


class ModelSourceError(ValueError):
    """A model file that is missing, unsafe, damaged, or does not fit the data."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model's source (hashable: it keys the per-process model cache of teacher tasks).

    Attributes:
        kind: one of ``SOURCE_KINDS``.
        location: the folder, file or (before download) MLflow URI.
        architecture: ``kind == "model"`` only: what the weights are for.
        preprocess: declared preprocessing; None: the kind's default (see ``load_source``).
    """

    kind: str
    location: str
    architecture: str | None = None
    preprocess: Preprocess | None = None

    def describe(self) -> str:
        """``"exported program runs/a.pt2"``, ``"weights w.pth (torchvision:resnet18)"``, ..."""
        what = {
            "checkpoint": "checkpoint",
            "model": "weights",
            "exported": "exported program",
            "torchscript": "TorchScript module",
            "mlflow": "MLflow model",
        }[self.kind]
        arch = f" ({self.architecture})" if self.architecture else ""
        return f"{what} {self.location}{arch}"


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: ``module(preprocess(images))`` -> logits ``[B, K]``.

    Attributes:
        module: in eval mode, parameters frozen where it has any to freeze.
        preprocess: what turns ``[0, 1]`` (or uint8) images into this module's input.
        num_classes: K as the file records it (None: learnt by running it, ``check_on_batch``).
        class_names: as the file records them (empty: unknown).
        architecture: a registry name when the layers can be named (hint distillation).
        digest: SHA-256 of the weights or program file.
        preprocess_inside: the module itself takes ``[0, 1]`` images (ray_aekd's exports).
    """

    module: nn.Module
    preprocess: Preprocess
    num_classes: int | None
    class_names: tuple[str, ...]
    architecture: str | None
    digest: str
    preprocess_inside: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or ``[0, 1]`` float images ``[B, C, H, W]`` -> logits ``[B, K]``."""
        return self.module(self.preprocess(images))


def load_source(
    source: ModelSource,
    *,
    num_classes: int,
    in_channels: int,
    default_preprocess: Preprocess,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Load ``source`` safely.

    Args:
        source: where the model is (an MLflow source must be a local folder by now).
        num_classes, in_channels: what the data has; ``model`` sources are built for them.
        default_preprocess: the data's preprocessing, for kinds that do not record their own.
        map_location: device for the weights.

    Raises:
        ModelSourceError: a missing, unreadable, unsafe or ill-fitting file, with what was
            expected (no Ray or MLflow involved).
    """
    loader = {
        "checkpoint": _load_checkpoint,
        "model": _load_weights,
        "exported": _load_exported,
        "torchscript": _load_torchscript,
        "mlflow": _load_mlflow,
    }[source.kind]
    if source.kind != "checkpoint" and not Path(source.location).exists():
        raise ModelSourceError(f"{source.describe()}: the path does not exist.")
    loaded = loader(source, num_classes, in_channels, default_preprocess, map_location)
    if source.preprocess is not None:
        loaded.preprocess = source.preprocess
    elif loaded.preprocess_inside:
        loaded.preprocess = Preprocess(*IDENTITY_STATS)
    for parameter in loaded.module.parameters():
        parameter.requires_grad_(False)
    return loaded


def check_on_batch(loaded: LoadedModel, images: torch.Tensor, num_classes: int, what: str) -> None:
    """Run ``loaded`` on one real batch (uint8 ``[B, C, H, W]``, B >= 2) and check it returns
    ``[B, num_classes]`` finite logits; ``what`` names the model in errors."""
    try:
        with torch.inference_mode():
            out = loaded(images)
    except Exception as error:  # torch raises RuntimeError, exported programs also AssertionError/ValueError
        raise ModelSourceError(
            f"{what} does not run on the data's images: {list(images.shape)} uint8, {loaded.preprocess.describe()} "
            f"({_last_line(error)})."
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSourceError(
            f"{what} returned {got} for a batch of {images.shape[0]} images; expected logits [{images.shape[0]}, "
            f"{num_classes}]."
        )
    if out.shape[1] != num_classes:
        raise ModelSourceError(
            f"{what} gives {out.shape[1]} classes, but the data has {num_classes}; expected a classifier for "
            f"{num_classes} classes."
        )
    if not torch.isfinite(out).all():
        raise ModelSourceError(f"{what} returned NaN or Inf logits on the data's first images.")


def ray_aekd_metadata(class_names: tuple[str, ...] | list[str], input_shape: tuple[int, ...], dataset: str) -> dict:
    """The metadata ray_aekd stores with a model whose preprocessing is inside it."""
    return {
        "format": "ray_aekd.model",
        "input": "float32 images [N, C, H, W] in [0, 1] (as torchvision's ToTensor gives them)",
        "output": "logits [N, K]",
        "preprocess_inside": True,
        "input_shape": list(input_shape),
        "class_names": list(class_names),
        "dataset": dataset,
    }


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(error: BaseException, limit: int = 300) -> str:
    line = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _last_line(error: BaseException) -> str:
    """The last line of an error's text, in one line: TorchScript puts the interpreter's traceback
    first and torch's own message (shapes, channels) last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return _one_line(RuntimeError(lines[-1])) if lines else type(error).__name__


def _from_metadata(meta: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
    """``(class_names, preprocess_inside)`` from ray_aekd's metadata (``{}`` when a file has none)."""
    names = meta.get("class_names") or ()
    ok = isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
    return (tuple(names) if ok else ()), bool(meta.get("preprocess_inside", False))


def _load_checkpoint(source, num_classes, in_channels, default, map_location) -> LoadedModel:
    try:
        model, meta = load_checkpoint(source.location, map_location=map_location)
    except (CheckpointError, OSError) as error:
        raise ModelSourceError(_one_line(error) + ".") from None
    return LoadedModel(
        module=model.eval(),
        preprocess=Preprocess(meta.mean, meta.std),  # the checkpoint records what it was trained on
        num_classes=meta.num_classes,
        class_names=meta.class_names,
        architecture=meta.architecture,
        digest=meta.weights_sha256,
    )


def _unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict inside the usual wrappings: ``{"state_dict": ...}``, ``{"model": ...}``
    (also nested), and DDP's ``module.`` prefix on every key."""
    for _ in range(3):
        inner = next((state[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(state.get(k), dict)),
                     None)  # fmt: skip
        if inner is None:
            break
        state = inner
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights(source, num_classes, in_channels, default, map_location) -> LoadedModel:
    path = Path(source.location)
    what = source.describe()
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelSourceError(f"{what}: a weights file must end in {', '.join(WEIGHT_SUFFIXES)}; got {path.name!r}.")
    try:
        model = build_model(str(source.architecture), num_classes, in_channels=in_channels)
    except ValueError as error:
        raise ModelSourceError(f"{what}: {_one_line(error)}.") from None
    data = path.read_bytes()
    try:
        state = _unwrap(read_state_dict(data, path.name, str(path), map_location))
    except CheckpointError as error:
        raise ModelSourceError(_one_line(error) + ".") from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        other = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise ModelSourceError(f"{what}: the file holds more than a state dict of tensors (e.g. {other!r}).")
    expected = model.state_dict()
    missing, unexpected, reshaped = key_differences(expected, tensors)
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {', '.join(map(repr, missing[:3]))}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {', '.join(map(repr, unexpected[:3]))}")
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} of another shape, first {k!r} {list(tensors[k].shape)} for "
                         f"{list(expected[k].shape)}")  # fmt: skip
            classifier = [k for k in reshaped if expected[k].dim() >= 1 and expected[k].shape[0] == num_classes]
            if classifier and tensors[classifier[0]].dim() >= 1:
                parts.append(
                    f"the weights are for {tensors[classifier[0]].shape[0]} classes, the data has {num_classes}"
                )
        raise ModelSourceError(f"{what} does not fit {source.architecture}: {'; '.join(parts)}.")
    non_finite = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise ModelSourceError(f"{what} is damaged: its tensor {non_finite[0]!r} holds NaN or Inf.")
    model.load_state_dict(tensors, strict=True)
    return LoadedModel(
        module=model.eval(),
        preprocess=default,
        num_classes=num_classes,
        class_names=(),
        architecture=source.architecture,
        digest=hashlib.sha256(data).hexdigest(),
    )


# Records of a .pt2 archive that are plain text, by their path inside the archive's root folder;
# the configs that list raw tensor records; entry prefixes torch unpickles whatever they are marked.
_PT2_TEXT = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_CONFIGS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
_PT2_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


def check_pt2_archive(path: str | Path) -> None:
    """A guard, not a sandbox: refuse a ``.pt2`` archive whose records ``torch.export.load``
    would unpickle beyond tensors. Every record must be raw tensor bytes listed (once, not marked
    ``use_pickle``) in the weights or constants config, JSON, one of torch's short text records, or
    pass ``torch.load(weights_only=True)``. The graph itself is still code that torch interprets
    (symbolic shapes, operator names): load programs you trust, as with TorchScript."""
    where = f"exported program {path}"

    def unsafe(why: str) -> ModelSourceError:
        return ModelSourceError(f"{where} is unsafe: {why} and is refused (nothing was unpickled).")

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelSourceError(f"{where} is not a torch.export archive ({_one_line(error)}).") from None
    try:
        with archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
            root = infos[0].filename.split("/", 1)[0] if infos else ""
            raw: set[str] = set()
            for suffix in _PT2_CONFIGS:
                name = f"{root}/{suffix}"
                if name not in archive.namelist():
                    continue
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    raise ModelSourceError(f"{where} is damaged: {name} is not JSON.") from None
                folder = name.rsplit("/", 1)[0]
                for key, entry in config.items():
                    if not isinstance(entry, dict) or "path_name" not in entry:
                        continue
                    record = f"{folder}/{entry['path_name']}"
                    if entry.get("use_pickle", False) or str(entry["path_name"]).startswith(_PT2_PICKLED_PREFIXES):
                        raise unsafe(f"its entry {key!r} is stored as a pickle ({record!r})")
                    if record in raw:
                        raise unsafe(f"its record {record!r} is listed twice")
                    raw.add(record)
            for info in infos:
                name = info.filename
                if name in raw:
                    continue
                content = archive.read(info)
                inner = name.split("/", 1)[1] if "/" in name else name
                if inner in _PT2_TEXT and len(content) < 256 and content.isascii():
                    continue
                try:
                    json.loads(content)
                    continue
                except ValueError:
                    pass
                try:
                    torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
                except Exception:
                    raise unsafe(f"its record {name!r} is neither tensors, JSON nor text") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:  # a damaged member (bad CRC, cut short)
        raise ModelSourceError(f"{where} is damaged ({_one_line(error)}).") from None


def _load_exported(source, num_classes, in_channels, default, map_location) -> LoadedModel:
    return _exported_program(Path(source.location), f"exported program {source.location}", {}, default, map_location)


def _exported_program(
    path: Path, what: str, metadata: dict[str, Any], default: Preprocess, map_location: Any = "cpu"
) -> LoadedModel:
    check_pt2_archive(path)
    extra = {EXTRA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as error:
        raise ModelSourceError(f"{what} does not load ({_one_line(error)}).") from None
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(inputs) != 1:
        raise ModelSourceError(f"{what} takes {len(inputs)} inputs; expected one batch of images.")
    value = inputs[0].meta.get("val")
    batch = value.shape[0] if value is not None and value.dim() >= 1 else None
    if isinstance(batch, int):
        raise ModelSourceError(
            f"{what} was exported for a fixed batch of {batch}; expected a dynamic batch dimension: export with "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}} (name your forward's argument) and an example "
            "batch of 2 or more."
        )
    if extra[EXTRA_FILE]:
        try:
            metadata = json.loads(extra[EXTRA_FILE]) | metadata
        except ValueError:
            raise ModelSourceError(f"{what} is damaged: its {EXTRA_FILE} is not JSON.") from None
    names, inside = _from_metadata(metadata)
    if torch.device(map_location).type != "cpu":  # device arguments baked into the graph move too
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, torch.device(map_location))
    return LoadedModel(
        module=program.module(),
        preprocess=default,
        num_classes=len(names) or None,
        class_names=names,
        architecture=None,
        digest=_sha256(path),
        preprocess_inside=inside,
    )


def _load_torchscript(source, num_classes, in_channels, default, map_location) -> LoadedModel:
    extra = {EXTRA_FILE: ""}
    try:
        module = torch.jit.load(source.location, map_location=map_location, _extra_files=extra)
    except Exception as error:  # torch raises RuntimeError or ValueError for files it cannot read
        raise ModelSourceError(
            f"{source.describe()} is not a TorchScript file ({_one_line(error)}); expected what "
            "torch.jit.save writes for a scripted or traced module."
        ) from None
    metadata: dict[str, Any] = {}
    if extra[EXTRA_FILE]:
        try:
            metadata = json.loads(extra[EXTRA_FILE])
        except ValueError:
            metadata = {}
    names, inside = _from_metadata(metadata)
    return LoadedModel(
        module=module.eval(),
        preprocess=default,
        num_classes=len(names) or None,
        class_names=names,
        architecture=None,
        digest=_sha256(source.location),
        preprocess_inside=inside,
    )


def _load_mlflow(source, num_classes, in_channels, default, map_location) -> LoadedModel:
    folder = Path(source.location)
    what = source.describe()
    spec_file = folder / "MLmodel"
    if not spec_file.is_file():
        raise ModelSourceError(f"{what} is not an MLflow model: it has no MLmodel file.")
    try:
        spec = yaml.safe_load(spec_file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ModelSourceError(f"{what}: its MLmodel is not plain YAML ({_one_line(error)}).") from None
    flavor = (spec.get("flavors") or {}).get("pytorch") if isinstance(spec, dict) else None
    if not isinstance(flavor, dict):
        flavors = ", ".join((spec.get("flavors") or {}) if isinstance(spec, dict) else []) or "none"
        raise ModelSourceError(f"{what} is not an MLflow PyTorch model (flavors: {flavors}); expected flavor pytorch.")
    data = folder / str(flavor.get("model_data", "data"))
    program = data / "model.pt2"
    if not program.is_file():
        raise ModelSourceError(
            f"{what} is a pickled PyTorch model and is refused (loading it would run code); expected one logged "
            "in MLflow's pt2 format (mlflow.pytorch.log_model(..., serialization_format='pt2'), MLflow 3's default)."
        )
    metadata = spec.get("metadata") or {}
    return _exported_program(program, what, metadata if isinstance(metadata, dict) else {}, default, map_location)
