"""An independent, exact reference for the capped-simplex QP, in NumPy/SciPy float64.

    min a^T G a   s.t.  sum(a) = 1,  0 <= a <= C.

SciPy's bounded least squares (BVLS, with the sum as a heavy penalty row; SLSQP where that
fails) finds an approximate minimiser; its active set is then solved exactly as a KKT
linear system, corrected by primal-dual active-set steps, and the KKT conditions
(feasibility, stationarity, multiplier signs) are verified. ``exact_min_norm`` raises if
verification fails, so a test never compares against an unverified point.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import lsq_linear, minimize


def objective(gram: np.ndarray, alpha: np.ndarray) -> float:
    return float(alpha @ gram @ alpha)


def kkt_violation(gram: np.ndarray, alpha: np.ndarray, cap: float) -> float:
    """Largest violation of the KKT conditions at ``alpha`` (0 at an exact optimum).

    Stationarity: ``grad_i = 2 (G a)_i`` equals one multiplier ``nu`` on free coordinates,
    is >= nu where ``a_i = 0`` and <= nu where ``a_i = C``.
    """
    grad = 2 * gram @ alpha
    scale = max(1.0, float(np.abs(grad).max()))
    infeasible = max(abs(alpha.sum() - 1), float(np.maximum(-alpha, 0).max()), float(np.maximum(alpha - cap, 0).max()))
    # nu must lie in [max over i with a_i > 0 of grad_i, min over i with a_i < C of grad_i];
    # with soft thresholds, measure how far that interval is from being non-empty.
    eps = 1e-9
    lower = grad[alpha > eps].max(initial=-np.inf)  # a_i > 0  => grad_i <= nu
    upper = grad[alpha < cap - eps].min(initial=np.inf)  # a_i < C => grad_i >= nu
    gap = max(0.0, lower - upper) / scale
    return max(infeasible, gap)


def exact_min_norm(gram: np.ndarray, cap: float) -> np.ndarray:
    gram = 0.5 * (gram + gram.T)
    num = gram.shape[0]
    if cap * num <= 1 + 1e-12:
        return np.full(num, 1.0 / num)
    scale = np.trace(gram) / num
    g = gram / scale if scale > 0 else gram
    for approximate in (_penalised_bvls, _slsqp):  # the second only where the first fails
        approx = approximate(g, cap)
        if kkt_violation(g, approx, cap) < 1e-10:
            return approx
        for tol in (1e-6, 1e-4, 1e-8, 1e-10):
            candidate = _active_set_refinement(g, approx, cap, tol)
            if candidate is not None:
                return candidate
    raise AssertionError("reference solver could not verify an optimum")


def _slsqp(g: np.ndarray, cap: float) -> np.ndarray:
    num = g.shape[0]
    res = minimize(
        lambda a: a @ g @ a,
        np.full(num, 1.0 / num),
        jac=lambda a: 2 * g @ a,
        bounds=[(0.0, cap)] * num,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones_like(a)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return np.clip(res.x, 0, cap)


def _penalised_bvls(g: np.ndarray, cap: float, weight: float = 1e4) -> np.ndarray:
    """Bounded least squares (an exact active-set method) with sum(a) = 1 as a heavy row."""
    eig, vecs = np.linalg.eigh(g)
    rows = np.sqrt(np.clip(eig, 0, None))[:, None] * vecs.T  # rows^T rows = g
    a_mat = np.vstack([rows, weight * np.ones((1, g.shape[0]))])
    target = np.concatenate([np.zeros(g.shape[0]), [weight]])
    return lsq_linear(a_mat, target, bounds=(0.0, cap), method="bvls", tol=1e-14).x


def _active_set_refinement(
    g: np.ndarray, approx: np.ndarray, cap: float, tol: float, max_steps: int = 30
) -> np.ndarray | None:
    """Primal-dual active-set steps from the active set that ``approx`` suggests; returns a
    point whose KKT conditions are verified, or None."""
    at_zero = approx < tol
    at_cap = approx > cap - tol
    for _ in range(max_steps):
        alpha, nu = _solve_active_set(g, at_zero, at_cap, cap)
        if alpha is None:
            return None
        if kkt_violation(g, alpha, cap) < 1e-9:
            return np.clip(alpha, 0, cap)
        grad = 2 * g @ alpha
        # fix coordinates that left the box; free bounds whose multiplier has the wrong sign
        new_zero = (alpha < 0) | (at_zero & (grad >= nu))
        new_cap = (alpha > cap) | (at_cap & (grad <= nu))
        if np.array_equal(new_zero, at_zero) and np.array_equal(new_cap, at_cap):
            return None
        at_zero, at_cap = new_zero, new_cap & ~new_zero
    return None


def _solve_active_set(
    g: np.ndarray, at_zero: np.ndarray, at_cap: np.ndarray, cap: float
) -> tuple[np.ndarray | None, float]:
    free = ~(at_zero | at_cap)
    alpha = np.where(at_cap, cap, 0.0)
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return (alpha, 0.0) if abs(alpha.sum() - 1) < 1e-12 else (None, 0.0)
    # [2 G_FF  -1] [a_F]   [-2 G_FU C]
    # [1^T      0] [nu ] = [1 - C |U|]
    kkt = np.zeros((idx.size + 1, idx.size + 1))
    kkt[:-1, :-1] = 2 * g[np.ix_(idx, idx)]
    kkt[:-1, -1] = -1
    kkt[-1, :-1] = 1
    rhs = np.concatenate([-2 * g[idx] @ alpha, [1 - alpha.sum()]])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    alpha[idx] = sol[:-1]
    return alpha, float(sol[-1])
