"""KD, hint and combined losses, checked against formulas computed independently in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ray_aekd.core.losses import HintRegressors, distillation_loss, hint_losses, hint_weights, kd_losses
from ray_aekd.core.weighting import min_norm_weights, teacher_gram


def numpy_kd(student: np.ndarray, teachers: np.ndarray, temperature: float) -> np.ndarray:
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_s = softmax(student / temperature)
    out = []
    for t in teachers:
        p_t = softmax(t / temperature)
        out.append(temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)))
    return np.array(out)


def test_kd_losses_match_the_formula():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(16, 10)) * 2
    teachers = rng.normal(size=(3, 16, 10)) * 3
    for temperature in (1.0, 4.0, 20.0):
        ours = kd_losses(torch.tensor(student), torch.tensor(teachers), temperature).numpy()
        np.testing.assert_allclose(ours, numpy_kd(student, teachers, temperature), rtol=1e-10)


def test_kd_loss_is_zero_when_the_student_matches_and_positive_otherwise():
    logits = torch.randn(8, 5)
    teachers = torch.stack([logits, logits + 3 * torch.randn(8, 5)])
    losses = kd_losses(logits, teachers, 4.0)
    assert abs(float(losses[0])) < 1e-6 and float(losses[1]) > 0.01


def test_kd_losses_survive_extreme_logits():
    student = torch.tensor([[1e4, -1e4, 0.0]])
    teachers = torch.tensor([[[-1e4, 1e4, 0.0]]])
    assert torch.isfinite(kd_losses(student, teachers, 1.0)).all()


def test_distillation_loss_combines_terms_with_detached_weights():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teachers = torch.randn(3, 12, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (12,), generator=gen)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)

    out = distillation_loss(student, teachers, labels, weights, temperature=4.0, ce_weight=1.0, kd_weight=0.9)
    assert set(out) == {"loss", "ce", "kd", "kd/0", "kd/1", "kd/2", "weight/0", "weight/1", "weight/2"}
    kd = numpy_kd(student.detach().numpy(), teachers.numpy(), 4.0)
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert float(out["kd"].detach()) == pytest.approx(float(np.dot([0.2, 0.5, 0.3], kd)), rel=1e-10)
    assert float(out["loss"].detach()) == pytest.approx(float(ce.detach()) + 0.9 * float(out["kd"].detach()), rel=1e-10)
    for i in range(3):
        assert float(out[f"kd/{i}"].detach()) == pytest.approx(kd[i], rel=1e-10)

    out["loss"].backward()
    assert weights.grad is None  # alpha is a constant of the step
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_distillation_loss_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"teacher_weights must have shape \[M\] = \[3\]; got \[2\]"):
        distillation_loss(torch.zeros(4, 5), torch.zeros(3, 4, 5), torch.zeros(4, dtype=torch.long), torch.ones(2), 4.0)


class TinyStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = torch.relu(self.body(x))
        return self.head(feature.mean((2, 3))), feature


def test_hint_weights_walk_only_the_regressors_and_keep_the_graph():
    torch.manual_seed(0)
    student = TinyStudent()
    regressors = HintRegressors(8, [4, 6, 4])
    x = torch.randn(10, 3, 6, 6)
    teacher_features = [torch.randn(10, c, 6, 6) for c in (4, 6, 4)]
    logits, feature = student(x)
    hints = hint_losses(feature, teacher_features, regressors)
    assert hints.shape == (3,)

    weights = hint_weights(hints, feature, tolerance=0.6, space="per_sample")
    # nothing reached the student's parameters or the regressors' .grad
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in regressors.parameters())
    # the weights are the min-norm solution over the gradients on the feature
    grads = torch.stack([torch.autograd.grad(hints[m], feature, retain_graph=True)[0] for m in range(3)])
    torch.testing.assert_close(weights, min_norm_weights(teacher_gram(grads, "per_sample"), 0.6))

    out = distillation_loss(
        logits,
        torch.randn(3, 10, 5),
        torch.randint(0, 5, (10,)),
        torch.full((3,), 1 / 3),
        4.0,
        hints=hints,
        hint_teacher_weights=weights,
        hint_weight=2.0,
    )
    assert {"hint", "hint/0", "hint_weight/2"} <= set(out)
    out["loss"].backward()  # the graph is still whole: one backward through student and regressors
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in regressors.parameters())


def test_hint_regressors_on_flat_features_and_shape_errors():
    regressors = HintRegressors(8, [4, 2])
    outs = regressors(torch.randn(5, 8))
    assert [tuple(o.shape) for o in outs] == [(5, 4), (5, 2)]
    with pytest.raises(ValueError, match=r"teacher 1's feature is \[5, 3\]"):
        hint_losses(torch.randn(5, 8), [torch.randn(5, 4), torch.randn(5, 3)], regressors)
    with pytest.raises(ValueError, match="Got 1 teacher features for 2 hint regressors"):
        hint_losses(torch.randn(5, 8), [torch.randn(5, 4)], regressors)
    with pytest.raises(ValueError, match="at least one teacher"):
        HintRegressors(8, [])


def test_a_class_ruled_out_by_a_teacher_adds_nothing():
    student = torch.randn(4, 3)
    teachers = torch.randn(1, 4, 3)
    ruled_out = teachers.clone()
    ruled_out[..., 2] = float("-inf")
    loss = kd_losses(student, ruled_out, 2.0)
    assert torch.isfinite(loss).all()
    # equals the KL over the two remaining classes' teacher mass
    p_t = torch.softmax(ruled_out[0] / 2.0, -1)
    log_s = torch.log_softmax(student / 2.0, -1)
    expected = 4.0 * (p_t[:, :2] * (p_t[:, :2].log() - log_s[:, :2])).sum(-1).mean()
    torch.testing.assert_close(loss[0], expected)
