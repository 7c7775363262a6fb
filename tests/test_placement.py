"""Placement on a cluster: custom resources and node labels put teacher stages and train workers
where the config asks, and a request no node can meet is refused before anything is scheduled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import teacher_overrides

from ray_aekd.config import ConfigError, DistillConfig, load_config
from ray_aekd.distributed.distill import distill
from ray_aekd.distributed.session import Demand, check_demands, label_matches

HERE = Path(__file__).resolve().parent
SMOKE = HERE.parent / "tune_configs" / "distill_smoke.yaml"


@pytest.mark.slow
def test_teachers_and_workers_run_where_the_config_places_them(digits_teachers, tmp_path):
    """Three simulated nodes: a head, a teacher node (custom resource teacher_gpu and label
    role=teacher) and a student node (label role=student). Where every teacher actor and task
    and every train worker ran comes from Ray's state API, not from the config."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "placement_run.py"), json.dumps(digits_teachers), str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    nodes = seen["nodes"]
    assert len(set(nodes.values())) == 3
    # cnn_a and mlp_c run as actor pools (one per pass over the data: validation, then the epoch),
    # cnn_b as tasks; all of them on the teacher node only
    assert len(seen["teacher_actors"]) >= 2
    assert {a["node"] for a in seen["teacher_actors"]} == {nodes["teacher"]}
    assert seen["teacher_tasks"]
    assert {t["node"] for t in seen["teacher_tasks"]} == {nodes["teacher"]}
    assert len(seen["train_workers"]) == 2
    assert {w["node"] for w in seen["train_workers"]} == {nodes["student"]}
    # and the run finished: every sample through every teacher once (1438 train + 359 val),
    # checkpoints under storage_path, a student that learnt something
    assert seen["forwards"] == {"cnn_a": 1797, "cnn_b": 1797, "mlp_c": 1797}
    assert seen["checkpoints"]
    assert seen["val_acc1"] > 0.3
    # a tracking server on the driver's loopback address is refused on a multi-node cluster
    assert seen["loopback_tracking"].startswith("tracking.uri: http://127.0.0.1:5000"), seen["loopback_tracking"]
    assert "3-node cluster" in seen["loopback_tracking"]


def test_a_placement_no_node_can_meet_is_refused_before_scheduling(local_ray, digits_teachers, tmp_path):
    base = [*teacher_overrides(digits_teachers), f"output_dir={tmp_path / 'out'}"]
    labelled = load_config(DistillConfig, SMOKE, [*base, "workers.label_selector={ray-aekd/role: student}"])
    message = r"workers: a train worker needs \{CPU: 0.5\} on a node labelled \{ray-aekd/role: student\}, but no node"
    with pytest.raises(ValueError, match=message):
        distill(labelled, log=lambda line: None)
    custom = load_config(DistillConfig, SMOKE, [*base, "teachers.1.custom_resources={teacher_gpu: 1}"])
    with pytest.raises(ValueError, match=r"teachers.1: a teacher 'cnn_b' task needs \{CPU: 1, teacher_gpu: 1\}"):
        distill(custom, log=lambda line: None)
    more = torch.cuda.device_count() + 1  # more GPUs than any node of the local Ray has
    gpus = load_config(DistillConfig, SMOKE, [*base, f"teachers.0.gpus={more}"])
    message = rf"teachers.0: a teacher 'cnn_a' actor needs \{{CPU: 1, GPU: {more}\}}.*teachers.0.gpus is {more}"
    with pytest.raises(ValueError, match=message):
        distill(gpus, log=lambda line: None)
    assert not (tmp_path / "out").exists()  # refused before the run folder was made


