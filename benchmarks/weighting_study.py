"""Weighting study: does any way of weighting the teachers beat averaging, where weighting can matter?

    python benchmarks/weighting_study.py [--settings S ...] [--num-seeds 20] [--cifar-num-seeds 5]
                                         [--seeds 0 1 ...] [--jobs 2] [--output docs/results/results.json]
                                         [--work-dir /tmp/weighting_study] [--cifar-dir DIR] [--cifar-archive FILE]
                                         [--smoke] [--dump-gradients FILE [--dump-setting noisy_teacher]]

In one process per worker, without Ray or MLflow, every student is trained with
``ray_aekd.core.step.distill_step``, the step the Ray Train workers run, so that the study
measures the weighting and nothing else. Per setting and seed (a paired design):

1. the data are split (seeded) into teacher-train / student-train / tuning / test; the three
   teachers are trained (seeded) and their logits computed once, without augmentation;
2. before training (the first ``--diagnostic-seeds`` seeds), on a few batches of the student
   at its initialisation and after one epoch of ``average``: the teachers' gradient-cosine
   matrix (batch-mean gradients on the student's logits) and the spread of the AE-KD (C = 0.6),
   MGDA and UPGrad weights, and the Gram's trace: whether a weighting could differ at all;
3. every arm trains a student from the same initialisation with the same batch order:
   ``none`` (cross-entropy only), ``average``, ``aekd_c<C>`` for C in 0.4, 0.5, 0.6, 0.8,
   ``mgda``, ``upgrad``, ``authors_svm`` (the authors' released OneClassSVM solver, C = 0.6),
   ``fixed_start`` (fixed [0.6, 0.4, 0]: where that solver stops when it does not move),
   ``fixed_start_reversed`` ([0, 0.4, 0.6]: the same weights on the teachers in the other order),
   ``fixed_accuracy`` (fixed, proportional to each teacher's tuning accuracy) and ``best_single``
   (fixed one-hot on the teacher with the best tuning accuracy). Derived: ``aekd_tuned``, the
   C of the grid with the best mean *tuning* accuracy over seeds, reported with that C's test
   numbers (the test split never chooses anything). In the ``authors_svm`` runs every step's
   Gram is also handed to the authors' solver and to the exact one (``min_norm_weights``, same
   C): how often the authors' solver stops at its starting point, its iterations, and the L1
   distance of its weights to the exact ones;
4. per setting and arm over seeds: test accuracy (mean, sample std), the paired difference to
   ``average`` (mean, 95% t-interval, paired t-test and Wilcoxon signed-rank p), wins/ties/losses,
   tuning accuracy and the median wall seconds of one run (one thread).

Settings (the odd teacher is always listed last, so ``fixed_start`` gives it 0 and
``fixed_start_reversed`` gives it 0.6):

- ``mixed_arch``, ``specialist``, ``noisy_teacher``, ``correlated_pair`` on scikit-learn's digits
  (no network; 20 seeds by default): teachers ``digits_cnn``, ``digits_mlp``, a linear model;
  a student ``digits_mlp`` with 32 hidden units, 30 epochs, batch 64, SGD (momentum 0.9, cosine,
  lr 0.05), T = 4, ce_weight 1, kd_weight 0.9. One run takes about a second.
- ``cifar10_noisy`` on the real CIFAR-10 training JPEGs (``--cifar-dir``, or extracted once from
  ``--cifar-archive`` under ``--work-dir``, never into the repository; 5 seeds by default):
  small_cnn32 and small_cnn16 teachers and a small_cnn16 on 60% symmetric label noise, trained
  once on 15k images and shared by every seed; a small_cnn8 student on 10k images, tuned on 2k,
  tested on 5k.

Output: ``--output`` (JSON; paths in it are relative to the repository) and the same name with
``.md`` (one markdown table per setting, also printed). Every finished (setting, seed, arm) run
is appended to ``<work-dir>/runs.jsonl`` and teachers are cached there, so a rerun skips what is
done and an interrupted study loses nothing. ``--jobs N`` runs seeds in N spawned processes,
each on one thread. ``--smoke``: digits only, 2 seeds, 2 epochs, 400 samples (seconds).
``--dump-gradients FILE`` writes, instead of running the study, the batch-mean logit gradients
``[N, M, K]`` (float64) of about 200 steps spread over one ``authors_svm`` run (setting
``--dump-setting``, the first seed) with what both solvers made of them, as ``.npz``.

Time (one thread per run, measured on this project's 2-core CPU machine): a digits run takes
about 0.5 s, a digits seed (teachers, diagnostics, 13 arms) about 9 s, so the four digits
settings at 20 seeds take about 12 min of one core; for CIFAR-10, decoding the 32k images takes
20 s and the teachers 8 min, once; a run takes about 18 s, a seed about 4 min, 5 seeds 20 min.
The whole study with ``--jobs 2``: about 20 min from nothing, about 14 min with the CIFAR-10
teachers cached in the work folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_aekd.core.authors import authors_svm_weights, libsvm_start
from ray_aekd.core.step import DistillSettings, classification_epoch, distill_step, evaluate, make_optimizer
from ray_aekd.core.upgrad import upgrad_weights
from ray_aekd.core.weighting import cosine_gram, kd_logit_gradients, min_norm_weights, teacher_gram
from ray_aekd.data.labels import corrupt_labels
from ray_aekd.data.views import normalize
from ray_aekd.models.digits_nets import DigitsMLP
from ray_aekd.models.registry import build_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = "docs/results/results.json"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "weighting_study"
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
DEFAULT_CIFAR_DIR = Path(tempfile.gettempdir()) / "cifar10-jpg" / "train"
STUDY_VERSION = 1  # part of every record's fingerprint: bump when a change alters what a run measures
TEACHER_VERSION = 1  # part of the cached teachers' fingerprint: bump when a change alters how they train
TOLERANCES = (0.4, 0.5, 0.6, 0.8)
AUTHORS_TOLERANCE = 0.6
TEMPERATURE = 4.0
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
DIAGNOSTIC_BATCHES = 8
DUMP_STEPS = 200
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MEAN = (0.3,)
DIGITS_STD = (0.4,)


# ---------------------------------------------------------------- settings and arms


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a setting.

    Attributes:
        name: short label.
        model: ``linear``, ``digits_mlp``, ``digits_cnn`` or a registry model (``small_cnn16``).
        init: initialisation seed offset (near copies differ only here).
        order: batch-order seed offset.
        data: ``all`` of the teacher-train split, or its ``half_a`` / ``half_b``.
        classes: train only on these classes (a specialist; the head stays K-way).
        label_noise: share of labels replaced by a uniformly drawn other class (symmetric noise).
    """

    name: str
    model: str
    init: int
    order: int
    data: str = "all"
    classes: tuple[int, ...] | None = None
    label_noise: float = 0.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """A dataset, a teacher ensemble and how teachers and students train."""

    name: str
    dataset: str  # digits | cifar10
    reason: str
    teachers: tuple[TeacherSpec, ...]
    student: str  # digits_mlp_h32 | small_cnn8
    sizes: tuple[int, int, int, int]  # teacher-train, student-train, tuning, test (0 = by fractions)
    teacher_epochs: int
    teacher_lr: float
    teacher_batch: int
    student_epochs: int
    student_lr: float
    batch_size: int
    shared_teachers: bool  # trained once on a fixed split for every seed
    default_seeds: int
    smoke: bool = False


