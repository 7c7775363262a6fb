"""Deterministic splits and augmentation views.

A view of sample ``index`` under ``(seed, view)`` is fixed: the crop offset and flip come
from a hash of the three numbers, not from a random stream, so a teacher and the student
see exactly the same pixels whatever batch the sample lands in, on any worker, online or
replayed from a soft-label cache.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["augment", "normalize", "split_indices", "view_params"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def split_indices(
    num: int, val_fraction: float, seed: int, tuning_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random train/validation split of ``range(num)``: ``(train [N_t], val [N_v])``,
    both sorted.

    With ``tuning_fraction > 0`` the val split is set aside and never returned: a tuning
    split of ``tuning_fraction`` of the training split (drawn with the same seed) is returned
    as the validation split, and the rest of the training split as the training split. A sweep
    then chooses its settings without ever reading the val split it is finally judged on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1); got {val_fraction}.")
    if not 0.0 <= tuning_fraction < 1.0:
        raise ValueError(f"data.tuning_fraction must be in [0, 1); got {tuning_fraction}.")
    num_val = int(round(num * val_fraction))
    if num_val == 0 or num_val == num:
        raise ValueError(f"data.val_fraction {val_fraction} leaves an empty split of {num} samples.")
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    train, val = order[num_val:], order[:num_val]
    if tuning_fraction > 0:
        num_tuning = int(round(len(train) * tuning_fraction))
        if num_tuning == 0 or num_tuning == len(train):
            raise ValueError(
                f"data.tuning_fraction {tuning_fraction} leaves an empty split of the {len(train)} training samples."
            )
        train, val = train[num_tuning:], train[:num_tuning]  # order is already random: the next num_tuning
    return train.sort().values, val.sort().values


def _mix(x: np.ndarray | np.uint64) -> np.ndarray | np.uint64:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def view_params(
    indices: torch.Tensor, seed: int, view: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets and flips of samples ``indices [B]`` in view ``view``.

    Returns:
        ``dy [B]``, ``dx [B]`` in ``[0, 2 * pad]`` and ``flip [B]`` (bool).
    """
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) * _GOLDEN + np.uint64(view))
        h = _mix(indices.cpu().numpy().astype(np.uint64) ^ key)
    span = np.uint64(2 * pad + 1)
    dy = torch.from_numpy((h % span).astype(np.int64))
    dx = torch.from_numpy(((h >> np.uint64(21)) % span).astype(np.int64))
    flip = torch.from_numpy(((h >> np.uint64(42)) & np.uint64(1)).astype(bool))
    return dy, dx, flip


def augment(
    images: torch.Tensor, indices: torch.Tensor, seed: int, view: int | None, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, deterministic per (seed, view, index).

    Args:
        images: ``[B, C, H, W]`` (any dtype).
        indices: ``[B]`` sample indices in the source.
        seed, view: the view's key; ``view=None`` returns the images unchanged (evaluation).
        pad: padding in pixels before cropping back to ``H x W``.
        flip: allow horizontal flips.

    Returns:
        ``[B, C, H, W]``, same dtype.
    """
    if view is None:
        return images
    batch, _, height, width = images.shape
    dy, dx, flips = view_params(indices, seed, view, pad)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(height)).to(images.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(width)).to(images.device)  # [B, W]
    if flip:
        cols = torch.where(flips[:, None].to(images.device), cols.flip(-1), cols)
    b = torch.arange(batch, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32, scaled to [0, 1], then per-channel standardised."""
    x = images.float() / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s
