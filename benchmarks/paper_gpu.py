"""The AE-KD authors' released CIFAR-100 setting on one GPU, scaled to about ten minutes, and the
product's own GPU path once. One command:

    python benchmarks/paper_gpu.py --data-root DATA [--minutes 10] [--output runs/paper_gpu/result.json]
    python benchmarks/paper_gpu.py --tiny            # CPU, seconds: synthetic 32x32 data, tiny nets

Part 1 (the paper's setting, scaled): CIFAR-100 held on the device as uint8 (random 4-pixel-padded
crop and horizontal flip done on the device, no DataLoader); three CIFAR-style ResNet-50 teachers
(torchvision's ResNet-50 with a 3x3 stride-1 stem and no max-pool) trained here with seeds 0, 4
and 9; then three CIFAR-style ResNet-18 students from one initialisation, trained in lockstep on
the same augmented batches and the same teacher logits with ``distill_step`` and the strategies
``average``, ``aekd`` (C = 0.6) and ``authors_svm`` (C = 0.6, the released OneClassSVM solver).
The recipe is the authors' (SGD 0.05, Nesterov momentum 0.9, weight decay 5e-4, batch 64,
loss 1 * CE + 0.9 * KD at T = 4, lr x0.1 at 150/180/210 of 240 epochs, here scaled to the epochs
run). Each arm reports its final test accuracy and its best over epochs (the authors' selection,
made on the test set), its seconds and steps/s, and how often the authors' solver stopped at its
starting point on that arm's real gradients, and how far its weights were from the exact ones.

Part 2 (the product's GPU path): ``ray_aekd.distributed.distill.distill`` (what ``ray-aekd
distill`` runs) twice on the same data, with the part-1 teachers saved as TorchScript: once with
the teachers as Ray Data actor pools streaming soft labels every epoch (fractional GPUs, sharing
the GPU with the student's Ray Train worker), once with the student alone (``data.views: 1``,
``cache.mode: memory``: the teachers run once before training and are gone while the student
trains). The student's samples/s in both come from the runs' ``metrics.jsonl`` and ``timings``.

Left out, on purpose: the authors' 240-epoch teachers (their checkpoints are not available
offline: the teachers here train for a few epochs), their data loader and test-time selection as
the only number (the final accuracy is reported next to it). On a GPU the networks run in bf16
autocast with channels_last; logits, losses, Gram matrices and solvers stay in float32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_aekd.core.authors import authors_svm_weights
from ray_aekd.core.step import DistillSettings, classification_epoch, distill_step, evaluate, make_optimizer
from ray_aekd.core.weighting import min_norm_weights
from ray_aekd.data import DataSourceError, augment, normalize
from ray_aekd.data.sources import cifar_source


#: The released setting (AnTuo1998/AE-KD: train_student.py, train_student.sh, setting.py,
#: helper/loops.py, helper/optimization.py).
@dataclass(frozen=True)
class Recipe:
    """The released student recipe, and the teachers' (same optimiser and schedule)."""

    dataset: str = "cifar100"
    teachers: str = "three CIFAR-style ResNet50, seeds 0, 4, 9"
    student: str = "CIFAR-style ResNet18"
    epochs: int = 240
    milestones: tuple[int, ...] = (150, 180, 210)
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 0.9
    tolerance: float = 0.6
    selection: str = "best test accuracy over epochs"


PAPER = Recipe()
TEACHER_SEEDS = (0, 4, 9)
ARMS = ("average", "aekd", "authors_svm")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SOLVER_SAMPLES = 1500  # Gram matrices per arm re-solved for the authors'-solver statistics


# --------------------------------------------------------------------------------------- data


