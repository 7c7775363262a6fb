"""``benchmarks/paper_gpu.py``: the authors' CIFAR-100 setting for one GPU, exercised in its CPU
tiny mode (synthetic 32x32 data, tiny nets, a few batches per phase, the product's ``distill`` on
a local Ray), plus the pieces a GPU run relies on that can be checked here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import loaded_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_gpu.py"
ARMS = ("average", "aekd", "authors_svm")


@pytest.fixture(scope="module")
def paper_gpu():
    with loaded_script(SCRIPT) as module:
        yield module


def test_milestones_scale_the_authors_150_180_210_of_240(paper_gpu):
    assert paper_gpu.scaled_milestones(240) == (150, 180, 210)
    assert paper_gpu.scaled_milestones(24) == (15, 18, 21)
    assert paper_gpu.scaled_milestones(8) == (5, 6, 7)
    assert paper_gpu.scaled_milestones(1) == (1,)


def test_cifar_resnets_keep_32x32_resolution_in_the_stem(paper_gpu):
    model = paper_gpu.cifar_torchvision("resnet18", 100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_missing_cifar100_names_the_flag(paper_gpu, tmp_path):
    with pytest.raises(SystemExit, match="--data-root") as error:
        paper_gpu.main(["--data-root", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "work")])
    assert "cifar-100-python" in str(error.value) and "never downloads" in str(error.value)


@pytest.mark.slow
def test_tiny_mode_reports_every_arm_the_authors_solver_and_the_product_throughputs(
    paper_gpu, local_ray, tmp_path, monkeypatch, capsys
):
    """The whole script in tiny mode, in this process on the session's Ray (a command-line run
    starts its own)."""
    output = tmp_path / "result.json"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert paper_gpu.main(["--tiny", "--work-dir", str(tmp_path / "work"), "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread on a CPU
    printed = capsys.readouterr().out
    assert "[paper_gpu] will measure:" in printed and "[paper] plan:" in printed
    result = json.loads(output.read_text())
    assert result["tiny"] is True and result["device"].startswith("cpu")
    paper = result["paper"]
    assert set(paper["arms"]) == set(ARMS)
    for name, arm in paper["arms"].items():
        for key in ("final_test_acc1", "best_test_acc1"):
            assert math.isfinite(arm[key]) and 0.0 <= arm[key] <= 1.0, (name, key, arm[key])
        assert arm["best_test_acc1"] >= arm["final_test_acc1"] and arm["best_selected_on_test_set"] is True
        assert arm["steps"] > 0 and arm["steps_per_second"] > 0
        assert abs(sum(arm["mean_weights"]) - 1) < 1e-4
    assert paper["arms"]["average"]["mean_weights"] == pytest.approx([1 / 3] * 3, abs=1e-6)
    for name in ARMS:
        stats = paper["authors_solver"][name]
        assert 0.0 <= stats["at_start_fraction"] <= 1.0 and stats["solves"] == paper["arms"][name]["steps"]
        assert math.isfinite(stats["mean_l1_to_exact"]) and 0.0 <= stats["mean_l1_to_exact"] <= 2.0
        assert stats["trained_with_it"] is (name == "authors_svm")
    product = result["product"]
    for run in ("streaming", "student_alone"):
        assert "refused" not in product[run], product[run]
        assert product[run]["samples_per_second_in_steps"] > 0
        assert product[run]["samples_per_second_last_epoch"] > 0
        assert product[run]["timings"]["steps"] > 0
    assert product["streaming_over_alone"] > 0
    assert str(tmp_path) not in json.dumps(result)  # no machine paths: the result may be committed
