"""Other CIFAR networks used across KD papers: WRN, VGG, MobileNetV2, ShuffleNetV2, and a
plain four-convolution net small enough to train on CIFAR-10 on a laptop's CPU.

All take ``[B, C, 32, 32]`` inputs (any size >= 32 works; pooling is adaptive) and return
logits ``[B, K]``. Layer names are stable so that a hint layer can be named in a config.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MobileNetV2", "ShuffleNetV2", "SmallCNN", "VGG", "WideResNet"]


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k: ``(depth - 4) / 6`` blocks per stage at widths ``16k, 32k, 64k``.

    Layers: ``stem``, ``stage1``..``stage3``, ``head``; ``features`` is ``[B, 64k]``.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 28, 40, ...); got {depth}.")
        blocks = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        channels = 16
        stages = []
        for index, width in enumerate(widths):
            layers = []
            for block in range(blocks):
                layers.append(_WideBlock(channels, width, 2 if index > 0 and block == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class VGG(nn.Module):
    """CIFAR VGG with batch norm: five conv blocks separated by max-pooling.

    ``blocks`` gives the conv widths of each block, e.g. VGG-8 ``[[64], [128], [256], [512],
    [512]]``. Layers: ``block1``..``block5``, ``head``; ``features`` is ``[B, 512]``.
    """

    def __init__(self, blocks: list[list[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if len(blocks) != 5:
            raise ValueError(f"VGG needs 5 conv blocks; got {len(blocks)}.")
        channels = in_channels
        for index, widths in enumerate(blocks, start=1):
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            setattr(self, f"block{index}", nn.Sequential(*layers))
        self.head = nn.Linear(channels, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, 6):
            x = getattr(self, f"block{index}")(x)
            x = F.max_pool2d(x, 2) if index < 5 else F.adaptive_avg_pool2d(x, 1)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == channels
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 inputs: stride 1 in the stem and the
    second stage; ``width`` scales every layer (0.5 is the "half" model of KD papers).

    Layers: ``stem``, ``blocks``, ``last``, ``head``; ``features`` is ``[B, 1280 * width]``.
    """

    # (expansion, channels, repeats, stride)
    _SETTING = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()

        def scaled(c: int) -> int:
            return max(8, int(c * width + 4) // 8 * 8)

        channels = scaled(32)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6()
        )
        blocks = []
        for expand, out, repeats, stride in self._SETTING:
            for i in range(repeats):
                blocks.append(_InvertedResidual(channels, scaled(out), stride if i == 0 else 1, expand))
                channels = scaled(out)
        self.blocks = nn.Sequential(*blocks)
        last = int(1280 * max(1.0, width) + 4) // 8 * 8  # as torchvision: never narrower than 1280
        self.last = nn.Sequential(nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.head = nn.Linear(last, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.last(self.blocks(self.stem(x))), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = channels // 2
        if stride == 2:
            self.left: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(),
            )
            right_in = in_channels
        else:
            self.left = nn.Identity()
            right_in = branch
        self.right = nn.Sequential(
            nn.Conv2d(right_in, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(),
            nn.Conv2d(branch, branch, 3, stride=stride, padding=1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.right(right)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1.0x (Ma et al., 2018) for 32x32 inputs (stride-1 stem, no max-pool).

    Layers: ``stem``, ``stage1``..``stage3``, ``last``, ``head``; ``features`` is ``[B, 1024]``.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        channels = 24
        stages = []
        for width, repeats in ((116, 4), (232, 8), (464, 4)):
            units = [_ShuffleUnit(channels, width, 2)] + [_ShuffleUnit(width, width, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            channels = width
        self.stage1, self.stage2, self.stage3 = stages
        self.last = nn.Sequential(nn.Conv2d(channels, 1024, 1, bias=False), nn.BatchNorm2d(1024), nn.ReLU())
        self.head = nn.Linear(1024, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers at widths ``w, 2w, 4w, 4w`` (the last three with stride 2),
    global average pooling and a linear head. ``w = 8`` has 16 k parameters and trains at about
    5,000 CIFAR images per second on two CPU cores; ``w = 32`` has 0.24 M (about 1,700 per second).

    Layers: ``stem`` (32x32), ``stage1`` (16x16), ``stage2`` (8x8), ``stage3`` (4x4), ``fc``.
    """

    def __init__(self, width: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = block(in_channels, width, 1)
        self.stage1 = block(width, 2 * width, 2)
        self.stage2 = block(2 * width, 4 * width, 2)
        self.stage3 = block(4 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
