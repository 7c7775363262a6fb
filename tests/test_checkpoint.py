"""Checkpoints round-trip exactly and refuse anything unsafe, damaged or unexpected."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from ray_aekd import __version__
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointError, CheckpointMetadata, load_checkpoint, save_checkpoint

DIGITS_META = CheckpointMetadata(
    architecture="digits_cnn",
    num_classes=10,
    input_shape=(1, 8, 8),
    mean=(0.3,),
    std=(0.4,),
    dataset="digits",
    class_names=tuple(str(i) for i in range(10)),
    seed=3,
    metrics={"val/acc1": 0.97},
)


def saved(tmp_path: Path, name: str = "ckpt") -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1)
    model(torch.randn(4, 1, 8, 8))  # move batch-norm running stats off their defaults
    path = str(tmp_path / name)
    save_checkpoint(path, model, DIGITS_META)
    return path, model.eval()


def rewrite_weights(path: str, payload: object) -> None:
    """Make the checkpoint a format-1 one (``weights.pt``, a torch file) holding ``payload``, with
    its hash updated, so only the content check can refuse it."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    Path(path, "weights.safetensors").unlink()
    Path(path, "weights.pt").write_bytes(data)
    meta = json.loads(Path(path, "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
    meta["format_version"] = 1
    Path(path, "metadata.json").write_text(json.dumps(meta))


def test_round_trip_is_exact_and_keeps_metadata(tmp_path):
    path, model = saved(tmp_path)
    loaded, meta = load_checkpoint(path, expect_num_classes=10, expect_input_shape=(1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert meta.metrics == {"val/acc1": 0.97} and meta.seed == 3 and meta.class_names[9] == "9"
    assert meta.package_version == __version__ and len(meta.weights_sha256) == 64
    assert not loaded.training


def test_fsspec_urls_work(tmp_path):
    model = build_model("resnet8", 10)
    meta = CheckpointMetadata("resnet8", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, "cifar10")
    save_checkpoint("memory://teachers/t0", model, meta)
    loaded, _ = load_checkpoint("memory://teachers/t0")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="metadata.json is missing"):
        load_checkpoint(str(tmp_path))
    Path(tmp_path, "metadata.json").write_text(json.dumps({"architecture": "resnet8"}))
    with pytest.raises(CheckpointError, match="is not a ray_aekd checkpoint"):
        load_checkpoint(str(tmp_path))


def test_weights_are_safetensors_with_provenance_in_the_metadata(tmp_path):
    """The weights file is plain safetensors (any safetensors reader gets the tensors) and the
    metadata records architecture, classes, preprocessing, provenance and the file's hash."""
    from safetensors.torch import load_file

    path, model = saved(tmp_path)
    tensors = load_file(str(Path(path, "weights.safetensors")))
    assert tensors.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    meta = json.loads(Path(path, "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["architecture"] == "digits_cnn" and meta["class_names"][0] == "0"
    assert meta["mean"] == [0.3] and meta["std"] == [0.4] and meta["input_shape"] == [1, 8, 8]
    assert meta["weights_sha256"] == hashlib.sha256(Path(path, "weights.safetensors").read_bytes()).hexdigest()
    assert meta["provenance"]["torch"] == torch.__version__.split("+")[0]
    assert meta["provenance"]["ray_aekd"] == __version__
    assert not Path(path, "weights.pt").exists()


def test_format_1_checkpoints_still_load(tmp_path):
    """A checkpoint written before safetensors (weights.pt, format_version 1) loads as before."""
    path, model = saved(tmp_path)
    rewrite_weights(path, model.state_dict())
    loaded, meta = load_checkpoint(path)
    assert meta.format_version == 1 and meta.weights_file == "weights.pt"
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_truncated_weights_are_refused(tmp_path):
    path, _ = saved(tmp_path)
    weights = Path(path, "weights.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="weights.safetensors does not match the hash"):
        load_checkpoint(path)


def test_a_damaged_safetensors_header_is_refused(tmp_path):
    """Hash updated to match: only the parser can tell the file is not safetensors."""
    path, _ = saved(tmp_path)
    weights = Path(path, "weights.safetensors")
    data = b"\xff" * 16 + weights.read_bytes()[16:]
    weights.write_bytes(data)
    meta = json.loads(Path(path, "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
    Path(path, "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights.safetensors is not a readable safetensors file"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    path, model = saved(tmp_path)
    marker = tmp_path / "pwned"
    rewrite_weights(path, {**model.state_dict(), "extra": _Exploit(str(marker))})
    with pytest.raises(CheckpointError, match="holds more than tensors and is refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path, _ = saved(tmp_path)
    rewrite_weights(path, build_model("digits_mlp", 10, in_channels=1).state_dict())
    with pytest.raises(CheckpointError, match="do not fit architecture 'digits_cnn'"):
        load_checkpoint(path)


def test_expectations_are_checked(tmp_path):
    path, _ = saved(tmp_path)
    with pytest.raises(CheckpointError, match="num_classes = 10, but 100 classes are expected"):
        load_checkpoint(path, expect_num_classes=100)
    with pytest.raises(CheckpointError, match=r"input shape \[1, 8, 8\], but the data has \[3, 32, 32\]"):
        load_checkpoint(path, expect_input_shape=(3, 32, 32))
