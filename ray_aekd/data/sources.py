"""Image classification sources: bundled digits, CIFAR-10/100, and any image-folder tree.

A source is an indexable collection of ``(image, label)`` with ``image`` a uint8 tensor
``[C, H, W]``, plus what a model and a checkpoint need to know about it: number of classes,
class names, input shape and per-channel normalisation. Images are decoded lazily where
they live on disk (image folders); digits and CIFAR are held in memory as uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ray_aekd._names import DATASETS

__all__ = ["DataSourceError", "ImageSource", "SOURCES", "TensorSource", "ImageFolderSource", "open_source"]

SOURCES = DATASETS  # the names the config checks without importing torch


class DataSourceError(ValueError):
    """A data source that cannot be opened, with what to do about it."""


class ImageSource(Protocol):
    """A labelled image dataset: ``source[i]`` is ``(image uint8 [C, H, W], label)``."""

    @property
    def name(self) -> str: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def input_shape(self) -> tuple[int, int, int]:  # (C, H, W)
        ...

    @property
    def mean(self) -> tuple[float, ...]: ...

    @property
    def std(self) -> tuple[float, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


@dataclass(frozen=True)
class TensorSource:
    """A source held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFolderSource:
    """Any ``root/<class>/<image>`` tree (ImageNet-style), decoded on access and resized to
    ``size`` x ``size`` when given. Normalisation defaults to ImageNet's statistics."""

    def __init__(self, root: str | Path, size: int | None = None) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(root)
        allowed = "a folder of class folders holding images (root/<class>/<image>) for dataset imagefolder"
        if not root.is_dir():
            raise DataSourceError(
                f"data.path: got {str(root)!r}, which does not exist or is not a directory; allowed: {allowed}."
            )
        try:
            self._folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as error:
            raise DataSourceError(
                f"data.path: got {str(root)!r}, which holds no images in class folders ({_one_line(error)}); "
                f"allowed: {allowed}."
            ) from None
        self.name = "imagefolder"
        self.class_names = tuple(self._folder.classes)
        self.num_classes = len(self.class_names)
        self._size = size
        try:  # the first image fixes the input shape; one that cannot be decoded stops here, not in a worker
            first, _ = self[0]
        except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError is an OSError
            raise DataSourceError(
                f"data.path: got {str(root)!r}, whose first image {self._folder.samples[0][0]!r} cannot be read "
                f"({_one_line(error)}); allowed: {allowed}, which PIL can decode."
            ) from None
        self.input_shape = (first.shape[0], first.shape[1], first.shape[2])
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)

    def __len__(self) -> int:
        return len(self._folder.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.functional import pil_to_tensor, resize

        path, label = self._folder.samples[index]
        image = pil_to_tensor(self._folder.loader(path).convert("RGB"))
        if self._size is not None:
            image = resize(image, [self._size, self._size], antialias=True)
        return image, label


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()).rstrip(".")


def digits_source() -> TensorSource:
    """scikit-learn's bundled handwritten digits: 1,797 images, 1 x 8 x 8, 10 classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64).mul(255.0 / 16.0).round().to(torch.uint8)
    return TensorSource(
        name="digits",
        images=images.unsqueeze(1),
        labels=torch.tensor(digits.target, dtype=torch.int64),
        class_names=tuple(str(i) for i in range(10)),
        mean=(0.3,),
        std=(0.4,),
    )


_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}  # fmt: skip


def cifar_source(name: str, root: str | Path, train: bool = True, download: bool = False) -> TensorSource:
    """CIFAR-10 or CIFAR-100 through torchvision, from ``root`` (downloaded only if asked)."""
    import torchvision

    cls_name, folder, url, mean, std = _CIFAR[name]
    try:
        dataset = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=download)
    except RuntimeError as error:
        found = str(error).split(". You can use download=True")[0].rstrip(".")  # torchvision's Python advice
        raise DataSourceError(
            f"data.path: {name} was not found under data.path {str(root)!r} ({found}); allowed: a folder holding "
            f"the extracted '{folder}/' folder (from {url}), or data.download: true where the network allows."
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8
    return TensorSource(
        name=name,
        images=images,
        labels=torch.tensor(dataset.targets, dtype=torch.int64),
        class_names=tuple(dataset.classes),
        mean=mean,
        std=std,
    )


def open_source(name: str, path: str | None = None, download: bool = False, size: int | None = None) -> ImageSource:
    """Open a source by name: ``digits`` (no path), ``cifar10``/``cifar100`` (path = root
    folder), ``imagefolder`` (path = tree root; ``size`` resizes images)."""
    if name not in SOURCES:
        raise DataSourceError(f"Unknown dataset {name!r}. Valid datasets: {', '.join(SOURCES)}.")
    if name == "digits":
        return digits_source()
    if path is None:
        raise DataSourceError(f"dataset {name!r} needs data.path (a folder); got none.")
    if name == "imagefolder":
        return ImageFolderSource(path, size=size)
    return cifar_source(name, path, download=download)
