"""The command line: the same flags with the same meaning on every command, ``--check`` and
``--print-config`` without Ray or torch, no store made by ``compare``, and outputs refused where a
Ray job's copy of the working directory would take them with it."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_aekd import cli
from ray_aekd._locations import check_outputs_survive, job_working_copy, tracking_store_path
from ray_aekd.cli._options import json_stdout, tracking_uri_for_this_command, write_json
from ray_aekd.config import DistillConfig, SweepConfig, TeachersConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tune_configs"
CONFIG_COMMANDS = {
    "teachers": "teachers_smoke.yaml",
    "distill": "distill_smoke.yaml",
    "relabel": "distill_smoke.yaml",
    "sweep": "sweep_smoke.yaml",
}
HEAVY = ("torch", "ray", "mlflow", "torchvision")


def _run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -X importtime -m ray_aekd.cli ARGS``: stderr also lists every module imported."""
    environ = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")} | (env or {})
    command = [sys.executable, "-X", "importtime", "-m", "ray_aekd.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=environ)


def _imported(stderr: str) -> set[str]:
    """Top-level packages in ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    names = [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in names}


def _messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize(("command", "config"), CONFIG_COMMANDS.items())
def test_check_accepts_a_good_config_without_torch_or_ray(command, config, tmp_path):
    path = CONFIGS / config
    sets = ["--set", f"output_dir={tmp_path / 'out'}"]
    if command == "relabel":  # relabel writes the cache: it needs cache.path
        sets += ["--set", f"cache.path={tmp_path / 'cache'}", "--set", "data.views=2"]
    proc = _run(command, "--config", str(path), "--check", *sets, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"config OK: {path}\n"
    assert not _imported(proc.stderr) & set(HEAVY), sorted(_imported(proc.stderr) & set(HEAVY))
    assert not any(tmp_path.iterdir())  # no run folder, no MLflow store


def test_check_refuses_a_bad_config_naming_the_key_without_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "distill_smoke.yaml").read_text() + "workers: {num_workers: 2, cpus: -1}\n")
    proc = _run("distill", "--config", str(bad), "--check", cwd=tmp_path)
    assert proc.returncode == 2
    assert _messages(proc.stderr) == ["ray-aekd distill: error: workers.cpus: got -1.0; allowed: a number > 0."]
    assert proc.stdout == ""
    assert not _imported(proc.stderr) & set(HEAVY)
    proc = _run("distill", "--config", str(CONFIGS / "distill_smoke.yaml"), "--check", "--set", "data.dataset=mnist")
    assert proc.returncode == 2
    assert "data.dataset: got 'mnist'; allowed: digits, cifar10, cifar100, imagefolder." in proc.stderr


def test_check_of_a_torchvision_model_checks_its_syntax_without_torch(tmp_path):
    smoke, sets = CONFIGS / "distill_smoke.yaml", ["--set", f"output_dir={tmp_path / 'out'}"]
    proc = _run("distill", "--config", str(smoke), "--check", *sets, "--set", "student.model=torchvision:resnet18")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"config OK: {smoke} (torchvision:resnet18 is checked when the run starts)\n"
    assert not _imported(proc.stderr) & set(HEAVY), sorted(_imported(proc.stderr) & set(HEAVY))
    proc = _run("distill", "--config", str(smoke), "--check", *sets, "--set", "student.model='torchvision:res net'")
    assert proc.returncode == 2
    assert "student.model: got 'torchvision:res net'; allowed: torchvision:<a model name of the library>" in proc.stderr


def test_relabel_check_refuses_a_config_without_cache_path_as_the_run_does(tmp_path):
    proc = _run("relabel", "--config", str(CONFIGS / "distill_smoke.yaml"), "--check", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert _messages(proc.stderr) == [
        "ray-aekd relabel: error: cache.path: got None; allowed: a folder or URI to write the soft-label cache to."
    ]
    assert not _imported(proc.stderr) & set(HEAVY)


def test_check_with_an_old_key_warns_once_and_passes(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text((CONFIGS / "distill_smoke.yaml").read_text().replace("cpus: 0.5", "cpus_per_worker: 0.5"))
    proc = _run("distill", "--config", str(old), "--check", "--set", "teachers.0.num_cpus=0.5")
    assert proc.returncode == 0, proc.stderr
    assert _messages(proc.stderr) == [
        "ray-aekd: warning: workers.cpus_per_worker is renamed workers.cpus; the old key works until 0.3.",
        "ray-aekd: warning: teachers.<i>.num_cpus is renamed teachers.<i>.cpus; the old key works until 0.3.",
    ]


@pytest.mark.parametrize(("command", "config"), CONFIG_COMMANDS.items())
def test_print_config_prints_every_key_and_reads_back(command, config, capsys, tmp_path):
    assert cli.main([command, "--config", str(CONFIGS / config), "--print-config"]) == 0
    out = capsys.readouterr().out
    first = out.split("\n---\n")[0]
    cls = {"teachers": TeachersConfig, "sweep": SweepConfig}.get(command, DistillConfig)
    if cls is SweepConfig:
        data = yaml.safe_load(first)
        assert data["trials"] == {"cpus": 0.1, "max_concurrent": 2} and data["scheduler"]["type"] == "none"
        base = yaml.safe_load(out.split("\n---\n")[1])
        assert base["workers"]["num_workers"] == 1 and base["cache"]["path"].endswith("soft_labels")
        return
    (tmp_path / "printed.yaml").write_text(out)
    assert load_config(cls, tmp_path / "printed.yaml") == load_config(cls, CONFIGS / config)
    assert "train:\n  epochs:" in out and "seed: 0" in out  # defaults filled in


def test_output_dir_and_tracking_uri_are_shorthands_for_the_config_keys(capsys):
    flags = ["--output-dir", "/mnt/shared/runs", "--tracking-uri", "sqlite:////mnt/shared/mlflow.db"]
    assert cli.main(["distill", "--config", str(CONFIGS / "distill_smoke.yaml"), "--print-config", *flags]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["output_dir"] == "/mnt/shared/runs" and data["tracking"]["uri"] == "sqlite:////mnt/shared/mlflow.db"
    sweep = ["sweep", "--config", str(CONFIGS / "sweep_smoke.yaml"), "--print-config", "--experiment", "e", *flags]
    assert cli.main(sweep) == 0
    sweep_part, base_part = capsys.readouterr().out.split("\n---\n")
    assert yaml.safe_load(sweep_part)["output_dir"] == "/mnt/shared/runs"
    assert yaml.safe_load(base_part)["tracking"] == {
        "uri": "sqlite:////mnt/shared/mlflow.db", "experiment": "e", "register_model": None,
    }  # fmt: skip


def test_the_tracking_uri_flag_wins_over_the_environment_for_the_command_only(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    with tracking_uri_for_this_command("sqlite:////tmp/x.db"):
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/x.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking_uri_for_this_command("sqlite:////tmp/x.db"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def _flags(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def test_every_command_shares_the_common_flags():
    flags = _flags(cli.build_parser())
    for command in CONFIG_COMMANDS:
        assert {"--config", "--set", "--check", "--print-config", "--json"} <= flags[command], command
    for command in ("teachers", "distill", "relabel", "sweep", "compare", "evaluate", "quickstart", "upload"):
        assert "--tracking-uri" in flags[command], command
    for command in ("teachers", "distill", "sweep", "compare", "quickstart"):
        assert "--output-dir" in flags[command], command
    for command in ("demo", "teachers", "distill", "relabel", "sweep", "compare", "evaluate", "quickstart", "upload",
                    "export"):  # fmt: skip
        assert "--json" in flags[command], command
    assert all("--verbose" in f for f in flags.values())


def test_verbose_help_says_what_it_does_on_each_command():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {
        name: next(a.help for a in p._actions if "--verbose" in a.option_strings) for name, p in sub.choices.items()
    }
    logged = {"teachers", "distill", "sweep", "quickstart"}  # the commands that capture_logs into a ray_aekd.log
    assert {name for name, text in helps.items() if "ray_aekd.log" in text} == logged
    assert all("traceback" in text for text in helps.values())


def test_json_alone_prints_only_json_on_stdout(capsys, tmp_path):
    args = argparse.Namespace(json="-")
    with json_stdout(args):
        print("epoch 1/1 ...")  # a command's progress: to stderr
    write_json(args, {"acc1": 0.5})
    out, err = capsys.readouterr()
    assert json.loads(out) == {"acc1": 0.5} and out.count("\n") == 1 and "epoch 1/1" in err
    args = argparse.Namespace(json=str(tmp_path / "r.json"))
    with json_stdout(args):
        print("summary")
    write_json(args, {"acc1": 0.5})
    assert capsys.readouterr().out == "summary\n"
    assert json.loads((tmp_path / "r.json").read_text()) == {"acc1": 0.5}


def test_relabel_tracking_uri_sets_the_config_key_that_mlflow_teachers_load_from(capsys):
    smoke = str(CONFIGS / "distill_smoke.yaml")
    assert cli.main(["relabel", "--config", smoke, "--print-config", "--tracking-uri", "http://head:5000"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tracking"]["uri"] == "http://head:5000"


def test_export_json_gives_path_format_and_input_shape(digits_teachers, tmp_path, capsys):
    output = tmp_path / "cnn.pt2"
    assert cli.main(["export", "--model", digits_teachers["cnn_a"], "--output", str(output), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and output.is_file()
    assert json.loads(out) == {
        "path": str(output), "format": "pt2", "input_shape": [1, 8, 8], "num_classes": 10,
        "preprocess": json.loads(out)["preprocess"],
    }  # fmt: skip
    assert cli.main(["export", "--model", digits_teachers["cnn_a"], "--output", str(output)]) == 0
    assert capsys.readouterr().out.startswith("exported ")  # without --json: the sentence


def test_evaluate_json_alone_sends_its_progress_to_stderr(digits_teachers, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["evaluate", "--model", digits_teachers["cnn_a"], "--data", "digits", "--tracking-uri", uri, "--json"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and 0 <= json.loads(out)["acc1"] <= 1
    assert f"MLflow: {uri}, experiment 'ray-aekd-eval', run " in err


def test_upload_json_gives_the_run_id_and_the_tracking_uri(tmp_path, monkeypatch, capsys):
    from ray_aekd.tracking import upload

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlflow_tracking_uri").write_text("http://head:5000\n")
    calls = []

    def fake_upload(path, tracking_uri=None, log=print):
        calls.append((path, tracking_uri))
        print("uploaded ...")  # progress: to stderr under --json
        return "abc123"

    monkeypatch.setattr(upload, "upload", fake_upload)
    assert cli.main(["upload", str(run_dir), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"run_id": "abc123", "tracking_uri": "http://head:5000"} and "uploaded" in err
    assert cli.main(["upload", str(run_dir), "--tracking-uri", "sqlite:////x/m.db", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tracking_uri"] == "sqlite:////x/m.db"
    assert calls == [(str(run_dir), None), (str(run_dir), "sqlite:////x/m.db")]


def test_a_valueerror_from_inside_a_library_is_not_reported_as_bad_input(monkeypatch, capsys):
    from ray_aekd.cli import demo

    monkeypatch.setattr(demo, "run_demo", lambda **_: int("not a number"))  # a bug, not the user's input
    with pytest.raises(ValueError, match="invalid literal for int"):
        cli.main(["demo"])
    assert "error:" not in capsys.readouterr().err


def test_bad_input_is_one_line_and_verbose_adds_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AEKD_VERBOSE", "0")  # --verbose sets it to 1; unset again after this test
    bad = ["distill", "--config", str(CONFIGS / "distill_smoke.yaml"), "--check", "--set", "distill.strategy=best"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    refusal = (
        "ray-aekd distill: error: distill.strategy: got 'best'; allowed: average, aekd, mgda, upgrad, "
        "authors_svm, fixed, none.\n"
    )
    assert err == refusal
    assert cli.main([*bad, "--verbose"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ConfigError: distill.strategy" in err
    assert err.endswith(refusal)


# --- compare never makes a store ------------------------------------------------------------------


def test_compare_refuses_a_store_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = tmp_path / "nowhere" / "x.db"
    for uri, path in ((f"sqlite:///{missing}", missing), ("sqlite:///mlflow.db", tmp_path / "mlflow.db")):
        assert cli.main(["compare", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        resolved = uri.replace("///m", f"///{tmp_path}/m")  # a relative store, as MLflow would resolve it
        assert err.startswith(f"ray-aekd compare: error: --tracking-uri: got '{resolved}'")
        assert f"no MLflow store is there ({path} does not exist)" in err and err.count("\n") == 1
        assert not path.exists()
    assert cli.main(["compare"]) == 2  # the default store, sqlite:///mlflow.db here, is not made either
    assert "does not exist" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_compare_refuses_a_store_on_a_path_that_does_not_exist_as_a_console_script(tmp_path):
    proc = _run("compare", "--tracking-uri", "sqlite:////nonexistent/x.db", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no MLflow store is there (/nonexistent/x.db does not exist)" in proc.stderr
    assert not Path("/nonexistent/x.db").exists() and not any(tmp_path.iterdir())


# --- outputs that a Ray job's working-directory copy would take with it ---------------------------

JOB = "/tmp/ray/session_2026-01-01_00-00-00_000000_1/runtime_resources/working_dir_files/_ray_pkg_0a1b2c"


def test_a_ray_job_working_directory_copy_is_recognised():
    assert job_working_copy(JOB) == Path(JOB)
    assert job_working_copy(JOB + "/tune_configs") == Path(JOB)
    assert job_working_copy("/home/me/ray_aekd") is None
    assert job_working_copy("/tmp/working_dir_files/x") is None


@pytest.mark.parametrize(
    ("key", "value", "survives"),
    [
        ("output_dir", "runs/distill", False),
        ("output_dir", f"{JOB}/runs", False),
        ("output_dir", "/mnt/shared/runs", True),
        ("storage_path", "s3://bucket/ckpt", True),
        ("storage_path", "file://runs/x", False),
        ("cache.path", "gs://bucket/cache", True),
        ("cache.path", None, True),
    ],
)
def test_outputs_inside_the_job_copy_are_refused_naming_key_value_and_fix(key, value, survives):
    outputs = [(key, value, "--output-dir /mnt/shared/runs")]
    if survives:
        check_outputs_survive(outputs, None, cwd=JOB)
        check_outputs_survive([(key, "runs/x", "")], None, cwd="/home/me/ray_aekd")  # not a job: anything goes
        return
    with pytest.raises(ValueError) as error:
        check_outputs_survive(outputs, None, cwd=JOB)
    text = str(error.value)
    assert text.startswith(f"{key}: got {value!r}; this command runs in Ray's temporary copy of the working directory")
    assert JOB in text and "e.g. --output-dir /mnt/shared/runs" in text


@pytest.mark.parametrize(
    ("uri", "survives"),
    [
        ("sqlite:///mlflow.db", False),
        ("mlruns", False),
        ("file:./mlruns", False),
        ("sqlite:////mnt/shared/mlflow.db", True),
        ("http://head:5000", True),
        ("databricks", True),
    ],
)
def test_a_tracking_store_inside_the_job_copy_is_refused(uri, survives):
    if survives:
        check_outputs_survive([], ("MLFLOW_TRACKING_URI", uri), cwd=JOB)
        return
    message = r"^MLFLOW_TRACKING_URI: got .*the job's runs would vanish; allowed: a tracking"
    with pytest.raises(ValueError, match=message):
        check_outputs_survive([], ("MLFLOW_TRACKING_URI", uri), cwd=JOB)


def test_tracking_store_paths():
    assert tracking_store_path("sqlite:///mlflow.db") == "mlflow.db"
    assert tracking_store_path("sqlite:////abs/mlflow.db") == "/abs/mlflow.db"
    assert tracking_store_path("file:///abs/mlruns") == "/abs/mlruns"
    assert tracking_store_path("https://mlflow.example.com") is None


def test_the_cli_refuses_relative_outputs_in_a_job_copy_before_any_ray_work(tmp_path, monkeypatch, capsys):
    job = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    smoke = str(CONFIGS / "distill_smoke.yaml")
    assert cli.main(["distill", "--config", smoke, "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ray-aekd distill: error: output_dir: got 'runs/distill_smoke'; this command runs in Ray's")
    assert "e.g. --output-dir /mnt/shared/runs" in err
    assert cli.main(["distill", "--config", smoke, "--check", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tracking.uri (not set: MLflow's default, sqlite:///mlflow.db): got 'sqlite:///mlflow.db'" in err
    assert "--tracking-uri sqlite:////mnt/shared/mlflow.db" in err
    fine = ["--output-dir", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert cli.main(["distill", "--config", smoke, "--check", *fine]) == 0
    sweep = ["sweep", "--config", str(CONFIGS / "sweep_smoke.yaml"), "--check"]
    assert cli.main([*sweep, *fine[2:]]) == 2
    assert "error: output_dir: got 'runs/sweep_smoke'; this command runs in Ray's" in capsys.readouterr().err
    assert cli.main([*sweep, *fine]) == 0  # the soft-label cache goes under the sweep's folder
    assert not any(job.iterdir())


def _json_commands(out: Path) -> dict[str, list[str]]:
    """Each command with ``--json``, with every other output outside the job copy (under ``out``)."""
    fine = ["--output-dir", str(out), "--tracking-uri", f"sqlite:///{out}/mlflow.db"]
    smoke = str(CONFIGS / "distill_smoke.yaml")
    return {
        "demo": ["demo"],
        "teachers": ["teachers", "--config", str(CONFIGS / "teachers_smoke.yaml"), "--check", *fine],
        "distill": ["distill", "--config", smoke, "--check", *fine],
        "relabel": ["relabel", "--config", smoke, "--check", "--set", f"cache.path={out}/c", "--set", "data.views=2"],
        "sweep": ["sweep", "--config", str(CONFIGS / "sweep_smoke.yaml"), "--check", *fine],
        "compare": ["compare", *fine],
        "evaluate": ["evaluate", "--model", str(out / "student"), "--data", "digits"],
        "quickstart": ["quickstart", *fine],
        "export": ["export", "--model", str(out / "student"), "--output", str(out / "student.pt2")],
        "upload": ["upload", str(out / "run")],
    }


def test_every_command_with_json_is_in_this_test():
    flags = _flags(cli.build_parser())
    assert {name for name, have in flags.items() if "--json" in have} == set(_json_commands(Path("/x")))


@pytest.mark.parametrize("command", list(_json_commands(Path("/x"))))
def test_a_relative_json_path_in_a_job_copy_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    job = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main([*_json_commands(tmp_path / "out")[command], "--json", "result.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ray-aekd {command}: error: --json: got 'result.json'; this command runs in Ray's"), err
    assert "e.g. --json /mnt/shared/..." in err and err.count("\n") == 1
    assert not any(job.iterdir()) and not (tmp_path / "out").exists()


# --- no silent failure in the entry layer ---------------------------------------------------------


def _handlers(path: Path) -> list[str]:
    """``except`` clauses in ``path`` that catch everything or do nothing."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ExceptHandler):
            swallows = all(isinstance(s, ast.Pass) for s in node.body)
            if node.type is None or swallows:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_bare_or_silent_except_in_the_cli_or_config():
    files = sorted((ROOT / "ray_aekd" / "cli").rglob("*.py")) + sorted((ROOT / "ray_aekd" / "config").rglob("*.py"))
    assert [h for f in files for h in _handlers(f)] == []


def test_functions_of_the_cli_and_config_fit_on_a_screen():
    files = sorted((ROOT / "ray_aekd" / "cli").rglob("*.py")) + sorted((ROOT / "ray_aekd" / "config").rglob("*.py"))
    long = [
        f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
