"""Data sources, deterministic splits and augmentation views."""

from ray_aekd.data.sources import SOURCES, DataSourceError, ImageFolderSource, ImageSource, TensorSource, open_source
from ray_aekd.data.views import augment, normalize, split_indices, view_params

__all__ = [
    "SOURCES",
    "DataSourceError",
    "ImageFolderSource",
    "ImageSource",
    "TensorSource",
    "augment",
    "normalize",
    "open_source",
    "split_indices",
    "view_params",
]
