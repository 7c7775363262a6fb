"""``ray_aekd.compare`` against real MLflow stores: a SQLite file, and one tracking server over HTTP.

The runs are logged the way ``ray_aekd.distill`` and the sweep log them: run name = config name,
the flattened config as string params, ``val/*`` metrics per epoch (step = epoch), teacher and
ensemble accuracies at step 0, sweep children tagged ``mlflow.parentRunId``.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from itertools import count

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ray_aekd.tracking.compare import (
    collect_runs,
    compare,
    format_table,
    plot_comparison,
    plot_metric_against,
    rank_runs,
    write_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_clock = count(1_700_000_000_000, 1000)

# name: (strategy, C, T, val/acc1 per epoch, val/agreement per epoch, status)
SWEEP_TRIALS = {
    "aekd-c0.6-t4": ("aekd", "0.6", "4.0", [0.80, 0.93, 0.91], [0.70, 0.85, 0.88], "FINISHED"),
    "aekd-c0.8-t4": ("aekd", "0.8", "4.0", [0.85, 0.90, 0.94375], [0.70, 0.80, 0.90], "FINISHED"),
    "aekd-c0.6-t2": ("aekd", "0.6", "2.0", [0.90, 0.91, 0.91], [0.75, 0.78, 0.80], "FINISHED"),
    "mgda-t4": ("mgda", "0.6", "4.0", [0.70, 0.75], [0.60, 0.65], "RUNNING"),
}
AVERAGE = ("average", "0.6", "4.0", [0.88, 0.92, 0.90, 0.89], [0.90, 0.91, 0.92, 0.93], "FINISHED")


def log_distill_run(client, experiment_id, name, spec, parent_id=None, extra_params=None):
    """One run as ``ray_aekd.distill`` logs it; returns the run id."""
    strategy, tolerance, temperature, acc1, agreement, status = spec
    tags = {"ray_aekd.strategy": strategy}
    if parent_id is not None:
        tags["mlflow.parentRunId"] = parent_id
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {
        "name": name, "distill.strategy": strategy, "distill.tolerance": tolerance,
        "distill.temperature": temperature, "train.epochs": str(len(acc1)), "student.model": "digits_mlp",
    } | (extra_params or {})  # fmt: skip
    stamp = next(_clock)
    metrics = [Metric("teacher/cnn_a/val/acc1", 0.8, stamp, 0), Metric("ensemble/val/acc1", 0.9, stamp, 0)]
    for epoch, (acc, agree) in enumerate(zip(acc1, agreement, strict=True), start=1):
        stamp = next(_clock)
        metrics += [
            Metric("val/acc1", acc, stamp, epoch), Metric("val/agreement", agree, stamp, epoch),
            Metric("val/acc5", 1.0, stamp, epoch), Metric("val/ece", 0.05, stamp, epoch),
            Metric("val/loss", 1 - acc, stamp, epoch), Metric("train/loss", 1.2 - acc, stamp, epoch),
            Metric("weights/cnn_a", 0.5, stamp, epoch), Metric("weights/cnn_b", 0.5, stamp, epoch),
        ]  # fmt: skip
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def log_sweep(client, experiment_id, trials, name="tol-sweep"):
    """A sweep parent with one child per trial; returns (parent id, {trial name: child id})."""
    parent = client.create_run(experiment_id, run_name=name, tags={"ray_aekd.sweep": "true"}).info.run_id
    # a parent may carry the base config and the best trial's accuracy: it is still never a row
    client.log_batch(parent, metrics=[Metric("val/acc1", 0.99, next(_clock), 1)],
                     params=[Param("distill.strategy", "aekd")])  # fmt: skip
    children = {
        n: log_distill_run(client, experiment_id, n, spec, parent, {"sweep.tolerance_fraction": "0.5"})
        for n, spec in trials.items()
    }
    client.set_terminated(parent)
    return parent, children


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with a sweep (4 children), a stand-alone average run, a teacher run, a sweep
    with no child yet, a distillation run with no epoch yet, and two other experiments."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    client = MlflowClient(uri)
    main = client.create_experiment("ray-aekd")
    parent, children = log_sweep(client, main, SWEEP_TRIALS)
    average = log_distill_run(client, main, "average-t4", AVERAGE)
    teacher = client.create_run(main, run_name="teacher-cnn_a").info.run_id  # no distill.strategy: not a row
    client.log_batch(teacher, metrics=[Metric("val/acc1", 0.97, next(_clock), 1)],
                     params=[Param("train.epochs", "3")])  # fmt: skip
    starting = client.create_run(main, run_name="just-started").info.run_id  # no val/acc1 yet: not a row
    client.log_param(starting, "distill.strategy", "aekd")
    empty_sweep = client.create_run(main, run_name="empty-sweep", tags={"ray_aekd.sweep": "true"}).info.run_id
    client.create_experiment("empty")
    client.create_experiment("ray-aekd-teachers")
    return {"uri": uri, "parent": parent, "children": children, "average": average, "empty_sweep": empty_sweep}


@pytest.fixture(autouse=True)
def tracking_env(monkeypatch, store):
    """MLFLOW_TRACKING_URI points at the test store (``resolve_tracking_uri`` reads it first)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # what limit_mlflow_retries sets; undone after
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return store


