"""A source as a streaming ``ray.data.Dataset`` of rows ``(index, image, label)``.

Only the sample indices are materialised; images are read (and, for image folders,
decoded) inside Ray Data tasks, block by block. In-memory sources are put in the object
store once and read zero-copy by every task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import ray.data

from ray_aekd.data.sources import ImageSource, TensorSource

__all__ = ["to_ray_dataset"]


class _RowLoader:
    """Reads a batch of sample indices into ``index``, ``image`` uint8 [B, C, H, W], ``label``."""

    def __init__(self, source: ImageSource) -> None:
        if isinstance(source, TensorSource):
            self._arrays: Any = ray.put({"images": source.images.numpy(), "labels": source.labels.numpy()})
            self._source: ImageSource | None = None
        else:
            self._arrays, self._source = None, source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = batch["index"].astype(np.int64)
        if self._source is None:  # a TensorSource: its arrays are in the object store
            arrays = ray.get(self._arrays)
            images, labels = arrays["images"][index], arrays["labels"][index]
        else:
            rows = [self._source[int(i)] for i in index]
            images = np.stack([image.numpy() for image, _ in rows])
            labels = np.array([label for _, label in rows], dtype=np.int64)
        return {"index": index, "image": images, "label": labels}


def to_ray_dataset(
    source: ImageSource,
    indices: Sequence[int] | np.ndarray | None = None,
    num_blocks: int | None = None,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Rows ``index`` (int64), ``image`` (uint8 ``[C, H, W]``), ``label`` (int64) for
    ``indices`` of ``source`` (all samples by default), in the given order; the loading
    tasks each reserve ``num_cpus``."""
    ids = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if ids.size == 0:
        raise ValueError("to_ray_dataset: no sample indices given (empty split?).")
    if ids.min() < 0 or ids.max() >= len(source):
        raise ValueError(f"to_ray_dataset: indices must be in [0, {len(source)}); got {ids.min()}..{ids.max()}.")
    items = [{"index": int(i)} for i in ids]
    blocks = num_blocks or max(1, min(len(items) // 256, 64))
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _RowLoader(source), batch_format="numpy", num_cpus=num_cpus
    )
