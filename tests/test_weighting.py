"""The AE-KD weight solver and the teacher-gradient Gram, against an exact SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qp_reference import exact_min_norm, kkt_violation, objective

from ray_aekd.core.losses import kd_losses
from ray_aekd.core.weighting import (
    STRATEGIES,
    aekd_weights,
    kd_logit_gradients,
    min_norm_weights,
    strategy_tolerance,
    teacher_gram,
)


def random_problem(seed: int, num: int, dim: int, shared: float, cap_kind: str) -> tuple[np.ndarray, float]:
    """Gram of ``num`` gradients in R^dim sharing a common direction of strength ``shared``."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(num, dim)) + shared * rng.normal(size=(1, dim))
    gram = vectors @ vectors.T
    cap = {"uniform_edge": 1 / num + 1e-6, "random": float(rng.uniform(1 / num, 1)), "mgda": 1.0}[cap_kind]
    return gram, cap


def normalized(gram: np.ndarray) -> np.ndarray:
    return gram / (np.trace(gram) / gram.shape[0])


problems = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(2, 64),
    st.integers(1, 140),
    st.floats(0.0, 3.0),
    st.sampled_from(["uniform_edge", "random", "mgda"]),
)


@settings(max_examples=300, deadline=None)
@given(problems)
def test_solver_matches_exact_reference(problem):
    seed, num, dim, shared, cap_kind = problem
    gram, cap = random_problem(seed, num, dim, shared, cap_kind)
    ours = min_norm_weights(torch.tensor(gram), cap).numpy()
    reference = exact_min_norm(gram, cap)
    g = normalized(gram)

    # feasible
    assert abs(ours.sum() - 1) < 1e-9
    assert ours.min() >= 0 and ours.max() <= cap + 1e-9
    # optimal: KKT conditions hold and the objective matches the exact one
    assert kkt_violation(g, ours, cap) < 1e-6
    best = objective(g, reference)
    assert objective(g, ours) - best <= 1e-6 * max(best, 1.0)
    # and where the minimiser is unique and well conditioned, it is the same point
    eig = np.linalg.eigvalsh(g)
    if eig[0] > 1e-3 * eig[-1]:
        assert np.abs(ours - reference).max() <= 1e-4


@settings(max_examples=100, deadline=None)
@given(problems)
def test_float32_gram_gives_float32_weights_close_to_exact(problem):
    seed, num, dim, shared, cap_kind = problem
    gram, cap = random_problem(seed, num, dim, shared, cap_kind)
    ours = min_norm_weights(torch.tensor(gram, dtype=torch.float32), cap)
    assert ours.dtype == torch.float32
    g = normalized(gram)
    eig = np.linalg.eigvalsh(g)
    reference = exact_min_norm(gram, cap)
    assert abs(float(ours.sum()) - 1) < 1e-5
    if eig[0] > 1e-2 * eig[-1]:  # float32 rounding of G is amplified by the condition number
        assert np.abs(ours.double().numpy() - reference).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num", [2, 5, 17])
def test_weights_do_not_depend_on_gram_scale(num, dtype):
    gram, cap = random_problem(7, num, 12, 1.0, "random")
    base = min_norm_weights(torch.tensor(gram, dtype=dtype), cap)
    for exponent in range(-12, 7):
        scaled = min_norm_weights(torch.tensor(gram * 10.0**exponent, dtype=dtype), cap)
        torch.testing.assert_close(scaled, base, atol=1e-9 if dtype == torch.float64 else 1e-5, rtol=0)


