"""The engine's steps on real digits data, in-process (no Ray)."""

from __future__ import annotations

import pytest
import torch

from ray_aekd.core.losses import distillation_loss
from ray_aekd.core.step import DistillSettings, classification_epoch, distill_step, evaluate, make_optimizer
from ray_aekd.data import normalize, split_indices
from ray_aekd.data.sources import digits_source
from ray_aekd.models import build_model


@pytest.fixture(scope="module")
def digits():
    source = digits_source()
    train, val = split_indices(len(source), 0.2, seed=0)
    x = normalize(source.images, source.mean, source.std)
    return x[train], source.labels[train], x[val], source.labels[val]


def batches(x, y, size=64, seed=0):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(y), size):
        idx = order[i : i + size]
        yield x[idx], y[idx]


def test_a_classifier_learns_digits(digits):
    x, y, xv, yv = digits
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1)
    optimizer, scheduler = make_optimizer(model, 0.05, 0.9, 5e-4, "cosine", epochs=5)
    for epoch in range(5):
        metrics = classification_epoch(model, batches(x, y, seed=epoch), optimizer)
        scheduler.step()
    assert metrics["train/acc1"] > 0.8
    val, logits = evaluate(model, xv, yv)
    assert val["val/acc1"] > 0.85 and logits.shape == (len(yv), 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    with pytest.raises(ValueError, match="got no batches"):
        classification_epoch(model, iter(()), optimizer)


def test_multistep_schedule():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, 1.0, 0.9, 0.0, "multistep", epochs=10, milestones=(2, 4))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


@pytest.fixture(scope="module")
def teachers(digits):
    x, y, _, _ = digits
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("digits_mlp", 10, in_channels=1)
        optimizer, _ = make_optimizer(model, 0.05, 0.9, 0.0, "constant", epochs=3)
        for epoch in range(3):
            classification_epoch(model, batches(x, y, seed=epoch + 10 * seed), optimizer)
        out.append(model.eval())
    with torch.inference_mode():
        return torch.stack([t(x) for t in out])  # [3, N, 10]


@pytest.mark.parametrize("strategy", ["average", "aekd", "mgda"])
def test_distill_step_trains_a_student(digits, teachers, strategy):
    x, y, xv, yv = digits
    torch.manual_seed(0)
    student = build_model("digits_mlp", 10, in_channels=1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    settings = DistillSettings(strategy=strategy, tolerance=0.6)
    first = None
    for epoch in range(3):
        for step, idx in enumerate(torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).split(64)):
            out = distill_step(student, x[idx], y[idx], teachers[:, idx], optimizer, settings, step=step)
            first = out["loss"] if first is None else first
            weights = torch.stack([out[f"weight/{m}"] for m in range(3)])
            assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
            assert float(weights.max()) <= {"average": 1 / 3, "aekd": 0.6, "mgda": 1.0}[strategy] + 1e-6
            if strategy == "average":
                assert torch.equal(weights, torch.full((3,), 1 / 3))
    assert float(out["loss"]) < 0.5 * float(first)
    assert evaluate(student, xv, yv)[0]["val/acc1"] > 0.85


def test_distill_step_is_the_documented_loss_with_one_update():
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3)
    x, y, t = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randn(2, 8, 3)
    before = [p.detach().clone() for p in student.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    out = distill_step(student, x, y, t, optimizer, DistillSettings(strategy="average", temperature=2.0))
    # recompute with the parameters before the step: same loss, and SGD moved them by lr * grad
    reference = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p, b in zip(reference.parameters(), before, strict=True):
            p.copy_(b)
    expected = distillation_loss(reference(x), t, y, torch.full((2,), 0.5), 2.0)["loss"]
    expected.backward()
    torch.testing.assert_close(out["loss"], expected.detach())
    for p, b, r in zip(student.parameters(), before, reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * r.grad)


def test_non_finite_teacher_stops_with_the_teacher_and_the_step():
    student = torch.nn.Linear(4, 3)
    t = torch.randn(3, 8, 3)
    t[1, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"Teacher 1 produced non-finite logits.*\(at step 7\)"):
        distill_step(
            student, torch.randn(8, 4), torch.zeros(8, dtype=torch.long), t, optimizer, DistillSettings(), step=7
        )


def test_identical_teachers_give_the_same_update_under_every_strategy(digits, teachers):
    """With M copies of one teacher, every convex combination is that teacher: average, AE-KD
    and MGDA must move the student identically; and the teachers' logits are left untouched."""
    x, y, _, _ = digits
    same = teachers[:1, :64].expand(3, -1, -1).clone()
    frozen = same.clone()
    states = {}
    for strategy in ("average", "aekd", "mgda"):
        torch.manual_seed(0)
        student = build_model("digits_cnn", 10, in_channels=1)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            distill_step(student, x[:64], y[:64], same, optimizer, DistillSettings(strategy=strategy, tolerance=0.5))
        states[strategy] = student.state_dict()
        assert any(not torch.equal(before[k], v) for k, v in states[strategy].items())  # the student moved
    assert torch.equal(same, frozen)
    for strategy in ("aekd", "mgda"):
        for key, value in states["average"].items():
            torch.testing.assert_close(states[strategy][key], value, rtol=1e-5, atol=1e-6)


def test_hint_level_aekd_step(digits, teachers):
    """Hints: the student and its per-teacher regressors learn, hint terms get their own AE-KD
    weights within [0, C] summing to 1."""
    from ray_aekd.core.losses import HintRegressors
    from ray_aekd.core.step import HintStudent

    x, y, _, _ = digits
    torch.manual_seed(0)
    student = HintStudent(build_model("digits_mlp", 10, in_channels=1), "body", HintRegressors(128, [16, 16, 16]))
    features = [torch.randn(64, 16, generator=torch.Generator().manual_seed(m)) for m in range(3)]
    regressor_before = student.regressors.regressors[0].weight.detach().clone()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    settings = DistillSettings(strategy="aekd", tolerance=0.5, hint_weight=0.5)
    first = distill_step(student, x[:64], y[:64], teachers[:, :64], optimizer, settings, teacher_features=features)
    for _ in range(20):
        out = distill_step(student, x[:64], y[:64], teachers[:, :64], optimizer, settings, teacher_features=features)
    alpha = torch.stack([out[f"hint_weight/{m}"] for m in range(3)])
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-6) and float(alpha.max()) <= 0.5 + 1e-6
    assert float(out["hint"]) < float(first["hint"])
    assert not torch.equal(student.regressors.regressors[0].weight, regressor_before)
    with pytest.raises(ValueError, match="needs teacher_features"):
        distill_step(student, x[:64], y[:64], teachers[:, :64], optimizer, settings)


def test_validation_metrics_from_sums():
    from ray_aekd.core.metrics import validation_metrics, validation_sums

    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [4.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    ensemble = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    halves = validation_sums(logits[:2], labels[:2], ensemble[:2]) + validation_sums(
        logits[2:], labels[2:], ensemble[2:]
    )
    metrics = validation_metrics(halves)
    whole = validation_metrics(validation_sums(logits, labels, ensemble))
    assert metrics == pytest.approx(whole)  # sums add up across batches (and workers)
    confidence = float(logits.softmax(-1).max(-1).values[0])
    assert metrics["val/acc1"] == 0.5 and metrics["val/acc5"] == 1.0 and metrics["val/agreement"] == 0.75
    assert metrics["val/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    assert metrics["val/ece"] == pytest.approx(abs(confidence - 0.5))  # all four in one bin, half right
