"""The cluster configs of cluster/ are valid and agree with each other and with the CIFAR-100 configs.

Offline: no cloud account, no Kubernetes, no Ray cluster. The launcher configs (aws.yaml, gcp.yaml)
are checked against the schema that ships inside the installed ray package and with Ray's own
``prepare_config`` / ``validate_config`` (what ``ray up`` runs before it calls the cloud); the KubeRay
manifests against tests/schemas/kuberay-v1.5.1-subset.json, written by hand from KubeRay v1.5.x's
API types (see its description). The rest are the properties no schema knows: token auth on every
``ray start``, nothing published, MLflow reachable by every node, the same shared storage and
image everywhere, the nodes kept up hold a CIFAR-100 run as ray_aekd itself would check it, and
every ``ray-aekd ... --config`` command named in cluster/ loads with ray_aekd's own loaders.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import validate_node_labels

from ray_aekd.cli import build_parser
from ray_aekd.config import DistillConfig, TeachersConfig, load_config
from ray_aekd.config.sweep import load_sweep
from ray_aekd.distributed.prepare import demand_totals, run_demands
from ray_aekd.distributed.session import Demand, check_demands

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
README = CLUSTER / "README.md"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-v1.5.1-subset.json"
REPO_ON_NODES = "/home/ray/ray_aekd"  # where the launcher configs and cluster/Dockerfile put this repository
SHARED = "/mnt/shared"
TOKEN_FILE = "~/.ray/auth_token"
ROLE = "ray-aekd/role"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def cifar100() -> DistillConfig:
    return load_config(DistillConfig, ROOT / "tune_configs" / "distill_cifar100.yaml")


def node_type_with_role(config: dict[str, Any], role: str) -> dict[str, Any]:
    types = [t for t in config["available_node_types"].values() if t.get("labels", {}).get(ROLE) == role]
    assert len(types) == 1, f"expected one node type labelled {ROLE}={role}, found {len(types)}"
    return types[0]


def start_commands(config: dict[str, Any], key: str) -> list[str]:
    commands = [c for c in config[key] if "ray start" in c]
    assert commands, f"{key} has no `ray start`"
    return commands


def mlflow_server_args(command: str) -> dict[str, str | None]:
    """``--flag value`` / ``--flag=value`` / bare ``--flag`` of the ``mlflow server`` in a shell command."""
    match = re.search(r"mlflow server (.*?)'", command)
    assert match, f"no `mlflow server ...'` in {command!r}"
    tokens = shlex.split(match.group(1))
    args: dict[str, str | None] = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name, sep, value = token.partition("=")
            if sep:
                args[name] = value
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                args[name] = tokens[i + 1]
            else:
                args[name] = None
    return args


# --- Ray cluster launcher configs --------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_is_valid_for_ray_up(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher(name)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # `ray up` fills in the provider's defaults.yaml for any list we leave out (for AWS/GCP: a nightly
    # Ray wheel); every command it will run must be one written here
    ours = {c for key, value in config.items() if key.endswith("_commands") for c in value}
    ours |= {c for t in config["available_node_types"].values() for c in t.get("initialization_commands", [])}
    for key, value in prepared.items():
        if key.endswith("_commands"):
            assert set(value) <= ours, f"{name}: {key} runs commands from Ray's defaults: {set(value) - ours}"
    for t in prepared["available_node_types"].values():
        assert set(t.get("initialization_commands", [])) <= ours


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_node_types(name):
    config = launcher(name)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    total = 0
    for role, custom in (("teacher", "teacher_gpu"), ("student", "student_gpu")):
        t = node_type_with_role(config, role)
        validate_node_labels(t["labels"])  # Ray's syntax; raises on a bad key or value
        assert t["resources"].get("GPU", 0) >= 1, f"the {role} node type has no GPU"
        assert t["resources"].get(custom, 0) == t["resources"]["GPU"], f"{custom}: one per GPU of the {role} node"
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"]
        total += t["max_workers"]
    assert total <= config["max_workers"]


def launcher_nodes(config: dict[str, Any], size: str) -> list[dict[str, Any]]:
    """``ray.nodes()``-like entries of the launcher cluster with ``min_workers`` or ``max_workers`` nodes."""
    nodes = []
    for name, t in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else t.get(size, 0)
        resources = {k: float(v) for k, v in t["resources"].items()}
        nodes += [{"NodeManagerAddress": name, "Resources": resources, "Labels": dict(t.get("labels", {}))}] * count
    return nodes


def check_run_fits(demands: list[Demand], nodes: list[dict[str, Any]]) -> None:
    """What ``ray_aekd.session.connect`` checks before a run, against these nodes."""
    cpus, gpus = demand_totals(demands)
    assert cpus <= sum(n["Resources"].get("CPU", 0) for n in nodes)
    assert gpus <= sum(n["Resources"].get("GPU", 0) for n in nodes)
    check_demands(demands, nodes)


def teacher_training_demands() -> list[Demand]:
    config = load_config(TeachersConfig, ROOT / "tune_configs" / "teachers_cifar100.yaml")
    res = config.trials
    per = {"CPU": res.cpus} | ({"GPU": res.gpus} if res.gpus else {})
    return [Demand("trials", "teacher trial", per, count=len(config.teachers))]


def cifar100_runs() -> dict[str, list[Demand]]:
    """The demands of each CIFAR-100 job of cluster/README.md, as ray_aekd builds them."""
    distill = cifar100()
    _, base = load_sweep(ROOT / "tune_configs" / "sweep_cifar100.yaml")
    trial = from_base(base)
    return {
        "teachers": teacher_training_demands(),
        "distill": run_demands(distill, teachers=True, workers=True),
        "relabel": run_demands(trial, teachers=True, workers=False),
        "sweep trial": run_demands(trial, teachers=False, workers=True),
    }


def from_base(base: dict[str, Any]) -> DistillConfig:
    from ray_aekd.config import apply_preset, from_dict

    return from_dict(DistillConfig, apply_preset(base))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_kept_up_hold_every_cifar100_job(name):
    config = launcher(name)
    nodes = launcher_nodes(config, "min_workers")  # ray-aekd refuses a run the nodes up now cannot hold
    for job, demands in cifar100_runs().items():
        try:
            check_run_fits(demands, nodes)
        except (AssertionError, ValueError) as error:
            raise AssertionError(f"{name}: the nodes kept up cannot hold `ray-aekd {job}`: {error}") from None
    # at full size, the student nodes hold the sweep's concurrent trials
    sweep, base = load_sweep(ROOT / "tune_configs" / "sweep_cifar100.yaml")
    workers = from_base(base).workers
    student = node_type_with_role(config, "student")
    assert student["max_workers"] * student["resources"]["GPU"] >= sweep.trials.max_concurrent * workers.num_workers


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_ray_start_uses_token_auth(name):
    config = launcher(name)
    assert config["file_mounts"].get(TOKEN_FILE) == TOKEN_FILE, "the token file is synced to every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in start_commands(config, key):
            exported = " ".join(re.findall(r"export ([^;]*);", command.split("ray start")[0]))
            assert "RAY_AUTH_MODE=token" in exported.split(), f"{key}: {command!r}"
            assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in exported.split(), f"{key}: {command!r}"
    assert "RAY_AUTH_MODE=disabled" not in (CLUSTER / name).read_text()


@pytest.mark.parametrize("name", LAUNCHERS)
def test_mlflow_on_the_head_is_private_and_every_node_has_its_uri(name):
    config = launcher(name)
    node_ip = "HEAD_IP=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')"
    [server] = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert node_ip in server, "MLflow's address is the head's private IP, as Ray sees it"
    args = mlflow_server_args(server)
    assert args["--host"] == "$HEAD_IP", f"mlflow server --host {args['--host']}: bind the head's private IP only"
    port = args["--port"]
    allowed = (args.get("--allowed-hosts") or "").split(",")
    assert "*" not in allowed and f"$HEAD_IP:{port}" in allowed, f"--allowed-hosts {allowed}"
    assert "--serve-artifacts" in args
    assert args["--artifacts-destination"].startswith((SHARED, "s3://", "gs://"))
    assert args["--backend-store-uri"].startswith("sqlite:///")
    relay = re.search(r"socat TCP-LISTEN:(\d+),bind=([\d.]+)", server)
    if relay:  # the local end of `ray attach -p 5000`: loopback only
        assert relay.groups() == (port, "127.0.0.1")
        assert any("socat" in c for c in config["head_setup_commands"])
    [head_start] = start_commands(config, "head_start_ray_commands")
    assert node_ip in head_start
    assert f"export MLFLOW_TRACKING_URI=http://$HEAD_IP:{port};" in head_start  # job drivers inherit it
    [worker_start] = start_commands(config, "worker_start_ray_commands")
    assert f"export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port};" in worker_start


@pytest.mark.parametrize("name", LAUNCHERS)
def test_nothing_is_published(name):
    config = launcher(name)
    text = (CLUSTER / name).read_text()
    assert "0.0.0.0" not in text and "::/0" not in text
    [head_start] = start_commands(config, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_start  # `ray dashboard` forwards to the head's loopback
    assert "ray-client-server-port" not in text
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not ranges, f"a security group rule opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to {ranges}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_shared_filesystem_on_every_node_and_in_the_configs(name):
    config = launcher(name)
    mount = re.compile(rf"\bmount -t nfs4? .* {SHARED}$")
    for node_type, t in config["available_node_types"].items():
        # a node type's own list replaces the global one (the head always runs the global one)
        commands = config["initialization_commands"]
        if node_type != config["head_node_type"]:
            commands = t.get("initialization_commands", commands)
        assert any(mount.search(c) for c in commands), f"{name}: {node_type} does not mount {SHARED}"
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    # what the CIFAR-100 jobs read and write is on that filesystem
    distill = cifar100()
    sweep, base = load_sweep(ROOT / "tune_configs" / "sweep_cifar100.yaml")
    teachers = load_config(TeachersConfig, ROOT / "tune_configs" / "teachers_cifar100.yaml")
    paths = {
        "distill output_dir": distill.output_dir,
        "distill storage_path": distill.storage_path,
        "distill data.path": distill.data.path,
        "sweep output_dir": sweep.output_dir,
        "sweep storage_path": sweep.storage_path,
        "sweep cache.path": from_base(base).cache.path,
        "teachers output_dir": teachers.output_dir,
        "teachers data.path": teachers.data.path,
    } | {f"teachers.{i}.checkpoint": t.checkpoint for i, t in enumerate(distill.teachers)}
    for key, path in paths.items():
        assert path is not None and path.startswith(SHARED + "/"), f"{key}: {path} is not on {SHARED}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_setup_installs_the_synced_checkout(name):
    config = launcher(name)
    assert config["file_mounts"].get(REPO_ON_NODES) == ".", "ray up syncs the repository root"
    assert any(re.match(rf"pip install -e {REPO_ON_NODES}\b", c) for c in config["setup_commands"])
    for pattern in ("**/.git", ".venv", "runs", "mlflow.db"):
        assert pattern in config["rsync_exclude"]
    for key in ("initialization_commands", "setup_commands", "head_setup_commands"):
        for command in config[key]:
            assert not re.search(r"\b(curl|wget)\b|https?://", command), f"{key} fetches by hand: {command!r}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_docker_image_is_the_installed_ray(name):
    assert launcher(name)["docker"]["image"] == RAY_IMAGE
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in requires and "py311" in RAY_IMAGE


# --- KubeRay --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay_validator():
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_validate_against_the_committed_schema(name, kuberay_validator):
    [doc] = manifests(name)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in kuberay_validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)


def _typo(spec):
    spec["workerGroupSpecs"][0]["minReplica"] = spec["workerGroupSpecs"][0].pop("minReplicas")


def _int_param(spec):
    spec["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1


def _string_replicas(spec):
    spec["workerGroupSpecs"][1]["replicas"] = "1"


def _spec_typo(spec):
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")


def _container_typo(spec):
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}


@pytest.mark.parametrize("mutate", [_typo, _int_param, _string_replicas, _spec_typo, _container_typo])
def test_kuberay_schema_refuses_what_kubernetes_would(mutate, kuberay_validator):
    [doc] = manifests("raycluster.yaml")
    mutate(doc["spec"])
    assert list(kuberay_validator.iter_errors(doc)), f"{mutate.__name__} passed the schema"


def quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def test_kuberay_cluster_spec():
    [cluster] = manifests("raycluster.yaml")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    groups = pod_groups(spec)
    head_limits = groups["head"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, "the head is a CPU pod"
    for name, role, custom in (("teacher-gpu", "teacher", "teacher_gpu"), ("student-gpu", "student", "student_gpu")):
        group = groups[name]
        [container] = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert isinstance(gpus, int) and gpus >= 1, f"{name}: nvidia.com/gpu limit {gpus!r}"
        assert container["resources"]["requests"].get("nvidia.com/gpu") == gpus
        assert group["labels"] == {ROLE: role}
        validate_node_labels(group["labels"])
        # Ray 2.60's KubeRay autoscaler ignores labels in rayStartParams: they belong in `labels`
        assert "labels" not in group["rayStartParams"]
        assert quantity(group["resources"][custom]) == gpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def kuberay_nodes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``ray.nodes()``-like entries of the pods kept up (``minReplicas``)."""
    nodes = []
    for name, group in pod_groups(spec).items():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": quantity(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        resources |= {k: quantity(v) for k, v in group.get("resources", {}).items()}
        count = 1 if name == "head" else group["minReplicas"]
        nodes += [{"NodeManagerAddress": name, "Resources": resources, "Labels": group.get("labels", {})}] * count
    return nodes


