"""Teacher sources (``ray_aekd.models.sources``): the five kinds of model a teacher can be,
loaded through the real code paths on real images, and the one clear error each bad file gets.

Models are built here (untrained, with their batch-norm statistics moved off the defaults by a
few forward passes, so that a loader that dropped buffers would be caught). The data is real:
scikit-learn's bundled digits (uint8 ``[N, 1, 8, 8]``) and a small RGB image folder of digits
upsampled to 16 x 16 PNGs. Each loaded model must give the logits of the original model on the
preprocessed images, preprocessing computed here from the declared statistics. No Ray is
started and nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ray_aekd.config import ConfigError, DistillConfig, DistillTeacher, from_dict, load_config
from ray_aekd.data.sources import ImageFolderSource, digits_source
from ray_aekd.distributed.prepare import check_run, load_teacher, resolve_paths, teacher_key
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointMetadata, save_checkpoint
from ray_aekd.models.export import export_program, with_preprocess
from ray_aekd.models.preprocess import Preprocess
from ray_aekd.models.sources import (
    EXTRA_FILE,
    LoadedModel,
    ModelSource,
    ModelSourceError,
    check_on_batch,
    check_pt2_archive,
    load_source,
)

SMOKE = str(Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGES = 24  # real images each comparison runs on


class PickledCode:
    """Unpickling this runs ``touch <marker>``: what a malicious model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# data and models


@pytest.fixture(scope="module")
def digits():
    return digits_source()


@pytest.fixture(scope="module")
def digit_images(digits) -> torch.Tensor:
    """Real digits, uint8 ``[IMAGES, 1, 8, 8]``, from across the set (several classes)."""
    return digits.images[torch.linspace(0, len(digits) - 1, IMAGES).long()]


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory, digits) -> ImageFolderSource:
    """An image folder of real digits: 3 per class, 16 x 16 RGB PNGs under ``root/<class>/``."""
    root = tmp_path_factory.mktemp("rgb_digits")
    for label in range(10):
        folder = root / str(label)
        folder.mkdir()
        for j, i in enumerate((digits.labels == label).nonzero().flatten()[:3].tolist()):
            pixels = digits.images[i, 0].numpy()
            Image.fromarray(pixels).resize((16, 16), Image.NEAREST).convert("RGB").save(folder / f"{j}.png")
    return ImageFolderSource(root)


@pytest.fixture(scope="module")
def rgb_images(rgb_folder) -> torch.Tensor:
    return torch.stack([rgb_folder[i][0] for i in range(len(rgb_folder))])


def _expected_input(images: torch.Tensor, mean, std, size: int | None = None) -> torch.Tensor:
    """What a model trained with ``mean``/``std`` (and ``size``) takes, computed here with
    torchvision's resize: ``resize(images / 255) - mean) / std``."""
    x = images.to(torch.float32) / 255.0
    if size is not None:
        x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _settled(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``model`` in eval mode after a few training-mode passes on ``x`` (and ``x`` shifted):
    its batch-norm running statistics are no longer the defaults."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for shift in (0.0, 0.5, 1.0):
            model(x + shift)
    return model.eval()


def _digits_model(arch: str, digit_images: torch.Tensor, classes: int = 10) -> torch.nn.Module:
    return _settled(build_model(arch, classes, in_channels=1), _expected_input(digit_images, (0.3,), (0.4,)))


def _load(source: ModelSource, data) -> LoadedModel:
    """``load_source`` for ``data``'s classes, channels and default preprocessing."""
    return load_source(
        source,
        num_classes=data.num_classes,
        in_channels=data.input_shape[0],
        default_preprocess=Preprocess(data.mean, data.std),
    )


def _assert_same_logits(loaded: LoadedModel, images: torch.Tensor, model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        got = loaded(images)
        want = model(x)
    assert got.shape == (images.shape[0], want.shape[1])
    torch.testing.assert_close(got, want)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, *, dynamic: bool = True, extra=None) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path), extra_files=extra)
    return path