def test_realistic_tiny_gram_is_solved_exactly():
    """Batch 128, 100 classes, T = 4: Gram trace ~1e-7, where absolute stopping rules fail."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(128, 100, generator=gen, dtype=torch.float64)
    teachers = torch.randn(5, 128, 100, generator=gen, dtype=torch.float64) * 3
    gram = teacher_gram(kd_logit_gradients(student, teachers, 4.0))
    assert 1e-9 < float(gram.trace()) < 1e-5
    ours = min_norm_weights(gram, 0.6).numpy()
    reference = exact_min_norm(gram.numpy(), 0.6)
    assert np.abs(ours - reference).max() <= 1e-6


@pytest.mark.parametrize("num", [1, 2, 3, 7, 64])
def test_tolerance_one_over_m_is_exactly_uniform(num):
    gram, _ = random_problem(3, num, 5, 1.0, "random")
    weights = min_norm_weights(torch.tensor(gram), 1 / num)
    assert torch.equal(weights, torch.full((num,), 1 / num, dtype=torch.float64))


def test_tolerance_one_is_the_mgda_min_norm_point():
    # two nearly opposite gradients and a third orthogonal one: MGDA balances them
    vectors = np.array([[1.0, 0.0, 0.0], [-0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    gram = vectors @ vectors.T
    weights = min_norm_weights(torch.tensor(gram), 1.0).numpy()
    reference = exact_min_norm(gram, 1.0)
    np.testing.assert_allclose(weights, reference, atol=1e-9)
    # the first two nearly cancel: the best point on their segment, by hand, has norm 0.0525
    # (t = 1.72 / 3.62 on the first), which bounds the min norm over the triangle
    assert np.linalg.norm(weights @ vectors) <= 0.0526
    assert np.linalg.norm(np.full(3, 1 / 3) @ vectors) > 0.33


def test_tolerance_caps_the_largest_weight():
    # one teacher has a tiny gradient: MGDA puts almost all weight on it, the cap limits that
    vectors = np.array([[0.01, 0.0], [1.0, 0.5], [0.5, 1.0], [1.0, 1.0]])
    gram = vectors @ vectors.T
    assert min_norm_weights(torch.tensor(gram), 1.0)[0] > 0.9
    capped = min_norm_weights(torch.tensor(gram), 0.4)
    assert float(capped.max()) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("num", [2, 3, 6, 7, 9])
def test_both_solver_paths_match_reference_around_the_switch(num):
    """M <= 6 enumerates active sets, larger M runs the interior point: both are exact."""
    for seed in range(10):
        gram, cap = random_problem(seed, num, num + 3, 0.5, "random")
        ours = min_norm_weights(torch.tensor(gram), cap).numpy()
        np.testing.assert_allclose(ours, exact_min_norm(gram, cap), atol=1e-8)


def test_batched_grams_solve_each_problem():
    grams = [random_problem(seed, 6, 9, 1.0, "random")[0] for seed in range(6)]
    batch = torch.tensor(np.stack(grams)).reshape(2, 3, 6, 6)
    weights = min_norm_weights(batch, 0.5)
    assert weights.shape == (2, 3, 6)
    for i, gram in enumerate(grams):
        torch.testing.assert_close(weights.reshape(6, 6)[i], min_norm_weights(torch.tensor(gram), 0.5))


def test_all_zero_gradients_give_uniform_weights():
    assert torch.equal(min_norm_weights(torch.zeros(4, 4), 0.7), torch.full((4,), 0.25))
    logits = torch.randn(16, 10)
    weights = aekd_weights(logits, logits.expand(3, 16, 10).clone(), temperature=4.0, tolerance=0.9)
    assert torch.equal(weights, torch.full((3,), 1 / 3))


def test_solver_never_reads_values_back_to_the_host():
    """On the meta device every data-dependent read (.item(), bool(), Python branching on
    values) raises, so this passing shows the solve can run asynchronously on a GPU."""
    for num in (2, 5, 33):
        out = min_norm_weights(torch.empty(3, num, num, device="meta"), 0.6)
        assert out.shape == (3, num) and out.device.type == "meta"
    for space in ("batch_mean", "per_sample"):
        out = aekd_weights(
            torch.empty(8, 10, device="meta"),
            torch.empty(4, 8, 10, device="meta"),
            4.0,
            0.5,
            space=space,
            check_finite=False,
        )
        assert out.shape == (4,)


@pytest.mark.parametrize(
    ("tolerance", "num", "message"),
    [(0.1, 5, r"\[0\.2, 1\] for M = 5"), (1.5, 3, r"\[0\.333333, 1\] for M = 3"), (float("nan"), 2, "got nan")],
)
def test_tolerance_outside_range_is_an_error_naming_the_range(tolerance, num, message):
    with pytest.raises(ValueError, match=message):
        min_norm_weights(torch.eye(num), tolerance)
    with pytest.raises(ValueError, match=message):
        aekd_weights(torch.zeros(4, 3), torch.zeros(num, 4, 3), temperature=2.0, tolerance=tolerance)


@pytest.mark.parametrize(
    ("gram", "message"),
    [
        (torch.zeros(3), r"\[\.\.\., M, M\]"),
        (torch.zeros(3, 4), r"\[\.\.\., M, M\]"),
        (torch.eye(3, dtype=torch.int64), "floating"),
    ],
)
def test_bad_gram_is_an_error(gram, message):
    with pytest.raises(ValueError, match=message):
        min_norm_weights(gram, 0.5)


def test_closed_form_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(12, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teachers = torch.randn(4, 12, 7, generator=gen, dtype=torch.float64) * 2
    closed = kd_logit_gradients(student, teachers, temperature=3.0)
    losses = kd_losses(student, teachers, temperature=3.0)
    for m in range(4):
        (auto,) = torch.autograd.grad(losses[m], student, retain_graph=True)
        torch.testing.assert_close(closed[m], auto, atol=1e-12, rtol=1e-10)


def test_gram_spaces():
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(3, 8, 5, generator=gen, dtype=torch.float64)
    means = grads.mean(1)
    torch.testing.assert_close(teacher_gram(grads, "batch_mean"), means @ means.T)
    flat = grads.flatten(1)
    torch.testing.assert_close(teacher_gram(grads, "per_sample"), flat @ flat.T)
    cosine = teacher_gram(grads, "per_sample", normalize=True)
    torch.testing.assert_close(cosine.diagonal(), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Valid spaces: batch_mean, per_sample"):
        teacher_gram(grads, "per_class")


@pytest.mark.parametrize("space", ["batch_mean", "per_sample"])
def test_reduce_hook_makes_two_workers_agree_with_the_full_batch(space):
    """Simulate a 2-worker all-reduce: each worker sees half the batch."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    teachers = torch.randn(4, 32, 10, generator=gen, dtype=torch.float64) * 2
    halves = [(student[:16], teachers[:, :16]), (student[16:], teachers[:, 16:])]

    seen: list[torch.Tensor] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor)
        return tensor

    for s, t in halves:
        aekd_weights(s, t, 4.0, 0.6, space=space, reduce=record)
    shapes = {"batch_mean": (4, 10), "per_sample": (4, 4)}
    assert seen[0].shape == shapes[space]

    # an all-reduce sum: each worker adds the other's tensor to its own
    per_worker = [
        aekd_weights(s, t, 4.0, 0.6, space=space, reduce=lambda x, other=seen[1 - i]: x + other)
        for i, (s, t) in enumerate(halves)
    ]
    torch.testing.assert_close(per_worker[0], per_worker[1], atol=0, rtol=0)
    full = aekd_weights(student, teachers, 4.0, 0.6, space=space)
    torch.testing.assert_close(per_worker[0], full, atol=1e-8, rtol=0)