def test_experiment_runs_are_ranked_by_final_accuracy_then_agreement(store):
    rows = rank_runs(collect_runs())
    # aekd-c0.6-t4 and aekd-c0.6-t2 end level at 0.91; the one that agrees more with the ensemble wins
    assert [r.name for r in rows] == ["aekd-c0.8-t4", "aekd-c0.6-t4", "aekd-c0.6-t2", "average-t4", "mgda-t4"]
    by_name = {r.name: r for r in rows}
    best = by_name["aekd-c0.6-t4"]
    assert (best.acc1, best.best_acc1, best.best_epoch, best.epochs) == (0.91, 0.93, 2, 3)
    assert best.agreement == 0.88
    assert (best.tolerance, best.temperature, best.strategy) == (0.6, 4.0, "aekd")
    assert by_name["aekd-c0.6-t2"].best_epoch == 2  # 0.91 at epochs 2 and 3: the earliest
    assert by_name["average-t4"].tolerance is None  # C means nothing for average, whatever was logged
    assert (by_name["average-t4"].acc1, by_name["average-t4"].best_epoch) == (0.89, 2)
    assert by_name["mgda-t4"].status == "RUNNING"
    assert by_name["aekd-c0.8-t4"].run_id == store["children"]["aekd-c0.8-t4"]


def test_sweep_gives_only_its_children(store):
    rows = rank_runs(collect_runs(sweep=store["parent"]))
    assert [r.name for r in rows] == ["aekd-c0.8-t4", "aekd-c0.6-t4", "aekd-c0.6-t2", "mgda-t4"]
    assert {r.run_id for r in rows} == set(store["children"].values())


def test_table_shows_ranks_settings_and_best_epoch(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the URI given as an argument is used, and named
    rows = rank_runs(collect_runs(tracking_uri=store["uri"]))
    table = format_table(rows, tracking_uri=store["uri"])
    print(table)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "run", "strategy", "C", "T", "val/acc1", "val/agreement", "best", "epoch",
                                "run", "id"]  # fmt: skip
    first = lines[1].split()
    assert first == ["1", "aekd-c0.8-t4", "aekd", "0.8", "4", "0.9437", "0.9000", "3", "(0.9437)",
                     store["children"]["aekd-c0.8-t4"]]  # fmt: skip
    assert lines[2].split()[7:9] == ["2", "(0.9300)"]  # final 0.91 at epoch 3, best 0.93 at epoch 2
    average = lines[4].split()
    assert average[1:5] == ["average-t4", "average", "-", "4"]
    assert "mgda-t4 [running]" in lines[5]
    id_columns = {line.find(row.run_id) for row, line in zip(rows, lines[1:6], strict=True)}
    assert id_columns == {lines[0].index("run id")}  # every run id under the header
    assert lines[6] == f"5 runs in experiment 'ray-aekd' at {store['uri']}, ranked by final val/acc1"


def test_compare_writes_csv_and_plot(store, tmp_path):
    out = tmp_path / "report" / "nested"
    rows, png = compare(sweep=store["parent"], output_dir=str(out))
    assert png == out / "compare.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    with (out / "compare.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [r["run"] for r in table] == [r.name for r in rows]
    top = table[0]
    assert top["rank"] == "1"
    assert top["run_id"] == store["children"]["aekd-c0.8-t4"]  # the full id
    assert top["val/acc1"] == "0.94375"  # not rounded
    assert (top["best_epoch"], top["best_acc1"], top["C"], top["T"]) == ("3", "0.94375", "0.8", "4.0")
    assert table[-1]["status"] == "RUNNING" and table[-1]["epochs"] == "2"


