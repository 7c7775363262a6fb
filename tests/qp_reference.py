"""An independent, exact reference for the capped-simplex QP, in NumPy/SciPy float64.

    min a^T G a   s.t.  sum(a) = 1,  0 <= a <= C.

SciPy's SLSQP finds an approximate minimiser; its active set is then solved exactly as a
KKT linear system, and the KKT conditions (feasibility, stationarity, multiplier signs) are
verified. ``exact_min_norm`` raises if verification fails, so a test never compares against
an unverified point.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


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


def exact_min_norm(gram: np.ndarray, cap: float, active_tol: float = 1e-6) -> np.ndarray:
    gram = 0.5 * (gram + gram.T)
    num = gram.shape[0]
    if cap * num <= 1 + 1e-12:
        return np.full(num, 1.0 / num)
    scale = np.trace(gram) / num
    g = gram / scale if scale > 0 else gram
    res = minimize(
        lambda a: a @ g @ a,
        np.full(num, 1.0 / num),
        jac=lambda a: 2 * g @ a,
        bounds=[(0.0, cap)] * num,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones_like(a)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    best = np.clip(res.x, 0, cap)
    best /= best.sum()
    for tol in (active_tol, 1e-4, 1e-8):
        candidate = _solve_active_set(g, best, cap, tol)
        if candidate is not None and kkt_violation(g, candidate, cap) < 1e-9:
            return candidate
    if kkt_violation(g, best, cap) < 1e-7:
        return best
    raise AssertionError("reference solver could not verify an optimum")


def _solve_active_set(g: np.ndarray, approx: np.ndarray, cap: float, tol: float) -> np.ndarray | None:
    num = g.shape[0]
    at_zero = approx < tol
    at_cap = approx > cap - tol
    free = ~(at_zero | at_cap)
    alpha = np.where(at_cap, cap, 0.0)
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return alpha if abs(alpha.sum() - 1) < 1e-12 else None
    # [G_FF  -1] [a_F]   [-G_FU C]
    # [1^T    0] [nu ] = [1 - C |U|]
    kkt = np.zeros((idx.size + 1, idx.size + 1))
    kkt[:-1, :-1] = g[np.ix_(idx, idx)]
    kkt[:-1, -1] = -1
    kkt[-1, :-1] = 1
    rhs = np.concatenate([-g[idx] @ alpha, [1 - alpha.sum()]])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    alpha[idx] = sol[:-1]
    if (alpha < -1e-12).any() or (alpha > cap + 1e-12).any() or abs(alpha.sum() - 1) > 1e-10:
        return None
    del num
    return np.clip(alpha, 0, cap)
