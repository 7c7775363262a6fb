"""Data sources on real data, deterministic splits and views."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ray_aekd.data import DataSourceError, augment, normalize, open_source, split_indices


def test_digits_is_the_real_bundled_dataset():
    source = open_source("digits")
    assert len(source) == 1797 and source.num_classes == 10 and source.input_shape == (1, 8, 8)
    image, label = source[0]
    assert image.dtype == torch.uint8 and label == 0  # the first digit is a zero
    assert source.images.max() == 255  # 16 (ink) maps to 255
    counts = torch.bincount(source.labels)
    assert counts.min() >= 170  # every class is present, about 180 each


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(1797, 0.2, seed=5)
    again, val_again = split_indices(1797, 0.2, seed=5)
    assert torch.equal(train, again) and torch.equal(val, val_again)
    assert len(val) == 359 and len(set(train.tolist()) | set(val.tolist())) == 1797
    assert not set(train.tolist()) & set(val.tolist())
    other, _ = split_indices(1797, 0.2, seed=6)
    assert not torch.equal(train, other)
    with pytest.raises(ValueError, match=r"data.val_fraction must be in \(0, 1\); got 1.5"):
        split_indices(100, 1.5, 0)


def test_a_tuning_split_comes_out_of_the_training_split_and_never_touches_val():
    train, val = split_indices(1797, 0.2, seed=5)
    fit, tuning = split_indices(1797, 0.2, seed=5, tuning_fraction=0.25)
    assert len(tuning) == round(len(train) * 0.25) and len(fit) + len(tuning) == len(train)
    assert set(fit.tolist()) | set(tuning.tolist()) == set(train.tolist())  # all of train, nothing else
    assert not set(tuning.tolist()) & set(val.tolist()) and not set(fit.tolist()) & set(val.tolist())
    assert not set(fit.tolist()) & set(tuning.tolist())
    again, tuning_again = split_indices(1797, 0.2, seed=5, tuning_fraction=0.25)
    assert torch.equal(tuning, tuning_again) and torch.equal(fit, again)
    with pytest.raises(ValueError, match="tuning_fraction"):
        split_indices(10, 0.2, 0, tuning_fraction=0.01)  # rounds to no tuning sample


def test_split_seed_fixes_the_evaluation_split_whatever_the_run_seed():
    from ray_aekd.config import DataConfig, from_dict

    fixed = from_dict(DataConfig, {"split_seed": 3})
    _, val_a = fixed.split(1797, seed=0)
    _, val_b = fixed.split(1797, seed=1)
    assert torch.equal(val_a, val_b) and torch.equal(val_a, split_indices(1797, 0.2, 3)[1])
    follows = DataConfig()  # null: the run's seed, as before
    assert not torch.equal(follows.split(1797, seed=0)[1], follows.split(1797, seed=1)[1])
    tuned = from_dict(DataConfig, {"split_seed": 3, "tuning_fraction": 0.2})
    train, tuning = tuned.split(1797, seed=7)
    assert not set(tuning.tolist()) & set(val_a.tolist()) and not set(train.tolist()) & set(val_a.tolist())


def test_views_are_keyed_by_seed_view_and_index_not_by_batch():
    source = open_source("digits")
    indices = torch.arange(64)
    images = source.images[indices]
    a = augment(images, indices, seed=0, view=3, pad=2)
    b = augment(images, indices, seed=0, view=3, pad=2)
    assert torch.equal(a, b)
    # the same sample in another batch, at another position, gets the same pixels
    reordered = torch.tensor([40, 7, 13])
    assert torch.equal(augment(source.images[reordered], reordered, seed=0, view=3, pad=2), a[reordered])
    # other views and other seeds differ for most samples
    c = augment(images, indices, seed=0, view=4, pad=2)
    d = augment(images, indices, seed=1, view=3, pad=2)
    assert (a != c).flatten(1).any(1).float().mean() > 0.7
    assert (a != d).flatten(1).any(1).float().mean() > 0.7
    assert torch.equal(augment(images, indices, seed=0, view=None), images)


def test_a_view_is_a_padded_crop_or_its_mirror():
    image = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4) + 1
    seen = set()
    for view in range(40):
        out = augment(image, torch.tensor([0]), seed=0, view=view, pad=1)[0, 0]
        padded = torch.nn.functional.pad(image[0, 0], (1, 1, 1, 1))
        crops = [padded[y : y + 4, x : x + 4] for y in range(3) for x in range(3)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in crops)
        seen.add(tuple(out.flatten().tolist()))
    assert len(seen) > 6  # offsets and flips vary across views


def test_normalize():
    x = normalize(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, 2.0))


def test_imagefolder_reads_a_real_tree(tmp_path):
    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (12, 10), colour).save(tmp_path / label / f"{i}.png")
    source = open_source("imagefolder", str(tmp_path), size=8)
    assert len(source) == 6 and source.class_names == ("cat", "dog") and source.input_shape == (3, 8, 8)
    image, label = source[5]
    assert label == 1 and image.dtype == torch.uint8 and image[2].float().mean() > 250  # blue dog


def test_missing_or_empty_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist or is not a directory"):
        open_source("imagefolder", str(tmp_path / "nope"))
    with pytest.raises(DataSourceError, match="holds no images in class folders"):
        open_source("imagefolder", str(tmp_path))
    with pytest.raises(DataSourceError, match=r"cifar10 was not found under data.path .* 'cifar-10-batches-py/'"):
        open_source("cifar10", str(tmp_path))
    with pytest.raises(DataSourceError, match="Unknown dataset 'mnist'. Valid datasets: digits, cifar10"):
        open_source("mnist")
    with pytest.raises(DataSourceError, match="needs data.path"):
        open_source("cifar100")
