"""Distil your own models (issue 16): teachers that ray_aekd did not train, a student that works
outside it, and ``ray-aekd evaluate`` / ``export`` / ``compare --promote``.

One end-to-end run on the shared local Ray (Train's local mode, one epoch): an image folder of
real digits (upsampled to 16 x 16 RGB PNGs), a ``torchvision:resnet18`` teacher given as a
state dict with its own normalisation and resolution, and a ``torch.export`` program teacher.
The student's MLflow model, fed raw ``[0, 1]`` images, must give exactly the predictions of
``ray-aekd evaluate`` on a separate image folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from test_package import RAY_AEKD

from ray_aekd import cli
from ray_aekd.config import DistillConfig, load_config
from ray_aekd.core.step import classification_epoch, make_optimizer
from ray_aekd.data.sources import digits_source
from ray_aekd.data.views import split_indices
from ray_aekd.models import build_model
from ray_aekd.models.preprocess import Preprocess, WithPreprocess

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TRAIN_IMAGES, HELD_OUT_IMAGES = 700, 300


def _write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Digits ``[N, 1, 8, 8]`` uint8 as 16 x 16 RGB PNGs under ``root/<class>/``."""
    for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[0].numpy()
        Image.fromarray(pixels).resize((16, 16), Image.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def _train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float = 0.05
) -> torch.nn.Module:
    torch.manual_seed(seed)
    optimizer, _ = make_optimizer(model, lr, 0.9, 5e-4, "constant", epochs=epochs)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        batches = ((x[order[i : i + 64]], y[order[i : i + 64]]) for i in range(0, len(y), 64))
        classification_epoch(model, batches, optimizer)
    return model.eval()


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """Two image folders (train / held-out) and two teachers trained here on the train folder's
    images: a torchvision resnet18 state dict (ImageNet normalisation, 32 x 32 input) and an
    exported small_cnn8 program (its own mean/std, 16 x 16 input)."""
    root = tmp_path_factory.mktemp("own_models")
    source = digits_source()
    train_idx, held_idx = split_indices(len(source), 0.25, seed=1)
    train_idx, held_idx = train_idx[:TRAIN_IMAGES], held_idx[:HELD_OUT_IMAGES]  # small: the suite's time budget
    train_dir = _write_folder(root / "train", source.images[train_idx], source.labels[train_idx])
    held_dir = _write_folder(root / "held_out", source.images[held_idx], source.labels[held_idx])

    from ray_aekd.data.sources import ImageFolderSource

    folder = ImageFolderSource(train_dir)
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    labels = torch.tensor([folder[i][1] for i in range(len(folder))])

    resnet_pre = Preprocess(*IMAGENET, size=32)
    resnet = _train(build_model("torchvision:resnet18", 10), resnet_pre(images), labels, epochs=2, seed=0, lr=0.01)
    weights = root / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, weights)  # DDP-style

    cnn_pre = Preprocess((0.2, 0.2, 0.2), (0.35, 0.35, 0.35))
    cnn = _train(build_model("small_cnn8", 10), cnn_pre(images), labels, epochs=4, seed=1)
    program = torch.export.export(cnn, (cnn_pre(images[:4]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = root / "cnn.pt2"
    torch.export.save(program, str(exported))
    return {"root": root, "train": train_dir, "held_out": held_dir, "weights": weights, "exported": exported,
            "resnet": resnet, "resnet_pre": resnet_pre, "cnn": cnn, "cnn_pre": cnn_pre}  # fmt: skip


def _teachers(models) -> str:
    mean, std = IMAGENET
    return (
        f"teachers=[{{name: resnet, model: 'torchvision:resnet18', weights: '{models['weights']}', "
        f"preprocess: {{mean: {list(mean)}, std: {list(std)}, size: 32}}}}, "
        f"{{name: cnn, exported: '{models['exported']}', "
        "preprocess: {mean: [0.2, 0.2, 0.2], std: [0.35, 0.35, 0.35]}}]"
    )


@pytest.mark.slow
def test_own_teachers_distil_and_the_student_works_outside(local_ray, own_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from ray_aekd.distributed.distill import distill

    config = load_config(
        DistillConfig,
        SMOKE,
        [
            _teachers(own_models),
            "name=own",
            f"output_dir={tmp_path / 'out'}",
            "data.dataset=imagefolder",
            f"data.path={own_models['train']}",
            "student.model=small_cnn8",
            "train.epochs=1",
            "train.batch_size=64",
            "workers.num_workers=0",
            "tracking.register_model=own-student",
        ],
    )
    result = distill(config, log=print)
    # each teacher ran with its own preprocessing: its accuracy on the val split is what the model
    # scores in this process with that preprocessing (one sample of slack for batch-order rounding)
    from ray_aekd.data.sources import ImageFolderSource

    train_folder = ImageFolderSource(own_models["train"])
    _, val_idx = config.data.split(len(train_folder), config.seed)
    val_images = torch.stack([train_folder[int(i)][0] for i in val_idx])
    val_labels = torch.tensor([train_folder[int(i)][1] for i in val_idx])
    with torch.inference_mode():
        for name, pre in (("resnet", "resnet_pre"), ("cnn", "cnn_pre")):
            expected = (own_models[name](own_models[pre](val_images)).argmax(-1) == val_labels).double().mean()
            assert result.teachers[name] == pytest.approx(float(expected), abs=1.01 / len(val_idx)), name

    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    # system tags and the dataset as a run input
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "imagefolder" and len(inputs[0].dataset.digest) == 16
    assert json.loads(inputs[0].dataset.profile)["train_samples"] == config.data.split(TRAIN_IMAGES, 0)[0].numel()

    # the student's MLflow model takes [0, 1] images: signature, metadata, real input example
    version = client.search_model_versions("name='own-student'")[0]
    model_uri = f"models:/own-student/{version.version}"
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 3, 16, 16], (-1, 3, 16, 16))
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 10], (-1, 10))
    assert info.metadata["class_names"] == [str(i) for i in range(10)] and info.metadata["preprocess_inside"]
    example = mlflow.models.Model.load(model_uri).load_input_example(mlflow.artifacts.download_artifacts(model_uri))
    assert float(np.min(example)) >= 0 and float(np.max(example)) <= 1 and float(np.max(example)) > 0.5

    # evaluate on the held-out folder, from the checkpoint and from the MLflow model: same numbers
    predictions = tmp_path / "predictions.csv"
    held = f"imagefolder:{own_models['held_out']}"
    proc = subprocess.run(
        [RAY_AEKD, "evaluate", "--model", result.student_checkpoint, "--data", held, "--json",
         "--predictions", str(predictions)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)
    assert scored["num_samples"] == HELD_OUT_IMAGES and set(scored["per_class"]) == {str(i) for i in range(10)}
    assert {"acc1", "acc5", "ece", "nll"} <= set(scored)  # the accuracy itself: benchmarks/own_models.py
    proc = subprocess.run([RAY_AEKD, "evaluate", "--model", model_uri, "--data", held, "--json"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["acc1"] == scored["acc1"]

    # pyfunc on raw [0, 1] images (as ToTensor gives them) predicts what evaluate printed
    from ray_aekd.data.sources import ImageFolderSource

    folder = ImageFolderSource(own_models["held_out"])
    raw = torch.stack([folder[i][0] for i in range(len(folder))]).float().numpy() / 255.0
    logits = mlflow.pyfunc.load_model(model_uri).predict(raw)
    served = np.asarray(logits).argmax(-1)
    rows = predictions.read_text().splitlines()[1:]
    assert [int(r.split(",")[2]) for r in rows] == served.tolist()
    labels = np.array([folder[i][1] for i in range(len(folder))])
    assert float((served == labels).mean()) == pytest.approx(scored["acc1"], abs=1e-9)

    # compare --promote sets the champion alias on the best run's registered version
    assert cli.main(["compare", "--experiment", "ray-aekd-smoke", "--promote", "--output-dir", str(tmp_path)]) == 0
    assert client.get_model_version_by_alias("own-student", "champion").run_id == result.mlflow_run_id


@pytest.mark.slow
def test_evaluate_logs_a_run_with_a_confusion_matrix_and_a_reliability_diagram(own_models, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    held = f"imagefolder:{own_models['held_out']}"
    mean, std = IMAGENET
    args = ["evaluate", "--model", str(own_models["weights"]), "--arch", "torchvision:resnet18", "--data", held,
            "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)), "--size", "32"]  # fmt: skip
    assert cli.main([*args, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "acc@1" in out and "per-class accuracy" in out and f"samples {HELD_OUT_IMAGES}" in out
    # the same numbers as the resnet run by hand with its preprocessing
    from ray_aekd.data.sources import ImageFolderSource

    folder = ImageFolderSource(own_models["held_out"])
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    labels = torch.tensor([folder[i][1] for i in range(len(folder))])
    with torch.inference_mode():
        expected = (own_models["resnet"](own_models["resnet_pre"](images)).argmax(-1) == labels).double().mean()
    assert f"acc@1 {float(expected):.4f}" in out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ray-aekd-eval").experiment_id])
    assert run.data.metrics["eval/acc1"] == pytest.approx(float(expected))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"confusion.png", "reliability.png",
                                                                         "evaluation.json"}  # fmt: skip
    assert run.inputs.dataset_inputs[0].tags[0].value == "evaluation"


@pytest.mark.slow
def test_export_writes_a_program_with_the_preprocessing_inside(own_models, tmp_path):
    """``ray-aekd export`` of a state dict: the .pt2 takes [0, 1] images, gives the model's logits,
    and evaluates (as a teacher source would load it) to the same accuracy."""
    output = tmp_path / "resnet.pt2"
    held = f"imagefolder:{own_models['held_out']}"
    mean, std = IMAGENET
    base = ["--model", str(own_models["weights"]), "--arch", "torchvision:resnet18", "--mean",
            ",".join(map(str, mean)), "--std", ",".join(map(str, std)), "--size", "32"]  # fmt: skip
    assert cli.main(["export", *base, "--data", held, "--output", str(output)]) == 0
    program = torch.export.load(str(output)).module()
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        expected = own_models["resnet"](own_models["resnet_pre"](x))
    torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-4)
    reference = WithPreprocess(own_models["resnet"], own_models["resnet_pre"]).eval()
    torch.testing.assert_close(program(x), reference(x), rtol=1e-4, atol=1e-4)
    # the program carries its classes and says its preprocessing is inside: evaluate needs no --mean/--std
    from ray_aekd.tracking.evaluate import evaluate_model, open_eval_data, parse_model

    data = open_eval_data(held)
    exported = evaluate_model(parse_model(str(output)), data)
    by_hand = evaluate_model(parse_model(str(own_models["weights"]), "torchvision:resnet18",
                                         own_models["resnet_pre"]), data)  # fmt: skip
    assert exported.predictions == by_hand.predictions


@pytest.mark.slow
def test_evaluate_refuses_a_model_for_other_classes(own_models, tmp_path, capsys):
    """A model that records class names other than the data's is refused, naming both."""
    from ray_aekd.models.sources import ModelSource
    from ray_aekd.tracking.evaluate import export_model, open_eval_data, parse_model

    held = open_eval_data(f"imagefolder:{own_models['held_out']}")
    renamed = held.source
    renamed.class_names = tuple(f"class_{n}" for n in renamed.class_names)  # the same images, other names
    output = tmp_path / "renamed.pt2"
    export_model(ModelSource("exported", str(own_models["exported"]), preprocess=own_models["cnn_pre"]), output, held)
    code = cli.main(["evaluate", "--model", str(output), "--data", f"imagefolder:{own_models['held_out']}"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on classes ['class_0'," in err and "but the data has ['0', '1'," in err
    assert parse_model(str(output)).kind == "exported"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "nowhere.pt2", "--data", "digits"],
            "--model: exported program nowhere.pt2: the path does not exist",
        ),
        (
            ["--model", "w.pth", "--data", "digits"],
            "--model: got 'w.pth', a weights file; allowed: a weights file with --arch",
        ),
        (["--model", "x", "--data", "mnist"], "--data: got 'mnist'; allowed: digits, cifar10:ROOT"),
        (["--model", "x", "--data", "cifar10:/nowhere"], "--data: data.path: cifar10 was not found under"),
        (["--model", "x", "--data", "digits", "--mean", "0.5"], "--mean/--std: give both"),
    ],
)
def test_evaluate_bad_input_is_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ray-aekd evaluate: error: {message}"), err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_on_digits_and_on_a_configs_validation_split(tmp_path, capsys):
    """``--data digits`` is the held-out split every digits config validates on, so it scores the
    same samples as ``--data config:distill_smoke.yaml``; ``--json`` is one object."""
    from ray_aekd.models.checkpoint import CheckpointMetadata, save_checkpoint

    source = digits_source()
    train, _ = split_indices(len(source), 0.2, seed=0)
    pre = Preprocess(source.mean, source.std)
    model = _train(build_model("digits_mlp", 10, in_channels=1), pre(source.images[train]), source.labels[train], 3, 0)
    meta = CheckpointMetadata("digits_mlp", 10, (1, 8, 8), source.mean, source.std, "digits", source.class_names)
    save_checkpoint(str(tmp_path / "mlp"), model, meta)
    results = []
    for data in ("digits", f"config:{SMOKE}"):
        assert cli.main(["evaluate", "--model", str(tmp_path / "mlp"), "--data", data, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["num_samples"] == results[1]["num_samples"] == 359
    assert results[0]["acc1"] == results[1]["acc1"] > 0.8  # a 3-epoch MLP on digits; chance is 0.1
    assert results[0]["confusion"] == results[1]["confusion"]