NODES = [
    {"NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}, "Labels": {}},
    {"NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0, "GPU": 2.0, "teacher_gpu": 2.0},
     "Labels": {"ray-aekd/role": "teacher", "zone": "a"}},
    {"NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 16.0, "GPU": 4.0},
     "Labels": {"ray-aekd/role": "student", "zone": "b"}},
]  # fmt: skip


def test_label_selectors_follow_rays_syntax():
    labels = {"ray-aekd/role": "teacher", "zone": "a"}
    assert label_matches({"ray-aekd/role": "teacher"}, labels)
    assert not label_matches({"ray-aekd/role": "student"}, labels)
    assert label_matches({"ray-aekd/role": "!student"}, labels)
    assert label_matches({"zone": "in(a, b)"}, labels) and not label_matches({"zone": "!in(a,b)"}, labels)
    assert not label_matches({"missing": "x"}, labels) and label_matches({"missing": "!x"}, labels)


def test_demands_must_fit_on_one_node_and_in_the_cluster():
    teacher = Demand("teachers.0", "teacher 'a' actor", {"CPU": 2, "GPU": 1, "teacher_gpu": 1},
                     {"ray-aekd/role": "teacher"}, count=2)  # fmt: skip
    workers = Demand("workers", "train worker", {"CPU": 4, "GPU": 1}, {"ray-aekd/role": "student"}, count=4)
    check_demands([teacher, workers], NODES)  # fits: two teachers on 10.0.0.2, four workers on 10.0.0.3
    # a single worker asking for more than any student node has: named, with what the nodes offer
    big = Demand("workers", "train worker", {"CPU": 32}, {"ray-aekd/role": "student"})
    with pytest.raises(ValueError, match=r"workers: a train worker needs \{CPU: 32\}.*10.0.0.3 \{CPU: 16, GPU: 4\}"):
        check_demands([big], NODES)
    # each fits on a node, but the pools hold three teacher_gpu at once and the cluster has two
    three = Demand("teachers.0", "teacher 'a' actor", {"CPU": 1, "teacher_gpu": 1}, count=3)
    message = r"teachers.0: the run holds 3 teacher 'a' actors of \{CPU: 1, teacher_gpu: 1\} at once, but this Ray "
    with pytest.raises(ValueError, match=message + r"cluster has room for 2 in it"):
        check_demands([three], NODES)
    # six GPU workers on the student nodes: the cluster has 7 GPUs, but the student node 4
    six = Demand("workers", "train worker", {"CPU": 1, "GPU": 1}, {"ray-aekd/role": "student"}, count=6)
    with pytest.raises(ValueError, match=r"room for 4 on nodes labelled \{ray-aekd/role: student\}"):
        check_demands([six], NODES)
    # two pools that fit one by one but not together: the cluster-wide custom resource total says so
    pools = [Demand(f"teachers.{i}", "teacher actor", {"CPU": 1, "teacher_gpu": 1}, count=2) for i in range(2)]
    with pytest.raises(ValueError, match=r"teachers.0, teachers.1: the run holds 4 'teacher_gpu' at once"):
        check_demands(pools, NODES)
    # tasks hold theirs only while they run: two teacher tasks of one teacher_gpu each fit
    tasks = [Demand(f"teachers.{i}", "task", {"CPU": 1, "teacher_gpu": 2}, held=False) for i in range(2)]
    check_demands(tasks, NODES)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teachers.0.custom_resources={CPU: 2}", r"teachers.0.custom_resources.CPU: got 2; allowed: a custom resource"),
        (
            "teachers.0.custom_resources={teacher_gpu: 1.5}",
            r"teachers.0.custom_resources.teacher_gpu: got 1.5; allowed: a number",
        ),
        ("teachers.0.custom_resources={teacher_gpu: 0}", r"teachers.0.custom_resources.teacher_gpu: got 0"),
        (
            "teachers.0.custom_resources=[teacher_gpu]",
            r"teachers.0.custom_resources: got \['teacher_gpu'\]; allowed: a mapping",
        ),
        ("teachers.0.label_selector={zone: 1}", r"teachers.0.label_selector.zone: got 1; allowed: a string"),
        ("workers.custom_resources={GPU: 1}", r"workers.custom_resources.GPU: got 1; allowed: a custom resource"),
        (
            "workers={num_workers: 0, label_selector: {zone: a}}",
            r"workers.label_selector: got \{'zone': 'a'\}; allowed: empty when num_workers is 0",
        ),
        ("storage_path=''", r"storage_path: got ''; allowed: a path or URI"),
    ],
)
def test_bad_placement_keys_name_the_key(override, message):
    overrides = ["teachers=[{name: a, checkpoint: x}, {name: b, checkpoint: y}]", override]
    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, SMOKE, overrides)