def _rewrite_zip(src: Path, dst: Path, replace: dict) -> None:
    """Copy the zip ``src`` to ``dst`` with each record whose name ends in a key of ``replace``
    given that value: bytes, or a function of the old bytes."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            for suffix, value in replace.items():
                if info.filename.endswith(suffix):
                    data = value(data) if callable(value) else value
            new.writestr(info.filename, data)


def _pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _save_mlflow(model: torch.nn.Module, path: Path, example: np.ndarray, **kwargs) -> Path:
    import mlflow.models
    import mlflow.pytorch

    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    # the tensor spec's batch dimension is -1 (dynamic): MLflow exports the pt2 program with it
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"][0] == -1
    mlflow.pytorch.save_model(
        model, str(path), input_example=example, signature=signature, pip_requirements=["torch"], **kwargs
    )  # pip_requirements given: MLflow would otherwise spend a minute inferring them in a subprocess
    return path


# ---------------------------------------------------------------------------------------------
# 1. each kind loads and gives the original model's logits


def test_checkpoint_loads_with_the_preprocessing_it_records(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    mean, std = (0.25,), (0.5,)  # not the data's (0.3, 0.4): the checkpoint's own statistics must win
    meta = save_checkpoint(
        str(tmp_path / "ckpt"),
        model,
        CheckpointMetadata("digits_cnn", 10, (1, 8, 8), mean, std, "digits", class_names=digits.class_names),
    )
    loaded = _load(ModelSource("checkpoint", str(tmp_path / "ckpt")), digits)
    _assert_same_logits(loaded, digit_images, model, _expected_input(digit_images, mean, std))
    assert (loaded.num_classes, loaded.class_names, loaded.architecture) == (10, digits.class_names, "digits_cnn")
    assert loaded.digest == meta.weights_sha256
    with torch.no_grad():  # the data's statistics would give other logits: the comparison can tell
        assert not torch.allclose(loaded(digit_images), model(_expected_input(digit_images, digits.mean, digits.std)))


def _plain(state):
    return state


def _ddp_wrapped(state):
    """A training script's checkpoint of a DDP-wrapped model: ``module.`` keys, with an optimizer."""
    params = [v for k, v in state.items() if v.is_floating_point()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return {"state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": optimizer.state_dict(), "epoch": 3}


@pytest.mark.parametrize(
    ("suffix", "wrap"),
    [(".pt", _plain), (".pth", _ddp_wrapped), (".safetensors", _plain)],
    ids=["pt", "pth-state_dict-ddp-prefix", "safetensors"],
)
def test_model_and_weights_load_the_state_dict(tmp_path, digits, digit_images, suffix, wrap):
    model = _digits_model("digits_cnn", digit_images)
    path = tmp_path / f"digits_cnn{suffix}"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(wrap(state), path)
    teacher = from_dict(DistillTeacher, {"name": "t", "model": "digits_cnn", "weights": str(path)}, "teachers.0")
    loaded = load_teacher(teacher, digits, f"teachers.0.{teacher_key(teacher)}")
    _assert_same_logits(loaded, digit_images, model, _expected_input(digit_images, digits.mean, digits.std))
    assert loaded.architecture == "digits_cnn" and loaded.num_classes == 10


def test_torchvision_weights_with_their_own_preprocessing_on_an_rgb_folder(tmp_path, rgb_folder, rgb_images):
    model = _settled(build_model("torchvision:resnet18", 10), _expected_input(rgb_images, *IMAGENET, size=32))
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    teacher = from_dict(
        DistillTeacher,
        {
            "name": "resnet",
            "model": "torchvision:resnet18",
            "weights": str(path),
            "preprocess": {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1]), "size": 32},
        },
        "teachers.0",
    )
    loaded = load_teacher(teacher, rgb_folder, "teachers.0.weights")
    assert rgb_images.shape[-2:] == (16, 16)  # resized to 32 by the teacher's preprocessing
    assert loaded.preprocess == Preprocess(IMAGENET[0], IMAGENET[1], 32)
    _assert_same_logits(loaded, rgb_images, model, _expected_input(rgb_images, *IMAGENET, size=32))


def test_timm_weights_load_on_an_rgb_folder(tmp_path, rgb_folder, rgb_images):
    pytest.importorskip("timm")
    x = _expected_input(rgb_images, rgb_folder.mean, rgb_folder.std)
    model = _settled(build_model("timm:resnet10t", 10), x)
    path = tmp_path / "resnet10t.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = _load(ModelSource("model", str(path), "timm:resnet10t"), rgb_folder)
    check_on_batch(loaded, rgb_images[:2], 10, "timm teacher")
    _assert_same_logits(loaded, rgb_images, model, x)  # the folder's own (ImageNet) statistics, no resize


