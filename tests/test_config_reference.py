"""The generated references are up to date, and the torch-free name catalogues agree with the
modules that implement the names."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


REFERENCES = [("ray_aekd.config.reference", "docs/configuration.md"), ("ray_aekd.cli.reference", "docs/cli.md")]


@pytest.mark.parametrize(("module", "doc"), REFERENCES)
def test_the_committed_reference_is_what_the_code_generates(module, doc):
    import importlib

    generated = importlib.import_module(module).render()
    committed = (ROOT / doc).read_text()
    assert committed == generated, f"{doc} is out of date: run `python -m {module}` and commit it"


def test_the_configuration_reference_lists_every_key():
    from ray_aekd.config import DistillConfig, SweepConfig, TeachersConfig, flatten, load_config, load_sweep
    from ray_aekd.config.reference import render

    text = render()
    configs = ROOT / "tune_configs"
    for config in (
        load_config(TeachersConfig, configs / "teachers_digits.yaml"),
        load_config(DistillConfig, configs / "distill_cifar100.yaml"),
        load_sweep(configs / "sweep_digits.yaml")[0],
    ):
        for key in flatten(config):
            general = ".".join("<i>" if part.isdigit() else part for part in key.split("."))
            if isinstance(config, SweepConfig) and general.startswith(("space.", "overrides.")):
                continue  # free-form mappings: their own keys are the base config's
            assert f"| `{general}` |" in text, general


def test_the_catalogues_agree_with_the_modules_that_implement_them():
    from ray_aekd import _names
    from ray_aekd.core.weighting import _SPACES, STRATEGIES
    from ray_aekd.data.sources import SOURCES
    from ray_aekd.models.registry import model_names
    from ray_aekd.models.sources import SOURCE_KINDS

    assert model_names()[: len(_names.BUILTIN_MODELS)] == _names.BUILTIN_MODELS
    assert (STRATEGIES, _SPACES, SOURCES, SOURCE_KINDS) == (
        _names.STRATEGIES, _names.GRADIENT_SPACES, _names.DATASETS, _names.SOURCE_KINDS,
    )  # fmt: skip


def test_the_cli_default_tracking_uri_is_mlflows():
    from ray_aekd.cli._options import DEFAULT_TRACKING_URI
    from ray_aekd.tracking.runs import DEFAULT_TRACKING_URI as RUNS_DEFAULT

    assert DEFAULT_TRACKING_URI == RUNS_DEFAULT
