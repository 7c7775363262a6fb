"""The config of ``ray-aekd distill`` (and ``relabel``): the trained teachers, the student, the
loss, the Ray Train workers and where the run goes; plus the presets it can start from."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

from ray_aekd._names import GRADIENT_SPACES, GRADIENT_STRATEGIES, SOURCE_KINDS, STRATEGIES, TOLERANCE_STRATEGIES
from ray_aekd.config._base import Renamed, check, check_custom_resources, check_labels, check_name
from ray_aekd.config.common import TrackingConfig, TrainConfig, check_model
from ray_aekd.config.data import CacheConfig, DistillDataConfig
from ray_aekd.config.faults import FaultsConfig, check_kill_teacher
from ray_aekd.config.teachers import check_unique_names

if TYPE_CHECKING:
    from ray_aekd.models.preprocess import Preprocess
    from ray_aekd.models.sources import ModelSource

__all__ = [
    "PRESETS",
    "STAGES",
    "DistillConfig",
    "DistillTeacher",
    "DistillTrackingConfig",
    "LossConfig",
    "PreprocessConfig",
    "StudentConfig",
    "WorkersConfig",
    "apply_preset",
]

#: ``teachers.<i>.stage``: how a teacher's Ray Data stage runs.
STAGES = ("auto", "actors", "tasks")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What a teacher was trained on: ``x in [0, 1] -> resize to size -> (x - mean) / std``."""

    mean: tuple[float, ...]  # one number, or one per input channel
    std: tuple[float, ...]  # one number > 0, or one per input channel
    size: int | None = None  # resize images to size x size first (bilinear); null: the data's size

    def validate(self, prefix: str) -> None:
        check(len(self.mean) >= 1, f"{prefix}.mean", list(self.mean), "one number, or one per input channel")
        check(
            len(self.std) >= 1 and all(math.isfinite(v) and v > 0 for v in self.std),
            f"{prefix}.std",
            list(self.std),
            "one number > 0, or one per input channel",
        )
        size = self.size
        check(size is None or size >= 1, f"{prefix}.size", size, "an integer >= 1, or null (the data's size)")

    def to_preprocess(self) -> Preprocess:
        from ray_aekd.models.preprocess import Preprocess  # torch: only where the transform is built

        return Preprocess(self.mean, self.std, self.size)


_SOURCE_ALLOWED = (
    "exactly one of checkpoint (a ray_aekd checkpoint folder or URI), model + weights (an architecture and a "
    ".pt/.pth/.safetensors state dict), exported (a torch.export .pt2 program), torchscript (a TorchScript file) "
    "or mlflow (models:/<name>@<alias>, models:/<model id>, runs:/<run id>/<path>)"
)