def test_exported_program_with_a_dynamic_batch(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    x = _expected_input(digit_images, digits.mean, digits.std)
    path = _export(model, x[:2], tmp_path / "cnn.pt2")
    loaded = _load(ModelSource("exported", str(path)), digits)
    _assert_same_logits(loaded, digit_images, model, x)  # 24 images through a program exported on 2
    _assert_same_logits(loaded, digit_images[:3], model, x[:3])
    _assert_same_logits(loaded, digit_images[:1], model, x[:1])  # a last batch of one image
    assert loaded.class_names == () and loaded.architecture is None


def test_exported_program_with_the_preprocessing_inside_takes_raw_images(tmp_path, digits, digit_images):
    """``ray-aekd export``'s programs say so in their metadata: no second normalisation."""
    model = _digits_model("digits_mlp", digit_images)
    pre = Preprocess((0.2,), (0.45,))
    wrapped, meta = with_preprocess(model, pre, digits.class_names, (1, 8, 8), "digits")
    path = export_program(wrapped, digit_images[:2].float() / 255, meta, tmp_path / "student.pt2")
    loaded = _load(ModelSource("exported", str(path)), digits)
    assert loaded.class_names == digits.class_names and loaded.num_classes == 10
    _assert_same_logits(loaded, digit_images, model, _expected_input(digit_images, pre.mean, pre.std))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_module(tmp_path, digits, digit_images, how):
    model = _digits_model("digits_cnn", digit_images)
    x = _expected_input(digit_images, digits.mean, digits.std)
    module = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x[:2])
    path = tmp_path / f"cnn_{how}.pt"
    torch.jit.save(module, str(path))
    loaded = _load(ModelSource("torchscript", str(path)), digits)
    check_on_batch(loaded, digit_images[:2], 10, "torchscript teacher")
    _assert_same_logits(loaded, digit_images, model, x)


def test_mlflow_model_folder_in_the_pt2_format(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    x = _expected_input(digit_images, digits.mean, digits.std)
    folder = _save_mlflow(model, tmp_path / "mlflow_model", x[:2].numpy())
    assert (folder / "data" / "model.pt2").is_file()  # MLflow 3 writes the pt2 format by default
    loaded = _load(ModelSource("mlflow", str(folder)), digits)
    check_on_batch(loaded, digit_images[:2], 10, "mlflow teacher")
    _assert_same_logits(loaded, digit_images, model, x)
    _assert_same_logits(loaded, digit_images[:1], model, x[:1])  # a last batch of one image


# ---------------------------------------------------------------------------------------------
# 2. one clear error per bad file


@pytest.mark.parametrize(
    ("kind", "name", "arch"),
    [
        ("checkpoint", "no_checkpoint", None),
        ("model", "no_weights.pt", "digits_cnn"),
        ("exported", "no_program.pt2", None),
        ("torchscript", "no_module.pt", None),
        ("mlflow", "no_mlflow_model", None),
    ],
    ids=["checkpoint", "model", "exported", "torchscript", "mlflow"],
)
def test_a_missing_file(tmp_path, digits, kind, name, arch):
    path = tmp_path / name
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource(kind, str(path), arch), digits)
    assert str(path) in str(error.value)
    assert "does not exist" in str(error.value)


def test_weights_for_another_number_of_classes(tmp_path, digits, digit_images):
    path = tmp_path / "cnn_5_classes.pt"
    torch.save(_digits_model("digits_cnn", digit_images, classes=5).state_dict(), path)
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("model", str(path), "digits_cnn"), digits)
    text = str(error.value)
    assert str(path) in text and "digits_cnn" in text
    assert "the weights are for 5 classes, the data has 10" in text
    assert "'head.weight' [5, 32] for [10, 32]" in text  # the first key of another shape, with both shapes


