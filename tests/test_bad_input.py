"""The bad-input catalogue (docs/bad_input.md): every case stops with exit code 2 and one line
that names the key, the bad value and what is allowed, before Ray starts, before the run folder
or an MLflow store is made.

Most cases call ``ray_aekd.cli.main`` in this process (the same code path as the console script,
without paying ~5 s of imports per case) with ``ray.init``, ``ray.cluster_resources`` and
``ray.nodes`` made to fail the test if anything reaches for the cluster. Two run the installed
``ray-aekd`` in a subprocess: a teacher checkpoint holding pickled code (the real entry point
must refuse it without running it) and more GPUs than the cluster has (that check needs Ray up).
NaN or Inf in teacher logits stops a running job, so it is tested with the faults (test_faults.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import ray
import torch
from PIL import Image
from test_package import RAY_AEKD

from ray_aekd import cli
from ray_aekd.models import build_model
from ray_aekd.models.checkpoint import CheckpointMetadata, save_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"
SMOKE = str(CONFIGS / "distill_smoke.yaml")  # two teachers (M = 2), two workers, batch 128


class PickledCode:
    """Unpickling this runs ``touch <marker>``: what a malicious weights.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(root: Path, name: str, arch: str = "digits_mlp", classes: int = 10, shape=(1, 8, 8)) -> Path:
    path = root / name
    meta = CheckpointMetadata(arch, classes, shape, (0.3,) * shape[0], (0.4,) * shape[0], "digits")
    save_checkpoint(str(path), build_model(arch, classes, in_channels=shape[0]), meta)
    return path


