"""UPGrad teacher weights (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

UPGrad projects each teacher's gradient ``g_i`` onto the dual cone of all the teachers'
gradients (the directions that increase no teacher's loss to first order) and averages the
projections. In weight space, with ``G`` the ``[M, M]`` Gram matrix of the gradients,

    w^(i) = argmin_w  w^T G w   s.t.  w >= e_i        (e_i: the i-th unit vector)
    w     = mean_i w^(i)

and the combined gradient is ``sum_m w_m g_m``. Properties the tests check: every teacher's
gradient has a non-negative inner product with the combined one (``G w >= 0``); when no two
gradients conflict (``G >= 0`` entrywise) it is exactly the average (``w = 1/M``); the weights
are non-negative and sum to at least 1; scaling ``G`` does not change them.

Why this one next to AE-KD and MGDA: it is exact and as cheap as AE-KD's solve (M quadratic
programs of M variables, from the same Gram), it needs no hyperparameter, and unlike the
min-norm point it does not shrink towards the smallest gradient: without conflict it is the
plain average, so any difference from ``average`` comes from resolving a conflict.

Each small QP is solved exactly by enumerating its active sets (``2^M`` patterns, batched), so
the solve has no data-dependent control flow. Torch only.
"""

from __future__ import annotations

import functools
import itertools

import torch

from ray_aekd.core._checks import check_num_teachers

__all__ = ["UPGRAD_MAX_TEACHERS", "upgrad_weights"]

#: The enumeration solves ``M * 2^M`` systems of size M; past this the cost is not worth it.
UPGRAD_MAX_TEACHERS = 12
_RIDGE = 1e-12
_SLACK = 1e-9


def upgrad_weights(gram: torch.Tensor) -> torch.Tensor:
    """UPGrad weights for one Gram matrix.

    Args:
        gram: ``[M, M]`` symmetric positive semi-definite Gram of the teachers' gradients, any
            positive scale.

    Returns:
        ``[M]`` non-negative weights (sum >= 1) in the Gram's dtype and on its device; uniform
        ``1/M`` for an all-zero Gram, NaN for a Gram holding NaN or Inf.

    Raises:
        ValueError: the Gram is not ``[M, M]`` floating point, or M > ``UPGRAD_MAX_TEACHERS``.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or not gram.is_floating_point():
        raise ValueError(f"gram must be a floating-point [M, M] tensor; got {gram.dtype} {list(gram.shape)}.")
    num = gram.shape[0]
    check_num_teachers(num)
    if num > UPGRAD_MAX_TEACHERS:
        raise ValueError(f"upgrad supports at most {UPGRAD_MAX_TEACHERS} teachers; got M = {num}.")
    uniform = torch.full((num,), 1.0 / num, dtype=gram.dtype, device=gram.device)
    with torch.no_grad():
        g = gram.detach().to(torch.float32 if gram.device.type == "mps" else torch.float64)
        g = 0.5 * (g + g.T)
        scale = g.diagonal().mean()
        finite = torch.isfinite(g).all()
        usable = finite & (scale > 0)
        g = torch.where(usable, g / torch.where(usable, scale, torch.ones_like(scale)), torch.zeros_like(g))
        weights = _projections(g).mean(0)
        weights = torch.where(usable, weights.to(gram.dtype), uniform)
        return torch.where(finite, weights, torch.nan)


def _projections(gram: torch.Tensor) -> torch.Tensor:
    """``[M, M]`` normalised Gram -> ``[M, M]``: row i is ``w^(i)``, the exact minimiser of
    ``w^T G w`` over ``w >= e_i``.

    A pattern leaves some coordinates free (``(G w)_j = 0``) and fixes the others at their bound.
    Every pattern's system is solved at once; of the solutions that respect the bounds, the one
    of least objective is the minimiser (the all-fixed pattern ``w = e_i`` always qualifies).
    """
    num = gram.shape[0]
    free = _patterns(num, gram.device)  # [P, M]
    eye = torch.eye(num, dtype=gram.dtype, device=gram.device)
    ridge = gram + _RIDGE * eye
    system = torch.where(free.unsqueeze(-1), ridge, eye)  # [P, M, M]: G rows where free, identity rows where fixed
    bounds = eye.unsqueeze(1)  # [M(i), 1, M]
    rhs = torch.where(free, 0.0, bounds)  # [M(i), P, M]
    solution, info = torch.linalg.solve_ex(system.unsqueeze(0), rhs.unsqueeze(-1))
    w = solution[..., 0]  # [M(i), P, M]
    feasible = (info == 0) & torch.isfinite(w).all(-1) & (w >= bounds - _SLACK).all(-1)
    usable = torch.where(feasible.unsqueeze(-1), w, 0.0)  # no NaN of a singular pattern in the sum
    objective = torch.where(feasible, torch.einsum("ipm,mn,ipn->ip", usable, gram, usable), torch.inf)
    best = objective.argmin(-1)  # [M(i)]
    chosen = w[torch.arange(num, device=gram.device), best]
    return torch.maximum(chosen, eye)  # within the slack of the bound: on it


@functools.cache
def _patterns(num: int, device: torch.device) -> torch.Tensor:
    """``[2^M, M]`` bool: every choice of free coordinates."""
    return torch.tensor(list(itertools.product((False, True), repeat=num)), device=device)
