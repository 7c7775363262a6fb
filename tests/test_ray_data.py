"""Sources as Ray datasets, on a local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ray_aekd.data import open_source
from ray_aekd.data.ray_dataset import to_ray_dataset


def test_digits_rows_match_the_source(local_ray):
    source = open_source("digits")
    indices = [5, 3, 1796, 0, 42]
    rows = {int(r["index"]): r for r in to_ray_dataset(source, indices).take_all()}
    assert sorted(rows) == sorted(indices)
    for i in indices:
        image, label = source[i]
        assert np.array_equal(rows[i]["image"], image.numpy()) and int(rows[i]["label"]) == label


def test_whole_source_streams_every_sample_once(local_ray):
    source = open_source("digits")
    ds = to_ray_dataset(source, num_blocks=4)
    seen = torch.cat([b["index"] for b in ds.iter_torch_batches(batch_size=256)])
    assert torch.equal(seen.sort().values, torch.arange(1797))


def test_imagefolder_is_decoded_in_ray_tasks(local_ray, tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30) if label == "a" else (200, 100, 0)).save(tmp_path / label / "x.png")
    rows = to_ray_dataset(open_source("imagefolder", str(tmp_path))).take_all()
    by_label = {int(r["label"]): r["image"] for r in rows}
    assert by_label[0].shape == (3, 8, 8) and by_label[1][0].mean() == 200


def test_bad_indices_are_errors(local_ray):
    source = open_source("digits")
    with pytest.raises(ValueError, match=r"indices must be in \[0, 1797\); got 0..1797"):
        to_ray_dataset(source, [0, 1797])
    with pytest.raises(ValueError, match="no sample indices"):
        to_ray_dataset(source, [])