def _replace_weights(path: Path, payload: object) -> None:
    """Make ``path`` a format-1 checkpoint (weights.pt, a torch file, as before safetensors) holding
    ``payload``, its hash in metadata.json: only the content check can refuse it."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    (path / "weights.safetensors").unlink()
    (path / "weights.pt").write_bytes(buffer.getvalue())
    meta = json.loads((path / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    meta["format_version"] = 1
    (path / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Untrained teacher checkpoints (their accuracy does not matter here), damaged ones, and
    image folders: ``{name: path}``; ``marker`` is the file the pickled code would create."""
    root = tmp_path_factory.mktemp("bad_inputs")
    out = {"a": _checkpoint(root, "a"), "b": _checkpoint(root, "b", "digits_cnn")}
    truncated = _checkpoint(root, "truncated")
    weights = truncated / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])  # a copy cut short
    pickled = _checkpoint(root, "pickled")
    out["marker"] = root / "pickled-code-ran"
    _replace_weights(pickled, {**build_model("digits_mlp", 10, in_channels=1).state_dict(),
                               "x": PickledCode(out["marker"])})  # fmt: skip
    other_arch = _checkpoint(root, "other_arch", "digits_cnn")
    _replace_weights(other_arch, build_model("digits_mlp", 10, in_channels=1).state_dict())
    non_finite = _checkpoint(root, "non_finite")
    state = build_model("digits_mlp", 10, in_channels=1).state_dict()
    state["head.weight"][0, 0] = float("nan")
    _replace_weights(non_finite, state)
    bad_meta = _checkpoint(root, "bad_metadata")
    meta = json.loads((bad_meta / "metadata.json").read_text())
    (bad_meta / "metadata.json").write_text(json.dumps(meta | {"num_classes": "ten"}))
    out["bad_metadata"] = bad_meta
    out |= {"truncated": truncated, "pickled": pickled, "other_arch": other_arch, "non_finite": non_finite}
    out["classes5"] = _checkpoint(root, "classes5", classes=5)
    out["rgb32"] = _checkpoint(root, "rgb32", "resnet8", shape=(3, 32, 32))
    out["empty"] = root / "empty_folder"
    out["empty"].mkdir()
    out["no_images"] = root / "no_images"
    (out["no_images"] / "cat").mkdir(parents=True)
    (out["no_images"] / "cat" / "notes.txt").write_text("not an image")
    out["broken_image"] = root / "broken_image"
    for label in ("cat", "dog"):
        (out["broken_image"] / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(out["broken_image"] / label / "1.png")
    (out["broken_image"] / "cat" / "0.png").write_bytes(b"this is not a png")  # sorted first
    out["missing"] = root / "does_not_exist"
    overflow = build_model("digits_mlp", 10, in_channels=1)
    with torch.no_grad():
        for parameter in overflow.parameters():
            parameter.mul_(1e30)  # finite weights whose logits overflow to Inf on any image
    meta = CheckpointMetadata("digits_mlp", 10, (1, 8, 8), (0.3,), (0.4,), "digits")
    save_checkpoint(str(root / "overflow"), overflow, meta)
    out["overflow"] = root / "overflow"
    # teachers given as a state dict or an exported program
    out["weights5"] = root / "digits_mlp_5_classes.pt"
    torch.save(build_model("digits_mlp", 5, in_channels=1).state_dict(), out["weights5"])
    fixed = torch.export.export(build_model("digits_mlp", 10, in_channels=1).eval(), (torch.zeros(2, 1, 8, 8),))
    out["fixed_batch"] = root / "fixed_batch.pt2"
    torch.export.save(fixed, str(out["fixed_batch"]))
    rgb = torch.export.export(build_model("resnet8", 10).eval(), (torch.zeros(2, 3, 32, 32),),
                              dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    out["rgb_pt2"] = root / "rgb.pt2"
    torch.export.save(rgb, str(out["rgb_pt2"]))
    return {k: str(v) for k, v in out.items()}


def _fill(text: str, inputs: dict[str, str]) -> str:
    """``text`` with each ``{name}`` of ``inputs`` replaced by its path (YAML's braces stay)."""
    for name, path in inputs.items():
        text = text.replace("{" + name + "}", path)
    return text


def _teachers(a: str = "{a}", b: str = "{b}", names=("a", "b")) -> str:
    return f"teachers=[{{name: {names[0]}, checkpoint: '{a}'}}, {{name: {names[1]}, checkpoint: '{b}'}}]"


@pytest.fixture
def refuse(tmp_path, monkeypatch, capsys, inputs):
    """``refuse(command, config, *sets) -> message``: runs ``ray-aekd`` in this process, asserts
    exit code 2, one line on stderr without a traceback, Ray untouched, no run folder or MLflow
    store made; returns the message after ``ray-aekd <command>: error: ``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def touched(*args, **kwargs):
        pytest.fail("the bad input reached the Ray cluster")  # pytest's Failed is no ValueError: not caught

    for name in ("init", "cluster_resources", "nodes"):
        monkeypatch.setattr(ray, name, touched)

    def run(command: str, config: str, *sets: str) -> str:
        ray_before = ray.is_initialized()
        overrides = [f"output_dir={tmp_path / 'out'}", *sets]
        argv = [command, "--config", config, *[a for s in overrides for a in ("--set", _fill(s, inputs))]]
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert ray.is_initialized() == ray_before
        made = {p.name for p in tmp_path.iterdir()} & {"out", "runs", "mlflow.db", "mlruns"}
        assert not made, f"{made} made for a bad input"
        prefix = f"ray-aekd {command}: error: "
        assert err.startswith(prefix), err
        return err[len(prefix) :].strip()

    return run


DISTILL = [  # (id, --set overrides of distill_smoke.yaml, the message or the parts of it that must be there)
    ("tolerance-below-1/M", ["distill.tolerance=0.3"],
     "distill.tolerance: got 0.3; allowed: a number in [1/M, 1] = [0.5, 1] for M = 2 teachers."),
    (
        "tolerance-above-1",
        ["distill.tolerance=1.5"],
        "distill.tolerance: got 1.5; allowed: a number in [1/M, 1] = [0.5, 1] for M = 2 teachers.",
    ),
    ("temperature-zero", ["distill.temperature=0"], "distill.temperature: got 0.0; allowed: a finite number > 0."),
    ("cache-mode-unknown", ["cache.mode=disk"], "cache.mode: got 'disk'; allowed: auto, memory, stream."),
    ("cache-mode-memory-with-a-new-view-every-epoch", ["cache.mode=memory"],
     ("cache.mode: got 'memory'; allowed: auto or stream when every epoch sees a new view (data.views is null and "
      "data.augment is true): memory keeps data.views views, so set data.views.")),
    ("temperature-negative", ["distill.temperature=-2"],
     "distill.temperature: got -2.0; allowed: a finite number > 0."),
    ("temperature-inf", ["distill.temperature=.inf"], "distill.temperature: got inf; allowed: a finite number > 0."),
    ("no-teachers", ["teachers=[]"], "teachers: got []; allowed: a list of at least one teacher."),
    ("duplicate-teacher-names", [_teachers(names=("a", "a"))],
     "teachers: got ['a']; allowed: unique teacher names (these repeat)."),
    ("checkpoint-missing", [_teachers(b="{missing}")],
     ("teachers.1.checkpoint: teacher 'b': "
      "{missing} is not a ray_aekd checkpoint: metadata.json is missing (the path does not "
      "exist); allowed: a ray_aekd checkpoint (a folder or URI holding metadata.json and the tensors-only weights "
      "file (weights.safetensors, or weights.pt before version 2)")),
    ("checkpoint-truncated", [_teachers(b="{truncated}")],
     ("teachers.1.checkpoint: teacher 'b': "
      "{truncated} is damaged: weights.safetensors does not match the hash in metadata.json "
      "(truncated or altered;", "; allowed: a ray_aekd checkpoint (")),
    ("checkpoint-pickled-code", [_teachers(b="{pickled}")],
     ("teachers.1.checkpoint: teacher 'b': "
      "{pickled} is unsafe: weights.pt holds more than tensors and is refused (nothing was "
      "unpickled; ", "GLOBAL", "; allowed: a ray_aekd checkpoint (")),
    ("checkpoint-weights-of-another-model", [_teachers(b="{other_arch}")],
     ("teachers.1.checkpoint: teacher 'b': "
      "{other_arch} does not load: its weights do not fit architecture 'digits_cnn' (",
      "tensors it needs are missing, e.g. 'conv1.0.weight'", "; allowed: a ray_aekd checkpoint (")),
    ("checkpoint-metadata-of-the-wrong-type", [_teachers(b="{bad_metadata}")],
     ("teachers.1.checkpoint: teacher 'b': "
      "{bad_metadata} is not a ray_aekd checkpoint: metadata.json has num_classes = 'ten' "
      "(expected an integer >= 1); allowed: a ray_aekd checkpoint (")),
    ("checkpoint-nan-weights", [_teachers(b="{non_finite}")],
     ("teachers.1.checkpoint: teacher 'b': {non_finite} is damaged: its tensor 'head.weight' holds NaN or Inf; "
      "allowed: a ray_aekd checkpoint (")),
    ("teacher-other-classes", [_teachers(b="{classes5}")],
     "teachers.1.checkpoint: 'b' was trained for 5 classes and inputs [1, 8, 8], but digits has 10 classes and "
     "inputs [1, 8, 8]; allowed: a teacher trained for 10 classes and inputs [1, 8, 8] (the teachers and the "
     "student read the same images)."),
    ("teacher-with-non-finite-logits", [_teachers(b="{overflow}")],
     ("teachers.1.checkpoint: teacher 'b': checkpoint {overflow} returned NaN or Inf logits on the data's first "
      "images; allowed: a ray_aekd checkpoint (")),
    ("teacher-without-a-source", ["teachers=[{name: a}, {name: b, checkpoint: '{b}'}]"],
     "teachers.0: got 'a with none of them'; allowed: exactly one of checkpoint (a ray_aekd checkpoint folder or URI), "
     "model + weights (an architecture and a .pt/.pth/.safetensors state dict), exported (a torch.export .pt2 "
     "program), torchscript (a TorchScript file) or mlflow (models:/<name>@<alias>, models:/<model id>, "
     "runs:/<run id>/<path>)."),
    ("teacher-with-two-sources", ["teachers=[{name: a, checkpoint: '{a}', exported: '{a}'}, "
                                  "{name: b, checkpoint: '{b}'}]"],
     "teachers.0: got 'a with checkpoint, exported'; allowed: exactly one of checkpoint ("),
    ("teacher-model-without-weights", ["teachers=[{name: a, model: digits_mlp}, {name: b, checkpoint: '{b}'}]"],
     "teachers.0.weights: got None; allowed: model and weights together: the architecture and its state dict file."),
    ("teacher-weights-missing", ["teachers=[{name: a, model: digits_mlp, weights: '{missing}.pt'}, "
                                 "{name: b, checkpoint: '{b}'}]"],
     "teachers.0.weights: teacher 'a': "
     "weights {missing}.pt (digits_mlp): the path does not exist; allowed: a state dict (.pt/.pth "
     "of tensors only, or .safetensors) that fits the architecture named by model, for the data's classes."),
    ("teacher-weights-for-other-classes", ["teachers=[{name: a, model: digits_mlp, weights: '{weights5}'}, "
                                           "{name: b, checkpoint: '{b}'}]"],
     ("teachers.0.weights: teacher 'a': "
      "weights {weights5} (digits_mlp) does not fit digits_mlp: 2 of another shape, first "
      "'head.weight' [5, 128] for [10, 128]; the weights are for 5 classes, the data has 10; allowed: a state dict")),
    ("teacher-exported-with-a-fixed-batch", ["teachers=[{name: a, exported: '{fixed_batch}'}, "
                                             "{name: b, checkpoint: '{b}'}]"],
     ("teachers.0.exported: teacher 'a': "
      "exported program {fixed_batch} was exported for a fixed batch of 2; expected a dynamic "
      "batch dimension")),
    ("teacher-exported-for-other-images", ["teachers=[{name: a, exported: '{rgb_pt2}'}, "
                                           "{name: b, checkpoint: '{b}'}]"],
     ("teachers.0.exported: teacher 'a': exported program {rgb_pt2} does not run on the data's images: "
      "[2, 1, 8, 8] uint8, mean [0.3], std [0.4] (", "; allowed: a torch.export program")),
    ("teacher-other-input-shape", [_teachers(a="{rgb32}")],
     "teachers.0.checkpoint: 'a' was trained for 10 classes and inputs [3, 32, 32], but digits has 10 classes and "
     "inputs [1, 8, 8]; allowed: a teacher trained for 10 classes and inputs [1, 8, 8]"),
    ("student-other-input-shape", ["student.model=vgg8"],
     ("student.model: got 'vgg8', which does not run on digits images of shape [1, 8, 8] (",
      "; allowed: a model that takes [1, 8, 8] inputs")),
    ("unknown-student-model", ["student.model=resnet21"],
     "student.model: Unknown model 'resnet21'. Valid models: resnet8, resnet14,"),
    ("unknown-strategy", ["distill.strategy=best"],
     "distill.strategy: got 'best'; allowed: average, aekd, mgda, upgrad, authors_svm, fixed, none."),
    ("worker-gpu-share-with-two-workers", ["workers.gpus=0.5"],
     "workers.gpus: got 0.5; allowed: 0 or 1 with more than one worker (NCCL cannot run two ranks on one GPU); a "
     "share in (0, 1) only with num_workers: 1, to leave the rest of the GPU to teacher actors."),
    ("worker-gpus-above-one", ["workers.gpus=2"],
     "workers.gpus: got 2.0; allowed: 0 (CPU), 1 (one GPU per worker), or a share in (0, 1) with num_workers: 1."),
    ("fixed-weights-missing", ["distill.strategy=fixed"],
     "distill.fixed_weights: got None; allowed: 2 numbers >= 0 that sum to 1, one per teacher in the order of "
     "teachers."),
    ("fixed-weights-bad-sum", ["distill.strategy=fixed", "distill.fixed_weights=[0.6, 0.6]"],
     "distill.fixed_weights: got [0.6, 0.6]; allowed: 2 numbers >= 0 that sum to 1, one per teacher"),
    ("fixed-weights-without-fixed", ["distill.fixed_weights=[0.6, 0.4]"],
     "distill.fixed_weights: got [0.6, 0.4]; allowed: null unless distill.strategy is fixed."),
    ("unknown-dataset", ["data.dataset=mnist"],
     "data.dataset: got 'mnist'; allowed: digits, cifar10, cifar100, imagefolder."),
    ("unknown-key", ["trian.epochs=2"], "config: unknown key(s) trian; allowed: teachers, student, distill, data,"),
    ("unknown-nested-key", ["distill.tolerence=0.5"],
     "distill: unknown key(s) tolerence; allowed: strategy, tolerance, temperature,"),
    ("string-for-an-int", ["train.epochs=two"], "train.epochs: got 'two'; allowed: an integer."),
    ("float-for-an-int", ["workers.num_workers=1.5"], "workers.num_workers: got 1.5; allowed: an integer."),
    ("string-for-a-number", ["train.lr=fast"], "train.lr: got 'fast'; allowed: a number."),
    ("string-for-a-bool", ["data.augment=maybe"], "data.augment: got 'maybe'; allowed: true or false."),
    ("string-for-a-list", ["teachers=abc"], "teachers: got 'abc'; allowed: a list."),
    ("list-for-a-mapping", ["data=[1, 2]"], "data: got [1, 2]; allowed: a mapping of dataset, path, download,"),
    ("list-for-a-resource-mapping", ["teachers.0.custom_resources=[1]"],
     "teachers.0.custom_resources: got [1]; allowed: a mapping."),
    ("batch-smaller-than-workers", ["train.batch_size=1"],
     "train.batch_size: got 1; allowed: a multiple of workers.num_workers = 2, so at least 2 (it is the global "
     "batch, split evenly across workers)."),
    ("data-path-not-given", ["data.dataset=imagefolder"],
     "data.path: got None; allowed: a folder for dataset 'imagefolder'."),
    ("data-path-missing", ["data.dataset=imagefolder", "data.path={missing}"],
     "data.path: got '{missing}', which does not exist or is not a directory; allowed: a folder of class folders "
     "holding images (root/<class>/<image>) for dataset imagefolder."),
    ("data-path-empty-folder", ["data.dataset=imagefolder", "data.path={empty}"],
     "data.path: got '{empty}', which holds no images in class folders (Couldn't find any class folder in "
     "{empty}); allowed: a folder of class folders holding images (root/<class>/<image>) for dataset imagefolder."),
    ("data-path-class-folders-without-images", ["data.dataset=imagefolder", "data.path={no_images}"],
     ("data.path: got '{no_images}', which holds no images in class folders (Found no valid file for the classes "
      "cat.", "; allowed: a folder of class folders holding images")),
    ("data-path-unreadable-image", ["data.dataset=imagefolder", "data.path={broken_image}"],
     ("data.path: got '{broken_image}', whose first image '{broken_image}/cat/0.png' cannot be read (",
      "; allowed: a folder of class folders holding images (root/<class>/<image>) for dataset imagefolder, which "
      "PIL can decode.")),
    ("cifar-path-without-cifar", ["data.dataset=cifar10", "data.path={empty}"],
     ("data.path: cifar10 was not found under data.path '{empty}' (Dataset not found or corrupted); allowed: a "
      "folder holding the extracted 'cifar-10-batches-py/' folder (from https://", "or data.download: true")),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in DISTILL], ids=[c[0] for c in DISTILL])
def test_distill_refuses_bad_input_before_ray(refuse, inputs, overrides, message):
    text = refuse("distill", SMOKE, _teachers(), *overrides)
    for part in (message,) if isinstance(message, str) else message:
        assert _fill(part, inputs) in text
    assert not Path(inputs["marker"]).exists()  # the pickled code never ran


SWEEP = [
    ("sweep-tolerance-below-1/M", ["space={distill.tolerance: {grid: [0.2, 0.6]}}"],
     "space: the trial distill.tolerance=0.2 would be invalid: distill.tolerance: got 0.2; allowed: a number in "
     "[1/M, 1] = [0.5, 1] for M = 2 teachers."),
    ("sweep-temperature-range-below-0", ["search.algorithm=random",
                                         "space={distill.temperature: {uniform: [-1, 4]}}"],
     "space: the trial distill.temperature=-1 would be invalid: distill.temperature: got -1.0; allowed: a finite "
     "number > 0."),
    ("sweep-grid-over-a-range", ["space={train.lr: {uniform: [0.01, 0.1]}}"],
     "space.train.lr: got {'uniform': [0.01, 0.1]}; allowed: {grid: [values]} with search.algorithm grid"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in SWEEP], ids=[c[0] for c in SWEEP])
def test_sweep_refuses_a_space_that_can_produce_invalid_values(refuse, overrides, message):
    assert message in refuse("sweep", str(CONFIGS / "sweep_smoke.yaml"), *overrides)


def test_teachers_refuses_an_unknown_model(refuse):
    text = refuse("teachers", str(CONFIGS / "teachers_smoke.yaml"), "teachers.0.model=resnet21")
    assert text.startswith("teachers.0.model: Unknown model 'resnet21'. Valid models: resnet8, resnet14,")


def test_a_missing_config_file(refuse):
    assert refuse("distill", "no_such_config.yaml") == "config file 'no_such_config.yaml' does not exist."


def _cli(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    argv = [RAY_AEKD, *args, "--set", f"output_dir={tmp_path / 'out'}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


def test_the_console_script_refuses_pickled_code_without_running_it(inputs, tmp_path):
    proc = _cli(tmp_path, "distill", "--config", SMOKE, "--set", _fill(_teachers(b="{pickled}"), inputs), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    expected = f"teachers.1.checkpoint: teacher 'b': {inputs['pickled']} is unsafe: weights.pt holds more than tensors"
    assert expected in proc.stderr
    assert not Path(inputs["marker"]).exists()
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir())  # no run folder, no mlflow.db


@pytest.fixture(scope="module")
def gpu_run(inputs, tmp_path_factory) -> subprocess.CompletedProcess:
    """``ray-aekd distill`` asking one GPU for teacher a, on this GPU-less machine, with no cluster
    in RAY_ADDRESS: refused before a local Ray starts. In a subprocess with a timeout (a hang fails
    the test). With Ray running, tests/test_placement.py checks the same request against its nodes."""
    sets = [_fill(_teachers(), inputs), f"teachers.0.gpus={torch.cuda.device_count() + 1}"]
    tmp_path = tmp_path_factory.mktemp("gpu")
    return _cli(tmp_path, "distill", "--config", SMOKE, *[a for s in sets for a in ("--set", s)], timeout=180)


def test_more_gpus_than_the_cluster_has_is_an_error_not_a_hang(gpu_run):
    assert gpu_run.returncode == 2 and "Traceback" not in gpu_run.stderr, gpu_run.stderr
    error = [line for line in gpu_run.stderr.splitlines() if "error:" in line]
    have = torch.cuda.device_count()
    assert error == [
        f"ray-aekd distill: error: teachers.0.gpus: got {have + 1}; allowed: GPUs this machine has ({have}; the "
        f"run would need {have + 1}), since no RAY_ADDRESS names a cluster: set it to 0 (teachers.<i>.gpus, "
        "workers.gpus) to run on CPU, or submit the run to a cluster with GPUs."
    ]
    assert "Started a local Ray instance" not in gpu_run.stderr + gpu_run.stdout  # refused before Ray started