def test_csv_leaves_average_tolerance_empty(tmp_path):
    rows = rank_runs(collect_runs())
    with write_csv(rows, tmp_path / "runs.csv").open() as file:
        table = {r["run"]: r for r in csv.DictReader(file)}
    assert table["average-t4"]["C"] == ""
    assert table["average-t4"]["strategy"] == "average"


def test_metric_plots_are_written(tmp_path):
    rows = collect_runs()
    for key in ("tolerance", "temperature"):
        path = plot_metric_against(rows, key, tmp_path / f"acc_vs_{key}.png", f"val/acc1 against {key}")
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    only_average = [r for r in rows if r.strategy == "average"]  # no C anywhere: a dashed line, still a figure
    assert plot_metric_against(only_average, "tolerance", tmp_path / "avg.png", "average").stat().st_size > 0
    assert plot_comparison(rows, tmp_path / "ranked.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="key must be one of tolerance, temperature, got 'C'"):
        plot_metric_against(rows, "C", tmp_path / "bad.png", "bad")  # type: ignore[arg-type]


def test_unknown_experiment_names_the_flag_and_lists_experiments(store):
    with pytest.raises(ValueError) as error:
        compare(experiment="ray-aekd-typo")
    message = str(error.value)
    assert message.startswith("--experiment 'ray-aekd-typo': no such experiment at sqlite:///")
    for name in ("'ray-aekd'", "'empty'", "'ray-aekd-teachers'", "'Default'"):
        assert name in message


def test_unknown_sweep_id_names_the_flag_and_lists_sweeps(store):
    with pytest.raises(ValueError) as error:
        compare(sweep="0" * 32)
    message = str(error.value)
    assert message.startswith(f"--sweep '{'0' * 32}': no run with this id at {store['uri']}")
    assert f"{store['parent']} ('tol-sweep' in 'ray-aekd')" in message


def test_a_run_that_is_not_a_sweep_is_refused(store):
    with pytest.raises(ValueError, match=r"--sweep '\w+': run 'average-t4' of experiment 'ray-aekd' is not a sweep"):
        compare(sweep=store["average"])


def test_sweep_of_another_experiment_is_refused(store):
    with pytest.raises(ValueError, match="is a run of experiment 'ray-aekd', not of --experiment 'empty'"):
        collect_runs(experiment="empty", sweep=store["parent"])


def test_empty_experiment_or_sweep_says_how_to_make_runs(store, tmp_path):
    with pytest.raises(ValueError) as error:
        compare(experiment="empty", output_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"no distillation runs were found in experiment 'empty' at {store['uri']}")
    assert "ray-aekd distill" in message and "ray-aekd sweep" in message
    with pytest.raises(ValueError, match=f"no distillation runs were found in sweep {store['empty_sweep']}"):
        compare(sweep=store["empty_sweep"], output_dir=str(tmp_path))
    assert not (tmp_path / "compare.csv").exists()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_compare_over_a_tracking_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` (SQLite behind it) on localhost: runs logged and compared over HTTP."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts in half the time
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"mlflow server exited:\n{(tmp_path / 'server.log').read_text()}"
            assert time.monotonic() < deadline, f"no /health in 60 s:\n{(tmp_path / 'server.log').read_text()}"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)

        client = MlflowClient(uri)
        experiment = client.create_experiment("ray-aekd")
        trials = {n: SWEEP_TRIALS[n] for n in ("aekd-c0.6-t4", "aekd-c0.6-t2")}
        parent, children = log_sweep(client, experiment, trials)
        log_distill_run(client, experiment, "average-t4", AVERAGE)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

        rows, png = compare(sweep=parent, output_dir=str(tmp_path / "out"))
        assert [(r.name, r.acc1, r.best_epoch) for r in rows] == [("aekd-c0.6-t4", 0.91, 2), ("aekd-c0.6-t2", 0.91, 2)]
        assert png.read_bytes().startswith(PNG_MAGIC)
        rows, _ = compare(output_dir=str(tmp_path / "out"))
        assert [r.name for r in rows] == ["aekd-c0.6-t4", "aekd-c0.6-t2", "average-t4"]
        footer = format_table(rows).splitlines()[-1]
        assert footer == f"3 runs in experiment 'ray-aekd' at {uri}, ranked by final val/acc1"
        with pytest.raises(ValueError, match=f"--sweep 'nope': no run with this id at {uri}; sweep runs there"):
            compare(sweep="nope")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
