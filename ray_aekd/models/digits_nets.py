"""Small networks for 8x8 single-channel digit images (scikit-learn's bundled digits)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "DigitsMLP"]


class DigitsMLP(nn.Module):
    """``[B, C, H, W]`` (flattened) -> hidden -> logits. Layers: ``body``, ``head``."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers and a pooled linear head for ``[B, C, 8, 8]``.

    Layers: ``conv1``, ``conv2``, ``head``; ``features`` is ``[B, 2 * width]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv2(self.conv1(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
