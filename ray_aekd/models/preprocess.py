"""How a model wants its input: per-channel mean and std, and optionally a square size.

Images travel through ray_aekd as uint8 ``[B, C, H, W]`` (data pipeline) or float32 in
``[0, 1]`` (what torchvision's ``ToTensor`` gives, and what a student handed to users takes).
``Preprocess`` turns either into what one model was trained on; ``WithPreprocess`` puts that
step inside a model, so that the model takes ``[0, 1]`` images itself (the student's MLflow
model and ``ray-aekd export`` programs). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["IDENTITY_STATS", "Preprocess", "WithPreprocess"]


@dataclass(frozen=True)
class Preprocess:
    """``x -> resize(x, size) -> (x - mean) / std`` on ``[0, 1]`` images.

    Attributes:
        mean: one number, or one per channel.
        std: one number > 0, or one per channel.
        size: resize to ``size x size`` (bilinear, antialiased) first; None keeps the size.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` (scaled by 1/255) or float ``[B, C, H, W]`` in ``[0, 1]``
        -> float32 ``[B, C, size, size]``, standardised."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def describe(self) -> str:
        size = f", size {self.size}" if self.size is not None else ""
        return f"mean {list(self.mean)}, std {list(self.std)}{size}"


#: A model that takes ``[0, 1]`` images as they are (its preprocessing is inside it).
IDENTITY_STATS = ((0.0,), (1.0,))


class WithPreprocess(nn.Module):
    """``model`` with its preprocessing inside: float32 ``[N, C, H, W]`` in ``[0, 1]`` -> logits ``[N, K]``.

    Buffers (not Python constants) hold the statistics, so that ``torch.export`` keeps them in
    the program and ``state_dict`` carries them.
    """

    mean: torch.Tensor  # [C, 1, 1]
    std: torch.Tensor  # [C, 1, 1]

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.size = preprocess.size
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32)[:, None, None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.model((x - self.mean) / self.std)
