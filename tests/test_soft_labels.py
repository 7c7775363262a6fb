"""The soft-label cache: written once, read instead of the teachers, refused when stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import teacher_overrides

from ray_aekd.config import DistillConfig, load_config
from ray_aekd.distributed.distill import distill
from ray_aekd.distributed.soft_labels import MANIFEST, _load_table, read_manifest, relabel
from ray_aekd.models.checkpoint import load_checkpoint

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"
NUM_TRAIN, NUM_VAL = 1438, 359  # digits with val_fraction 0.2


def config(teachers, tmp_path, *extra):
    return load_config(
        DistillConfig,
        SMOKE,
        [
            *teacher_overrides(teachers),
            f"output_dir={tmp_path / 'out'}",
            f"cache.path={tmp_path / 'cache'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.views=2",
            "data.deterministic=true",
            "workers.num_workers=0",
            "train.epochs=3",
            "train.batch_size=64",
            *extra,
        ],
    )


@pytest.mark.slow
def test_a_cached_run_trains_the_same_student_as_an_online_run_and_runs_no_teacher(
    local_ray, digits_teachers, tmp_path
):
    manifest = relabel(config(digits_teachers, tmp_path))
    # one teacher pass per sample and view, and one over the validation split: counted by the stages
    assert manifest["teacher_forward_passes"] == {n: NUM_TRAIN * 2 + NUM_VAL for n in ("cnn_a", "cnn_b", "mlp_c")}
    assert [t["name"] for t in manifest["teachers"]] == ["cnn_a", "cnn_b", "mlp_c"]
    assert manifest["teacher_sources"] == [
        {"name": n, "kind": "checkpoint", "location": digits_teachers[n]} for n in ("cnn_a", "cnn_b", "mlp_c")
    ]
    assert manifest["views"] == 2 and manifest["train_samples"] == NUM_TRAIN and manifest["dtype"] == "float32"
    assert sorted(p.name for p in (tmp_path / "cache" / "train").iterdir()) == ["view=0", "view=1"]

    cached = distill(config(digits_teachers, tmp_path, "name=cached"))
    # the cached run reads each view once into memory (cache.mode auto); the online one runs its teachers every epoch
    online = distill(config(digits_teachers, tmp_path, "name=online", "cache.path=null", "cache.mode=stream"))
    assert cached.teacher_forward_passes == {}  # the cached run started no teacher
    assert cached.soft_label_cache == str(tmp_path / "cache")
    assert online.teacher_forward_passes == {n: 3 * NUM_TRAIN + NUM_VAL for n in ("cnn_a", "cnn_b", "mlp_c")}

    # same seed and views: the same views, logits, order and so the same student
    assert cached.metrics["val/acc1"] == online.metrics["val/acc1"]
    assert cached.metrics["train/loss"] == pytest.approx(online.metrics["train/loss"], rel=1e-6)
    a, _ = load_checkpoint(cached.student_checkpoint)
    b, _ = load_checkpoint(online.student_checkpoint)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-6), name
    assert json.loads((Path(cached.run_dir) / "result.json").read_text())["teacher_forward_passes"] == {}

    # float16 halves the logits and keeps them within half precision
    half = relabel(config(digits_teachers, tmp_path, f"cache.path={tmp_path / 'half'}", "cache.dtype=float16"))
    assert half["dtype"] == "float16"
    names = ["cnn_a", "mlp_c"]
    position32, logits32 = _load_table(str(tmp_path / "cache"), 1, names)
    position16, logits16 = _load_table(str(tmp_path / "half"), 1, names)
    for name in names:
        full = logits32[name][position32[position32 >= 0]]
        rounded = logits16[name][position16[position32 >= 0]]
        assert torch.allclose(torch.from_numpy(rounded), torch.from_numpy(full), rtol=2e-3, atol=2e-3)


def test_a_stale_or_missing_cache_is_refused_with_what_differs(local_ray, digits_teachers, tmp_path):
    first = relabel(config(digits_teachers, tmp_path))
    again = relabel(config(digits_teachers, tmp_path))
    assert again["created"] == first["created"]  # up to date: kept, nothing ran

    other_weights = dict(digits_teachers, cnn_b=str(tmp_path / "cnn_b_retrained"))
    shutil.copytree(digits_teachers["cnn_a"], other_weights["cnn_b"])  # same architecture, other weights
    stale = r"this run's: other weights for teacher\(s\) \['cnn_b'\].*relabel --config <this config> --overwrite"
    with pytest.raises(ValueError, match=stale):
        distill(config(other_weights, tmp_path, "name=stale"))
    with pytest.raises(ValueError, match=r"views = 2 \(this run: 3\)"):
        distill(config(digits_teachers, tmp_path, "name=stale", "data.views=3"))
    split = r"train_indices \(another split of the data: data.val_fraction, data.split_seed"
    with pytest.raises(ValueError, match=r"seed = 0 \(this run: 1\); " + split):
        distill(config(digits_teachers, tmp_path, "name=stale", "seed=1"))
    with pytest.raises(ValueError, match=r"teachers \['cnn_a', 'cnn_b', 'mlp_c'\] \(this run: \['cnn_a', 'cnn_b'\]\)"):
        distill(
            config(digits_teachers, tmp_path, "name=stale", *teacher_overrides(digits_teachers, ("cnn_a", "cnn_b")))
        )
    assert not (tmp_path / "out" / "stale").exists()  # refused before the run started

    # relabel refuses to overwrite a cache made for other teachers unless told to
    with pytest.raises(ValueError, match=r"other weights for teacher\(s\) \['cnn_b'\]"):
        relabel(config(other_weights, tmp_path))
    remade = relabel(config(other_weights, tmp_path), overwrite=True)
    assert remade["created"] != first["created"] or remade["seconds"] != first["seconds"]
    assert read_manifest(str(tmp_path / "cache"))["teachers"][1] == remade["teachers"][1]

    # a relabel that died before writing its manifest leaves a cache that no run reads
    (tmp_path / "cache" / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"cache.path: no soft-label cache at .*no manifest.json; a relabel that was "
                                         r"interrupted leaves none\). Make it with `ray-aekd relabel"):  # fmt: skip
        distill(config(other_weights, tmp_path, "name=incomplete"))
