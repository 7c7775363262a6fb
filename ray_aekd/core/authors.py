"""The AE-KD authors' released weight solver, reproduced as a baseline (never a default).

The released code (github.com/AnTuo1998/AE-KD, ``helper/optimization.py``) solves the AE-KD
quadratic program with scikit-learn's ``OneClassSVM(kernel="precomputed", nu=1/(M*C), tol=1e-6)``
fitted on the raw Gram of the batch-mean gradients of the teachers' KD losses on the student's
logits, and reads the weights as ``dual_coef_ / (M * nu)`` at ``support_``. libsvm's tolerance is
absolute, and in real training the Gram's entries are tiny (trace ~1e-5 to 1e-7), so the solver
often stops before its first iteration and returns its starting point: the first ``floor(1/C)``
teachers at C, the next one at the remainder, the others at 0 (``[0.6, 0.4, 0]`` for M = 3,
C = 0.6) whatever the gradients. ``AuthorsSolve.at_start`` tells when that happened.

The Gram is used as given, with no rescaling, because reproducing that behaviour is the point.
Runs on the host (a device-to-host copy per step) and needs scikit-learn.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ray_aekd.core._checks import check_num_teachers, check_tolerance

__all__ = ["AUTHORS_SVM_TOL", "AuthorsSolve", "authors_svm_weights", "libsvm_start"]

#: The released code's stopping tolerance.
AUTHORS_SVM_TOL = 1e-6


class AuthorsSolve(NamedTuple):
    """One solve of the authors' solver.

    Attributes:
        weights: ``[M]`` float32 weights (sum 1, each at most C), on the Gram's device.
        iterations: libsvm's iteration count (``OneClassSVM.n_iter_``).
        at_start: the weights are libsvm's starting point (``libsvm_start``): the solver did
            not move, so the weights say nothing about the gradients.
    """

    weights: torch.Tensor
    iterations: int
    at_start: bool


def libsvm_start(num_teachers: int, tolerance: float) -> np.ndarray:
    """``[M]`` the weights libsvm's one-class solver starts from: ``nu * M = 1/C`` units of
    dual weight on the first teachers in order, scaled by ``C`` (``[0.6, 0.4, 0]`` for M = 3, C = 0.6)."""
    mass = 1.0 / tolerance  # nu * M
    full = min(num_teachers, math.floor(mass + 1e-12))
    start = np.zeros(num_teachers)
    start[:full] = 1.0
    if full < num_teachers:
        start[full] = mass - full
    return start * tolerance


def authors_svm_weights(gram: torch.Tensor, tolerance: float) -> AuthorsSolve:
    """The released solver's weights for one ``[M, M]`` Gram and tolerance C.

    Args:
        gram: ``[M, M]`` Gram of the teachers' batch-mean logit gradients, unscaled.
        tolerance: C in ``[1/M, 1]``; ``nu = 1 / (M * C)``.

    Raises:
        ValueError: bad shape or tolerance; ImportError naming the package when scikit-learn is missing.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must have shape [M, M]; got {list(gram.shape)}.")
    num = gram.shape[0]
    check_num_teachers(num)
    cap = check_tolerance(tolerance, num)
    try:
        from sklearn.svm import OneClassSVM
    except ImportError as error:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("strategy 'authors_svm' needs scikit-learn: pip install scikit-learn") from error
    nu = min(1.0, 1.0 / (num * cap))
    matrix = gram.detach().to("cpu", torch.float32).numpy()  # the released code hands libsvm a float32 Gram
    svm = OneClassSVM(kernel="precomputed", nu=nu, tol=AUTHORS_SVM_TOL).fit(matrix)
    weights = np.zeros(num)
    weights[svm.support_] = svm.dual_coef_[0] / (num * nu)
    at_start = bool(np.allclose(weights, libsvm_start(num, cap), rtol=0.0, atol=1e-9))
    iterations = int(np.asarray(svm.n_iter_).reshape(-1)[0])
    return AuthorsSolve(torch.as_tensor(weights, dtype=torch.float32, device=gram.device), iterations, at_start)
