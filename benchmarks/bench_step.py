"""Time one distillation training step: averaged KD, AE-KD as built here, and AE-KD as the
authors' code does it; then the weight solver alone against scikit-learn's OneClassSVM.

    python benchmarks/bench_step.py [--repeats 15] [--solver-repeats 200] [--json PATH]

Prints one JSON object on stdout, and writes it to PATH with --json (progress goes to stderr). Variants are timed
round-robin, one call each in turn, so that drift on a shared machine hits all of them
alike; times are medians and ratios are medians of the per-round ratios. The inputs are
synthetic tensors: this measures speed only.

Setting: CPU, batch 64, 32x32x3 inputs, CIFAR ResNet-20 student (0.28 M parameters) with
100 classes, M = 5 teachers whose logits are given, T = 4, C = 0.6, SGD with momentum.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ray_aekd import __version__
from ray_aekd.core.losses import distillation_loss, kd_losses
from ray_aekd.core.weighting import aekd_weights, kd_logit_gradients, min_norm_weights, teacher_gram
from ray_aekd.models import cifar_resnet

BATCH, CLASSES, TEACHERS, TEMPERATURE, TOLERANCE = 64, 100, 5, 4.0, 0.6
TARGETS = {"aekd_over_average_max": 1.05, "authors_over_aekd_min": 3.0, "svm_over_solver_at_m5_min": 20.0}


def one_class_svm_weights(gram: np.ndarray, tolerance: float, tol: float = 1e-6) -> np.ndarray:
    """The authors' route: OneClassSVM on the raw Gram with nu = 1 / (C M), tol 1e-6."""
    from sklearn.svm import OneClassSVM

    num = gram.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svm = OneClassSVM(kernel="precomputed", nu=1.0 / (tolerance * num), tol=tol).fit(gram)
    weights = np.zeros(num)
    weights[svm.support_] = svm.dual_coef_[0]
    return weights / weights.sum()


class StepBench:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = cifar_resnet(20, num_classes=CLASSES)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.images = torch.randn(BATCH, 3, 32, 32)
        self.labels = torch.randint(0, CLASSES, (BATCH,))
        self.teachers = torch.randn(TEACHERS, BATCH, CLASSES) * 3
        self.uniform = torch.full((TEACHERS,), 1.0 / TEACHERS)

    def _finish(self, logits: torch.Tensor, weights: torch.Tensor) -> None:
        loss = distillation_loss(logits, self.teachers, self.labels, weights, TEMPERATURE)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def average(self) -> None:
        self._finish(self.model(self.images), self.uniform)

    def aekd(self) -> None:
        logits = self.model(self.images)
        self._finish(logits, aekd_weights(logits, self.teachers, TEMPERATURE, TOLERANCE))

    def authors(self) -> None:
        """One backward through the whole student per teacher to read the logit gradients,
        then a CPU OneClassSVM solve, then the real backward."""
        logits = self.model(self.images)
        logits.retain_grad()
        losses = kd_losses(logits, self.teachers, TEMPERATURE)
        grads = []
        for m in range(TEACHERS):
            self.optimizer.zero_grad(set_to_none=True)
            logits.grad = None
            losses[m].backward(retain_graph=True)
            grads.append(logits.grad.mean(0).clone())
        stacked = torch.stack(grads)
        gram = (stacked @ stacked.T).double().cpu().numpy()
        weights = torch.from_numpy(one_class_svm_weights(gram, TOLERANCE)).float()
        self._finish(logits, weights)


def timed_rounds(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed round-robin: one call of each per round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of slow/fast within the same round: robust to drift across rounds."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))


def solver_comparison(repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    gen = torch.Generator().manual_seed(1)
    for num in (2, 5, 10, 32):
        student = torch.randn(BATCH, CLASSES, generator=gen, dtype=torch.float64)
        teachers = torch.randn(num, BATCH, CLASSES, generator=gen, dtype=torch.float64) * 3
        gram = teacher_gram(kd_logit_gradients(student, teachers, TEMPERATURE))
        gram_np = gram.numpy()
        ours = functools.partial(min_norm_weights, gram, TOLERANCE)
        svm = functools.partial(one_class_svm_weights, gram_np, TOLERANCE)
        times = timed_rounds({"ours": ours, "svm": svm}, repeats, warmup=5)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        # accuracy on this realistic (tiny-scale) Gram, against the authors' own route run on
        # the normalised Gram with a tight tolerance, where it is accurate
        exact = one_class_svm_weights(gram_np / np.diag(gram_np).mean(), TOLERANCE, tol=1e-10)
        out[f"M={num}"] = {
            "ours_us": medians["ours"] * 1e6,
            "one_class_svm_us": medians["svm"] * 1e6,
            "svm_over_ours": paired_ratio(times, "svm", "ours"),
            "gram_trace": float(gram.trace()),
            "svm_max_abs_weight_error": float(np.abs(svm() - exact).max()),
            "ours_max_abs_weight_error": float(np.abs(ours().numpy() - exact).max()),
        }
        print(f"  solver M={num} done", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=25, help="timed steps per variant")
    parser.add_argument("--solver-repeats", type=int, default=200, help="timed solves per solver and M")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    # the solvers first: after heavy multi-threaded steps, spinning intra-op threads slow
    # every small op (ours and scikit-learn's alike) for a while
    print(f"timing the solvers, {args.solver_repeats} rounds per M ...", file=sys.stderr)
    solver = solver_comparison(args.solver_repeats)
    bench = StepBench()
    print(f"timing {args.repeats} rounds of 3 training steps ...", file=sys.stderr)
    times = timed_rounds({"average": bench.average, "aekd": bench.aekd, "authors": bench.authors}, args.repeats)
    step = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {
        "aekd_over_average": paired_ratio(times, "aekd", "average"),
        "authors_over_aekd": paired_ratio(times, "authors", "aekd"),
        "svm_over_solver_at_m5": solver["M=5"]["svm_over_ours"],
    }
    result = {
        "setting": {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "batch": BATCH,
            "classes": CLASSES,
            "teachers": TEACHERS,
            "student": "cifar_resnet20",
            "temperature": TEMPERATURE,
            "tolerance": TOLERANCE,
            "repeats": args.repeats,
        },
        "versions": {"ray_aekd": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "step_ms": {name: seconds * 1e3 for name, seconds in step.items()},
        "ratios": ratios,
        "targets": TARGETS,
        "meets_targets": {
            "aekd_over_average": ratios["aekd_over_average"] <= TARGETS["aekd_over_average_max"],
            "authors_over_aekd": ratios["authors_over_aekd"] >= TARGETS["authors_over_aekd_min"],
            "svm_over_solver_at_m5": ratios["svm_over_solver_at_m5"] >= TARGETS["svm_over_solver_at_m5_min"],
        },
        "solver": solver,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
