"""Sweep configs and search spaces are checked before anything runs (no Ray here)."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from ray_aekd.config import ConfigError
from ray_aekd.config.sweep import apply_values, load_sweep, parse_space

BASE = {
    "name": "base",
    "data": {"dataset": "digits", "views": 2},
    "distill": {"strategy": "aekd", "tolerance": 0.6, "temperature": 4.0},
    "teachers": [{"name": n, "checkpoint": f"/nowhere/{n}"} for n in ("a", "b", "c")],
}


def check(space, algorithm="random", cached=False):
    return parse_space(space, BASE, algorithm, cached)


def test_a_valid_space_parses_into_its_dimensions():
    dims = check(
        {
            "distill.tolerance_fraction": {"grid": [0.0, 0.5, 1.0]},
            "distill.temperature": {"loguniform": [1.0, 8.0]},
            "train.lr": {"choice": [0.01, 0.1]},
            "train.epochs": {"randint": [1, 4]},
        }
    )
    assert [(d.key, d.kind) for d in dims] == [
        ("distill.tolerance_fraction", "grid"),
        ("distill.temperature", "loguniform"),
        ("train.lr", "choice"),
        ("train.epochs", "randint"),
    ]


def test_the_tolerance_fraction_maps_onto_one_over_m_to_one():
    for fraction, tolerance in ((0.0, 1 / 3), (0.5, 2 / 3), (1.0, 1.0)):
        data = apply_values(BASE, {"distill.tolerance_fraction": fraction})
        assert data["distill"]["tolerance"] == pytest.approx(tolerance)
    assert BASE["distill"]["tolerance"] == 0.6  # the base is not modified


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"distill.temperature": {"normal": [0, 1]}},
            "space.distill.temperature: got {'normal': [0, 1]}; allowed: one",
        ),
        ({"distill.temperature": [1, 2]}, "space.distill.temperature: got [1, 2]; allowed: one distribution"),
        (
            {"distill.temperature": {"uniform": [4, 2]}},
            "space.distill.temperature.uniform: got [4, 2]; allowed: [lo, hi] with lo < hi",
        ),
        ({"distill.temperature": {"loguniform": [0, 2]}}, "allowed: [lo, hi] with 0 < lo < hi"),
        (
            {"train.epochs": {"randint": [1.5, 3]}},
            "space.train.epochs.randint: got [1.5, 3]; allowed: [lo, hi], integers",
        ),
        ({"train.lr": {"choice": []}}, "space.train.lr.choice: got []; allowed: a non-empty list"),
        ({"train.lr": {"choice": [{"a": 1}]}}, "allowed: plain values"),
        ({"distill.temperature": {"uniform": [1, "x"]}}, "allowed: [lo, hi], two finite numbers"),
    ],
)
def test_bad_distributions_are_refused_with_the_key_and_what_is_allowed(space, message):
    with pytest.raises(ConfigError) as error:
        check(space)
    assert message in str(error.value)


def test_a_tolerance_below_one_over_m_is_refused():
    with pytest.raises(ConfigError) as error:
        check({"distill.tolerance": {"grid": [0.2, 0.6]}}, algorithm="grid")
    text = str(error.value)
    assert "distill.tolerance=0.2" in text and "[1/M, 1] = [0.333333, 1] for M = 3 teachers" in text
    # a range whose lower end is below 1/M can produce an invalid C: refused too
    with pytest.raises(ConfigError, match="distill.tolerance=0.3 would be invalid"):
        check({"distill.tolerance": {"uniform": [0.3, 1.0]}})
    assert check({"distill.tolerance": {"uniform": [0.34, 1.0]}})


def test_tolerance_fractions_outside_zero_one_and_both_tolerance_keys_are_refused():
    with pytest.raises(ConfigError, match=r"space.distill.tolerance_fraction: got 1.2; allowed: numbers in \[0, 1\]"):
        check({"distill.tolerance_fraction": {"uniform": [0.0, 1.2]}})
    with pytest.raises(ConfigError, match="either distill.tolerance or distill.tolerance_fraction, not both"):
        check({"distill.tolerance": {"grid": [0.5]}, "distill.tolerance_fraction": {"grid": [0.5]}}, "grid")


def test_unknown_keys_and_wrong_types_are_refused_naming_the_trial():
    with pytest.raises(ConfigError, match=r"distill: unknown key\(s\) tolerence"):
        check({"distill.tolerence": {"grid": [0.5]}})
    with pytest.raises(ConfigError, match=r"train.epochs='x' would be invalid: train.epochs: got 'x'"):
        check({"train.epochs": {"choice": [2, "x"]}})
    with pytest.raises(ConfigError, match="distill.strategy: got 'best'"):
        check({"distill.strategy": {"choice": ["aekd", "best"]}})


def test_keys_the_sweep_sets_or_the_cache_fixes_are_refused():
    with pytest.raises(ConfigError, match=r"space.name: .*\(the sweep sets them"):
        check({"name": {"choice": ["x"]}})
    with pytest.raises(ConfigError, match="space.tracking.experiment"):
        check({"tracking.experiment": {"choice": ["x"]}})
    with pytest.raises(ConfigError, match="space.teachers.0.checkpoint: .*with soft_label_cache: true"):
        check({"teachers.0.checkpoint": {"choice": ["/x"]}}, cached=True)
    with pytest.raises(ConfigError, match="space.data.views: .*with soft_label_cache: true"):
        check({"data.views": {"choice": [1, 2]}}, cached=True)


def test_the_search_algorithm_must_fit_the_space():
    with pytest.raises(ConfigError, match=r"space.distill.temperature: got \{'uniform': \[1.0, 8.0\]\}; allowed: "
                                          r"\{grid: \[values\]\} with search.algorithm grid"):  # fmt: skip
        check({"distill.temperature": {"uniform": [1.0, 8.0]}}, algorithm="grid")
    with pytest.raises(ConfigError, match="with search.algorithm optuna"):
        check({"distill.temperature": {"grid": [2.0, 4.0]}}, algorithm="optuna")


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_load_sweep_reads_the_base_next_to_the_sweep_file_and_merges_overrides(tmp_path):
    write(
        tmp_path / "base.yaml",
        """
        data: {dataset: digits}
        train: {epochs: 20, batch_size: 64}
        teachers: [{name: a, checkpoint: /x/a}, {name: b, checkpoint: /x/b}]
        """,
    )
    sweep_file = write(
        tmp_path / "sweep.yaml",
        """
        name: s
        base: base.yaml
        overrides: {train: {epochs: 3}, data: {views: 2}}
        space: {distill.temperature: {grid: [2.0, 4.0]}}
        soft_label_cache: true
        """,
    )
    sweep, base = load_sweep(str(sweep_file), ["trials.max_concurrent=3"])
    assert sweep.trials.max_concurrent == 3 and sweep.direction == "max"
    assert base["train"] == {"epochs": 3, "batch_size": 64}
    assert base["cache"]["path"].endswith("runs/sweep/s/soft_labels")  # the default cache of a cached sweep

    missing_views = write(tmp_path / "nv.yaml", sweep_file.read_text().replace(", data: {views: 2}", ""))
    with pytest.raises(ConfigError, match="data.views: got None; allowed: an integer >= 1 when cache.path is set"):
        load_sweep(str(missing_views))
    with pytest.raises(ConfigError, match="base: got 'nothere.yaml'; allowed: a distillation config file"):
        load_sweep(str(sweep_file), ["base=nothere.yaml"])
    with pytest.raises(ConfigError, match="metric: got 'val/acc2'; allowed: val/acc1"):
        load_sweep(str(sweep_file), ["metric=val/acc2"])
    optuna = ["search.algorithm=optuna", "space={distill.temperature: {uniform: [1.0, 8.0]}}"]
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match=r"optuna is not installed.*pip install 'ray-aekd\[optuna\]'"):
            load_sweep(str(sweep_file), optuna)
    else:
        assert load_sweep(str(sweep_file), optuna)[0].search.algorithm == "optuna"


def test_the_cli_refuses_a_bad_space_in_one_line_before_ray_starts(tmp_path):
    write(tmp_path / "base.yaml", "teachers: [{name: a, checkpoint: /x/a}, {name: b, checkpoint: /x/b}]\n")
    sweep_file = write(tmp_path / "sweep.yaml", "base: base.yaml\nspace: {distill.tolerance: {grid: [0.1, 1.0]}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "ray_aekd.cli", "sweep", "--config", str(sweep_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("ray-aekd sweep: error: space: the trial distill.tolerance=0.1 would be invalid")
    assert not (tmp_path / "runs").exists()


def test_every_value_of_a_large_grid_is_checked_beyond_the_combination_cap(monkeypatch):
    """A grid too large to check whole still has each value checked once: a bad temperature in the
    first dimension is refused before Ray, not in the trial that would have reached it."""
    import ray_aekd.config.sweep as sweep_config

    monkeypatch.setattr(sweep_config, "_MAX_COMBINATIONS", 5)  # 2 x 20 combinations: past the cap
    space = {"distill.temperature": {"grid": [4.0, -1.0]}, "train.lr": {"grid": [0.01 * i for i in range(1, 21)]}}
    with pytest.raises(ConfigError, match=r"distill\.temperature=-1\.0"):
        check(space, algorithm="grid")
    check({"distill.temperature": {"grid": [4.0, 2.0]}, "train.lr": space["train.lr"]}, algorithm="grid")