def test_kuberay_pods_kept_up_hold_every_cifar100_job():
    [cluster] = manifests("raycluster.yaml")
    nodes = kuberay_nodes(cluster["spec"])
    for job, demands in cifar100_runs().items():
        try:
            check_run_fits(demands, nodes)
        except (AssertionError, ValueError) as error:
            raise AssertionError(f"the pods kept up cannot hold `ray-aekd {job}`: {error}") from None


def test_kuberay_pods_share_storage_and_reach_mlflow_inside_the_cluster():
    objects = {(d["kind"], d["metadata"]["name"]): d for d in manifests("mlflow.yaml")}
    [service] = [d for (kind, _), d in objects.items() if kind == "Service"]
    port = service["spec"]["ports"][0]["port"]
    uri = f"http://{service['metadata']['name']}:{port}"
    claims = [d for (kind, _), d in objects.items() if kind == "PersistentVolumeClaim"]
    [claim] = [d["metadata"]["name"] for d in claims if "ReadWriteMany" in d["spec"]["accessModes"]]
    [cluster] = manifests("raycluster.yaml")
    for name, group in pod_groups(cluster["spec"]).items():
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == uri, f"{name}: MLFLOW_TRACKING_URI is not {uri}"
            [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == SHARED]
            assert volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim
    deployment = objects[("Deployment", "mlflow")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.partition("=")[::2] for a in container["args"])
    assert int(args["--port"]) == service["spec"]["ports"][0]["targetPort"]
    allowed = args["--allowed-hosts"].split(",")
    assert "*" not in allowed and f"{service['metadata']['name']}:{port}" in allowed
    assert "--serve-artifacts" in args and args["--artifacts-destination"].startswith(SHARED)
    # one process owns the SQLite file, never two pods at once
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    for name in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml"):
        for doc in manifests(name):
            assert doc["kind"] != "Ingress"
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: Service {doc['metadata']['name']}"
        text = (KUBERAY / name).read_text()
        assert "LoadBalancer" not in text and "NodePort" not in text and "enableIngress: true" not in text


