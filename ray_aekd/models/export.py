"""A model that works outside ray_aekd: preprocessing inside, ``[0, 1]`` images in, logits out.

``with_preprocess`` wraps a classifier with its normalisation (and resize) and returns the
metadata that travels with it (class names, input shape, what the input is). The student's
MLflow model and ``ray-aekd export`` programs are such wrapped models, so that
``model(images)`` on images as torchvision's ``ToTensor`` gives them is right without any
ray_aekd code. ``export_program`` writes a ``torch.export`` program (``.pt2``) with a dynamic
batch dimension and the metadata inside (an extra file that ``models.sources`` reads back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ray_aekd.models.preprocess import Preprocess, WithPreprocess
from ray_aekd.models.sources import EXTRA_FILE, ray_aekd_metadata

__all__ = ["export_program", "with_preprocess"]


def with_preprocess(
    model: nn.Module,
    preprocess: Preprocess,
    class_names: tuple[str, ...] | list[str],
    input_shape: tuple[int, int, int] | list[int],
    dataset: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(wrapped, metadata)``: ``wrapped`` takes float32 ``[N, C, H, W]`` in ``[0, 1]`` at
    ``input_shape`` and returns logits ``[N, K]``; ``metadata`` says so and names the classes."""
    wrapped = WithPreprocess(model, preprocess)
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        wrapped.eval()  # exported programs keep the mode they were exported in (and refuse eval())
    meta = ray_aekd_metadata(class_names, tuple(input_shape), dataset) | {
        "preprocess": {"mean": list(preprocess.mean), "std": list(preprocess.std), "size": preprocess.size}
    }
    return wrapped, meta


def export_program(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: str | Path) -> Path:
    """``torch.export`` ``model`` on ``example`` (float32 ``[B, C, H, W]``, B >= 2) with a dynamic
    batch dimension and save it to ``path`` with ``metadata`` inside; returns the path."""
    if example.shape[0] < 2:
        raise ValueError(
            f"export needs an example batch of 2 or more images (a batch of 1 fixes the size); got {example.shape[0]}."
        )
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps(metadata)})
    return path