@dataclasses.dataclass(frozen=True)
class DistillTeacher:
    """A trained teacher for distillation: where the model is (one of ``SOURCE_KINDS``), how
    its inputs are prepared, and how its Ray Data stage runs (each actor or task books
    ``cpus`` and ``gpus``)."""

    name: str  # the teacher's name in metrics (weights/<name>) and messages
    checkpoint: str | None = None  # ray_aekd checkpoint: folder, fsspec URL (s3://...) or MLflow URI
    model: str | None = None  # with weights: a registry name, torchvision:<name> or timm:<name>
    weights: str | None = None  # the state dict for model: .pt/.pth (tensors only) or .safetensors
    exported: str | None = None  # a torch.export program (.pt2) with a dynamic batch dimension
    torchscript: str | None = None  # a scripted or traced module (torch.jit.save)
    mlflow: str | None = None  # MLflow PyTorch model: models:/<name>@<alias>, models:/<id>, runs:/<id>/<path>, a folder
    preprocess: PreprocessConfig | None = None  # null: the dataset's (a checkpoint's own; [0, 1] for our exports)
    cpus: float = 1.0  # CPUs per actor or task (fractions oversubscribe a small machine with processes)
    gpus: float = 0.0  # GPUs per actor; fractional shares a GPU
    actors: int = 1  # size of this teacher's actor pool (stage: actors)
    batch_size: int = 256  # inference batch size
    stage: str = "auto"  # actors | tasks | auto (actors when gpus > 0, else tasks)
    custom_resources: dict[str, float] = dataclasses.field(default_factory=dict)  # other Ray resources per actor/task
    label_selector: dict[str, str] = dataclasses.field(default_factory=dict)  # run only on nodes with these labels

    RENAMED: ClassVar[dict[str, str | Renamed]] = {
        "num_cpus": "cpus",
        "num_gpus": "gpus",
        "resources": "custom_resources",
    }

    @property
    def source_kind(self) -> str:
        """The key that names this teacher's model (``checkpoint``, ``model``, ...)."""
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)

    @property
    def location(self) -> str:
        """The file, folder or URI of the model (``weights`` for a ``model`` teacher)."""
        kind = self.source_kind
        return str(self.weights if kind == "model" else getattr(self, kind))

    @property
    def runs_as_actors(self) -> bool:
        """Whether the stage is an actor pool (``stage: actors``, or ``auto`` with GPUs)."""
        return self.stage == "actors" or (self.stage == "auto" and self.gpus > 0)

    def with_location(self, location: str) -> DistillTeacher:
        """This teacher with its file, folder or URI replaced (resolved paths, downloaded MLflow models)."""
        kind = self.source_kind
        changes: dict[str, Any] = {"weights" if kind == "model" else kind: location}
        return dataclasses.replace(self, **changes)

    def source(self) -> ModelSource:
        from ray_aekd.models.sources import ModelSource  # torch: only where the model is loaded

        kind = self.source_kind
        return ModelSource(
            kind=kind,
            location=self.location,
            architecture=self.model,
            preprocess=self.preprocess.to_preprocess() if self.preprocess is not None else None,
        )

    def validate(self, prefix: str) -> None:
        check_custom_resources(f"{prefix}.custom_resources", self.custom_resources)
        check_labels(f"{prefix}.label_selector", self.label_selector)
        check(self.stage in STAGES, f"{prefix}.stage", self.stage, ", ".join(STAGES))
        check(
            self.stage != "tasks" or self.gpus == 0,
            f"{prefix}.stage",
            self.stage,
            "actors or auto for a teacher with gpus > 0 (an actor holds its GPU)",
        )
        check(
            self.actors == 1 or self.runs_as_actors,
            f"{prefix}.actors",
            self.actors,
            "1 unless the teacher runs as an actor pool (stage: actors, or auto with gpus > 0)",
        )
        check_name(f"{prefix}.name", self.name)
        check(
            (self.model is None) == (self.weights is None),
            f"{prefix}.{'weights' if self.weights is None else 'model'}",
            None,
            "model and weights together: the architecture and its state dict file",
        )
        given = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        check(len(given) == 1, prefix, f"{self.name} with {', '.join(given) or 'none of them'}", _SOURCE_ALLOWED)
        for key in (*SOURCE_KINDS, "weights"):
            value = getattr(self, key)
            check(value is None or bool(value.strip()), f"{prefix}.{key}", value, "a non-empty path or URI, or null")
        if self.model is not None:
            check_model(f"{prefix}.model", self.model)
        if self.mlflow is not None:
            check(
                self.mlflow.startswith(("models:/", "runs:/")) or "://" not in self.mlflow,
                f"{prefix}.mlflow",
                self.mlflow,
                "models:/<name>@<alias>, models:/<name>/<version>, models:/<model id>, runs:/<run id>/<path>, or a "
                "local MLflow model folder",
            )
        check(
            0 <= self.gpus <= 1 or float(self.gpus).is_integer(),
            f"{prefix}.gpus",
            self.gpus,
            "a number in [0, 1] (fractions share a GPU) or a whole number of GPUs",
        )
        check(self.cpus > 0, f"{prefix}.cpus", self.cpus, "a number > 0")
        check(self.actors >= 1, f"{prefix}.actors", self.actors, "an integer >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The model to train."""

    model: str = "digits_mlp"  # a registry name, torchvision:<name> or timm:<name>
    hint_layer: str | None = None  # hints: the student layer regressed onto the teachers' (default: the model's)

    def validate(self, prefix: str) -> None:
        check_model(f"{prefix}.model", self.model)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The distillation loss: L = ce_weight * CE + kd_weight * sum_m alpha_m KD_m (+ hints)."""

    strategy: str = "aekd"  # average | aekd | mgda | upgrad | authors_svm | fixed | none
    tolerance: float = 0.6  # C, in [1/M, 1] (aekd, authors_svm)
    temperature: float = 4.0  # T of the softened softmax
    ce_weight: float = 1.0  # gamma
    kd_weight: float = 0.9  # lambda
    hint_weight: float = 0.0  # beta: > 0 adds hint-level AE-KD
    space: str = "batch_mean"  # batch_mean | per_sample
    normalize: bool = False  # solve on unit-norm gradients, then weight by 1/||g|| (the authors' svm_norm)
    fixed_weights: tuple[float, ...] | None = None  # strategy fixed: one weight per teacher, >= 0, summing to 1

    def validate(self, prefix: str) -> None:
        check(self.strategy in STRATEGIES, f"{prefix}.strategy", self.strategy, ", ".join(STRATEGIES))
        # the range [1/M, 1] needs M: DistillConfig.validate checks it with the numbers
        check(math.isfinite(self.tolerance), f"{prefix}.tolerance", self.tolerance, "a number in [1/M, 1]")
        ok = math.isfinite(self.temperature) and self.temperature > 0
        check(ok, f"{prefix}.temperature", self.temperature, "a finite number > 0")
        for key in ("ce_weight", "kd_weight", "hint_weight"):
            value = getattr(self, key)
            check(math.isfinite(value) and value >= 0, f"{prefix}.{key}", value, "a finite number >= 0")
        check(self.space in GRADIENT_SPACES, f"{prefix}.space", self.space, ", ".join(GRADIENT_SPACES))


def _gpus_from_use_gpu(value: Any, key: str) -> float:
    check(isinstance(value, bool), key, value, "true or false")
    return 1.0 if value else 0.0


@dataclasses.dataclass(frozen=True)
class WorkersConfig:
    """The Ray Train worker group that trains the student: how many workers, and what each books."""

    num_workers: int = 2  # Ray Train workers; 0 runs the loop in this process (Train's local mode)
    cpus: float = 1.0  # CPUs per worker
    gpus: float = 0.0  # GPUs per worker: 0 (CPU, gloo), 1 (one GPU each, NCCL), or a share with one worker
    max_failures: int = 0  # worker-group restarts, each resuming from the last checkpoint; -1: no limit
    custom_resources: dict[str, float] = dataclasses.field(default_factory=dict)  # other Ray resources per worker
    label_selector: dict[str, str] = dataclasses.field(default_factory=dict)  # run only on nodes with these labels

    RENAMED: ClassVar[dict[str, str | Renamed]] = {
        "cpus_per_worker": "cpus",
        "use_gpu": Renamed("gpus", _gpus_from_use_gpu),
        "resources": "custom_resources",
    }

    @property
    def use_gpu(self) -> bool:
        """Whether each worker holds a GPU (Ray Train's ``ScalingConfig(use_gpu=...)``)."""
        return self.gpus > 0

    def validate(self, prefix: str) -> None:
        check_custom_resources(f"{prefix}.custom_resources", self.custom_resources)
        check_labels(f"{prefix}.label_selector", self.label_selector)
        check(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "an integer >= 0")
        check(self.cpus > 0, f"{prefix}.cpus", self.cpus, "a number > 0")
        check(
            0 <= self.gpus <= 1,
            f"{prefix}.gpus",
            self.gpus,
            "0 (CPU), 1 (one GPU per worker), or a share in (0, 1) with num_workers: 1",
        )
        check(
            self.gpus in (0, 1) or self.num_workers == 1,
            f"{prefix}.gpus",
            self.gpus,
            "0 or 1 with more than one worker (NCCL cannot run two ranks on one GPU); a share in (0, 1) only with "
            "num_workers: 1, to leave the rest of the GPU to teacher actors",
        )
        check(self.max_failures >= -1, f"{prefix}.max_failures", self.max_failures, "an integer >= 0, or -1")
        for key in ("custom_resources", "label_selector"):
            check(
                not (getattr(self, key) and self.num_workers == 0),
                f"{prefix}.{key}",
                getattr(self, key),
                "empty when num_workers is 0 (local mode runs the loop in this process, not on a placed worker)",
            )
        check(
            not (self.use_gpu and self.num_workers == 0),
            f"{prefix}.gpus",
            self.gpus,
            "0 when num_workers is 0 (local mode runs on this process's device)",
        )


@dataclasses.dataclass(frozen=True)
class DistillTrackingConfig(TrackingConfig):
    """Where MLflow runs go, and whether the student is registered as a model."""

    register_model: str | None = None  # also register the student under this MLflow model name

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check(self.register_model != "", f"{prefix}.register_model", self.register_model, "a name, or null")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """``ray-aekd distill`` and ``ray-aekd relabel``: distil trained teachers into a student."""

    teachers: tuple[DistillTeacher, ...]  # the trained teachers, one entry each
    student: StudentConfig = StudentConfig()
    distill: LossConfig = LossConfig()
    data: DistillDataConfig = DistillDataConfig()
    train: TrainConfig = TrainConfig()
    workers: WorkersConfig = WorkersConfig()
    cache: CacheConfig = CacheConfig()
    tracking: DistillTrackingConfig = DistillTrackingConfig(experiment="ray-aekd")
    name: str = "distill"  # MLflow run name and the run folder under output_dir
    output_dir: str = "runs/distill"  # run folders; on a multi-node cluster a path every node sees (NFS)
    storage_path: str | None = None  # Train checkpoints: shared path, s3://... or gs://...; null: output_dir/_train
    seed: int = 0  # the student's initialisation, the data order and (unless data.split_seed) the split
    faults: FaultsConfig = FaultsConfig()  # fault injection (tests, drills); RAY_AEKD_FAULTS overrides it

    def validate(self, prefix: str) -> None:
        names = [t.name for t in self.teachers]
        check_unique_names(names)
        self._validate_tolerance()
        self._validate_cache()
        check_name("name", self.name)
        check(bool(self.output_dir), "output_dir", self.output_dir, "a path")
        check(self.storage_path != "", "storage_path", self.storage_path, "a path or URI (s3://, gs://), or null")
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        self._validate_faults(names)

    def _validate_tolerance(self) -> None:
        num, loss = len(self.teachers), self.distill
        check(
            num >= 2 or loss.strategy not in GRADIENT_STRATEGIES,
            "distill.strategy",
            loss.strategy,
            "average, fixed or none when there is a single teacher (weighting from gradients needs M >= 2)",
        )
        if loss.strategy in TOLERANCE_STRATEGIES and num >= 2:
            check(
                1 / num - 1e-9 <= loss.tolerance <= 1,
                "distill.tolerance",
                loss.tolerance,
                f"a number in [1/M, 1] = [{1 / num:.6g}, 1] for M = {num} teachers",
            )
        else:  # the other strategies do not read it; still no nonsense
            check(0 < loss.tolerance <= 1, "distill.tolerance", loss.tolerance, "a number in (0, 1]")
        self._validate_fixed_weights(num)

    def _validate_fixed_weights(self, num: int) -> None:
        weights = self.distill.fixed_weights
        if self.distill.strategy != "fixed":
            shown = None if weights is None else list(weights)
            check(weights is None, "distill.fixed_weights", shown, "null unless distill.strategy is fixed")
            return
        ok = weights is not None and len(weights) == num
        ok = ok and all(math.isfinite(w) and w >= 0 for w in weights or ()) and abs(sum(weights or ()) - 1) <= 1e-6
        check(
            ok,
            "distill.fixed_weights",
            None if weights is None else list(weights),
            f"{num} numbers >= 0 that sum to 1, one per teacher in the order of teachers",
        )

    def _validate_cache(self) -> None:
        views_repeat = self.data.views is not None or not self.data.augment
        if self.cache.path is not None:
            check(
                views_repeat,
                "data.views",
                self.data.views,
                "an integer >= 1 when cache.path is set (the cache holds that many views; or data.augment: false)",
            )
            check(
                self.distill.hint_weight == 0,
                "distill.hint_weight",
                self.distill.hint_weight,
                "0 when cache.path is set (the cache holds logits, not the teachers' hint features)",
            )
        if self.cache.mode == "memory":
            check(
                views_repeat,
                "cache.mode",
                self.cache.mode,
                "auto or stream when every epoch sees a new view (data.views is null and data.augment is true): "
                "memory keeps data.views views, so set data.views",
            )
            check(
                self.distill.hint_weight == 0,
                "cache.mode",
                self.cache.mode,
                "auto or stream when distill.hint_weight > 0 (memory keeps logits, not the teachers' hint features)",
            )

    def _validate_faults(self, names: list[str]) -> None:
        faults = self.faults
        check_kill_teacher(faults.kill_teacher, names)
        check(
            faults.kill_teacher is None or self.cache.path is None,
            "faults.kill_teacher",
            faults.kill_teacher,
            "null when cache.path is set (no teacher runs: the fault could never fire)",
        )
        down = faults.mlflow_down_epoch
        check(
            down is None or down <= self.train.epochs,
            "faults.mlflow_down_epoch",
            down,
            f"an epoch of the run (1 to train.epochs = {self.train.epochs}), or null",
        )
        workers = max(1, self.workers.num_workers)
        check(
            faults.kill_worker_rank is None or (faults.kill_worker_rank < workers and self.workers.num_workers > 0),
            "faults.kill_worker_rank",
            faults.kill_worker_rank,
            f"a rank below workers.num_workers = {self.workers.num_workers} (local mode has no worker to kill), "
            "or null",
        )


#: ``preset: <name>`` at the top of a distillation config fills in these values; keys the
#: config sets itself win. ``authors_cifar`` is the AE-KD authors' CIFAR-100 student recipe as
#: released (train_student.py / train_student.sh: batch 64 on one GPU, SGD with Nesterov
#: momentum, 240 epochs, lr x0.1 at 150/180/210, T = 4, CE 1 + KD 0.9, C = 0.6).
PRESETS: dict[str, dict[str, Any]] = {
    "authors_cifar": {
        "train": {
            "epochs": 240,
            "batch_size": 64,
            "lr": 0.05,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": [150, 180, 210],
        },
        "distill": {"temperature": 4.0, "tolerance": 0.6, "ce_weight": 1.0, "kd_weight": 0.9},
        "data": {"augment": True},
    }
}


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Merge ``data["preset"]`` (a name in ``PRESETS``) under the config's own values."""
    if "preset" not in data:
        return data
    data = dict(data)
    name = data.pop("preset")
    check(name in PRESETS, "preset", name, ", ".join(PRESETS))
    merged = {k: dict(v) for k, v in PRESETS[name].items()}
    for key, value in data.items():
        if key in merged and isinstance(value, dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged
