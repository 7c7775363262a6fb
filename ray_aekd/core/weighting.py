"""AE-KD teacher weights: the min-norm convex combination of teacher gradients.

Du et al., "Agree to Disagree: Adaptive Ensemble Knowledge Distillation in Gradient
Space", NeurIPS 2020. Given the gradients ``g_1 .. g_M`` that the teachers' KD losses put
on the student, AE-KD weights teacher ``m`` by ``alpha_m`` where

    alpha = argmin  alpha^T G alpha   s.t.  sum(alpha) = 1,  0 <= alpha_m <= C,

``G_mn = <g_m, g_n>`` and the tolerance ``C`` lies in ``[1/M, 1]``. ``C = 1/M`` forces the
uniform average; ``C = 1`` is MGDA's min-norm point.

The authors reach alpha through scikit-learn's ``OneClassSVM`` on the raw Gram, which stops
on an absolute tolerance and is far off when Gram entries are tiny (they are: trace ~1e-7
for batch 128, 100 classes, T = 4); ``ray_aekd.core.authors`` reproduces it as the
``authors_svm`` baseline. Here the Gram is first normalised by its mean diagonal,
so the weights do not depend on the gradients' scale. The QP is then solved exactly for
M <= 6 by enumerating its active sets (at most 3^M) in one batched solve, and for larger M by a
primal-dual interior-point method (Mehrotra predictor-corrector, fixed iteration count)
followed by one exact active-set polish. Every operation is a batched tensor op on the
Gram's device: no ``.item()``, no data-dependent Python control flow, so a CUDA step never
waits on the host. The solve runs in float64 (float32 on devices without float64) and
returns the Gram's dtype.

Deliberately left out: any dependency on Ray or MLflow (a test keeps it so); the
distributed all-reduce itself, which the caller passes in as ``reduce``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch.nn import functional as F

from ray_aekd._names import GRADIENT_SPACES, GRADIENT_STRATEGIES, TOLERANCE_STRATEGIES
from ray_aekd._names import STRATEGIES as _STRATEGY_NAMES
from ray_aekd.core._checks import check_logits, check_num_teachers, check_temperature, check_tolerance
from ray_aekd.core.authors import authors_svm_weights
from ray_aekd.core.upgrad import upgrad_weights

__all__ = [
    "STRATEGIES",
    "GradientSpace",
    "aekd_weights",
    "NonFiniteLogitsError",
    "check_finite_logits",
    "check_fixed_weights",
    "cosine_gram",
    "kd_logit_gradients",
    "min_norm_weights",
    "strategy_tolerance",
    "strategy_weights",
    "teacher_gram",
]

GradientSpace = Literal["batch_mean", "per_sample"]
_SPACES = GRADIENT_SPACES

#: Strategy names accepted in configs (one tuple with the config's; ``strategy_weights`` says
#: what each does).
STRATEGIES = _STRATEGY_NAMES

_IPM_ITERATIONS = 14
# Up to this M the QP is solved exactly by enumerating active sets (3^M small systems).
_ENUMERATE_MAX_TEACHERS = 6
_POLISH_PASSES = 2
_FRACTION_TO_BOUNDARY = 0.995


def strategy_tolerance(strategy: str, num_teachers: int, tolerance: float | None = None) -> float:
    """The tolerance C of a min-norm strategy: ``average`` (C = 1/M), ``aekd`` (the given C),
    ``mgda`` (C = 1) or ``authors_svm`` (the given C).

    Args:
        strategy: one of those four.
        num_teachers: M, the number of teachers (at least 1).
        tolerance: C for ``aekd`` and ``authors_svm``; ignored by the others.

    Returns:
        C in ``[1/M, 1]``.

    Raises:
        ValueError: unknown strategy, a strategy with no tolerance, M < 1, or ``aekd`` /
            ``authors_svm`` without a valid tolerance.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}. Valid strategies: {', '.join(STRATEGIES)}.")
    check_num_teachers(num_teachers)
    if strategy == "average":
        return 1.0 / num_teachers
    if strategy == "mgda":
        return 1.0
    if strategy not in TOLERANCE_STRATEGIES:
        raise ValueError(f"strategy {strategy!r} has no tolerance C (only {', '.join(TOLERANCE_STRATEGIES)} read one).")
    if tolerance is None:
        raise ValueError(f"strategy {strategy!r} needs a tolerance C in [1/M, 1]; got none.")
    return check_tolerance(tolerance, num_teachers)