def test_weights_with_missing_and_unexpected_keys(tmp_path, digits, digit_images):
    mlp = _digits_model("digits_mlp", digit_images).state_dict()
    cnn = build_model("digits_cnn", 10, in_channels=1).state_dict()
    path = tmp_path / "mlp_weights_for_a_cnn.pt"
    torch.save(mlp, path)
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("model", str(path), "digits_cnn"), digits)
    text = str(error.value)
    missing = [k for k in cnn if k not in mlp]
    unexpected = [k for k in mlp if k not in cnn]
    assert str(path) in text and "does not fit digits_cnn" in text
    assert f"{len(missing)} missing key(s), first {missing[0]!r}" in text
    assert f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}" in text

    # one key short: named alone
    state = _digits_model("digits_cnn", digit_images).state_dict()
    del state["head.bias"]
    torch.save(state, path)
    with pytest.raises(ModelSourceError, match=r"1 missing key\(s\), first 'head.bias'"):
        _load(ModelSource("model", str(path), "digits_cnn"), digits)


def test_weights_holding_pickled_code_are_refused_without_running_it(tmp_path, digits, digit_images):
    marker = tmp_path / "pickled-code-ran"
    path = tmp_path / "evil.pt"
    torch.save({**_digits_model("digits_cnn", digit_images).state_dict(), "x": PickledCode(marker)}, path)
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("model", str(path), "digits_cnn"), digits)
    text = str(error.value)
    assert str(path) in text and "is unsafe" in text and "nothing was unpickled" in text
    assert not marker.exists()


def test_an_exported_program_with_a_fixed_batch_is_refused(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    path = _export(model, _expected_input(digit_images[:4], digits.mean, digits.std), tmp_path / "fixed.pt2",
                   dynamic=False)  # fmt: skip
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("exported", str(path)), digits)
    text = str(error.value)
    assert str(path) in text
    assert "fixed batch of 4" in text and "dynamic batch dimension" in text


def test_a_pt2_archive_with_a_pickled_record_is_refused_unread(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    good = _export(model, _expected_input(digit_images[:2], digits.mean, digits.std), tmp_path / "good.pt2")
    check_pt2_archive(good)  # what torch.export.save writes passes
    with zipfile.ZipFile(good) as archive:
        record = next(n for n in archive.namelist() if n.endswith("sample_inputs/model.pt"))
    marker = tmp_path / "pt2-code-ran"
    bad = tmp_path / "bad.pt2"
    _rewrite_zip(good, bad, {record: _pickle({"x": PickledCode(marker)})})  # torch.export.load unpickles this record
    with pytest.raises(ModelSourceError) as error:
        check_pt2_archive(bad)
    assert str(bad) in str(error.value) and repr(record) in str(error.value) and "unsafe" in str(error.value)
    with pytest.raises(ModelSourceError, match="is unsafe"):
        _load(ModelSource("exported", str(bad)), digits)
    assert not marker.exists()


def test_a_pt2_archive_whose_weights_config_marks_a_record_pickled_is_refused_unread(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    good = _export(model, _expected_input(digit_images[:2], digits.mean, digits.std), tmp_path / "good.pt2")
    marker = tmp_path / "pt2-weight-code-ran"

    def mark_pickled(data: bytes) -> bytes:
        config = json.loads(data)
        config["config"]["conv1.0.weight"]["use_pickle"] = True
        return json.dumps(config).encode()

    with zipfile.ZipFile(good) as archive:
        config = json.loads(
            archive.read(next(n for n in archive.namelist() if n.endswith("model_weights_config.json")))
        )
    record = "weights/" + config["config"]["conv1.0.weight"]["path_name"]
    bad = tmp_path / "bad_weight.pt2"
    _rewrite_zip(good, bad, {"model_weights_config.json": mark_pickled, record: _pickle(PickledCode(marker))})
    try:
        with pytest.raises(ModelSourceError, match="is unsafe"):
            _load(ModelSource("exported", str(bad)), digits)
    finally:
        assert not marker.exists(), "torch.export.load ran the pickled code of a record check_pt2_archive let through"


def test_a_pt2_archive_listing_a_record_twice_or_damaged_is_refused(tmp_path, digits, digit_images):
    """A record listed twice in the weights config (once raw, once as something else) is refused,
    and so is an archive whose member is damaged (a flipped byte fails the zip's CRC): one error each."""
    model = _digits_model("digits_cnn", digit_images)
    good = _export(model, _expected_input(digit_images[:2], digits.mean, digits.std), tmp_path / "good.pt2")

    def list_twice(data: bytes) -> bytes:
        config = json.loads(data)
        first, second = list(config["config"])[:2]
        config["config"][second]["path_name"] = config["config"][first]["path_name"]
        return json.dumps(config).encode()

    twice = tmp_path / "twice.pt2"
    _rewrite_zip(good, twice, {"model_weights_config.json": list_twice})
    with pytest.raises(ModelSourceError, match="is listed twice and is refused"):
        check_pt2_archive(twice)

    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("models/model.json"))
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    at = info.header_offset + 30 + name_length + extra_length + 8  # a byte of the member's data
    data[at] ^= 0xFF
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match=r"exported program .*damaged\.pt2 is damaged \("):
        check_pt2_archive(damaged)