DIGITS_FRACTIONS = (0.35, 0.30, 0.15, 0.20)  # teacher-train, student-train, tuning, test


def make_settings(smoke: bool) -> dict[str, Setting]:
    """Every setting of the study (``smoke`` shrinks data and epochs to seconds)."""
    t_epochs, s_epochs = (2, 2) if smoke else (30, 30)

    def digits(name: str, reason: str, teachers: tuple[TeacherSpec, ...]) -> Setting:
        return Setting(
            name=name, dataset="digits", reason=reason, teachers=teachers, student="digits_mlp_h32",
            sizes=(0, 0, 0, 0), teacher_epochs=t_epochs, teacher_lr=0.05, teacher_batch=64,
            student_epochs=s_epochs, student_lr=0.05, batch_size=64, shared_teachers=False,
            default_seeds=2 if smoke else 20, smoke=smoke,
        )  # fmt: skip

    cifar_sizes = (600, 400, 200, 200) if smoke else (15000, 10000, 2000, 5000)
    return {
        "mixed_arch": digits(
            "mixed_arch",
            "teachers of different architectures and capacities (CNN, MLP, linear) make different mistakes, "
            "and the weak linear teacher's gradients need not agree with the others'",
            (
                TeacherSpec("cnn", "digits_cnn", 1, 1),
                TeacherSpec("mlp", "digits_mlp", 2, 2),
                TeacherSpec("linear", "linear", 3, 3),
            ),
        ),  # fmt: skip
        "specialist": digits(
            "specialist",
            "a teacher trained only on classes 0-4 (10-way head) is confidently wrong on 5-9, so its gradients "
            "oppose the two generalists' on half of the data",
            (
                TeacherSpec("cnn", "digits_cnn", 1, 1),
                TeacherSpec("mlp", "digits_mlp", 2, 2),
                TeacherSpec("cnn_0to4", "digits_cnn", 3, 3, classes=(0, 1, 2, 3, 4)),
            ),
        ),  # fmt: skip
        "noisy_teacher": digits(
            "noisy_teacher",
            "one teacher trained with 60% symmetric label noise among two good ones: a weighting that finds the "
            "bad teacher can beat averaging",
            (
                TeacherSpec("cnn", "digits_cnn", 1, 1),
                TeacherSpec("mlp", "digits_mlp", 2, 2),
                TeacherSpec("cnn_noisy60", "digits_cnn", 3, 3, label_noise=0.6),
            ),
        ),  # fmt: skip
        "correlated_pair": digits(
            "correlated_pair",
            "two near copies (same MLP, same data and batch order, another init) outvote one independent CNN "
            "under averaging; min-norm weighting treats the pair as nearly one direction",
            (
                TeacherSpec("mlp_a", "digits_mlp", 1, 1, data="half_a"),
                TeacherSpec("mlp_a_copy", "digits_mlp", 2, 1, data="half_a"),
                TeacherSpec("cnn_b", "digits_cnn", 3, 3, data="half_b"),
            ),
        ),  # fmt: skip
        "cifar10_noisy": Setting(
            name="cifar10_noisy",
            dataset="cifar10",
            reason="real images, teachers of two capacities and one trained on 60% symmetric label noise: the "
            "CIFAR-10 case where per-step weighting has the most to gain over averaging",
            teachers=(
                TeacherSpec("cnn32", "small_cnn32", 1, 1),
                TeacherSpec("cnn16", "small_cnn16", 2, 2),
                TeacherSpec("cnn16_noisy60", "small_cnn16", 3, 3, label_noise=0.6),
            ),
            student="small_cnn8",
            sizes=cifar_sizes,
            teacher_epochs=1 if smoke else 10,
            teacher_lr=0.1,
            teacher_batch=128,
            student_epochs=1 if smoke else 6,
            student_lr=0.05,
            batch_size=64,
            shared_teachers=True,
            default_seeds=2 if smoke else 5,
            smoke=smoke,
        ),  # fmt: skip
    }


SETTING_NAMES = tuple(make_settings(False))
DIGITS_SETTINGS = tuple(name for name, s in make_settings(False).items() if s.dataset == "digits")


def arm_names(num_teachers: int = 3) -> list[str]:
    """The trained arms, in report order (``aekd_tuned`` is derived from the ``aekd_c*`` ones)."""
    return [
        "none", "average", *(f"aekd_c{c:g}" for c in TOLERANCES), "mgda", "upgrad", "authors_svm",
        "fixed_start", "fixed_start_reversed", "fixed_accuracy", "best_single",
    ]  # fmt: skip


ARM_ABOUT = {
    "none": "cross-entropy only (kd_weight 0 in effect: all teacher weights 0)",
    "average": "uniform weights 1/M",
    **{f"aekd_c{c:g}": f"AE-KD, exact min-norm point of the simplex capped at C = {c:g}" for c in TOLERANCES},
    "mgda": "min-norm point of the simplex (C = 1)",
    "upgrad": "UPGrad (Quinton & Rey 2024): mean of each gradient's projection onto the teachers' dual cone",
    "authors_svm": f"the AE-KD authors' released solver (OneClassSVM on the raw Gram, C = {AUTHORS_TOLERANCE:g})",
    "fixed_start": "fixed libsvm starting point [0.6, 0.4, 0] (the authors' solver when it stops at iteration 0)",
    "fixed_start_reversed": "fixed [0, 0.4, 0.6]: the same weights with the teachers in the other order",
    "fixed_accuracy": "fixed, proportional to each teacher's tuning-split accuracy",
    "best_single": "fixed one-hot on the teacher with the best tuning-split accuracy",
    "aekd_tuned": "AE-KD at the C of the grid with the best mean tuning-split accuracy (test numbers of that C)",
}


def arm_settings(arm: str, tuning_accs: Sequence[float]) -> DistillSettings:
    """The ``DistillSettings`` of one arm; ``tuning_accs`` are the teachers' tuning accuracies [M]."""
    num = len(tuning_accs)
    base = {"temperature": TEMPERATURE, "ce_weight": 1.0, "kd_weight": 0.9, "space": "batch_mean"}
    if arm in ("none", "average", "mgda", "upgrad"):
        return DistillSettings(strategy=arm, **base)  # type: ignore[arg-type]
    if arm.startswith("aekd_c"):
        return DistillSettings(strategy="aekd", tolerance=float(arm[len("aekd_c") :]), **base)  # type: ignore[arg-type]
    if arm == "authors_svm":
        return DistillSettings(strategy="authors_svm", tolerance=AUTHORS_TOLERANCE, **base)  # type: ignore[arg-type]
    start = [float(w) for w in libsvm_start(num, AUTHORS_TOLERANCE)]
    if arm == "fixed_start":
        weights = start
    elif arm == "fixed_start_reversed":
        weights = start[::-1]
    elif arm == "fixed_accuracy":
        weights = [a / sum(tuning_accs) for a in tuning_accs]
    elif arm == "best_single":
        best = max(range(num), key=lambda i: (tuning_accs[i], -i))
        weights = [1.0 if i == best else 0.0 for i in range(num)]
    else:
        raise ValueError(f"Unknown arm {arm!r}. Valid arms: {', '.join(arm_names(num))}.")
    return DistillSettings(strategy="fixed", weights=tuple(weights), **base)  # type: ignore[arg-type]


