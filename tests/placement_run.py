"""A smoke distillation on a simulated three-node Ray cluster (``ray.cluster_utils.Cluster``):
run as a script by ``test_placement.py``, in its own process so that the test session's local
Ray is untouched. Prints one JSON line: the nodes, and for every teacher stage actor or task
and every train worker that ran, the node Ray's state API says it ran on.

    python tests/placement_run.py '<teachers as {name: checkpoint} JSON>' <work folder>
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "distill_smoke.yaml"


def main(teachers: dict[str, str], work: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from ray_aekd.config import DistillConfig, load_config
    from ray_aekd.distributed.distill import distill

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": 0},
    )
    # the teacher node offers the custom resource and a label; the student node a label
    teacher_node = cluster.add_node(num_cpus=2, resources={"teacher_gpu": 2}, labels={"ray-aekd/role": "teacher"})
    student_node = cluster.add_node(num_cpus=2, labels={"ray-aekd/role": "student"})
    os.environ["RAY_ADDRESS"] = cluster.address
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the config's tracking.uri decides here
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        a, b, c = teachers["cnn_a"], teachers["cnn_b"], teachers["mlp_c"]
        overrides = [
            "teachers=["
            f"{{name: cnn_a, checkpoint: '{a}', stage: actors, cpus: 0.5, custom_resources: {{teacher_gpu: 1}}}}, "
            f"{{name: cnn_b, checkpoint: '{b}', stage: tasks, cpus: 0.5, custom_resources: {{teacher_gpu: 1}}}}, "
            f"{{name: mlp_c, checkpoint: '{c}', stage: actors, cpus: 0.5, "
            "label_selector: {ray-aekd/role: teacher}}]",
            "workers.label_selector={ray-aekd/role: student}",
            f"output_dir={work / 'out'}",
            f"storage_path={work / 'storage'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "name=placed",
        ]
        log = lambda line: print(line, file=sys.stderr)  # noqa: E731
        try:  # a tracking server on the driver's loopback: unreachable from the other nodes
            distill(
                load_config(DistillConfig, SMOKE, [*overrides, "tracking.uri=http://127.0.0.1:5000", "name=loopback"]),
                log=log,
            )
            loopback = "not refused"
        except ValueError as error:
            loopback = str(error)
        result = distill(load_config(DistillConfig, SMOKE, overrides), log=log)
        actors = list_actors(detail=True, limit=10000, raise_on_missing_output=False)
        tasks = list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
        teacher_actors = [x for x in actors if "TeacherStage" in (x.repr_name or x.class_name or "")]
        return {
            "nodes": {
                "teacher": teacher_node.node_id,
                "student": student_node.node_id,
                "head": cluster.head_node.node_id,
            },
            "teacher_actors": [{"name": x.repr_name or x.class_name, "node": x.node_id} for x in teacher_actors],
            "teacher_tasks": [
                {"name": x.name, "node": x.node_id} for x in tasks if "_teacher_task" in x.name and x.node_id
            ],
            "train_workers": [
                {"name": x.class_name, "node": x.node_id} for x in actors if x.class_name == "RayTrainWorker"
            ],
            "actor_classes": sorted({x.class_name for x in actors}),
            "val_acc1": result.metrics["val/acc1"],
            "loopback_tracking": loopback,
            "forwards": result.teacher_forward_passes,
            "checkpoints": sorted(p.name for p in (work / "storage" / "placed").glob("checkpoint_*")),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]), Path(sys.argv[2]))))
