"""The weighting study (``benchmarks/weighting_study.py``) on its smoke setting: real digits,
every arm of the four digits settings, two seeds, in-process (no Ray), into a temporary folder.

What a reader of ``results.json`` relies on: every arm has a paired difference to ``average``
over the right seeds with a 95% interval around its mean; ``average`` differs from itself by
exactly 0; C is chosen on the tuning split; no absolute path is stored; a rerun reuses every
finished run, and a run that is lost is trained again to the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import loaded_script

from ray_aekd.core.authors import authors_svm_weights
from ray_aekd.core.weighting import min_norm_weights

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "benchmarks" / "weighting_study.py"
STORED_GRADIENTS = REPO / "tests" / "data" / "authors_gradients.npz"


@pytest.fixture(scope="module")
def study():
    with loaded_script(STUDY) as module:
        yield module


@pytest.fixture(scope="module")
def smoke(study, tmp_path_factory):
    """One smoke study: ``(args, output folder, work folder, report, printed text)``."""
    root = tmp_path_factory.mktemp("weighting")
    args = ["--smoke", "--output", str(root / "out" / "results.json"), "--work-dir", str(root / "work")]
    threads = torch.get_num_threads()
    assert study.main(args) == 0
    assert torch.get_num_threads() == threads  # the study runs on one thread and gives the count back
    report = json.loads((root / "out" / "results.json").read_text())
    return args, root, report


def test_every_arm_has_a_paired_difference_to_average(study, smoke):
    _, _, report = smoke
    assert set(report["settings"]) == set(study.DIGITS_SETTINGS)
    for name, setting in report["settings"].items():
        assert setting["seeds"] == [0, 1] and setting["reason"]
        assert set(setting["arms"]) == {*study.arm_names(), "aekd_tuned"}, name
        for arm, summary in setting["arms"].items():
            diff = summary["diff_vs_average"]
            assert diff["n"] == 2, (name, arm)
            low, high = diff["ci95"]
            assert low <= diff["mean"] <= high, (name, arm)
            raw = setting["per_seed"][arm]
            assert raw["seeds"] == [0, 1] and len(raw["test_acc"]) == 2
            paired = [a - b for a, b in zip(raw["test_acc"], setting["per_seed"]["average"]["test_acc"], strict=True)]
            assert diff["mean"] == pytest.approx(sum(paired) / 2, abs=1e-9)
            assert 0 <= diff["t_test_p"] <= 1 and 0 <= diff["wilcoxon_p"] <= 1
        average = setting["arms"]["average"]["diff_vs_average"]
        assert average["mean"] == 0 and average["ci95"] == [0, 0] and average["ties"] == 2
        assert setting["arms"]["none"]["mean_weights"] == [0, 0, 0]


def test_c_is_chosen_on_the_tuning_split(smoke):
    _, _, report = smoke
    for setting in report["settings"].values():
        tuned = setting["aekd_tuned"]
        by_c = tuned["tuning_acc_by_tolerance"]
        assert by_c[f"{tuned['tolerance']:g}"] == max(by_c.values())
        assert setting["per_seed"]["aekd_tuned"] == setting["per_seed"][tuned["arm"]]
        for c, value in by_c.items():
            assert value == pytest.approx(setting["arms"][f"aekd_c{c}"]["tuning_acc_mean"])


def test_diagnostics_and_the_authors_solver_are_reported(smoke):
    _, _, report = smoke
    for setting in report["settings"].values():
        diag = setting["diagnostics"]
        assert diag["seeds"] == [0, 1]
        for stage in ("init", "after_one_epoch"):
            cosine = np.array(diag[stage]["cosine"])
            assert cosine.shape == (3, 3) and np.allclose(np.diag(cosine), 1.0)
            spread = diag[stage]["weights"]["aekd_c0.6"]
            assert all(0 <= lo <= hi <= 0.6 + 1e-6 for lo, hi in zip(spread["min"], spread["max"], strict=True))
        authors = setting["authors_solver"]
        assert authors["runs"] == 2 and authors["steps"] > 0
        assert 0 <= authors["at_start_fraction"] <= 1 and authors["l1_to_exact_max"] <= 2


def test_no_absolute_paths_are_stored(smoke):
    _, root, report = smoke
    text = (root / "out" / "results.json").read_text()
    assert str(REPO) not in text and str(root) not in text

    def strings(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    assert not [s for s in strings(report) if s.startswith(("/", "~"))]
    assert "benchmarks/weighting_study.py --smoke" in report["command"]
    markdown = (root / "out" / "results.md").read_text()
    assert markdown.count("| aekd_tuned |") == len(report["settings"])


def test_a_rerun_reuses_finished_runs_and_retrains_lost_ones_alike(study, smoke, capsys):
    args, root, report = smoke
    records = root / "work" / "runs.jsonl"
    lines = records.read_text().splitlines()
    assert study.main(args) == 0
    assert records.read_text().splitlines() == lines  # nothing ran again
    assert "0 (setting, seed) tasks to run" in capsys.readouterr().out
    again = json.loads((root / "out" / "results.json").read_text())
    assert again["settings"] == report["settings"]

    # lose the last half of the records and every cached teacher: what is missing is trained again
    records.write_text("\n".join(lines[: len(lines) // 2]) + "\n" + lines[len(lines) // 2][:20])  # a torn line too
    for cached in (root / "work" / "teachers").iterdir():
        cached.unlink()
    assert study.main(args) == 0
    assert "0 (setting, seed) tasks to run" not in capsys.readouterr().out
    rerun = json.loads((root / "out" / "results.json").read_text())
    for name, setting in report["settings"].items():
        for arm, raw in setting["per_seed"].items():
            assert rerun["settings"][name]["per_seed"][arm]["test_acc"] == raw["test_acc"], (name, arm)
            assert rerun["settings"][name]["per_seed"][arm]["tuning_acc"] == raw["tuning_acc"], (name, arm)


def test_dump_gradients_writes_what_both_solvers_saw(study, tmp_path):
    path = tmp_path / "gradients.npz"
    assert study.main(["--smoke", "--dump-gradients", str(path), "--work-dir", str(tmp_path / "work")]) == 0
    with np.load(path) as stored:
        gradients = stored["gradients"]
        assert gradients.dtype == np.float64 and gradients.shape[1:] == (3, 10)
        assert str(stored["setting"]) == "noisy_teacher" and float(stored["tolerance"]) == 0.6
        assert float(stored["temperature"]) == 4.0
        grams = torch.from_numpy(gradients @ gradients.transpose(0, 2, 1))
        exact = min_norm_weights(grams, 0.6).numpy()
        np.testing.assert_allclose(exact, stored["exact_weights"], atol=1e-4)
        for gram, weights, at_start in zip(
            stored["grams"], stored["authors_weights"], stored["authors_at_start"], strict=True
        ):  # the step's own Gram gives the authors' solver's weights again, exactly
            solve = authors_svm_weights(torch.from_numpy(gram), 0.6)
            assert solve.at_start == at_start
            np.testing.assert_array_equal(solve.weights.double().numpy(), weights)


def test_the_stored_gradients_are_a_real_run():
    """tests/data/authors_gradients.npz, written by ``--dump-gradients`` from a full digits run."""
    assert STORED_GRADIENTS.stat().st_size < 100 * 1024
    with np.load(STORED_GRADIENTS) as stored:
        assert stored["gradients"].shape[0] >= 150 and stored["gradients"].shape[1:] == (3, 10)
        assert int(stored["total_steps"]) > stored["gradients"].shape[0] // 2
        assert stored["steps"][-1] == int(stored["total_steps"]) - 1
        assert stored["grams"].shape == (stored["gradients"].shape[0], 3, 3)


def test_holm_adjusts_each_settings_p_values_step_down(study):
    """Twelve comparisons per setting: the adjusted p is what a reader may hold against 0.05."""
    arms = {name: {"diff_vs_average": {"t_test_p": p}} for name, p in
            [("average", 1.0), ("a", 0.01), ("b", 0.04), ("c", 0.03), ("d", None)]}  # fmt: skip
    arms["aekd_tuned"] = {"tolerance": 0.6, "diff_vs_average": {"t_test_p": 0.01}}
    arms["aekd_c0.6"] = {"diff_vs_average": {"t_test_p": 0.01}}
    study.holm(arms)
    adjusted = {name: s["diff_vs_average"].get("t_test_p_holm") for name, s in arms.items()}
    # four tested arms (a, aekd_c0.6, c, b): 4 x 0.01, 3 x 0.01 -> running max 0.04, 2 x 0.03 = 0.06, 1 x 0.04 -> 0.06
    assert adjusted["a"] == pytest.approx(0.04) and adjusted["aekd_c0.6"] == pytest.approx(0.04)
    assert adjusted["c"] == pytest.approx(0.06) and adjusted["b"] == pytest.approx(0.06)
    assert adjusted["d"] is None and adjusted["average"] is None
    assert adjusted["aekd_tuned"] == adjusted["aekd_c0.6"]  # the same runs, not a new comparison
