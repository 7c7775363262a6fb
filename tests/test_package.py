"""The package as a user installs and runs it: layers, console script, demo on real data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_aekd.cli.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
# the console script installed next to this interpreter (the venv need not be activated)
RAY_AEKD = shutil.which("ray-aekd", path=str(Path(sys.executable).parent)) or "ray-aekd"


def test_layout_and_typing_marker():
    expected = ("ray_aekd", "tune_configs", "cluster", "tests", "benchmarks", "pyproject.toml", "README.md", ".ci/run")
    for path in expected:
        assert (ROOT / path).exists(), path
    assert (ROOT / "ray_aekd" / "py.typed").exists()


@pytest.mark.slow
def test_console_script_runs_the_demo(tmp_path):
    out_json = tmp_path / "demo.json"
    cmd = [
        RAY_AEKD,
        "demo",
        "--epochs",
        "2",
        "--teachers",
        "3",
        "--strategies",
        "average",
        "aekd",
        "--json",
        str(out_json),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "teachers val/acc1" in proc.stdout and "aekd" in proc.stdout
    result = json.loads(out_json.read_text())
    assert set(result["strategies"]) == {"average", "aekd"}
    assert result["strategies"]["average"]["mean_weights"] == pytest.approx([1 / 3] * 3)
    weights = result["strategies"]["aekd"]["mean_weights"]
    assert sum(weights) == pytest.approx(1.0) and max(weights) <= 0.6 + 1e-9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tolerance", "0.2"], r"tolerance must be in \[1/M, 1\] = \[0.333333, 1\] for M = 3 teachers; got 0.2"),
        (["--teachers", "1"], r"number of teachers \(--teachers\) must be >= 2; got 1"),
        (["--temperature", "0"], "temperature must be a finite number > 0; got 0.0"),
        (["--epochs", "0"], r"epochs \(--epochs\) must be >= 1; got 0"),
    ],
)
def test_demo_bad_input_is_one_clear_line(args, message):
    proc = subprocess.run([RAY_AEKD, "demo", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_demo_teachers_disagree_and_the_student_learns():
    """Real digits: every teacher is hurt on its own classes, the ensemble is not, and a
    distilled student beats every single teacher."""
    result = run_demo(num_teachers=3, epochs=8, strategies=("average", "aekd"), log=lambda line: None)
    assert max(result.teacher_acc1) < 0.9 < result.ensemble_acc1
    for row in result.strategies.values():
        assert row["val/acc1"] > max(result.teacher_acc1)
