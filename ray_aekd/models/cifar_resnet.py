"""ResNets for 32x32 inputs (He et al., 2016, section 4.2), as used across KD papers.

Depth ``6n + 2`` with three stages of ``n`` basic blocks at widths ``w, 2w, 4w``:
ResNet-20 is ``n = 3, w = 16`` (0.27 M parameters), ResNet-56 ``n = 9``. Shortcuts that
change shape are 1x1 convolutions with batch norm (option B).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet"]


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``.

    Args:
        depth: 8, 14, 20, 32, 44, 56, 110, ... (``depth - 2`` divisible by 6).
        num_classes: K.
        width: channels of the first stage (16; 64 for the "x4" models).
        in_channels: input channels (3 for RGB).
        stem_width: channels of the stem convolution; defaults to ``width`` (32 for "x4").

    Shapes:
        input ``[B, in_channels, H, W]`` -> logits ``[B, K]``; ``features`` returns the
        pooled penultimate features ``[B, 4 * width]``.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        width: int = 16,
        in_channels: int = 3,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...); got {depth}.")
        blocks = (depth - 2) // 6
        channels = stem_width or width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cifar_resnet(
    depth: int, num_classes: int = 10, width: int = 16, in_channels: int = 3, stem_width: int | None = None
) -> CifarResNet:
    """Build a CIFAR ResNet; ``cifar_resnet(20)`` is ResNet-20, ``cifar_resnet(8, width=64,
    stem_width=32)`` is ResNet-8x4."""
    return CifarResNet(
        depth=depth, num_classes=num_classes, width=width, in_channels=in_channels, stem_width=stem_width
    )
