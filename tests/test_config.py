"""Configs: the shipped YAML files load; bad input is one error naming key, value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ray_aekd.config import ConfigError, TeachersConfig, flatten, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"


@pytest.mark.parametrize("name", ["teachers_digits.yaml", "teachers_cifar100.yaml", "teachers_smoke.yaml"])
def test_shipped_configs_load(name):
    config = load_config(TeachersConfig, CONFIGS / name)
    assert len(config.teachers) >= 2


def test_defaults_overrides_and_flatten(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teachers:\n  - {name: a, model: resnet8}\n  - {name: b, model: digits_mlp}\ntrain: {lr: 5e-3}\n")
    config = load_config(TeachersConfig, path, ["train.epochs=3", "teachers.1.seed=9", "data.augment=false"])
    assert config.train.epochs == 3 and config.train.lr == 0.005 and config.teachers[1].seed == 9
    assert config.data.augment is False and config.data.dataset == "digits"  # default
    flat = flatten(config)
    assert flat["train.epochs"] == 3 and flat["teachers.1.model"] == "digits_mlp"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


GOOD_TEACHERS = "teachers:\n  - {name: a, model: digits_mlp}\n"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (GOOD_TEACHERS + "trian: {epochs: 2}\n", [], r"config: unknown key\(s\) trian; allowed: teachers, data, train"),
        (GOOD_TEACHERS, ["train.epochs=0"], r"train.epochs: got 0; allowed: an integer >= 1"),
        (GOOD_TEACHERS, ["train.epochs=two"], r"train.epochs: got 'two'; allowed: an integer"),
        (GOOD_TEACHERS, ["train.schedule=step"], r"train.schedule: got 'step'; allowed: cosine, multistep, constant"),
        (GOOD_TEACHERS, ["data.dataset=mnist"], r"data.dataset: got 'mnist'; allowed: digits, cifar10"),
        (GOOD_TEACHERS, ["data.dataset=cifar10"], r"data.path: got None; allowed: a folder for dataset 'cifar10'"),
        (GOOD_TEACHERS, ["trials.gpus=-1"], r"trials.gpus: got -1.0"),
        (GOOD_TEACHERS, ["trials.max_failures=-2"], r"trials.max_failures: got -2; allowed: an integer >= 0, or"),
        (GOOD_TEACHERS, ["trials.max_failures=1.5"], r"trials.max_failures: got 1.5; allowed: an integer"),
        (
            GOOD_TEACHERS + "resources: {cpus_per_teacher: 1}\ntrials: {cpus: 2}\n",
            [],
            r"resources.cpus_per_teacher and trials.cpus: both given",
        ),
        (GOOD_TEACHERS, ["faults.kill_teacher=z"], r"faults.kill_teacher: got 'z'; allowed: one of the teachers \(a\)"),
        (
            GOOD_TEACHERS,
            ["faults.kill_teacher=a", "faults.kill_teacher_epoch=11"],
            r"faults.kill_teacher_epoch: got 11; allowed: an epoch of the run \(1 to train.epochs = 10\)",
        ),
        ("teachers: []\n", [], r"teachers: got \[\]; allowed: a list of at least one teacher"),
        (
            GOOD_TEACHERS + "  - {name: a, model: resnet8}\n",
            [],
            r"teachers: got \['a'\]; allowed: unique teacher names",
        ),
        (
            "teachers:\n  - {name: a, model: resnet21}\n",
            [],
            r"teachers.0.model: Unknown model 'resnet21'. Valid models",
        ),
        ("teachers:\n  - {name: a, model: resnet8, label_noise: 0.5}\n", [], r"teachers.0.noisy_classes: got \[\]"),
        ("teachers:\n  - {model: resnet8}\n", [], r"teachers.0.name: required but missing"),
        ("data: {dataset: digits}\n", [], r"teachers: required but missing"),
        ("!!python/object/apply:os.system ['true']\n", [], "is not plain YAML data"),
        (GOOD_TEACHERS, ["teachers.0.seed=-1"], r"teachers.0.seed: got -1; allowed: an integer >= 0"),
        (GOOD_TEACHERS, ["train.schedule=multistep"], r"train.milestones: got \[\]; allowed: increasing epochs"),
        (GOOD_TEACHERS, ["train.lr=.inf"], r"train.lr: got inf; allowed: a finite number > 0"),
        (
            GOOD_TEACHERS,
            ["data.image_size=16"],
            r"data.image_size: got 16; allowed: null unless",
        ),
        (GOOD_TEACHERS + "1: x\n", [], r"config: unknown key\(s\) 1; allowed"),
        (GOOD_TEACHERS, ["train.lr=[1"], "the value is not plain YAML"),
        (GOOD_TEACHERS, ["data.split_seed=-2"], r"data.split_seed: got -2; allowed: an integer >= 0, or null"),
        (GOOD_TEACHERS, ["data.tuning_fraction=1"], r"data.tuning_fraction: got 1.0; allowed: a number in \[0, 1\)"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TeachersConfig, write(tmp_path, text), overrides)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TeachersConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(TeachersConfig, write(tmp_path, GOOD_TEACHERS), ["train.epochs"])


def test_distill_preset_fills_what_the_config_leaves_out():
    from ray_aekd.config import DistillConfig

    teachers = "teachers=[{name: a, checkpoint: x}, {name: b, checkpoint: y}]"
    config = load_config(
        DistillConfig, None, [teachers, "preset=authors_cifar", "train.epochs=20", "train.milestones=[5]"]
    )
    assert config.train.epochs == 20 and config.train.milestones == (5,)  # the config's own keys win
    assert (config.train.schedule, config.train.lr, config.train.batch_size) == ("multistep", 0.05, 64)
    assert config.train.nesterov  # the released recipe trains with Nesterov momentum
    shared = load_config(DistillConfig, None, [teachers, "workers.num_workers=1", "workers.gpus=0.5"])
    assert shared.workers.gpus == 0.5 and shared.workers.use_gpu  # one worker on half a GPU, teachers on the rest
    assert (config.distill.temperature, config.distill.tolerance, config.distill.kd_weight) == (4.0, 0.6, 0.9)
    with pytest.raises(ConfigError, match="preset: got 'fast'; allowed: authors_cifar"):
        load_config(DistillConfig, None, [teachers, "preset=fast"])
    single = r"distill.strategy: got 'aekd'; allowed: average, fixed or none when there is a single"
    with pytest.raises(ConfigError, match=single):
        load_config(DistillConfig, None, ["teachers=[{name: a, checkpoint: x}]"])


SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_use_todays_keys(name, capsys, tmp_path):
    """Every shipped config loads without a renamed-key warning, and --print-config's YAML reads
    back into the same config."""
    from ray_aekd.config import DistillConfig, SweepConfig, dump_yaml, load_sweep

    cls = {"teachers": TeachersConfig, "distill": DistillConfig, "sweep": SweepConfig}[name.split("_")[0]]
    config = load_sweep(CONFIGS / name)[0] if cls is SweepConfig else load_config(cls, CONFIGS / name)
    assert "warning" not in capsys.readouterr().err
    if cls is SweepConfig:  # the printed config is read from elsewhere: its base by its full path
        config = dataclasses.replace(config, base=str(CONFIGS / config.base))
    again = tmp_path / name
    again.write_text(dump_yaml(config))
    assert load_config(cls, again) == config


OLD_TEACHERS = GOOD_TEACHERS + "resources: {cpus_per_teacher: 0.5, gpus_per_teacher: 0.25, max_failures: 4}\n"
NEW_TEACHERS = GOOD_TEACHERS + "trials: {cpus: 0.5, gpus: 0.25, max_failures: 4}\n"
OLD_DISTILL = """
teachers:
  - {name: a, checkpoint: x, num_cpus: 2, num_gpus: 0.5, resources: {teacher_gpu: 1}}
  - {name: b, checkpoint: y, num_cpus: 2, num_gpus: 0.5, resources: {teacher_gpu: 1}}