def test_reduce_returning_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"reduce must return a tensor of shape \[3, 5\]"):
        aekd_weights(torch.zeros(4, 5), torch.randn(3, 4, 5), 2.0, 0.5, reduce=lambda t: t.sum(0))


def test_non_finite_teacher_logits_name_the_teacher():
    teachers = torch.randn(4, 8, 5)
    teachers[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="Teacher 2 produced non-finite logits"):
        aekd_weights(torch.randn(8, 5), teachers, 4.0, 0.5)
    teachers[3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"teachers \[2, 3\]"):
        aekd_weights(torch.randn(8, 5), teachers, 4.0, 0.5)
    student = torch.randn(8, 5)
    student[0, 0] = float("inf")
    with pytest.raises(ValueError, match="student produced non-finite"):
        aekd_weights(student, torch.randn(4, 8, 5), 4.0, 0.5)


@pytest.mark.parametrize(
    ("student", "teachers", "kwargs", "message"),
    [
        (torch.zeros(4, 5), torch.zeros(3, 4, 6), {}, r"\[M, B, K\] matching student_logits \[B, K\] = \[4, 5\]"),
        (torch.zeros(4, 5), torch.zeros(4, 5), {}, r"\[M, B, K\]"),
        (torch.zeros(4), torch.zeros(3, 4), {}, r"\[B, K\]"),
        (torch.zeros(4, 5), torch.zeros(0, 4, 5), {}, "no teachers"),
        (
            torch.zeros(4, 5),
            torch.zeros(3, 4, 5),
            {"temperature": 0.0},
            "temperature must be a finite number > 0; got 0.0",
        ),
        (torch.zeros(4, 5), torch.zeros(3, 4, 5), {"space": "diag"}, "Unknown gradient space 'diag'"),
    ],
)
def test_bad_aekd_inputs_are_errors(student, teachers, kwargs, message):
    args = {"temperature": 4.0, "tolerance": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        aekd_weights(student, teachers, **args)


def test_weights_are_detached_and_on_the_logits_dtype():
    student = torch.randn(8, 5, requires_grad=True)
    weights = aekd_weights(student, torch.randn(3, 8, 5), 4.0, 0.5)
    assert not weights.requires_grad and weights.dtype == torch.float32


def test_strategy_tolerance():
    assert STRATEGIES == ("average", "aekd", "mgda", "upgrad", "authors_svm", "fixed", "none")
    assert strategy_tolerance("average", 4) == 0.25
    assert strategy_tolerance("mgda", 4) == 1.0
    assert strategy_tolerance("aekd", 4, 0.6) == 0.6
    assert strategy_tolerance("authors_svm", 4, 0.6) == 0.6
    with pytest.raises(ValueError, match="Valid strategies: average, aekd, mgda, upgrad"):
        strategy_tolerance("mean", 4)
    with pytest.raises(ValueError, match="'upgrad' has no tolerance"):
        strategy_tolerance("upgrad", 4, 0.6)
    with pytest.raises(ValueError, match=r"\[0\.25, 1\] for M = 4"):
        strategy_tolerance("aekd", 4, 0.1)
    with pytest.raises(ValueError, match="needs a tolerance"):
        strategy_tolerance("aekd", 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_the_float32_weights(dtype):
    """Gradients are formed in float32: in float16 this Gram (trace ~1e-7) would underflow to 0."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(128, 100, generator=gen)
    teachers = torch.randn(3, 128, 100, generator=gen) * 3
    reference = aekd_weights(student.to(dtype).float(), teachers.to(dtype).float(), 4.0, 0.9)
    weights = aekd_weights(student.to(dtype), teachers.to(dtype), 4.0, 0.9)
    assert not torch.allclose(reference, torch.full((3,), 1 / 3), atol=0.02)  # a real, non-uniform answer
    torch.testing.assert_close(weights.float(), reference, atol=2e-3, rtol=0)


def test_non_finite_gram_gives_nan_weights_not_a_silent_answer():
    for num in (3, 8):
        gram = torch.eye(num, dtype=torch.float64)
        gram[0, 1] = gram[1, 0] = float("nan")
        assert torch.isnan(min_norm_weights(gram, 0.5)).all()
    batch = torch.eye(3).repeat(2, 1, 1)
    batch[1, 2, 2] = float("inf")
    out = min_norm_weights(batch, 0.5)
    assert torch.allclose(out[0], torch.full((3,), 1 / 3)) and torch.isnan(out[1]).all()