@dataclass
class DeviceData:
    """A dataset held on the device: ``train_x``/``test_x`` uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


def load_cifar100(root: Path, device: torch.device) -> DeviceData:
    """CIFAR-100 from torchvision's extracted ``root/cifar-100-python/`` folder (the product's
    ``cifar_source``), held on ``device``; never downloads."""
    try:
        train, test = (cifar_source("cifar100", root, train=flag) for flag in (True, False))
    except DataSourceError as error:
        raise SystemExit(
            f"--data-root: {error} This script never downloads: pass --data-root pointing at the folder that "
            "holds cifar-100-python/."
        ) from None
    return DeviceData(
        train.images.to(device), train.labels.to(device), test.images.to(device), test.labels.to(device),
        100, train.mean, train.std, "cifar100",
    )  # fmt: skip


def synthetic_data(num_classes: int, n_train: int, n_test: int, seed: int = 0) -> DeviceData:
    """Learnable 32x32 RGB images: each class is a fixed colour-and-stripe pattern plus noise (uint8)."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, 32, 32, generator=gen) * 0.6 + 0.2

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        noise = torch.randn(n, 3, 32, 32, generator=gen) * 0.15
        return ((patterns[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return DeviceData(train_x, train_y, test_x, test_y, num_classes, CIFAR100_MEAN, CIFAR100_STD, "synthetic")


def to_input(images: torch.Tensor, data: DeviceData, channels_last: bool) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> normalised float32 ``[B, C, H, W]`` (the product's ``normalize``)."""
    x = normalize(images, data.mean, data.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_indices(n: int, batch_size: int, gen: torch.Generator, max_steps: int | None) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches (the last one may be short); at most ``max_steps``."""
    order = torch.randperm(n, generator=gen)
    for step, start in enumerate(range(0, n, batch_size)):
        if max_steps is not None and step >= max_steps:
            return
        yield order[start : start + batch_size]


# ------------------------------------------------------------------------------------- models


def cifar_torchvision(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ResNet (``resnet50``, ``resnet18``) in the CIFAR style of the authors' code:
    a 3x3 stride-1 stem convolution and no max-pool, so 32x32 inputs keep their resolution."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class Float32Logits(nn.Module):
    """Runs ``model`` under bf16 autocast when ``bf16`` is set and returns float32 logits ``[B, K]``,
    so that the KD losses, the Gram matrix and the weight solvers see float32."""

    def __init__(self, model: nn.Module, bf16: bool) -> None:
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float()


def build(arch: str, num_classes: int, device: torch.device, fast: bool) -> Float32Logits:
    """A CIFAR-style torchvision ResNet, or a registry model (``registry:resnet8``) for tiny runs."""
    if arch.startswith("registry:"):
        from ray_aekd.models import build_model

        model = build_model(arch.split(":", 1)[1], num_classes)
    else:
        model = cifar_torchvision(arch, num_classes)
    model = model.to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    return Float32Logits(model, bf16=fast)


def scaled_milestones(epochs: int) -> tuple[int, ...]:
    """The authors' milestones 150/180/210 of 240 epochs, scaled to ``epochs`` (distinct, >= 1)."""
    return tuple(sorted({max(1, round(epochs * m / PAPER.epochs)) for m in PAPER.milestones}))


def paper_optimizer(model: nn.Module, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    return make_optimizer(
        model, lr=PAPER.lr, momentum=PAPER.momentum, weight_decay=PAPER.weight_decay,
        schedule="multistep", epochs=epochs, milestones=scaled_milestones(epochs), nesterov=True,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ options


@dataclass
class Options:
    """What one run does; ``tiny`` fills in the CPU values."""

    tiny: bool
    device: torch.device
    fast: bool  # bf16 autocast + channels_last (GPU only)
    teacher_arch: str
    student_arch: str
    batch_size: int
    max_steps: int | None  # per epoch; None: the whole training set
    teacher_epochs: int | None
    student_epochs: int | None
    minutes: float
    teacher_share: float
    tolerance: float = PAPER.tolerance
    product_student: str = "torchvision:resnet18"
    product_epochs: int = 2
    worker_gpus: float = 0.5
    teacher_gpus: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- part 1


def teacher_batches(
    data: DeviceData, opts: Options, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented batches ``(x [B, 3, 32, 32] float32, y [B])`` of one epoch: the product's
    padded crop and flip (``ray_aekd.data.augment``), keyed by a view number drawn from ``gen``."""
    for idx in batch_indices(len(data.train_y), opts.batch_size, gen, opts.max_steps):
        view = int(torch.randint(0, 2**31 - 1, (), generator=gen))
        on_device = idx.to(data.train_x.device)
        images = augment(data.train_x[on_device], idx, seed=0, view=view)
        yield to_input(images, data, opts.fast), data.train_y[on_device]


def measure_steps(data: DeviceData, opts: Options) -> dict[str, float]:
    """Seconds per teacher training step and per lockstep student step (three teacher forwards
    and the three arms' ``distill_step``), from a short warm-up on throw-away models."""
    gen = torch.Generator().manual_seed(123)
    teacher = build(opts.teacher_arch, data.num_classes, opts.device, opts.fast)
    optimizer, _ = paper_optimizer(teacher, 1)
    warm, timed = (1, 2) if opts.tiny else (5, 20)
    batches = list(teacher_batches(data, replace_steps(opts, warm + timed), gen))
    classification_epoch(teacher, batches[:warm], optimizer)
    sync(opts.device)
    start = time.perf_counter()
    classification_epoch(teacher, batches[warm:], optimizer)
    sync(opts.device)
    teacher_step = (time.perf_counter() - start) / max(1, len(batches) - warm)
    teachers = [teacher.eval()] * len(TEACHER_SEEDS)
    arms = make_arms(data, opts, epochs=1)
    for i, (x, y) in enumerate(batches):
        if i == warm:
            sync(opts.device)
            start = time.perf_counter()
        lockstep(arms, teachers, x, y, i, opts.device)
    sync(opts.device)
    student_step = (time.perf_counter() - start) / max(1, len(batches) - warm)
    del teacher, teachers, arms, optimizer
    if opts.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"teacher_step_s": teacher_step, "student_lockstep_s": student_step}


def replace_steps(opts: Options, max_steps: int) -> Options:
    out = copy.copy(opts)
    out.max_steps = max_steps
    return out


def plan_epochs(data: DeviceData, opts: Options, spent: float) -> dict[str, Any]:
    """Epochs per phase: fixed by the options, or sized from ``--minutes`` and a measured warm-up."""
    steps = math.ceil(len(data.train_y) / opts.batch_size)
    if opts.max_steps is not None:
        steps = min(steps, opts.max_steps)
    timing = measure_steps(data, opts)
    eval_factor = 1.05  # per-epoch test evaluation and bookkeeping
    teacher_epoch = steps * timing["teacher_step_s"] * eval_factor
    student_epoch = steps * timing["student_lockstep_s"] * eval_factor
    budget = opts.minutes * 60 - spent
    teacher_epochs = opts.teacher_epochs or max(
        1, int(budget * opts.teacher_share / (len(TEACHER_SEEDS) * teacher_epoch))
    )
    student_epochs = opts.student_epochs or max(1, int(budget * (1 - opts.teacher_share) / student_epoch))
    estimate = len(TEACHER_SEEDS) * teacher_epochs * teacher_epoch + student_epochs * student_epoch
    return {
        "steps_per_epoch": steps,
        "teacher_epochs": teacher_epochs,
        "student_epochs": student_epochs,
        "teacher_milestones": list(scaled_milestones(teacher_epochs)),
        "student_milestones": list(scaled_milestones(student_epochs)),
        "seconds_per_teacher_epoch": round(teacher_epoch, 3),
        "seconds_per_student_epoch_three_arms": round(student_epoch, 3),
        "estimated_minutes": round((estimate + spent) / 60, 2),
        **{k: round(v, 5) for k, v in timing.items()},
    }


def train_teachers(data: DeviceData, opts: Options, epochs: int, teacher_dir: Path | None) -> list[dict[str, Any]]:
    """Train (or load from ``teacher_dir``) the three teachers; returns one record each, with the model."""
    out = []
    for seed in TEACHER_SEEDS:
        name = f"resnet50_s{seed}" if not opts.tiny else f"teacher_s{seed}"
        torch.manual_seed(seed)
        model = build(opts.teacher_arch, data.num_classes, opts.device, opts.fast)
        start = time.perf_counter()
        if teacher_dir is not None:
            path = teacher_dir / f"{name}.pt"
            if not path.is_file():
                raise SystemExit(
                    f"--teachers: {str(path)!r} is missing (expected one state dict per teacher: {name}.pt)."
                )
            model.model.load_state_dict(torch.load(path, map_location=opts.device, weights_only=True))
            trained = 0
        else:
            optimizer, scheduler = paper_optimizer(model, epochs)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                classification_epoch(model, teacher_batches(data, opts, gen), optimizer)
                scheduler.step()
            trained = epochs
        sync(opts.device)
        seconds = time.perf_counter() - start
        metrics, _ = evaluate(model, to_input(data.test_x, data, opts.fast), data.test_y)
        print(f"[paper] teacher {name}: {trained} epoch(s), test acc1 {metrics['val/acc1']:.4f}, {seconds:.1f} s")
        out.append({"name": name, "seed": seed, "epochs": trained, "test_acc1": metrics["val/acc1"],
                    "seconds": round(seconds, 2), "model": model.eval()})  # fmt: skip
    return out


@dataclass
class Arm:
    strategy: str
    model: Float32Logits
    optimizer: torch.optim.Optimizer
    scheduler: Any
    settings: DistillSettings
    seconds: float = 0.0
    steps: int = 0
    grams: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    history: list[float] = field(default_factory=list)


def make_arms(data: DeviceData, opts: Options, epochs: int) -> list[Arm]:
    """The three students, copies of one initialisation (seed 0)."""
    torch.manual_seed(0)
    first = build(opts.student_arch, data.num_classes, opts.device, opts.fast)
    arms = []
    for strategy in ARMS:
        model = copy.deepcopy(first)
        optimizer, scheduler = paper_optimizer(model, epochs)
        settings = DistillSettings(
            strategy=strategy, tolerance=opts.tolerance, temperature=PAPER.temperature,
            ce_weight=PAPER.ce_weight, kd_weight=PAPER.kd_weight,
        )  # fmt: skip
        arms.append(Arm(strategy, model, optimizer, scheduler, settings))
    return arms


def lockstep(arms: list[Arm], teachers: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, step: int,
             device: torch.device) -> None:  # fmt: skip
    """One step of every arm on the same batch and the same teacher logits ``[M, B, K]``."""
    with torch.no_grad():
        teacher_logits = torch.stack([t(x) for t in teachers])
    for arm in arms:
        arm.model.train()
        sync(device)
        start = time.perf_counter()
        out = distill_step(arm.model, x, y, teacher_logits, arm.optimizer, arm.settings, step=step)
        sync(device)
        arm.seconds += time.perf_counter() - start
        arm.steps += 1
        arm.grams.append(out["gram"])
        arm.weights.append(torch.stack([out[f"weight/{m}"] for m in range(len(teachers))]))


def train_students(data: DeviceData, opts: Options, teachers: Sequence[nn.Module], epochs: int) -> list[Arm]:
    arms = make_arms(data, opts, epochs)
    gen = torch.Generator().manual_seed(0)
    test_x = to_input(data.test_x, data, opts.fast)
    step = 0
    for epoch in range(epochs):
        for x, y in teacher_batches(data, opts, gen):
            lockstep(arms, teachers, x, y, step, opts.device)
            step += 1
        line = []
        for arm in arms:
            arm.scheduler.step()
            metrics, _ = evaluate(arm.model, test_x, data.test_y)
            arm.history.append(metrics["val/acc1"])
            line.append(f"{arm.strategy} {metrics['val/acc1']:.4f}")
        print(f"[paper] student epoch {epoch + 1}/{epochs}: test acc1 " + ", ".join(line))
    return arms


def solver_stats(grams: torch.Tensor, tolerance: float, limit: int = SOLVER_SAMPLES) -> dict[str, Any]:
    """How the authors' OneClassSVM solver behaves on these ``[S, M, M]`` Gram matrices (at most
    ``limit`` of them, evenly spaced over training): the share of solves that stopped at libsvm's
    starting point, its iterations, and the L1 distance of its weights to the exact AE-KD weights."""
    grams = grams.detach().to("cpu", torch.float64)
    picked = torch.linspace(0, len(grams) - 1, min(limit, len(grams))).round().long().unique()
    sample = grams[picked]
    exact = min_norm_weights(sample, tolerance)
    at_start, iterations, distance = [], [], []
    for gram, best in zip(sample, exact, strict=True):
        solve = authors_svm_weights(gram, tolerance)
        at_start.append(solve.at_start)
        iterations.append(solve.iterations)
        distance.append(float((solve.weights.double() - best).abs().sum()))
    traces = sample.diagonal(dim1=-2, dim2=-1).sum(-1)
    return {
        "solves": len(sample),
        "of_steps": len(grams),
        "at_start_fraction": float(np.mean(at_start)),
        "mean_iterations": float(np.mean(iterations)),
        "mean_l1_to_exact": float(np.mean(distance)),
        "max_l1_to_exact": float(np.max(distance)),
        "gram_trace_median": float(traces.median()),
        "gram_trace_p10_p90": [float(traces.quantile(0.1)), float(traces.quantile(0.9))],
    }


def arm_record(arm: Arm, tolerance: float) -> dict[str, Any]:
    weights = torch.stack(arm.weights).float().cpu()
    best = int(np.argmax(arm.history))
    return {
        "strategy": arm.strategy,
        "tolerance": tolerance if arm.strategy in ("aekd", "authors_svm") else None,
        "final_test_acc1": arm.history[-1],
        "best_test_acc1": arm.history[best],
        "best_epoch": best + 1,
        "best_selected_on_test_set": True,  # the authors' selection; not a held-out estimate
        "test_acc1_per_epoch": arm.history,
        "student_step_seconds": round(arm.seconds, 3),
        "steps": arm.steps,
        "steps_per_second": arm.steps / arm.seconds if arm.seconds > 0 else None,
        "mean_weights": weights.mean(0).tolist(),
        "weights_std_over_steps": weights.std(0).tolist() if len(weights) > 1 else [0.0] * weights.shape[1],
        "authors_solver_on_these_gradients": solver_stats(torch.stack(arm.grams), tolerance),
    }


def part_paper(data: DeviceData, opts: Options, teacher_dir: Path | None, work: Path, start: float) -> dict[str, Any]:
    plan = plan_epochs(data, opts, time.perf_counter() - start)
    if teacher_dir is not None:
        plan["teacher_epochs"] = 0
    print("[paper] plan: " + json.dumps(plan))
    print(
        f"[paper] {len(TEACHER_SEEDS)} teachers x {plan['teacher_epochs']} epoch(s), then 3 students in lockstep x "
        f"{plan['student_epochs']} epoch(s), {plan['steps_per_epoch']} steps of {opts.batch_size} per epoch; "
        f"estimated {plan['estimated_minutes']:.1f} min for part 1"
    )
    teachers = train_teachers(data, opts, plan["teacher_epochs"], teacher_dir)
    models = [t.pop("model") for t in teachers]
    with torch.no_grad():
        test_x = to_input(data.test_x, data, opts.fast)
        mean_logits = torch.stack([evaluate(m, test_x, data.test_y)[1] for m in models]).mean(0)
        ensemble = float((mean_logits.argmax(-1) == data.test_y).float().mean())
    save_teachers(models, teachers, data, opts, work / "teachers")
    start_students = time.perf_counter()
    arms = train_students(data, opts, models, plan["student_epochs"])
    sync(opts.device)
    students_seconds = time.perf_counter() - start_students
    records = {arm.strategy: arm_record(arm, opts.tolerance) for arm in arms}
    del models, arms
    if opts.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "plan": plan,
        "teachers": teachers,
        "ensemble_test_acc1": ensemble,
        "students_seconds": round(students_seconds, 2),
        "arms": records,
        "authors_solver": {
            name: rec["authors_solver_on_these_gradients"] | {"trained_with_it": name == "authors_svm"}
            for name, rec in records.items()
        },
    }


def save_teachers(models: list[Float32Logits], teachers: list[dict[str, Any]], data: DeviceData, opts: Options,
                  folder: Path) -> None:  # fmt: skip
    """Each teacher as a state dict (``--teachers`` reloads it) and as a float32 TorchScript trace
    on the CPU (what part 2's ``teachers.<i>.torchscript`` loads; it takes normalised images)."""
    folder.mkdir(parents=True, exist_ok=True)
    example = to_input(data.test_x[:2], data, False).cpu()
    for model, record in zip(models, teachers, strict=True):
        inner = copy.deepcopy(model.model).float().cpu().to(memory_format=torch.contiguous_format).eval()
        torch.save(inner.state_dict(), folder / f"{record['name']}.pt")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ calls TorchScript deprecated
            traced = torch.jit.trace(inner, example)
            torch.jit.save(traced, str(folder / f"{record['name']}.torchscript.pt"))


# ------------------------------------------------------------------------------------- part 2


def image_folder(data: DeviceData, folder: Path, limit: int) -> Path:
    """The first ``limit`` training images as PNGs in ``folder/<class>/`` (``imagefolder`` data, tiny runs)."""
    from PIL import Image

    for i in range(min(limit, len(data.train_y))):
        label = int(data.train_y[i])
        (folder / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
        array = data.train_x[i].permute(1, 2, 0).cpu().numpy()
        Image.fromarray(array).save(folder / f"c{label:03d}" / f"{i:05d}.png")
    return folder


def product_config(opts: Options, data_section: dict[str, Any], work: Path, names: list[str], alone: bool,
                   name: str) -> dict[str, Any]:  # fmt: skip
    """A distillation config (the keys of docs/configuration.md) for one product run."""
    teacher_gpus = opts.teacher_gpus
    if teacher_gpus is None:
        teacher_gpus = (
            0.0 if opts.device.type != "cuda" else math.floor((1 - opts.worker_gpus) / len(names) * 1e4) / 1e4
        )  # never over one GPU in all
    gpu = opts.device.type == "cuda"
    stage = "actors" if gpu else "auto"  # auto: tasks on CPU (starts faster than actor pools)
    preprocess = {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}
    teachers = [
        {"name": n, "torchscript": str(work / "teachers" / f"{n}.torchscript.pt"), "gpus": teacher_gpus,
         "cpus": 1.0 if gpu else 0.5, "stage": stage, "actors": 1, "batch_size": 256, "preprocess": preprocess}
        for n in names
    ]  # fmt: skip
    data = dict(data_section, augment=True, views=1 if alone else None)
    return {
        "name": name,
        "output_dir": str(work / "product"),
        "seed": 0,
        "data": data,
        "cache": {"mode": "memory" if alone else "stream"},
        "student": {"model": opts.product_student},
        "distill": {"strategy": "aekd", "tolerance": opts.tolerance, "temperature": PAPER.temperature,
                    "ce_weight": PAPER.ce_weight, "kd_weight": PAPER.kd_weight},
        "train": {"epochs": opts.product_epochs, "batch_size": PAPER.batch_size if not opts.tiny else 32,
                  "lr": PAPER.lr, "momentum": PAPER.momentum, "weight_decay": PAPER.weight_decay,
                  "schedule": "constant"},
        "workers": {"num_workers": 1, "cpus": 1.0, "gpus": opts.worker_gpus if opts.device.type == "cuda" else 0.0},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "paper-gpu"},
        "teachers": teachers,
    }  # fmt: skip


def run_product(config_dict: dict[str, Any], work: Path) -> dict[str, Any]:
    """One ``distill`` run through the Python API that ``ray-aekd distill`` calls; its student's throughput."""
    import yaml

    from ray_aekd.config import DistillConfig
    from ray_aekd.config.loading import load_config
    from ray_aekd.distributed.distill import distill

    path = work / f"{config_dict['name']}.yaml"
    path.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    shutil.rmtree(work / "product" / config_dict["name"], ignore_errors=True)  # a fresh run, not a resume
    shutil.rmtree(work / "product" / "_train" / config_dict["name"], ignore_errors=True)
    try:
        config = load_config(DistillConfig, path)
    except ValueError as error:  # the product refuses this config (e.g. a fractional workers.gpus)
        print(f"[product] {config_dict['name']}: refused by the config check: {error}")
        return {"refused": str(error), "config": path.name}
    start = time.perf_counter()
    try:
        result = distill(config, log=lambda line: print(f"[product] {line}"))
    except ValueError as error:  # refused before training, e.g. more GPUs booked than the machine has
        print(f"[product] {config_dict['name']}: refused: {error}")
        return {"refused": str(error), "config": path.name}
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    per_epoch = [row["train/samples_per_second"] for row in rows if "train/samples_per_second" in row]
    samples = sum(row.get("train/samples", 0.0) for row in rows)
    steps_seconds, first = result.timings.get("steps", 0.0), result.timings.get("first_step", 0.0)
    batch = config.train.batch_size
    return {
        "config": path.name,
        "samples_per_second_per_epoch": per_epoch,
        "samples_per_second_last_epoch": per_epoch[-1] if per_epoch else None,
        "samples_per_second_in_steps": samples / steps_seconds if steps_seconds > 0 else None,
        # without the first step, which waits for the pipeline (and, streaming, the teachers' first batches)
        "samples_per_second_after_first_step": (samples - batch) / (steps_seconds - first)
        if steps_seconds > first > 0 and samples > batch
        else None,
        "train_samples": samples,
        "val_acc1": result.metrics.get("val/acc1"),
        "timings": result.timings,
        "seconds": round(seconds, 2),
    }


def part_product(
    data: DeviceData, opts: Options, work: Path, names: list[str], data_root: Path | None
) -> dict[str, Any]:
    if opts.tiny:
        section: dict[str, Any] = {"dataset": "imagefolder", "path": str(image_folder(data, work / "images", 192)),
                                   "val_fraction": 0.25}  # fmt: skip
    else:
        assert data_root is not None
        section = {"dataset": "cifar100", "path": str(data_root), "val_fraction": 0.1}
    out: dict[str, Any] = {"student_model": opts.product_student, "epochs": opts.product_epochs}
    for key, alone in (("streaming", False), ("student_alone", True)):
        config = product_config(opts, section, work, names, alone, name=f"paper-gpu-{key.replace('_', '-')}")
        out[key] = run_product(config, work) | {
            "teachers": "none while training: run once over data.views = 1, kept in memory (cache.mode memory)"
            if alone
            else "Ray Data actor pools streaming every epoch (cache.mode stream, data.views null)",
            "teacher_gpus_each": config["teachers"][0]["gpus"],
            "worker_gpus": config["workers"]["gpus"],
        }
    a, b = out["streaming"].get("samples_per_second_in_steps"), out["student_alone"].get("samples_per_second_in_steps")
    out["streaming_over_alone"] = a / b if a and b else None
    return out


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, help="folder holding cifar-100-python/ (torchvision's layout)")
    parser.add_argument("--tiny", action="store_true", help="CPU, seconds: synthetic 32x32 data, tiny nets")
    parser.add_argument("--minutes", type=float, default=10.0, help="part 1's budget (sizes the epochs)")
    parser.add_argument("--teacher-share", type=float, default=0.5, help="share of --minutes for the teachers")
    parser.add_argument("--teacher-epochs", type=int, help="fixed teacher epochs (instead of --minutes)")
    parser.add_argument("--student-epochs", type=int, help="fixed student epochs (instead of --minutes)")
    parser.add_argument("--teachers", type=Path, help="folder of <name>.pt state dicts: load, do not train")
    parser.add_argument("--product-epochs", type=int, help="epochs of each product run (default: 2; tiny: 1)")
    parser.add_argument("--product-student", help="student model of the product runs (default: torchvision:resnet18)")
    parser.add_argument("--worker-gpus", type=float, default=0.5, help="GPU share of the product's train worker")
    parser.add_argument("--teacher-gpus", type=float, help="GPU share of each teacher actor (default: the rest / M)")
    parser.add_argument("--skip-paper", action="store_true", help="part 2 only (needs --teachers)")
    parser.add_argument("--skip-product", action="store_true", help="part 1 only")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/paper_gpu"), help="teachers, product runs")
    parser.add_argument("--output", type=Path, help="result JSON (default: <work-dir>/result.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.skip_paper and args.teachers is None:
        raise SystemExit("--skip-paper needs --teachers (the folder part 1 wrote its teachers to).")
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    opts = Options(
        tiny=args.tiny, device=device, fast=cuda,
        teacher_arch="registry:resnet14" if args.tiny else "resnet50",
        student_arch="registry:resnet8" if args.tiny else "resnet18",
        batch_size=16 if args.tiny else PAPER.batch_size, max_steps=3 if args.tiny else None,
        teacher_epochs=1 if args.tiny else args.teacher_epochs, student_epochs=1 if args.tiny else args.student_epochs,
        minutes=args.minutes, teacher_share=args.teacher_share,
        product_student=args.product_student or ("resnet8" if args.tiny else "torchvision:resnet18"),
        product_epochs=args.product_epochs or (1 if args.tiny else 2),
        worker_gpus=args.worker_gpus, teacher_gpus=args.teacher_gpus,
    )  # fmt: skip
    if args.tiny:
        data = synthetic_data(num_classes=10, n_train=256, n_test=64)
    else:
        if args.data_root is None:
            raise SystemExit("--data-root is required without --tiny: the folder that holds cifar-100-python/.")
        data = load_cifar100(args.data_root, device)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    output = args.output or work / "result.json"
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    print(
        f"[paper_gpu] device {device_name}; tiny {args.tiny}; data {data.name}: {len(data.train_y)} train, "
        f"{len(data.test_y)} test, {data.num_classes} classes; bf16 autocast + channels_last: {opts.fast}"
    )
    print(
        "[paper_gpu] will measure: per arm (average, aekd C=0.6, authors_svm C=0.6) final and best-over-epochs test "
        "acc1 (best = the authors' test-set selection), seconds and steps/s; the authors' solver's at-start share and "
        "L1 distance to the exact weights on each arm's gradients; the product student's samples/s with teachers "
        "streaming and alone"
    )
    result: dict[str, Any] = {
        "tiny": args.tiny,
        "device": device_name,
        "paper_setting": dataclasses.asdict(PAPER),
        "reproduced": {
            "data": data.name,
            "teacher_arch": opts.teacher_arch + ("" if args.tiny else " (CIFAR stem: 3x3 conv, no max-pool)"),
            "student_arch": opts.student_arch + ("" if args.tiny else " (CIFAR stem)"),
            "batch_size": opts.batch_size,
            "bf16_autocast_channels_last": opts.fast,
            "students_trained_in_lockstep": "same init, same augmented batches, same teacher logits",
        },
    }
    teacher_names = [f"resnet50_s{s}" if not args.tiny else f"teacher_s{s}" for s in TEACHER_SEEDS]
    if not args.skip_paper:
        result["paper"] = part_paper(data, opts, args.teachers, work, start)
    elif args.teachers is not None and args.teachers.resolve() != (work / "teachers"):
        shutil.copytree(args.teachers, work / "teachers", dirs_exist_ok=True)
    if not args.skip_product:
        result["product"] = part_product(data, opts, work, teacher_names, args.data_root)
    result["seconds"] = round(time.perf_counter() - start, 2)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(summary(result))
    print(f"[paper_gpu] wrote {output} ({result['seconds']:.1f} s)")
    return 0


def summary(result: dict[str, Any]) -> str:
    lines = [f"[paper_gpu] {'TINY (CPU, synthetic): numbers mean nothing' if result['tiny'] else result['device']}"]
    for name, arm in result.get("paper", {}).get("arms", {}).items():
        stats = arm["authors_solver_on_these_gradients"]
        lines.append(
            f"  {name:12s} final {arm['final_test_acc1']:.4f}  best {arm['best_test_acc1']:.4f} (test-selected)  "
            f"{arm['steps_per_second']:.1f} steps/s  authors' solver at start {stats['at_start_fraction']:.2f}, "
            f"L1 to exact {stats['mean_l1_to_exact']:.3f}"
        )
    product = result.get("product", {})
    for key in ("streaming", "student_alone"):
        run = product.get(key, {})
        if "refused" in run:
            lines.append(f"  product {key}: refused: {run['refused']}")
        elif run:
            lines.append(f"  product {key}: student {run['samples_per_second_in_steps']:.0f} samples/s in its steps, "
                         f"{run['samples_per_second_last_epoch']:.0f} samples/s over the last epoch")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