def test_a_torchscript_path_that_is_not_torchscript(tmp_path, digits, digit_images):
    path = tmp_path / "state_dict.pt"
    torch.save(_digits_model("digits_cnn", digit_images).state_dict(), path)
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("torchscript", str(path)), digits)
    text = str(error.value)
    assert str(path) in text and "is not a TorchScript file" in text and "torch.jit.save" in text


def test_a_pickled_mlflow_model_is_refused_without_running_it(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images)
    example = _expected_input(digit_images[:2], digits.mean, digits.std).numpy()
    folder = _save_mlflow(model, tmp_path / "pickled_model", example, serialization_format="pickle")
    assert not (folder / "data" / "model.pt2").exists()
    marker = tmp_path / "mlflow-code-ran"
    pickled = next((folder / "data").glob("model.pt*"))
    pickled.write_bytes(_pickle(PickledCode(marker)))  # what a malicious pickled model would hold
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("mlflow", str(folder)), digits)
    text = str(error.value)
    assert str(folder) in text and "pickled" in text and "refused" in text and "pt2" in text
    assert not marker.exists()


def test_check_on_batch_catches_a_model_for_other_classes(tmp_path, digits, digit_images):
    model = _digits_model("digits_cnn", digit_images, classes=5)
    path = _export(model, _expected_input(digit_images[:2], digits.mean, digits.std), tmp_path / "five.pt2")
    source = ModelSource("exported", str(path))
    loaded = _load(source, digits)  # a program does not say how many classes it has: only running it tells
    with pytest.raises(ModelSourceError) as error:
        check_on_batch(loaded, digit_images[:2], digits.num_classes, source.describe())
    text = str(error.value)
    assert str(path) in text and "gives 5 classes, but the data has 10" in text


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        pytest.param("exported", "x.size()[1] == 3", id="exported"),  # the program's guard on the channels
        pytest.param(
            "torchscript",
            "to have 3 channels, but got 1 channels",
            id="torchscript",
        ),
    ],
)
def test_check_on_batch_catches_an_rgb_model_on_grey_digits(tmp_path, digits, digit_images, rgb_images, kind, says):
    model = _settled(build_model("torchvision:resnet18", 10), _expected_input(rgb_images, *IMAGENET))
    example = _expected_input(rgb_images[:2], *IMAGENET)
    if kind == "exported":
        path = _export(model, example, tmp_path / "resnet18.pt2")
    else:
        path = tmp_path / "resnet18_traced.pt"
        torch.jit.save(torch.jit.trace(model, example), str(path))
    source = ModelSource(kind, str(path))
    loaded = _load(source, digits)  # neither file says what input it takes: only running it tells
    with pytest.raises(ModelSourceError) as error:
        check_on_batch(loaded, digit_images[:2], digits.num_classes, source.describe())
    text = str(error.value)
    assert str(path) in text and "does not run on the data's images: [2, 1, 8, 8] uint8" in text
    assert says in text  # what the model expected


def test_torchvision_weights_for_grey_digits_are_refused_when_built(tmp_path, digits):
    path = tmp_path / "resnet18.pt"
    torch.save(build_model("torchvision:resnet18", 10).state_dict(), path)
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("model", str(path), "torchvision:resnet18"), digits)
    text = str(error.value)
    assert str(path) in text and "torchvision models take 3 input channels; got in_channels = 1" in text