def test_rayjob_runs_the_sweep_on_the_raycluster_spec():
    [cluster] = manifests("raycluster.yaml")
    [job] = manifests("rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert isinstance(job["spec"]["ttlSecondsAfterFinished"], int) and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["entrypoint"].startswith("ray-aekd sweep --config ")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]


def test_every_image_is_the_one_the_dockerfile_builds():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1) == RAY_IMAGE
    assert re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1) == REPO_ON_NODES
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    images = set()
    for name in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml"):
        text = (KUBERAY / name).read_text()
        images |= set(re.findall(r"^\s*image: (\S+)", text, re.M))
    assert len(images) == 1, f"the manifests run different images: {images}"
    assert images.pop().endswith(f"/ray-aekd:{VERSION}"), "tag the image with the package version"


# --- commands, config paths, runtime env, placeholders --------------------------------------------------

SUBCOMMANDS = ("teachers", "distill", "relabel", "sweep", "compare", "quickstart", "demo")
_COMMAND = re.compile(rf"\bray-aekd\s+(?:{'|'.join(SUBCOMMANDS)})\b[^;&|]*")


def _snippets() -> list[tuple[str, str]]:
    """(where, text) of every shell snippet in cluster/: README code blocks and inline code, YAML
    comments and the RayJob's entrypoint."""
    out = []
    readme = README.read_text()
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", readme, re.M | re.S):
        out += [("README.md", line) for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", readme, flags=re.M | re.S)
    out += [("README.md", " ".join(span.split())) for span in re.findall(r"`([^`]+)`", prose)]
    for path in sorted(CLUSTER.rglob("*.yaml")) + [CLUSTER / "Dockerfile"]:
        text = path.read_text().replace("\\\n#", " ")
        out += [(path.name, line.split("#", 1)[1]) for line in text.splitlines() if "#" in line]
    [job] = manifests("rayjob.yaml")
    out.append(("rayjob.yaml entrypoint", job["spec"]["entrypoint"]))
    return out


def _commands() -> list[tuple[str, str]]:
    found = []
    for where, text in _snippets():
        text = re.sub(r"\s#.*$", "", text)  # a shell comment after the command
        text = re.sub(r"<[^<>]+>", "PLACEHOLDER", text)  # <parent run id>
        # a command line, not a mention of a command in prose (`ray-aekd teachers` trains ...)
        found += [(where, m.group(0).strip()) for m in _COMMAND.finditer(text) if " --" in m.group(0)]
    return sorted(set(found))


COMMANDS = _commands()


def in_repo(path: str) -> Path:
    """A path a command names: relative to the repository root (commands run there with --working-dir .),
    or under the repository's place on the nodes and in the image."""
    if path.startswith(REPO_ON_NODES + "/"):
        return ROOT / path[len(REPO_ON_NODES) + 1 :]
    assert not Path(path).is_absolute(), f"{path} is outside the repository"
    return ROOT / path


def test_the_walkthrough_names_every_command():
    names = {shlex.split(command)[1] for _, command in COMMANDS}
    assert {"teachers", "distill", "relabel", "sweep", "compare"} <= names, names


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c[:70]}" for w, c in COMMANDS])
def test_every_command_in_cluster_loads_its_config(where, command):
    try:
        args = build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{command}` is not a valid ray-aekd command line")
    if args.command in ("teachers", "distill", "relabel"):
        cls = TeachersConfig if args.command == "teachers" else DistillConfig
        load_config(cls, in_repo(args.config), args.set)  # raises ConfigError naming the key
    elif args.command == "sweep":
        load_sweep(in_repo(args.config), args.set)
    elif args.command == "compare":
        assert args.tracking_uri == "http://127.0.0.1:5000", "compare reads MLflow through the port-forward"


def test_the_relabel_command_makes_the_cache_the_sweep_reads():
    [relabel] = [c for _, c in COMMANDS if c.startswith("ray-aekd relabel")]
    args = build_parser().parse_args(shlex.split(relabel)[1:])
    made = load_config(DistillConfig, in_repo(args.config), args.set)
    _, base = load_sweep(ROOT / "tune_configs" / "sweep_cifar100.yaml")
    read = from_base(base)
    for key in ("teachers", "data", "seed", "cache"):
        assert getattr(made, key) == getattr(read, key), f"relabel's {key} differs from the sweep's"


def test_every_config_path_named_in_cluster_exists():
    homes = [ROOT / "tune_configs", CLUSTER, KUBERAY]
    for path in sorted(CLUSTER.rglob("*")):
        if not path.is_file():
            continue
        for name in re.findall(r"(?<![\w./~-])[\w./-]+\.ya?ml\b", path.read_text()):
            if "/" in name:  # from the repository root (commands), or from cluster/ (README's table)
                found = in_repo(name).is_file() or (CLUSTER / name).is_file()
                assert found, f"{path.name} names {name}, which is not in the repository"
            else:
                assert any((home / name).is_file() for home in homes), f"{path.name} names {name}, found nowhere"


def test_runtime_env_installs_nothing_and_carries_no_secret():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)
    installers = {"pip", "conda", "uv", "container", "image_uri", "py_executable"}
    assert not installers & set(env), "the package is on the nodes already"
    assert "working_dir" not in env, "given on the command line: --working-dir ."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert not [k for k in env["env_vars"] if "TOKEN" in k or "AUTH" in k], "never ship the auth token in a job"
    for pattern in (".git", ".venv", "runs", "mlflow.db"):
        assert pattern in env["excludes"]
    assert "--runtime-env cluster/runtime_env.yaml --working-dir ." in README.read_text()


def test_every_placeholder_is_explained_and_nothing_turns_auth_off():
    readme = README.read_text()
    for path in sorted(CLUSTER.rglob("*")):
        if not path.is_file() or path == README:
            continue
        text = path.read_text()
        for token in set(re.findall(r"REPLACE_WITH_[A-Z0-9_]+|REGISTRY/ray-aekd", text)):
            assert token in readme, f"{path.name}: {token} is not explained in cluster/README.md"
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            text = path.read_text()
            assert "RAY_AUTH_MODE=disabled" not in text and "--dashboard-host=0.0.0.0" not in text, path.name