def fingerprint(setting: Setting) -> str:
    """What a run's result depends on (the setting and the study's version), hashed."""
    text = json.dumps({"version": STUDY_VERSION, "setting": dataclasses.asdict(setting)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def teacher_fingerprint(setting: Setting) -> str:
    """What a setting's teachers depend on, hashed (the student's settings may change without
    retraining them)."""
    student = ("reason", "batch_size", "default_seeds")
    fields = {k: v for k, v in dataclasses.asdict(setting).items() if not k.startswith("student") and k not in student}
    text = json.dumps({"version": TEACHER_VERSION, "teachers": fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's ``hash`` differs between processes)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    """Normalised float images ``[N, C, H, W]`` and labels ``[N]`` of the four parts."""

    teacher_x: torch.Tensor
    teacher_y: torch.Tensor
    student_x: torch.Tensor
    student_y: torch.Tensor
    tuning_x: torch.Tensor
    tuning_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _split(images: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int], seed: int, mean: Any, std: Any) -> Split:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for size in sizes:
        index = order[start : start + size]
        parts += [normalize(images[index], mean, std), labels[index]]
        start += size
    return Split(*parts)


def digits_split(setting: Setting, seed: int) -> Split:
    """The digits split of one seed (``smoke``: 400 of the 1,797 images)."""
    from ray_aekd.data.sources import digits_source

    source = digits_source()
    images, labels = source.images, source.labels
    if setting.smoke:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))[:400]
        images, labels = images[keep], labels[keep]
    total = len(labels)
    sizes = [int(f * total) for f in DIGITS_FRACTIONS[:3]]
    sizes.append(total - sum(sizes))
    return _split(images, labels, sizes, derived_seed("split", setting.name, seed), DIGITS_MEAN, DIGITS_STD)


def cifar_split(setting: Setting, cifar: CifarPaths) -> Split:
    """The fixed CIFAR-10 split (the same for every seed: the teachers are shared)."""
    images, labels = cifar_images(cifar, sum(setting.sizes))
    return _split(images, labels, setting.sizes, derived_seed("split", setting.name), CIFAR_MEAN, CIFAR_STD)


@dataclasses.dataclass(frozen=True)
class CifarPaths:
    """Where the CIFAR-10 JPEG tree is or comes from, and the study's cache folder."""

    tree: Path | None
    archive: Path
    work_dir: Path


def cifar_tree(paths: CifarPaths) -> Path:
    """The ``train/<class>/<image>.jpg`` tree: ``paths.tree`` when it holds the 10 classes, else
    extracted once from the archive under the work folder (never into the repository)."""
    if paths.tree is not None and len([p for p in paths.tree.glob("*") if p.is_dir()]) == 10:
        return paths.tree
    target = paths.work_dir / "cifar10-jpg"
    if (target / ".extracted").exists():
        return target / "train"
    if target.resolve().is_relative_to(REPO):
        raise SystemExit(f"--work-dir: {str(paths.work_dir)!r} is inside the repository; allowed: a folder outside it.")
    if not paths.archive.is_file():
        raise SystemExit(
            f"--cifar-archive: {str(paths.archive)!r} does not exist and --cifar-dir holds no class folders; allowed: "
            f"the CIFAR-10 training JPEG archive (train/<class>/<image>.jpg), e.g. {DEFAULT_ARCHIVE}."
        )
    say(f"extracting {paths.archive.name} under the work folder (once)")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(paths.archive) as tar:
        tar.extractall(target, filter="data")
    (target / ".extracted").write_text("ok\n")
    return target / "train"


def cifar_images(paths: CifarPaths, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` CIFAR-10 training images (uint8 ``[N, 3, 32, 32]``, labels ``[N]``), a fixed
    random choice of the 50,000, decoded once and cached in the work folder."""
    cache = paths.work_dir / f"cifar10_{count}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return torch.from_numpy(stored["images"]), torch.from_numpy(stored["labels"])
    from PIL import Image

    tree = cifar_tree(paths)
    classes = sorted(p.name for p in tree.iterdir() if p.is_dir())
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((tree / name).glob("*.jpg"))]
    if len(files) < count:
        raise SystemExit(f"the CIFAR-10 tree holds {len(files)} images; the study needs {count}.")
    chosen = np.random.default_rng(0).permutation(len(files))[:count]
    images = np.stack([np.asarray(Image.open(files[i][0]).convert("RGB")) for i in chosen]).transpose(0, 3, 1, 2)
    labels = np.array([files[i][1] for i in chosen], dtype=np.int64)
    _atomic_save_npz(cache, images=np.ascontiguousarray(images), labels=labels)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of one epoch's batches in a seeded order (a last batch of one sample is dropped:
    BatchNorm cannot train on it)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if len(index) > 1:
            yield index


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and 4-pixel-padded random crops of ``[B, C, H, W]`` (one shift per batch)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = torch.randint(-4, 5, (2,), generator=generator).tolist()
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    return padded[:, :, 4 + dy : 4 + dy + x.shape[2], 4 + dx : 4 + dx + x.shape[3]]


# ---------------------------------------------------------------- models and teachers


def build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A teacher or student network by name (``linear`` and ``digits_mlp_h32`` are the study's own)."""
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, num_classes))
    if name == "digits_mlp_h32":
        return DigitsMLP(num_classes, 64 * in_channels, hidden=32)
    return build_model(name, num_classes, in_channels)


@dataclasses.dataclass
class Teachers:
    """The teachers' logits ``[M, N, K]`` on the student-train, tuning and test parts, and their accuracies."""

    student: torch.Tensor
    tuning: torch.Tensor
    test: torch.Tensor
    tuning_acc: list[float]
    test_acc: list[float]
    seconds: float  # CPU seconds the teachers took to train (one thread)


def train_teacher(spec: TeacherSpec, setting: Setting, split: Split, seed: int) -> nn.Module:
    """One teacher trained with cross-entropy on its share of the teacher-train part."""
    x, y = split.teacher_x, split.teacher_y
    if spec.data != "all":
        halves = torch.randperm(len(y), generator=torch.Generator().manual_seed(derived_seed("halves", seed)))
        index = halves[: len(y) // 2] if spec.data == "half_a" else halves[len(y) // 2 :]
        x, y = x[index], y[index]
    if spec.classes is not None:
        keep = torch.isin(y, torch.tensor(spec.classes))
        x, y = x[keep], y[keep]
    if spec.label_noise > 0:
        noise = torch.Generator().manual_seed(derived_seed("noise", spec.name, seed))
        y = corrupt_labels(y, range(10), spec.label_noise, 10, noise)
    torch.manual_seed(derived_seed("teacher-init", spec.init, seed))
    model = build(spec.model, 10, x.shape[1])
    optimizer, scheduler = make_optimizer(
        model, setting.teacher_lr, MOMENTUM, WEIGHT_DECAY, "cosine", setting.teacher_epochs
    )
    order = torch.Generator().manual_seed(derived_seed("teacher-order", spec.order, seed))
    augment = setting.dataset == "cifar10"
    for _ in range(setting.teacher_epochs):
        epoch = [
            (_augment(x[i], order) if augment else x[i], y[i]) for i in batches(len(y), setting.teacher_batch, order)
        ]
        classification_epoch(model, epoch, optimizer)
        scheduler.step()
    return model.eval()


def _teacher_cache(setting: Setting, seed: int, work_dir: Path) -> Path:
    teacher_seed = 0 if setting.shared_teachers else seed
    return work_dir / "teachers" / f"{setting.name}_{teacher_fingerprint(setting)}_seed{teacher_seed}.pt"


def teachers_for(setting: Setting, seed: int, work_dir: Path, cifar: CifarPaths) -> tuple[Split, Teachers]:
    """The seed's split and its teachers' logits; teachers are trained once and cached in the
    work folder (per seed, or once for every seed with ``shared_teachers``)."""
    split = cifar_split(setting, cifar) if setting.dataset == "cifar10" else digits_split(setting, seed)
    cache = _teacher_cache(setting, seed, work_dir)
    teacher_seed = 0 if setting.shared_teachers else seed
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        return split, Teachers(**stored)
    start = time.process_time()
    outs: dict[str, list[torch.Tensor]] = {"student": [], "tuning": [], "test": []}
    accs: dict[str, list[float]] = {"tuning": [], "test": []}
    for spec in setting.teachers:
        model = train_teacher(spec, setting, split, teacher_seed)
        for part, x, y in (("student", split.student_x, split.student_y), ("tuning", split.tuning_x, split.tuning_y),
                           ("test", split.test_x, split.test_y)):  # fmt: skip
            metrics, logits = evaluate(model, x, y)
            outs[part].append(logits)
            if part in accs:
                accs[part].append(metrics["val/acc1"])
    teachers = Teachers(
        student=torch.stack(outs["student"]), tuning=torch.stack(outs["tuning"]), test=torch.stack(outs["test"]),
        tuning_acc=accs["tuning"], test_acc=accs["test"], seconds=time.process_time() - start,
    )  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save(dataclasses.asdict(teachers), tmp)
    os.replace(tmp, cache)
    return split, teachers


# ---------------------------------------------------------------- students


def student_init(setting: Setting, seed: int, in_channels: int) -> dict[str, torch.Tensor]:
    """The seed's student initialisation, shared by every arm."""
    torch.manual_seed(derived_seed("student-init", setting.name, seed))
    return copy.deepcopy(build(setting.student, 10, in_channels).state_dict())


def _order(setting: Setting, seed: int) -> torch.Generator:
    """The seed's batch order, the same for every arm."""
    return torch.Generator().manual_seed(derived_seed("student-order", setting.name, seed))


@dataclasses.dataclass
class AuthorsTrace:
    """Per-step record of the authors' solver against the exact one (``authors_svm`` runs)."""

    at_start: list[bool] = dataclasses.field(default_factory=list)
    iterations: list[int] = dataclasses.field(default_factory=list)
    l1: list[float] = dataclasses.field(default_factory=list)
    trace: list[float] = dataclasses.field(default_factory=list)
    gradients: list[np.ndarray] = dataclasses.field(default_factory=list)  # [M, K] float64, with --dump-gradients
    grams: list[np.ndarray] = dataclasses.field(default_factory=list)  # [M, M] float32, the step's own Gram
    authors_weights: list[np.ndarray] = dataclasses.field(default_factory=list)
    exact_weights: list[np.ndarray] = dataclasses.field(default_factory=list)


def train_student(
    setting: Setting,
    seed: int,
    arm: str,
    split: Split,
    teachers: Teachers,
    init: dict[str, torch.Tensor],
    trace: AuthorsTrace | None = None,
    dump: bool = False,
) -> dict[str, Any]:
    """Train one student of one arm; returns its tuning and test accuracy, seconds, steps and mean weights.

    With ``trace``, every step's Gram ``[M, M]`` also goes to the authors' solver and to the
    exact one at C = 0.6 (a second solve, left out of the run's seconds, so that ``authors_svm``
    is timed as training with it costs); with ``dump`` the batch-mean logit gradients ``[M, K]``
    are kept too.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    settings = arm_settings(arm, teachers.tuning_acc)
    model = build(setting.student, 10, split.student_x.shape[1])
    model.load_state_dict(init)
    optimizer, scheduler = make_optimizer(
        model, setting.student_lr, MOMENTUM, WEIGHT_DECAY, "cosine", setting.student_epochs
    )
    order = _order(setting, seed)
    weights: list[torch.Tensor] = []
    step = 0
    recording = cpu_recording = 0.0  # time spent on the record of the authors' solver, not on training
    for _ in range(setting.student_epochs):
        model.train()
        for index in batches(len(split.student_y), setting.batch_size, order):
            images, labels, teacher_logits = split.student_x[index], split.student_y[index], teachers.student[:, index]
            if dump and trace is not None:
                with torch.no_grad():  # the step's own logits (the student has no BatchNorm or dropout)
                    logits = model(images).double()
                gradients = kd_logit_gradients(logits, teacher_logits.double(), TEMPERATURE).mean(1)
                trace.gradients.append(gradients.numpy())
            out = distill_step(model, images, labels, teacher_logits, optimizer, settings, step=step)
            weights.append(torch.stack([out[f"weight/{m}"] for m in range(len(setting.teachers))]))
            if trace is not None:
                mark, cpu_mark = time.perf_counter(), time.process_time()
                gram = out["gram"]
                solve = authors_svm_weights(gram, AUTHORS_TOLERANCE)
                exact = min_norm_weights(gram.double(), AUTHORS_TOLERANCE)
                trace.at_start.append(solve.at_start)
                trace.iterations.append(solve.iterations)
                trace.l1.append(float((solve.weights.double() - exact).abs().sum()))
                trace.trace.append(float(gram.trace()))
                if dump:
                    trace.grams.append(gram.numpy().copy())
                    trace.authors_weights.append(solve.weights.double().numpy())
                    trace.exact_weights.append(exact.numpy())
                recording += time.perf_counter() - mark
                cpu_recording += time.process_time() - cpu_mark
            step += 1
        scheduler.step()
    tuning = evaluate(model, split.tuning_x, split.tuning_y)[0]["val/acc1"]
    test = evaluate(model, split.test_x, split.test_y)[0]["val/acc1"]
    mean_weights = torch.stack(weights).double().mean(0).tolist()
    if not (math.isfinite(tuning) and math.isfinite(test)):
        raise FloatingPointError(f"{setting.name} seed {seed} arm {arm}: accuracy is not finite.")
    return {
        "tuning_acc": tuning,
        "test_acc": test,
        "seconds": time.perf_counter() - start - recording,
        "cpu_seconds": time.process_time() - cpu_start - cpu_recording,
        "steps": step,
        "mean_weights": mean_weights,
    }


def authors_summary(trace: AuthorsTrace) -> dict[str, Any]:
    """One ``authors_svm`` run's solver record (iterations as a histogram, so that medians over
    runs stay exact)."""
    histogram: dict[str, int] = {}
    for it in trace.iterations:
        histogram[str(it)] = histogram.get(str(it), 0) + 1
    return {
        "steps": len(trace.at_start),
        "at_start": int(sum(trace.at_start)),
        "iterations": histogram,
        "l1_sum": float(sum(trace.l1)),
        "l1_max": float(max(trace.l1, default=0.0)),
        "trace_median": float(statistics.median(trace.trace)) if trace.trace else None,
        "trace_min": float(min(trace.trace, default=0.0)),
        "trace_max": float(max(trace.trace, default=0.0)),
    }


# ---------------------------------------------------------------- diagnostics


def _batch_stats(model: nn.Module, split: Split, teachers: Teachers, index_list: list[torch.Tensor]) -> dict[str, Any]:
    """Cosines, weights and traces of the teachers' batch-mean gradients on a few batches."""
    probe = copy.deepcopy(model).train()  # train mode as in the step; the copy keeps BatchNorm's statistics
    cosines, traces, at_start = [], [], []
    weights: dict[str, list[list[float]]] = {"aekd_c0.6": [], "mgda": [], "upgrad": [], "authors_svm": []}
    for index in index_list:
        with torch.no_grad():
            logits = probe(split.student_x[index])
        gram = teacher_gram(kd_logit_gradients(logits, teachers.student[:, index], TEMPERATURE), "batch_mean")
        cosines.append(cosine_gram(gram.double()))
        traces.append(float(gram.trace()))
        weights["aekd_c0.6"].append(min_norm_weights(gram.double(), 0.6).tolist())
        weights["mgda"].append(min_norm_weights(gram.double(), 1.0).tolist())
        weights["upgrad"].append(upgrad_weights(gram.double()).tolist())
        solve = authors_svm_weights(gram, AUTHORS_TOLERANCE)
        weights["authors_svm"].append(solve.weights.double().tolist())
        at_start.append(solve.at_start)
    return {
        "cosine": torch.stack(cosines).mean(0).tolist(),
        "weights": weights,
        "traces": traces,
        "authors_at_start": at_start,
    }


def diagnose(setting: Setting, seed: int, split: Split, teachers: Teachers, init: dict[str, torch.Tensor]) -> dict:
    """Gradient cosines and weight spreads at the student's initialisation and after one epoch of ``average``."""
    model = build(setting.student, 10, split.student_x.shape[1])
    model.load_state_dict(init)
    probe_order = torch.Generator().manual_seed(derived_seed("diagnostic-batches", setting.name, seed))
    index_list = list(batches(len(split.student_y), setting.batch_size, probe_order))[:DIAGNOSTIC_BATCHES]
    stages = {"init": _batch_stats(model, split, teachers, index_list)}
    optimizer, _ = make_optimizer(model, setting.student_lr, MOMENTUM, WEIGHT_DECAY, "constant", 1)
    settings = arm_settings("average", teachers.tuning_acc)
    model.train()
    for index in batches(len(split.student_y), setting.batch_size, _order(setting, seed)):
        distill_step(model, split.student_x[index], split.student_y[index], teachers.student[:, index], optimizer,
                     settings)  # fmt: skip
    stages["after_one_epoch"] = _batch_stats(model, split, teachers, index_list)
    return stages


# ---------------------------------------------------------------- records (resumable)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line, under a lock (workers share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a line torn by a crash: do not glue this record onto it
                    line = b"\n" + line
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of the file (a line cut short by a crash is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _key(record: dict[str, Any]) -> tuple:
    return (record["kind"], record["setting"], record["fp"], record["seed"], record.get("arm"))


@dataclasses.dataclass(frozen=True)
class Task:
    """One seed of one setting, and what of it is still to do."""

    setting: Setting
    seed: int
    arms: tuple[str, ...]
    teachers: bool  # the teachers' record is missing
    diagnostics: bool  # the diagnostics are to be computed and are missing
    records: Path
    work_dir: Path
    cifar: CifarPaths


def run_task(task: Task) -> dict[str, Any]:
    """Run what is missing of one seed of one setting, appending each record as it finishes."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    setting, seed, fp = task.setting, task.seed, fingerprint(task.setting)
    split, teachers = teachers_for(setting, seed, task.work_dir, task.cifar)
    common = {"setting": setting.name, "seed": seed, "fp": fp}
    if task.teachers:
        append_record(task.records, {"kind": "teachers", **common, "tuning_acc": teachers.tuning_acc,
                                     "test_acc": teachers.test_acc, "seconds": teachers.seconds})  # fmt: skip
    init = student_init(setting, seed, split.student_x.shape[1])
    if task.diagnostics:
        append_record(task.records, {"kind": "diagnostics", **common, "stages": diagnose(setting, seed, split,
                                                                                         teachers, init)})  # fmt: skip
    results = {}
    for arm in task.arms:
        trace = AuthorsTrace() if arm == "authors_svm" else None
        result = train_student(setting, seed, arm, split, teachers, init, trace)
        if trace is not None:
            result["authors"] = authors_summary(trace)
        append_record(task.records, {"kind": "run", **common, "arm": arm, **result})
        results[arm] = result
    return {"setting": setting.name, "seed": seed, "seconds": time.perf_counter() - start, "results": results}


def prepare_shared(setting: Setting, work_dir: Path, cifar: CifarPaths) -> str:
    """Train (or find) a setting's shared teachers before its seeds start."""
    torch.set_num_threads(1)
    teachers_for(setting, 0, work_dir, cifar)
    return setting.name


# ---------------------------------------------------------------- statistics


def paired(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std, 95% t-interval, paired t-test and Wilcoxon signed-rank p of paired differences."""
    from scipy import stats  # type: ignore[import-untyped,unused-ignore]

    n = len(diffs)
    out: dict[str, Any] = {"n": n, "mean": round(statistics.fmean(diffs), 12) if n else None, "std": None, "ci95": None,
                           "t_test_p": None, "wilcoxon_p": None, "better": sum(d > 0 for d in diffs),
                           "ties": sum(d == 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}  # fmt: skip
    if n < 2:
        return out
    mean, std = out["mean"], statistics.stdev(diffs)
    out["std"] = std
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    out["ci95"] = [mean - half, mean + half]
    if std == 0:
        out["t_test_p"] = 1.0 if mean == 0 else 0.0
    else:
        out["t_test_p"] = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    if all(d == 0 for d in diffs):
        out["wilcoxon_p"] = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out["wilcoxon_p"] = float(stats.wilcoxon(diffs).pvalue)
            except ValueError:
                out["wilcoxon_p"] = None
    return out


def holm(summaries: dict[str, dict[str, Any]]) -> None:
    """Add ``t_test_p_holm`` to each arm's ``diff_vs_average``: the t-test p adjusted by Holm's
    step-down method over the setting's arms (``average`` itself and the derived ``aekd_tuned``
    left out), so that one of a dozen comparisons coming out below 0.05 by chance is not read as a
    finding."""
    tested = sorted(
        (s["diff_vs_average"]["t_test_p"], arm)
        for arm, s in summaries.items()
        if arm not in ("average", "aekd_tuned") and s["diff_vs_average"]["t_test_p"] is not None
    )
    running = 0.0
    for rank, (p, arm) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        summaries[arm]["diff_vs_average"]["t_test_p_holm"] = running
    if "aekd_tuned" in summaries and "tolerance" in summaries["aekd_tuned"]:
        source = summaries.get(f"aekd_c{summaries['aekd_tuned']['tolerance']:g}", {}).get("diff_vs_average", {})
        if "t_test_p_holm" in source:
            summaries["aekd_tuned"]["diff_vs_average"]["t_test_p_holm"] = source["t_test_p_holm"]


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize_setting(setting: Setting, seeds: Sequence[int], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting's JSON: teachers, diagnostics, the authors' solver, per-arm summaries, raw per-seed numbers."""
    fp = fingerprint(setting)
    mine = [r for r in records if r["setting"] == setting.name and r["fp"] == fp and r["seed"] in seeds]
    runs = {(r["arm"], r["seed"]): r for r in mine if r["kind"] == "run"}
    teacher_records = {r["seed"]: r for r in mine if r["kind"] == "teachers"}
    diagnostics = sorted((r for r in mine if r["kind"] == "diagnostics"), key=lambda r: r["seed"])
    arms = arm_names(len(setting.teachers))
    per_seed: dict[str, dict[str, list[Any]]] = {}
    for arm in arms:
        done = [s for s in seeds if (arm, s) in runs]
        per_seed[arm] = {
            "seeds": done,
            "test_acc": [runs[arm, s]["test_acc"] for s in done],
            "tuning_acc": [runs[arm, s]["tuning_acc"] for s in done],
            "seconds": [runs[arm, s]["seconds"] for s in done],
            "cpu_seconds": [runs[arm, s]["cpu_seconds"] for s in done],
        }
    grid = [f"aekd_c{c:g}" for c in TOLERANCES]
    grid_seeds = [s for s in seeds if all((a, s) in runs for a in grid)]
    tuned: dict[str, Any] = {"tuning_acc_by_tolerance": {}, "seeds": len(grid_seeds)}
    if grid_seeds:
        by_c = {c: statistics.fmean(runs[f"aekd_c{c:g}", s]["tuning_acc"] for s in grid_seeds) for c in TOLERANCES}
        best = max(TOLERANCES, key=lambda c: (by_c[c], -c))  # ties: the smaller C
        tuned = {"tolerance": best, "arm": f"aekd_c{best:g}", "seeds": len(grid_seeds),
                 "tuning_acc_by_tolerance": {f"{c:g}": v for c, v in by_c.items()}}  # fmt: skip
        per_seed["aekd_tuned"] = per_seed[tuned["arm"]]
    summaries = {}
    for arm in [*arms, "aekd_tuned"] if "aekd_tuned" in per_seed else arms:
        data = per_seed[arm]
        paired_seeds = [s for s in data["seeds"] if ("average", s) in runs]
        test = dict(zip(data["seeds"], data["test_acc"], strict=True))
        mean, std = _mean_std(data["test_acc"])
        tuning_mean, tuning_std = _mean_std(data["tuning_acc"])
        source = tuned["arm"] if arm == "aekd_tuned" else arm
        weights = [runs[source, s]["mean_weights"] for s in data["seeds"]]
        summaries[arm] = {
            "about": ARM_ABOUT[arm],
            "n": len(data["seeds"]),
            "test_acc_mean": mean,
            "test_acc_std": std,
            "tuning_acc_mean": tuning_mean,
            "tuning_acc_std": tuning_std,
            "diff_vs_average": paired([round(test[s] - runs["average", s]["test_acc"], 12) for s in paired_seeds]),
            "seconds_median": statistics.median(data["seconds"]) if data["seconds"] else None,
            "cpu_seconds_median": statistics.median(data["cpu_seconds"]) if data["cpu_seconds"] else None,
            "mean_weights": np.mean(weights, axis=0).tolist() if weights else None,
        }
        if arm == "aekd_tuned":
            summaries[arm]["tolerance"] = tuned["tolerance"]
    holm(summaries)
    teacher_table = []
    for i, spec in enumerate(setting.teachers):
        tests = [teacher_records[s]["test_acc"][i] for s in seeds if s in teacher_records]
        tunings = [teacher_records[s]["tuning_acc"][i] for s in seeds if s in teacher_records]
        test_mean, test_std = _mean_std(tests)
        teacher_table.append({**dataclasses.asdict(spec), "test_acc_mean": test_mean, "test_acc_std": test_std,
                              "tuning_acc_mean": _mean_std(tunings)[0]})  # fmt: skip
    return {
        "reason": setting.reason,
        "dataset": setting.dataset,
        "fingerprint": fp,
        "seeds": list(seeds),
        "training": {k: v for k, v in dataclasses.asdict(setting).items() if k not in ("name", "reason", "teachers")},
        "teachers": teacher_table,
        "teacher_cpu_seconds_median": statistics.median([teacher_records[s]["seconds"] for s in teacher_records])
        if teacher_records
        else None,
        "diagnostics": summarize_diagnostics(diagnostics),
        "authors_solver": summarize_authors([runs[a, s]["authors"] for (a, s) in runs if a == "authors_svm"]),
        "aekd_tuned": tuned,
        "arms": summaries,
        "per_seed": per_seed,
    }


def summarize_diagnostics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Cosine matrix (mean) and per-teacher weight spread over the diagnostic seeds and batches."""
    if not records:
        return {"seeds": []}
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records], "batches_per_seed": DIAGNOSTIC_BATCHES}
    for stage in ("init", "after_one_epoch"):
        parts = [r["stages"][stage] for r in records]
        cosine = np.mean([p["cosine"] for p in parts], axis=0)
        off = cosine[~np.eye(len(cosine), dtype=bool)]
        weights = {}
        for method in parts[0]["weights"]:
            w = np.array([row for p in parts for row in p["weights"][method]])  # [seeds * batches, M]
            weights[method] = {"min": w.min(0).tolist(), "max": w.max(0).tolist(), "mean": w.mean(0).tolist()}
        traces = [t for p in parts for t in p["traces"]]
        starts = [a for p in parts for a in p["authors_at_start"]]
        out[stage] = {
            "cosine": cosine.tolist(),
            "cosine_offdiag_min": float(off.min()),
            "cosine_offdiag_max": float(off.max()),
            "weights": weights,
            "gram_trace_median": float(statistics.median(traces)),
            "authors_at_start_fraction": sum(starts) / len(starts),
        }
    return out


def summarize_authors(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Over every step of every ``authors_svm`` run: share stopped at the start, iterations, L1 to exact."""
    steps = sum(r["steps"] for r in records)
    if not steps:
        return {"runs": len(records), "steps": 0}
    histogram: dict[int, int] = {}
    for r in records:
        for it, count in r["iterations"].items():
            histogram[int(it)] = histogram.get(int(it), 0) + count
    expanded = [it for it, count in sorted(histogram.items()) for _ in range(count)]
    return {
        "runs": len(records),
        "steps": steps,
        "tolerance": AUTHORS_TOLERANCE,
        "at_start_fraction": sum(r["at_start"] for r in records) / steps,
        "iterations_median": float(statistics.median(expanded)),
        "iterations_max": max(expanded),
        "iterations_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "l1_to_exact_mean": sum(r["l1_sum"] for r in records) / steps,
        "l1_to_exact_max": max(r["l1_max"] for r in records),
        "gram_trace_median_of_runs": statistics.median([r["trace_median"] for r in records]),
        "gram_trace_min": min(r["trace_min"] for r in records),
        "gram_trace_max": max(r["trace_max"] for r in records),
    }


# ---------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.2g}" if value >= 0.001 else f"{value:.1e}")


def markdown(name: str, summary: dict[str, Any]) -> str:
    """One setting as markdown: reason, teachers, diagnostics, the authors' solver and the arms' table."""
    lines = [f"### {name} ({summary['dataset']}, {len(summary['seeds'])} seeds)", "", summary["reason"] + ".", ""]
    teachers = ", ".join(
        f"{t['name']} ({t['model']}) {_fmt(t['test_acc_mean'])} ± {_fmt(t['test_acc_std'])}"
        for t in summary["teachers"]
    )
    lines.append(f"Teachers, test accuracy: {teachers}.")
    diag = summary["diagnostics"]
    for stage, label in (("init", "at the student's init"), ("after_one_epoch", "after one epoch of average")):
        if stage in diag:
            d = diag[stage]
            spread = "; ".join(
                f"{m} " + ", ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(w["min"], w["max"], strict=True))
                for m, w in d["weights"].items()
            )
            lines.append(
                f"Gradient cosines {label}: off-diagonal {d['cosine_offdiag_min']:.2f} to "
                f"{d['cosine_offdiag_max']:.2f}; "
                f"weights per teacher [min, max]: {spread}; Gram trace median {d['gram_trace_median']:.1e}."
            )
    authors = summary["authors_solver"]
    if authors.get("steps"):
        lines.append(
            f"Authors' solver (C = {authors['tolerance']:g}) on {authors['steps']} steps of {authors['runs']} runs: "
            f"stopped at its start in {100 * authors['at_start_fraction']:.1f}% of steps; iterations median "
            f"{authors['iterations_median']:g}, max {authors['iterations_max']}; L1 to the exact weights mean "
            f"{authors['l1_to_exact_mean']:.3f}, max {authors['l1_to_exact_max']:.3f}; Gram trace "
            f"{authors['gram_trace_min']:.1e} to {authors['gram_trace_max']:.1e}."
        )
    tuned = summary["aekd_tuned"]
    if "tolerance" in tuned:
        lines.append(f"aekd_tuned: C = {tuned['tolerance']:g} (best mean tuning accuracy over {tuned['seeds']} seeds).")
    columns = ["arm", "test acc", "Δ vs average [95% CI]", "t-test p", "Holm p", "Wilcoxon p", "+/=/−",
               "tuning acc", "mean weights", "s/run"]  # fmt: skip
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for arm, s in summary["arms"].items():
        d = s["diff_vs_average"]
        ci = f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else "–"
        weights = ", ".join(f"{w:.2f}" for w in s["mean_weights"]) if s["mean_weights"] else "–"
        diff = f"{d['mean']:+.4f} {ci}" if d["mean"] is not None else "–"
        lines.append(
            f"| {arm} | {_fmt(s['test_acc_mean'])} ± {_fmt(s['test_acc_std'])} | {diff} | {_p(d['t_test_p'])} | "
            f"{_p(d.get('t_test_p_holm'))} | {_p(d['wilcoxon_p'])} | {d['better']}/{d['ties']}/{d['worse']} | "
            f"{_fmt(s['tuning_acc_mean'])} | "
            f"{weights} | {_fmt(s['seconds_median'], 2)} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def say(message: str) -> None:
    print(message, flush=True)


def relative(path: str | Path) -> str:
    """A path as the JSON may hold it: relative to the repository, or only its name when outside."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    return f"<outside the repository>/{resolved.name}"


def recorded_command(argv: Sequence[str]) -> str:
    """The command line with every path made relative (no absolute paths in the JSON)."""
    out = ["python", relative(__file__)]
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if os.path.isabs(value) or value.startswith("~"):
            arg = arg.replace(value, relative(value))
        out.append(arg)
    return shlex.join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--settings", nargs="+", choices=SETTING_NAMES, help="default: all (smoke: the digits ones)")
    parser.add_argument("--seeds", nargs="+", type=int, help="explicit seeds for every setting")
    parser.add_argument("--num-seeds", type=int, help="seeds 0..N-1 of the digits settings (default 20; smoke 2)")
    parser.add_argument("--cifar-num-seeds", type=int, help="seeds of the CIFAR-10 setting (default 5; smoke 2)")
    parser.add_argument("--diagnostic-seeds", type=int, default=3, help="seeds (the first ones) with diagnostics")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each")
    parser.add_argument("--output", default=str(REPO / DEFAULT_OUTPUT), help="JSON; the .md goes next to it")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="runs.jsonl and cached teachers and data")
    parser.add_argument("--cifar-dir", default=str(DEFAULT_CIFAR_DIR), help="an extracted train/<class>/*.jpg tree")
    parser.add_argument("--cifar-archive", default=str(DEFAULT_ARCHIVE), help="extracted if --cifar-dir is not there")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 2 epochs, 400 digits samples: seconds")
    parser.add_argument("--dump-gradients", metavar="FILE", help="only write one authors_svm run's gradients (.npz)")
    parser.add_argument("--dump-setting", default="noisy_teacher", choices=DIGITS_SETTINGS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}.")
    for flag in ("num_seeds", "cifar_num_seeds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}.")
    return args


def seeds_for(setting: Setting, args: argparse.Namespace) -> list[int]:
    if args.seeds:
        return list(dict.fromkeys(args.seeds))
    count = args.cifar_num_seeds if setting.dataset == "cifar10" else args.num_seeds
    return list(range(count if count is not None else setting.default_seeds))


def dump_gradients(args: argparse.Namespace, settings: dict[str, Setting], cifar: CifarPaths) -> None:
    """Write ~200 steps of one ``authors_svm`` run's batch-mean logit gradients ``[N, M, K]`` (float64)."""
    setting = settings[args.dump_setting]
    seed = seeds_for(setting, args)[0]
    split, teachers = teachers_for(setting, seed, Path(args.work_dir), cifar)
    init = student_init(setting, seed, split.student_x.shape[1])
    trace = AuthorsTrace()
    result = train_student(setting, seed, "authors_svm", split, teachers, init, trace, dump=True)
    total = len(trace.gradients)
    keep = np.unique(np.linspace(0, total - 1, min(DUMP_STEPS, total)).round().astype(int))
    path = Path(args.dump_gradients)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        gradients=np.stack(trace.gradients)[keep],  # [N, M, K] float64 batch-mean logit gradients
        grams=np.stack(trace.grams)[keep],  # [N, M, M] float32: the Gram the step solved on (exactly)
        steps=keep,
        total_steps=np.int64(total),
        authors_weights=np.stack(trace.authors_weights)[keep],  # [N, M] what the authors' solver returned
        authors_at_start=np.array(trace.at_start)[keep],
        authors_iterations=np.array(trace.iterations)[keep],
        exact_weights=np.stack(trace.exact_weights)[keep],  # [N, M] min_norm_weights at the same C
        setting=np.array(setting.name),
        seed=np.int64(seed),
        tolerance=np.float64(AUTHORS_TOLERANCE),
        temperature=np.float64(TEMPERATURE),
        teachers=np.array([t.name for t in setting.teachers]),
    )
    at_start = np.array(trace.at_start)[keep]
    say(
        f"wrote {len(keep)} of {total} steps of {setting.name} seed {seed} authors_svm to {relative(path)} "
        f"({path.stat().st_size / 1024:.0f} KiB); stopped at start in {at_start.mean():.0%} of them; "
        f"student test accuracy {result['test_acc']:.4f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study (or ``--dump-gradients``); 1 if a task failed. Torch runs on one thread
    meanwhile, and gets its thread count back after."""
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv), argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    torch.set_num_threads(1)
    settings = make_settings(args.smoke)
    work_dir = Path(args.work_dir).expanduser().resolve()
    cifar = CifarPaths(Path(args.cifar_dir).expanduser(), Path(args.cifar_archive).expanduser(), work_dir)
    if args.dump_gradients:
        dump_gradients(args, settings, cifar)
        return 0
    names = args.settings or (list(DIGITS_SETTINGS) if args.smoke else list(SETTING_NAMES))
    chosen = [settings[n] for n in names]
    records_path = work_dir / "runs.jsonl"
    records = load_records(records_path)
    done = {_key(r) for r in records}
    tasks = []
    for setting in chosen:
        fp, seeds = fingerprint(setting), seeds_for(setting, args)
        for seed in seeds:
            arms = tuple(a for a in arm_names() if ("run", setting.name, fp, seed, a) not in done)
            need_teachers = ("teachers", setting.name, fp, seed, None) not in done
            need_diag = (
                seed in seeds[: args.diagnostic_seeds] and ("diagnostics", setting.name, fp, seed, None) not in done
            )
            if arms or need_teachers or need_diag:
                tasks.append(Task(setting, seed, arms, need_teachers, need_diag, records_path, work_dir, cifar))
    say(f"{len(tasks)} (setting, seed) tasks to run, {sum(len(t.arms) for t in tasks)} student runs "
        f"({sum(r['kind'] == 'run' for r in records)} finished runs on record); --jobs {args.jobs}")  # fmt: skip
    start = time.perf_counter()
    failed = run_tasks(tasks, args.jobs, work_dir, cifar, start)
    records = load_records(records_path)
    report: dict[str, Any] = {
        "study": "weighting_study",
        "command": recorded_command(sys.argv[1:] if argv is None else argv),
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            **_versions("scipy", "sklearn"),
        },  # fmt: skip
        "protocol": {
            "threads_per_run": 1,
            "temperature": TEMPERATURE,
            "ce_weight": 1.0,
            "kd_weight": 0.9,
            "space": "batch_mean",
            "optimizer": {"name": "sgd", "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "schedule": "cosine"},
            "tolerance_grid": list(TOLERANCES),
            "authors_tolerance": AUTHORS_TOLERANCE,
            "digits_split_fractions": dict(
                zip(["teacher", "student", "tuning", "test"], DIGITS_FRACTIONS, strict=True)
            ),
            "smoke": args.smoke,
            "arms": {a: ARM_ABOUT[a] for a in [*arm_names(), "aekd_tuned"]},
            "teacher_order": "the odd teacher is last: fixed_start gives it 0, fixed_start_reversed 0.6",
            "statistics": "paired over seeds against average: 95% t-interval, paired t-test, Wilcoxon signed-rank",
        },
        "output": relative(args.output),
        "settings": {s.name: summarize_setting(s, seeds_for(s, args), records) for s in chosen},
        "failed_tasks": [f.replace(str(work_dir), "<work-dir>").replace(str(REPO), ".") for f in failed],
    }
    output = Path(args.output).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    text = "\n".join(markdown(name, summary) for name, summary in report["settings"].items())
    header = f"# Weighting study\n\n`{report['command']}`\n\n"
    output.with_suffix(".md").write_text(header + text)
    say("\n" + text)
    say(f"wrote {relative(output)} and {relative(output.with_suffix('.md'))} in {time.perf_counter() - start:.0f}s")
    return 1 if failed else 0


def _versions(*modules: str) -> dict[str, str]:
    out = {}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def run_tasks(tasks: list[Task], jobs: int, work_dir: Path, cifar: CifarPaths, start: float) -> list[str]:
    """Run the tasks (in-process with one job, else in spawned workers); shared teachers are
    prepared first, while the other tasks run. Returns the failed tasks' descriptions."""
    failed: list[str] = []

    def done(result: dict[str, Any]) -> None:
        accs = " ".join(
            f"{a} {r['test_acc']:.4f}" for a, r in result["results"].items() if a in ("average", "aekd_c0.6")
        )
        say(f"[{time.perf_counter() - start:7.1f}s] {result['setting']} seed {result['seed']}: "
            f"{len(result['results'])} runs in {result['seconds']:.1f}s {accs}")  # fmt: skip

    if jobs == 1:
        for task in tasks:
            try:
                done(run_task(task))
            except Exception as error:  # one failed seed must not lose the others
                failed.append(f"{task.setting.name} seed {task.seed}: {type(error).__name__}: {error}")
                say(f"FAILED {failed[-1]}")
        return failed
    ready = [t for t in tasks if t.setting.shared_teachers and _teacher_cache(t.setting, 0, work_dir).exists()]
    waiting = [t for t in tasks if t.setting.shared_teachers and t not in ready]
    shared = {t.setting.name: t.setting for t in waiting}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending: dict[Future, Any] = {pool.submit(prepare_shared, s, work_dir, cifar): s.name for s in shared.values()}
        # the longest tasks (CIFAR-10 seeds) first, so that no worker is left with them at the end
        pending |= {pool.submit(run_task, t): t for t in [*ready, *(t for t in tasks if not t.setting.shared_teachers)]}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                what = pending.pop(future)
                try:
                    result = future.result()
                except Exception as error:
                    label = what if isinstance(what, str) else f"{what.setting.name} seed {what.seed}"
                    failed.append(f"{label}: {type(error).__name__}: {error}")
                    say(f"FAILED {failed[-1]}")
                    if isinstance(what, str):  # its seeds cannot run
                        failed += [f"{what} seed {t.seed}: no teachers" for t in waiting if t.setting.name == what]
                    continue
                if isinstance(what, str):
                    say(f"[{time.perf_counter() - start:7.1f}s] {what}: shared teachers ready")
                    pending |= {pool.submit(run_task, t): t for t in waiting if t.setting.name == result}
                else:
                    done(result)
    return failed


if __name__ == "__main__":
    sys.exit(main())