workers: {num_workers: 2, cpus_per_worker: 3, use_gpu: true, resources: {student_gpu: 1}}
"""
NEW_DISTILL = """
teachers:
  - {name: a, checkpoint: x, cpus: 2, gpus: 0.5, custom_resources: {teacher_gpu: 1}}
  - {name: b, checkpoint: y, cpus: 2, gpus: 0.5, custom_resources: {teacher_gpu: 1}}
workers: {num_workers: 2, cpus: 3, gpus: 1, custom_resources: {student_gpu: 1}}
"""


def test_old_keys_load_for_one_release_with_a_warning_naming_the_new_key(tmp_path, capsys):
    from ray_aekd.config import DistillConfig
    from ray_aekd.config._base import _warned

    _warned.clear()
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD_TEACHERS)
    new.write_text(NEW_TEACHERS)
    assert load_config(TeachersConfig, old) == load_config(TeachersConfig, new)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"ray-aekd: warning: resources.{a} is renamed trials.{b}; the old key works until 0.3."
        for a, b in (("cpus_per_teacher", "cpus"), ("gpus_per_teacher", "gpus"), ("max_failures", "max_failures"))
    ]
    old.write_text(OLD_DISTILL)
    new.write_text(NEW_DISTILL)
    config = load_config(DistillConfig, old)
    assert config == load_config(DistillConfig, new)
    assert config.workers.gpus == 1.0 and config.workers.use_gpu and config.teachers[1].custom_resources
    err = capsys.readouterr().err
    for line in (
        "teachers.<i>.num_cpus is renamed teachers.<i>.cpus; the old key works until 0.3.",
        "teachers.<i>.num_gpus is renamed teachers.<i>.gpus",
        "teachers.<i>.resources is renamed teachers.<i>.custom_resources",
        "workers.cpus_per_worker is renamed workers.cpus",
        "workers.use_gpu is renamed workers.gpus",
        "workers.resources is renamed workers.custom_resources",
    ):
        assert err.count(line) == 1, err  # once, not once per teacher
    # --set with an old key: under the new name, replacing the file's value (and its value converted)
    config = load_config(DistillConfig, new, ["workers.use_gpu=false", "teachers.1.num_cpus=0.25"])
    assert (config.workers.gpus, config.teachers[1].cpus, config.teachers[0].cpus) == (0.0, 0.25, 2.0)
    with pytest.raises(ConfigError, match=r"workers.use_gpu: got 'maybe'; allowed: true or false"):
        load_config(DistillConfig, new, ["workers.use_gpu=maybe"])
    with pytest.raises(ConfigError, match=r"workers.gpus: got 2.0; allowed: 0 \(CPU\), 1 \(one GPU per worker\)"):
        load_config(DistillConfig, new, ["workers.gpus=2"])


def test_old_sweep_keys_and_old_keys_in_overrides(tmp_path, capsys):
    from ray_aekd.config import DistillConfig, from_dict, load_sweep

    (tmp_path / "base.yaml").write_text(NEW_DISTILL.replace("gpus: 1,", "gpus: 0,").replace("gpus: 0.5", "gpus: 0"))
    (tmp_path / "sweep.yaml").write_text(
        "base: base.yaml\nspace: {distill.temperature: {grid: [2.0]}}\ntrial_cpus: 0.3\nmax_concurrent_trials: 3\n"
        "overrides: {workers: {cpus_per_worker: 0.5}}\n"
    )
    sweep, base = load_sweep(tmp_path / "sweep.yaml")
    assert (sweep.trials.cpus, sweep.trials.max_concurrent) == (0.3, 3)
    assert from_dict(DistillConfig, base).workers.cpus == 0.5  # the old override key replaced the base's new one
    err = capsys.readouterr().err
    assert "trial_cpus is renamed trials.cpus" in err
    assert "max_concurrent_trials is renamed trials.max_concurrent" in err
    assert "overrides.workers.cpus_per_worker is renamed overrides.workers.cpus" in err


def test_quickstart_teachers_saved_under_the_old_key_names_are_reused(tmp_path):
    """A quickstart folder from before the resource keys were renamed keeps its teachers."""
    from ray_aekd.cli.quickstart import TEACHERS, _reusable_teachers, teachers_config

    config = teachers_config(tmp_path, epochs=30, seed=0)
    folder = Path(config.output_dir)
    folder.mkdir()
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    saved["resources"] = {  # what config.json held before: resources.*_per_teacher, no trials section
        "cpus_per_teacher": saved["trials"].pop("cpus"),
        "gpus_per_teacher": saved["trials"].pop("gpus"),
        "max_failures": saved["trials"].pop("max_failures"),
    }
    assert not saved["trials"], saved["trials"]
    del saved["trials"]
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "summary.json").write_text(json.dumps({"teachers": {}, "ensemble_acc1": 0.9}))
    for teacher in TEACHERS:
        (folder / teacher["name"]).mkdir()
        (folder / teacher["name"] / "metadata.json").write_text("{}")
    assert _reusable_teachers(config) == {"teachers": {}, "ensemble_acc1": 0.9}
    saved["seed"] = 1  # other settings: trained again
    (folder / "config.json").write_text(json.dumps(saved))
    assert _reusable_teachers(config) is None