def test_timm_names_without_timm_name_the_extra(tmp_path, digits, monkeypatch):
    path = tmp_path / "resnet10t.pt"
    torch.save({}, path)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, as when not installed
    with pytest.raises(ModelSourceError) as error:
        _load(ModelSource("model", str(path), "timm:resnet10t"), digits)
    assert str(path) in str(error.value) and 'pip install "ray-aekd[timm]"' in str(error.value)
    with pytest.raises(ConfigError) as config_error:
        from_dict(DistillTeacher, {"name": "t", "model": "timm:resnet10t", "weights": str(path)}, "teachers.0")
    assert str(config_error.value).startswith("teachers.0.model: ")
    assert "ray-aekd[timm]" in str(config_error.value)


TEACHER_CONFIG_ERRORS = [  # (id, teachers.0 in YAML, the start of the message, a part of what is allowed)
    ("none-of-the-keys", "{name: a}", "teachers.0: got 'a with none of them'; allowed: exactly one of checkpoint",
     "torchscript (a TorchScript file)"),
    ("two-of-the-keys", "{name: a, checkpoint: ck, exported: a.pt2}",
     "teachers.0: got 'a with checkpoint, exported'; allowed: exactly one of checkpoint", "exported (a torch.export"),
    ("model-without-weights", "{name: a, model: digits_cnn}", "teachers.0.weights: got None; allowed: ",
     "model and weights together"),
    ("weights-without-model", "{name: a, weights: w.pt}", "teachers.0.model: got None; allowed: ",
     "model and weights together"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("teacher", "start", "allowed"), [c[1:] for c in TEACHER_CONFIG_ERRORS], ids=[c[0] for c in TEACHER_CONFIG_ERRORS]
)
def test_teacher_config_errors(teacher, start, allowed):
    with pytest.raises(ConfigError) as error:
        load_config(DistillConfig, SMOKE, [f"teachers=[{teacher}, {{name: b, checkpoint: ck_b}}]"])
    text = str(error.value)
    assert text.startswith(start), text
    assert allowed in text and "\n" not in text


# ---------------------------------------------------------------------------------------------
# 3. the driver's checks (prepare) on a distillation config


def _config(tmp_path: Path, teachers: list[str]) -> DistillConfig:
    """distill_smoke.yaml (digits) with these teachers (YAML mappings), paths resolved."""
    config = load_config(
        DistillConfig,
        SMOKE,
        [
            f"teachers=[{', '.join(teachers)}]",
            f"output_dir={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    return resolve_paths(config, tmp_path / "runs" / "run")


def test_a_missing_local_mlflow_folder_is_named_as_missing(tmp_path, monkeypatch, digits):
    """A local MLflow model folder is read where it is (no download); a missing one is named."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = tmp_path / "no_such_model"
    config = _config(tmp_path, [f"{{name: a, mlflow: '{missing}'}}", "{name: b, checkpoint: ck_b}"])
    with pytest.raises(ValueError) as error:
        check_run(config, digits, 1000)
    text = str(error.value)
    assert text.startswith("teachers.0.mlflow: teacher 'a': ") and str(missing) in text
    assert "does not exist" in text and "\n" not in text
    assert not (tmp_path / "runs").exists()


def test_a_refused_mlflow_teacher_leaves_no_run_folder(tmp_path, monkeypatch):
    """An MLflow URI that does not resolve is one error, and the folder made for its download is
    removed: a bad input leaves no run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="teachers.0.mlflow: teacher 'a': cannot download 'models:/nobody@champion'"):
        _config(tmp_path, ["{name: a, mlflow: 'models:/nobody@champion'}", "{name: b, checkpoint: ck_b}"])
    assert not (tmp_path / "runs").exists(), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_check_run_refuses_a_teacher_for_other_class_names(tmp_path, monkeypatch, digits, digit_images):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    x = _expected_input(digit_images[:2], digits.mean, digits.std)
    letters = [chr(ord("a") + i) for i in range(10)]
    good = _export(_digits_model("digits_cnn", digit_images), x, tmp_path / "digits.pt2",
                   extra={EXTRA_FILE: json.dumps({"class_names": list(digits.class_names)})})  # fmt: skip
    other = _export(_digits_model("digits_cnn", digit_images), x, tmp_path / "letters.pt2",
                    extra={EXTRA_FILE: json.dumps({"class_names": letters})})  # fmt: skip
    config = _config(tmp_path, [f"{{name: good, exported: '{good}'}}", f"{{name: letters, exported: '{other}'}}"])
    with pytest.raises(ValueError) as error:
        check_run(config, digits, num_train=len(digits) * 4 // 5)
    text = str(error.value)
    assert text.startswith(f"teachers.1.exported: teacher 'letters': exported program {other} was trained on classes ")
    assert "[a, b, c, d, e, f, ...] (10)" in text  # the teacher's classes
    assert "but the data has [0, 1, 2, 3, 4, 5, ...] (10)" in text  # the data's
    # the same teacher alone, through load_teacher
    with pytest.raises(ValueError, match=r"trained on classes \[a, b, c"):
        load_teacher(config.teachers[1], digits, "teachers.1.exported")


def test_check_run_with_three_kinds_of_teacher(tmp_path, monkeypatch, digits, digit_images):
    """Weights, an exported program and an MLflow folder pass the driver's checks; the time
    they take is printed (``pytest -s``), not asserted."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    x = _expected_input(digit_images[:2], digits.mean, digits.std)
    weights = tmp_path / "cnn.safetensors"
    safetensors.torch.save_file(_digits_model("digits_cnn", digit_images).state_dict(), str(weights))
    program = _export(_digits_model("digits_mlp", digit_images), x, tmp_path / "mlp.pt2")
    folder = _save_mlflow(_digits_model("digits_cnn", digit_images), tmp_path / "mlflow_cnn", x.numpy())
    started = time.perf_counter()
    config = _config(
        tmp_path,
        [
            f"{{name: weights, model: digits_cnn, weights: '{weights}'}}",
            f"{{name: program, exported: '{program}'}}",
            f"{{name: mlflow, mlflow: '{folder}'}}",
        ],
    )
    resolved = time.perf_counter()
    info = check_run(config, digits, num_train=len(digits) * 4 // 5)
    checked = time.perf_counter()
    print(
        f"\nresolve_paths (copies the MLflow folder): {resolved - started:.3f} s; "
        f"check_run for 3 teachers (weights, exported, mlflow) on digits: {checked - resolved:.3f} s"
    )
    assert [t.source_kind for t in config.teachers] == ["model", "exported", "mlflow"]
    assert (Path(config.teachers[2].mlflow) / "data" / "model.pt2").is_file()
    assert info["num_classes"] == 10 and info["class_names"] == list(digits.class_names)
    assert info["input_shape"] == [1, 8, 8]


def test_a_changed_preprocess_is_another_teacher_for_caches_and_resumes():
    """A soft-label cache or a resumed run must not reuse logits made with other preprocessing:
    the teacher's identity carries its kind and preprocessing, except for a checkpoint using its
    own statistics (whose identity stays what caches made before teacher sources recorded)."""
    from ray_aekd.distributed.pipeline import TeacherStageSpec
    from ray_aekd.distributed.soft_labels import teacher_identity

    def identity(kind: str, declared: Preprocess | None, used: Preprocess) -> dict:
        key = {"checkpoint": "checkpoint", "exported": "exported"}[kind]
        data = {"name": "t", key: "/m"}
        if declared is not None:
            data["preprocess"] = {"mean": list(declared.mean), "std": list(declared.std), "size": declared.size}
        teacher = from_dict(DistillTeacher, data)
        spec = TeacherStageSpec(name="t", source=ModelSource(kind, "/m", preprocess=used), weights_sha256="abc")
        return teacher_identity(teacher, spec)

    own = Preprocess((0.3,), (0.4,))
    assert identity("checkpoint", None, own) == {"name": "t", "weights_sha256": "abc"}
    declared = Preprocess((0.5,), (0.5,), 16)
    assert identity("checkpoint", declared, declared) != identity("checkpoint", None, own)
    assert identity("exported", None, own) != identity("exported", None, Preprocess((0.3,), (0.5,)))
    assert identity("exported", None, own)["preprocess"] == [[0.3], [0.4], None]
