"""Distil your own models, measured: a torchvision state dict (ImageNet normalisation, 32 px) and
a torch.export program (its own normalisation, 16 px) as teachers on an image folder; the student
scored on a separate held-out folder by ``ray-aekd evaluate`` (checkpoint and MLflow model) and by
``mlflow.pyfunc`` on raw [0, 1] images; how long the teacher checks take; how fast a teacher for
the wrong number of classes is refused by the installed ``ray-aekd``.

    python benchmarks/own_models.py --out /tmp/own_models --json own_models.json

Data: scikit-learn's digits written as 16 x 16 RGB PNGs (train 75%, held-out 25%, split seed 1).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_own_models import IMAGENET, _train, _write_folder  # noqa: E402 - the test's own helpers

from ray_aekd.config import DistillConfig, load_config  # noqa: E402
from ray_aekd.data.sources import ImageFolderSource, digits_source  # noqa: E402
from ray_aekd.data.views import split_indices  # noqa: E402
from ray_aekd.models import build_model  # noqa: E402
from ray_aekd.models.preprocess import Preprocess  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/ray_aekd_own_models")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--resnet-lr", type=float, default=0.01, help="the resnet teacher's SGD learning rate")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    source = digits_source()
    train_idx, held_idx = split_indices(len(source), 0.25, seed=1)
    train_dir = _write_folder(root / "train", source.images[train_idx], source.labels[train_idx])
    held_dir = _write_folder(root / "held_out", source.images[held_idx], source.labels[held_idx])
    folder = ImageFolderSource(train_dir)
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    labels = torch.tensor([folder[i][1] for i in range(len(folder))])

    resnet_pre = Preprocess(*IMAGENET, size=32)
    resnet = _train(
        build_model("torchvision:resnet18", 10), resnet_pre(images), labels, args.teacher_epochs, 0, args.resnet_lr
    )
    torch.save(resnet.state_dict(), root / "resnet18.pth")
    wrong = build_model("torchvision:resnet18", 5)
    torch.save(wrong.state_dict(), root / "resnet18_5classes.pth")
    cnn_pre = Preprocess((0.2, 0.2, 0.2), (0.35, 0.35, 0.35))
    cnn = _train(build_model("small_cnn8", 10), cnn_pre(images), labels, 2 * args.teacher_epochs, 1)
    program = torch.export.export(cnn, (cnn_pre(images[:4]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(root / "cnn.pt2"))

    mean, std = IMAGENET
    teachers = (
        f"teachers=[{{name: resnet, model: 'torchvision:resnet18', weights: '{root / 'resnet18.pth'}', "
        f"preprocess: {{mean: {list(mean)}, std: {list(std)}, size: 32}}}}, "
        f"{{name: cnn, exported: '{root / 'cnn.pt2'}', "
        "preprocess: {mean: [0.2, 0.2, 0.2], std: [0.35, 0.35, 0.35]}}]"
    )
    overrides = [teachers, "name=own", f"output_dir={root / 'runs'}", "data.dataset=imagefolder",
                 f"data.path={train_dir}", "student.model=small_cnn8", f"train.epochs={args.student_epochs}",
                 "train.batch_size=64", "workers.num_workers=0", "tracking.register_model=own-student",
                 "tracking.experiment=own-models"]  # fmt: skip
    config = load_config(DistillConfig, SMOKE, overrides)

    from ray_aekd.distributed.prepare import check_run, resolve_paths

    resolved = resolve_paths(config, root / "runs" / "own")
    data = ImageFolderSource(train_dir)
    started = time.perf_counter()
    check_run(resolved, data, len(config.data.split(len(data), 0)[0]))
    check_seconds = time.perf_counter() - started

    ray_aekd = str(Path(sys.executable).parent / "ray-aekd")
    yaml_file = root / "wrong.yaml"
    yaml_file.write_text(SMOKE.read_text())
    wrong_teacher = f"[{{name: wrong, model: 'torchvision:resnet18', weights: '{root / 'resnet18_5classes.pth'}'}}]"
    started = time.perf_counter()
    proc = subprocess.run(
        [ray_aekd, "distill", "--config", str(yaml_file), "--set", "data.dataset=imagefolder", "--set",
         f"data.path={train_dir}", "--set", f"output_dir={root / 'runs'}", "--set", "student.model=small_cnn8",
         "--set", f"teachers={wrong_teacher}",
         "--set", "distill.strategy=average"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    refuse_seconds = time.perf_counter() - started

    import os

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    from ray_aekd.distributed.distill import distill

    result = distill(config, log=print)
    scores = {}
    for label, model in (("checkpoint", result.student_checkpoint), ("mlflow", "models:/own-student/1")):
        out = subprocess.run([ray_aekd, "evaluate", "--model", model, "--data", f"imagefolder:{held_dir}", "--json"],
                             capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
        scores[label] = json.loads(out.stdout)
    import mlflow.pyfunc

    held = ImageFolderSource(held_dir)
    raw = torch.stack([held[i][0] for i in range(len(held))]).float().numpy() / 255.0
    truth = np.array([held[i][1] for i in range(len(held))])
    predicted = np.asarray(mlflow.pyfunc.load_model("models:/own-student/1").predict(raw)).argmax(-1)
    report = {
        "teachers_val_acc1": result.teachers,
        "ensemble_val_acc1": result.ensemble_acc1,
        "student_val_acc1": result.metrics["val/acc1"],
        "held_out_samples": len(held),
        "held_out_acc1_evaluate_checkpoint": scores["checkpoint"]["acc1"],
        "held_out_acc1_evaluate_mlflow": scores["mlflow"]["acc1"],
        "held_out_acc1_pyfunc": float((predicted == truth).mean()),
        "held_out_ece": scores["checkpoint"]["ece"],
        "held_out_nll": scores["checkpoint"]["nll"],
        "teacher_check_seconds": check_seconds,
        "wrong_classes_refused_exit_code": proc.returncode,
        "wrong_classes_refused_seconds": refuse_seconds,
        "wrong_classes_message": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
        "distill_seconds": result.seconds,
        "teacher_epochs": args.teacher_epochs,
        "resnet_lr": args.resnet_lr,
        "student_epochs": args.student_epochs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
