"""The ``data`` and ``cache`` sections: which dataset, how it is split and augmented, and where a
distillation's soft labels come from."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ray_aekd._names import DATASETS
from ray_aekd.config._base import check

if TYPE_CHECKING:
    import torch

__all__ = ["CACHE_DTYPES", "CACHE_MODES", "CacheConfig", "DataConfig", "DistillDataConfig"]

#: How a soft-label cache stores logits.
CACHE_DTYPES = ("float32", "float16")
#: Where a run keeps its training views' soft labels between epochs (``CacheConfig.mode``).
CACHE_MODES = ("auto", "memory", "stream")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset and its train/validation split."""

    dataset: str = "digits"  # digits | cifar10 | cifar100 | imagefolder
    path: str | None = None  # the dataset's folder (all but digits, which ships with scikit-learn)
    download: bool = False  # cifar10/cifar100: download into path when it is not there
    val_fraction: float = 0.2  # share of the samples held out for validation
    image_size: int | None = None  # image folders only: resize to this square size
    augment: bool = True  # random crop (pad 4, or 1 for 8x8 digits) and horizontal flip
    split_seed: int | None = None  # seed of the train/val split; null: the run's seed
    tuning_fraction: float = 0.0  # > 0: validate on this share of the training split; the val split is never read

    def validate(self, prefix: str) -> None:
        check(self.dataset in DATASETS, f"{prefix}.dataset", self.dataset, ", ".join(DATASETS))
        check(0 < self.val_fraction < 1, f"{prefix}.val_fraction", self.val_fraction, "a number in (0, 1)")
        seed = self.split_seed
        check(seed is None or seed >= 0, f"{prefix}.split_seed", seed, "an integer >= 0, or null (the run's seed)")
        check(
            0 <= self.tuning_fraction < 1,
            f"{prefix}.tuning_fraction",
            self.tuning_fraction,
            "a number in [0, 1): 0 validates on the val split, more carves a tuning split out of the training split",
        )
        check(
            self.dataset == "digits" or bool(self.path),
            f"{prefix}.path",
            self.path,
            f"a folder for dataset {self.dataset!r}",
        )
        if self.image_size is not None:
            check(self.image_size >= 8, f"{prefix}.image_size", self.image_size, "an integer >= 8, or null")
            check(
                self.dataset == "imagefolder",
                f"{prefix}.image_size",
                self.image_size,
                "null unless dataset is imagefolder (other datasets have a fixed size)",
            )

    def split(self, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(train [N_t], validation [N_v])`` indices of a source of ``num`` samples for a run with
        seed ``seed``: the val split (by ``split_seed``, else ``seed``), or with ``tuning_fraction``
        a tuning split out of the training split, the val split left out of both."""
        from ray_aekd.data.views import split_indices  # torch: only where indices are made

        split_seed = seed if self.split_seed is None else self.split_seed
        return split_indices(num, self.val_fraction, split_seed, self.tuning_fraction)


@dataclasses.dataclass(frozen=True)
class DistillDataConfig(DataConfig):
    """The data of a distillation run: ``DataConfig`` plus how views and order repeat."""

    views: int | None = None  # distinct augmentation views: epoch e uses view e mod views; null: a new one each epoch
    deterministic: bool = False  # read blocks in a fixed order (Ray Data preserve_order): runs repeat exactly

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.views is not None:
            check(self.views >= 1, f"{prefix}.views", self.views, "an integer >= 1, or null (a new view every epoch)")

    def view(self, epoch: int) -> int:
        """The augmentation view that epoch ``epoch`` (0-based) reads."""
        return epoch % self.views if self.views else epoch

    def repeating_views(self) -> int | None:
        """How many distinct views the epochs cycle through: ``views``, 1 without augmentation,
        None when every epoch sees a new one."""
        return 1 if not self.augment else self.views


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Where a run's soft labels come from: the teachers, every epoch or once per kept view, or a
    cache on disk.

    ``mode``: keep each training view, its images and its teachers' logits, in Ray's object
    store (``memory``: teachers run once per view, not once per epoch), or run the teachers every
    epoch (``stream``); ``auto`` keeps them when the views repeat (``data.views`` set, or
    ``data.augment: false``), there are no hint features, and they fit in half of the object
    store. ``path``: a soft-label cache on disk (``ray-aekd relabel``): teacher logits for
    ``data.views`` views, read instead of running any teacher."""

    path: str | None = None  # local folder, s3://..., gs://...; set: read teacher logits from it, run no teacher
    dtype: str = "float32"  # float32 | float16 (half the size; logits rounded to ~3 significant digits)
    mode: str = "auto"  # auto | memory | stream

    def validate(self, prefix: str) -> None:
        check(self.path != "", f"{prefix}.path", self.path, "a folder or URI, or null")
        check(self.dtype in CACHE_DTYPES, f"{prefix}.dtype", self.dtype, ", ".join(CACHE_DTYPES))
        check(self.mode in CACHE_MODES, f"{prefix}.mode", self.mode, ", ".join(CACHE_MODES))