def strategy_weights(
    gram: torch.Tensor,
    strategy: str,
    tolerance: float | None = None,
    normalize: bool = False,
    fixed: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The teachers' weights that a strategy gives for one step.

    Args:
        gram: ``[M, M]`` raw Gram of the teachers' gradients on the student (``teacher_gram``).
        strategy: ``average`` (uniform ``1/M``); ``aekd`` (min-norm point of the simplex capped
            at C = ``tolerance``); ``mgda`` (C = 1); ``upgrad`` (``ray_aekd.core.upgrad``: the
            mean of each gradient's projection on the teachers' dual cone; weights sum to >= 1);
            ``authors_svm`` (``ray_aekd.core.authors``: the AE-KD authors' OneClassSVM, a
            baseline; a host round trip per step); ``fixed`` (``fixed``, given); ``none`` (all 0:
            no KD term).
        tolerance: C for ``aekd`` and ``authors_svm``.
        normalize: solve on unit-norm gradients (the cosine matrix), then weight teacher m by
            ``w_m / ||g_m||`` rescaled to the solved weights' sum, so that the combined gradient
            points where the solve on unit gradients said (the authors' ``svm_norm``). Only the
            solving strategies read it.
        fixed: the weights of ``fixed``: M numbers >= 0 summing to 1.

    Returns:
        ``[M]`` detached weights in the Gram's dtype and on its device.

    Raises:
        ValueError: unknown strategy, bad tolerance or fixed weights (naming the field).
    """
    num = gram.shape[-1]
    check_num_teachers(num)
    if strategy == "average":
        return torch.full((num,), 1.0 / num, dtype=gram.dtype, device=gram.device)
    if strategy == "none":
        return torch.zeros(num, dtype=gram.dtype, device=gram.device)
    if strategy == "fixed":
        return torch.tensor(check_fixed_weights(fixed, num), dtype=gram.dtype, device=gram.device)
    if strategy not in GRADIENT_STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}. Valid strategies: {', '.join(STRATEGIES)}.")
    solve_on = cosine_gram(gram) if normalize else gram
    if strategy == "upgrad":
        weights = upgrad_weights(solve_on)
    elif strategy == "authors_svm":
        weights = authors_svm_weights(solve_on, strategy_tolerance(strategy, num, tolerance)).weights.to(gram.dtype)
    else:
        weights = min_norm_weights(solve_on, strategy_tolerance(strategy, num, tolerance))
    return (_per_unit_norm(weights, gram) if normalize else weights).detach()


def check_fixed_weights(fixed: tuple[float, ...] | list[float] | None, num_teachers: int) -> tuple[float, ...]:
    """``fixed`` as a tuple of M floats, each finite and >= 0, summing to 1 (within 1e-6).

    Raises:
        ValueError: naming the weights, the value and what is allowed.
    """
    allowed = f"{num_teachers} numbers >= 0 that sum to 1, one per teacher"
    if fixed is None or len(fixed) != num_teachers:
        raise ValueError(f"fixed weights: got {fixed!r}; strategy 'fixed' needs {allowed}.")
    values = tuple(float(w) for w in fixed)
    if not all(math.isfinite(w) and w >= 0 for w in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fixed weights: got {list(fixed)}; strategy 'fixed' needs {allowed}.")
    return values


def cosine_gram(gram: torch.Tensor) -> torch.Tensor:
    """``[..., M, M]`` Gram -> the Gram of the unit-norm gradients (cosines; a zero gradient's
    row and column stay zero)."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return gram / (safe.unsqueeze(-1) * safe.unsqueeze(-2))


def _per_unit_norm(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Weights solved on unit gradients -> weights on the raw losses: ``w_m / ||g_m||``,
    rescaled to the same sum; a teacher with a zero gradient gets 0. All-zero norms: unchanged."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    scaled = torch.where(norms > 0, weights / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
    total = scaled.sum(-1, keepdim=True)
    rescale = weights.sum(-1, keepdim=True) / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, scaled * rescale, weights)


def min_norm_weights(gram: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Weights of the min-norm point of the capped simplex under a Gram matrix.

    Solves ``argmin_a a^T G a`` subject to ``sum(a) = 1`` and ``0 <= a_m <= tolerance``.

    Args:
        gram: ``[..., M, M]`` symmetric positive semi-definite Gram matrices (a batch of
            problems is solved at once). Any positive scale: the weights of ``s * G`` are the
            weights of ``G``.
        tolerance: C in ``[1/M, 1]``. ``1/M`` returns exactly uniform weights; ``1`` is the
            unconstrained (MGDA) min-norm point.

    Returns:
        ``[..., M]`` weights in the Gram's dtype and on its device. An all-zero Gram (every
        gradient zero) gives uniform weights; a Gram holding NaN or Inf gives NaN weights, so
        that the step's loss shows it instead of a silent fallback. Where the minimiser is not unique (singular
        Gram) one minimiser is returned.

    Raises:
        ValueError: the Gram is not ``[..., M, M]`` or the tolerance is outside ``[1/M, 1]``.
    """
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must have shape [..., M, M]; got {list(gram.shape)}.")
    if not gram.is_floating_point():
        raise ValueError(f"gram must be a floating-point tensor; got dtype {gram.dtype}.")
    num = gram.shape[-1]
    check_num_teachers(num)
    cap = check_tolerance(tolerance, num)
    uniform = torch.full(gram.shape[:-1], 1.0 / num, dtype=gram.dtype, device=gram.device)
    if cap <= 1.0 / num:  # the feasible set is the single uniform point
        return uniform

    with torch.no_grad():
        g = gram.detach().to(_solve_dtype(gram))
        g = 0.5 * (g + g.transpose(-1, -2))
        scale = g.diagonal(dim1=-2, dim2=-1).mean(-1)
        nonzero = scale > 0
        finite = torch.isfinite(g).all(-1).all(-1)
        g = torch.where((nonzero & finite)[..., None, None], g, 0.0)
        g = g / torch.where(nonzero & finite, scale, torch.ones_like(scale))[..., None, None]
        if num <= _ENUMERATE_MAX_TEACHERS:
            alpha = _enumerate_active_sets(g, cap)
        else:
            alpha = _polish(g, *_interior_point(g, cap), cap)
        alpha = torch.where(nonzero[..., None], alpha.to(gram.dtype), uniform)
        return torch.where(finite[..., None], alpha, torch.nan)


def kd_logit_gradients(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Closed-form gradient of each teacher's KD loss on the student logits.

    ``KD_m = T^2 / B * sum_b KL(softmax(t_mb / T) || softmax(z_b / T))`` has
    ``dKD_m / dz = (T / B) * (softmax(z / T) - softmax(t_m / T))``.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[M, B, K]``.
        temperature: T > 0.

    Returns:
        ``[M, B, K]`` gradients, detached, in float32 or wider (float16 logits are promoted).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    batch = student_logits.shape[0]
    with torch.no_grad():
        # at least float32: in float16 the Gram of these small gradients underflows to zero
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        p_student = torch.softmax(student_logits.detach().to(dtype) / temperature, dim=-1)
        p_teacher = torch.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        return (temperature / batch) * (p_student.unsqueeze(0) - p_teacher)


def teacher_gram(
    gradients: torch.Tensor,
    space: GradientSpace = "batch_mean",
    normalize: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gram matrix of per-teacher gradients in the chosen gradient space.

    Args:
        gradients: ``[M, B, ...]`` per-teacher, per-sample gradients.
        space: ``batch_mean`` takes ``g_m = mean_b gradients[m, b]`` (what the AE-KD authors'
            code does); ``per_sample`` flattens the whole ``[B, ...]`` gradient, so Gram
            entries are sums of per-sample inner products.
        normalize: return the Gram of the unit-norm gradients (the cosine-similarity matrix;
            zero gradients stay zero), computed after ``reduce``, so every worker count gives
            the same matrix.
        reduce: called on the ``[M, D]`` batch means (``batch_mean``) or the ``[M, M]`` Gram
            (``per_sample``) before solving; the distributed layer passes an all-reduce here so
            every worker gets the same Gram. Must return a tensor of the same shape.

    Returns:
        ``[M, M]`` Gram matrix.
    """
    if space not in _SPACES:
        raise ValueError(f"Unknown gradient space {space!r}. Valid spaces: {', '.join(_SPACES)}.")
    if gradients.dim() < 2:
        raise ValueError(f"gradients must have shape [M, B, ...]; got {list(gradients.shape)}.")
    flat = gradients.flatten(2) if gradients.dim() > 2 else gradients.unsqueeze(-1)
    if space == "batch_mean":
        vectors = flat.mean(dim=1)  # [M, D]
        if reduce is not None:
            vectors = _reduced(reduce, vectors)
        gram = vectors @ vectors.transpose(0, 1)
    else:
        vectors = flat.flatten(1)  # [M, B * D]
        gram = vectors @ vectors.transpose(0, 1)
        if reduce is not None:
            gram = _reduced(reduce, gram)
    return cosine_gram(gram) if normalize else gram


def aekd_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    tolerance: float,
    space: GradientSpace = "batch_mean",
    normalize: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """AE-KD teacher weights for one step, from logits alone (no backward pass).

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[M, B, K]``, the teachers' logits stacked.
        temperature: T > 0 of the KD loss.
        tolerance: C in ``[1/M, 1]``.
        space: ``batch_mean`` or ``per_sample`` (see ``teacher_gram``).
        normalize: solve on unit-norm gradients and re-weight by ``1/||g_m||`` (``strategy_weights``).
        reduce: all-reduce hook for the ``[M, K]`` means or the ``[M, M]`` Gram, so that the
            weights are identical on every worker.
        check_finite: raise if any teacher's logits hold NaN or Inf. The check reads one
            boolean back from the device; pass False to keep the step free of host syncs.

    Returns:
        ``[M]`` detached weights summing to 1, each in ``[0, C]`` (with ``normalize`` the
        re-weighting may move a weight past C, as in the authors' code).

    Raises:
        ValueError: bad shapes, temperature <= 0, tolerance outside ``[1/M, 1]``, unknown
            space, or (with ``check_finite``) non-finite logits, naming the teacher index.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    check_tolerance(tolerance, teacher_logits.shape[0])
    if space not in _SPACES:
        raise ValueError(f"Unknown gradient space {space!r}. Valid spaces: {', '.join(_SPACES)}.")
    if check_finite:
        check_finite_logits(student_logits, teacher_logits)
    gradients = kd_logit_gradients(student_logits, teacher_logits, temperature)
    gram = teacher_gram(gradients, space=space, reduce=reduce)
    return strategy_weights(gram, "aekd", tolerance, normalize)


class NonFiniteLogitsError(ValueError):
    """Logits with NaN or Inf. ``teachers``: the indices of the teachers whose logits are not
    finite (empty: the student's are not); ``step``: the training step, when known."""

    def __init__(self, message: str, teachers: list[int], step: int | None = None) -> None:
        super().__init__(message)
        self.teachers, self.step = teachers, step


def check_finite_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise ``NonFiniteLogitsError`` naming the first teacher (or the student) with NaN/Inf logits.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[M, B, K]``.
    """
    finite = torch.isfinite(teacher_logits).flatten(1).all(dim=1)  # [M]
    student_ok = torch.isfinite(student_logits).all()
    flags = torch.cat([finite, student_ok.reshape(1)]).cpu()  # one host read for all checks
    if bool(flags.all()):
        return
    bad = [i for i, ok in enumerate(flags[:-1].tolist()) if not ok]
    if bad:
        raise NonFiniteLogitsError(
            f"Teacher {bad[0]} produced non-finite logits (NaN or Inf)"
            + (f"; teachers {bad} all did." if len(bad) > 1 else "."),
            bad,
        )
    raise NonFiniteLogitsError("The student produced non-finite logits (NaN or Inf).", [])


# --------------------------------------------------------------------------- solver


class _Iterate(NamedTuple):
    """Interior-point state and the factorised Newton system at one iteration."""

    primal: torch.Tensor  # [..., 2, M]: alpha and cap - alpha
    dual: torch.Tensor  # [..., 2, M]: their multipliers
    r_dual: torch.Tensor  # [..., M]: stationarity residual
    r_prim: torch.Tensor  # [..., 1]: sum(alpha) - 1
    h_inv: torch.Tensor  # [..., M, M]: (G + diag(sum D / P))^-1
    h_inv_ones: torch.Tensor  # [..., M]: H^-1 1
    h_inv_ones_sum: torch.Tensor  # [..., 1]: 1^T H^-1 1


def _interior_point(gram: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mehrotra predictor-corrector on the normalised QP; ``gram`` is ``[..., M, M]``.

    Primal slacks ``P = [alpha, cap - alpha]`` and their multipliers ``D`` are kept stacked
    as ``[..., 2, M]`` so that a Newton step is a handful of batched ops (at these sizes the
    cost is per-op dispatch, not arithmetic). The complementarity target never drops below
    ``floor``, so iterations past convergence stay well defined. Returns ``(P, D)``.
    """
    num = gram.shape[-1]
    dtype, device = gram.dtype, gram.device
    floor = 1e-14 if dtype == torch.float64 else 1e-7
    sign = torch.ones(2, 1, dtype=dtype, device=device)  # dP = sign * d_alpha; no host-to-device copy
    sign[1] = -1.0
    alpha = torch.full(gram.shape[:-1], 1.0 / num, dtype=dtype, device=device)
    primal = torch.stack([alpha, cap - alpha], dim=-2)
    dual = torch.ones_like(primal)
    nu = torch.zeros_like(alpha[..., :1])

    for _ in range(_IPM_ITERATIONS):
        alpha = primal[..., 0, :]
        complementarity = primal * dual
        mu = complementarity.sum((-1, -2), keepdim=True) / (2 * num)
        h_inv, _ = torch.linalg.inv_ex(gram + torch.diag_embed((dual / primal).sum(-2)))
        h_inv_ones = h_inv.sum(-1)  # H is symmetric
        state = _Iterate(
            primal=primal,
            dual=dual,
            r_dual=(gram @ alpha.unsqueeze(-1)).squeeze(-1) - nu - (dual * sign).sum(-2),
            r_prim=alpha.sum(-1, keepdim=True) - 1.0,
            h_inv=h_inv,
            h_inv_ones=h_inv_ones,
            h_inv_ones_sum=h_inv_ones.sum(-1, keepdim=True),
        )
        # predictor: pure Newton towards zero complementarity, to choose the centring
        p_aff, d_aff, _, t_aff = _newton_direction(state, -complementarity, sign)
        mu_aff = ((primal + t_aff * p_aff) * (dual + t_aff * d_aff)).sum((-1, -2), keepdim=True) / (2 * num)
        sigma_mu = (mu_aff / mu.clamp(min=torch.finfo(dtype).tiny)) ** 3 * mu
        # corrector, with the second-order term of the predictor
        target = sigma_mu.clamp(min=floor) - complementarity - p_aff * d_aff
        d_primal, d_dual, d_nu, t = _newton_direction(state, target, sign)
        t = _FRACTION_TO_BOUNDARY * t
        primal = primal + t * d_primal
        dual = dual + t * d_dual
        nu = nu + t[..., 0] * d_nu
    return primal, dual


def _newton_direction(
    state: _Iterate, target: torch.Tensor, sign: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``H d_alpha - d_nu 1 = rhs``, ``1^T d_alpha = -r_prim``, then ``dD`` from
    ``P dD + D dP = target`` with ``dP = sign * d_alpha``.

    Returns ``dP [..., 2, M]``, ``dD [..., 2, M]``, ``d_nu [..., 1]`` and the largest step in
    ``(0, 1]`` that keeps ``P`` and ``D`` non-negative, ``[..., 1, 1]``.
    """
    primal, dual = state.primal, state.dual
    tiny = torch.finfo(primal.dtype).tiny
    rhs = (target * sign / primal).sum(-2) - state.r_dual
    x_rhs = (state.h_inv @ rhs.unsqueeze(-1)).squeeze(-1)
    d_nu = -(state.r_prim + x_rhs.sum(-1, keepdim=True)) / state.h_inv_ones_sum
    d_primal = sign * (x_rhs + d_nu * state.h_inv_ones).unsqueeze(-2)
    d_dual = (target - dual * d_primal) / primal
    ratios = torch.cat([primal / (-d_primal).clamp(min=tiny), dual / (-d_dual).clamp(min=tiny)], dim=-2)
    return d_primal, d_dual, d_nu, ratios.flatten(-2).amin(-1).clamp(max=1.0)[..., None, None]


def _enumerate_active_sets(gram: torch.Tensor, cap: float) -> torch.Tensor:
    """Exact solve for small M: every coordinate is free, at 0 or at C. Solve the KKT system
    of every such pattern (up to ``3^M``) in one batched solve and keep the feasible one of
    least objective. ``gram`` is ``[..., M, M]`` (normalised); returns ``[..., M]``.

    A ridge of ``1e-12`` keeps every pattern's system non-singular when the Gram is
    singular; it moves the objective by at most 1e-12.
    """
    num = gram.shape[-1]
    # at most floor(1 / C) weights can sit at the cap C, since the weights sum to 1
    template = _enumeration_template(num, gram.device, gram.dtype, int(1.0 / cap + 1e-9))  # P patterns
    ridge = 1e-12 * torch.eye(num, dtype=gram.dtype, device=gram.device)
    alpha, regular = _solve_kkt((gram + ridge).unsqueeze(-3), template, cap)  # [..., P, M], [..., P]
    alpha = torch.where(regular[..., None], alpha, 0.0)
    objective = torch.where(regular & _within_bounds(alpha, cap), _quadratic(gram.unsqueeze(-3), alpha), torch.inf)
    best = objective.argmin(-1)  # [...]
    chosen = torch.gather(alpha, -2, best[..., None, None].expand(*best.shape, 1, num)).squeeze(-2)
    return chosen.clamp(0.0, cap)


def _polish(gram: torch.Tensor, primal: torch.Tensor, dual: torch.Tensor, cap: float) -> torch.Tensor:
    """Solve the KKT system exactly on the active set that the interior point suggests.

    A bound is taken as active where its slack is smaller than its multiplier (at the
    optimum one of the two is zero), which needs no threshold on alpha's scale. A second
    pass puts free coordinates that left ``[0, cap]`` in the first onto their bound (a
    nearly degenerate coordinate can be misread). A polished point replaces the interior
    point only where it is feasible and no worse.
    """
    at_zero, at_cap = (primal < dual).unbind(-2)
    best = primal[..., 0, :]
    for _ in range(_POLISH_PASSES):
        alpha, regular = _solve_kkt(gram, _kkt_template(~(at_zero | at_cap), at_cap, gram.dtype), cap)
        feasible = regular & _within_bounds(alpha, cap)
        clamped = alpha.clamp(0.0, cap)
        better = feasible & (_quadratic(gram, clamped) <= _quadratic(gram, best) + 1e-12)
        best = torch.where(better[..., None], clamped, best)
        at_zero = at_zero | (regular[..., None] & (alpha < 0))
        at_cap = at_cap | (regular[..., None] & (alpha > cap))
    return best


class _KKTTemplate(NamedTuple):
    """The parts of the active-set KKT systems that do not depend on the Gram.

    Row i of the ``[M+1, M+1]`` system is ``G_i. alpha - nu = 0`` for a free i and
    ``alpha_i = bound`` otherwise; the last row is ``sum(alpha) = 1``.
    """

    use_gram: torch.Tensor  # [..., M+1, M+1] bool: the entry comes from the Gram
    constant: torch.Tensor  # [..., M+1, M+1]: identity rows, the -nu column, the sum row
    rhs_cap: torch.Tensor  # [..., M+1]: times C, the right-hand side of the at-cap rows
    rhs_sum: torch.Tensor  # [M+1]: the 1 of the sum row


def _kkt_template(free: torch.Tensor, at_cap: torch.Tensor, dtype: torch.dtype) -> _KKTTemplate:
    """Templates for active sets given as bool masks ``free``, ``at_cap`` ``[..., M]``."""
    num = free.shape[-1]
    eye = torch.eye(num, dtype=dtype, device=free.device)
    constant = F.pad(torch.where(free.unsqueeze(-1), 0.0, eye), (0, 1, 0, 1))
    constant = constant + F.pad(-free.to(dtype).unsqueeze(-1), (num, 0, 0, 1))  # the -nu column
    constant[..., num, :num] = 1.0  # the sum row
    use_gram = torch.zeros(constant.shape, dtype=torch.bool, device=free.device)
    use_gram[..., :num, :num] = free.unsqueeze(-1)
    rhs_sum = torch.zeros(num + 1, dtype=dtype, device=free.device)
    rhs_sum[num] = 1.0
    return _KKTTemplate(use_gram, constant, F.pad(at_cap.to(dtype), (0, 1)), rhs_sum)


@functools.cache
def _enumeration_template(num: int, device: torch.device, dtype: torch.dtype, max_at_cap: int) -> _KKTTemplate:
    """The template of every pattern with at most ``max_at_cap`` weights at the cap (of the
    ``3^M`` patterns), built once per M, device, dtype and bound."""
    codes = torch.tensor(list(itertools.product((0, 1, 2), repeat=num)))  # 0 free, 1 at 0, 2 at C
    codes = codes[(codes == 2).sum(-1) <= max_at_cap].to(device)
    return _kkt_template(codes == 0, codes == 2, dtype)


def _solve_kkt(gram: torch.Tensor, template: _KKTTemplate, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise over active sets: ``alpha_i = 0`` / ``= cap`` where fixed, the rest free.

    Args:
        gram: ``[..., M, M]``, broadcast against the template's batch of active sets.

    Returns:
        ``alpha [..., M]`` (not clamped) and ``regular [...]``: the system was non-singular
        and its solution finite.
    """
    num = gram.shape[-1]
    kkt = torch.where(template.use_gram, F.pad(gram, (0, 1, 0, 1)), template.constant)
    rhs = template.rhs_cap * cap + template.rhs_sum
    solution, info = torch.linalg.solve_ex(kkt, rhs.unsqueeze(-1))
    alpha = solution[..., :num, 0]
    return alpha, (info == 0) & torch.isfinite(alpha).all(-1)


def _within_bounds(alpha: torch.Tensor, cap: float, slack: float = 1e-10) -> torch.Tensor:
    """``[..., M] -> [...]``: every weight in ``[-slack, cap + slack]``."""
    return (alpha >= -slack).all(-1) & (alpha <= cap + slack).all(-1)


def _quadratic(gram: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha^T G alpha`` for ``gram [..., M, M]``, ``alpha [..., M]`` -> ``[...]``."""
    return (alpha.unsqueeze(-2) @ gram @ alpha.unsqueeze(-1))[..., 0, 0]


def _solve_dtype(gram: torch.Tensor) -> torch.dtype:
    return torch.float32 if gram.device.type == "mps" else torch.float64


def _reduced(reduce: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    out = reduce(tensor)
    if not isinstance(out, torch.Tensor) or out.shape != tensor.shape:
        raise ValueError(
            f"reduce must return a tensor of shape {list(tensor.shape)}; got "
            f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}."
        )
    return out
