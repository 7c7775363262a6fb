"""Typed, validated configs: YAML (plain data, ``yaml.safe_load``) into frozen dataclasses.

``load_config(TeachersConfig, "tune_configs/teachers_digits.yaml", ["train.epochs=2"])``
reads the file, applies ``--set`` overrides (dotted keys; values parsed as YAML scalars),
and builds the dataclass tree. Unknown keys, wrong types and out-of-range values raise one
``ConfigError`` naming the dotted key, the value and what is allowed. Keys renamed in 0.2 still
load until 0.3, with a warning that names the new key.

One module per concern; this package re-exports them, so ``from ray_aekd.config import X`` is
the import to use:

- ``_base``: ``ConfigError``, the checks, ``from_dict``, renamed keys, ``flatten``, ``to_data``;
- ``loading``: ``load_config`` (file + ``--set``), ``dump_yaml`` (``--print-config``);
- ``common``: ``train`` and ``tracking`` sections, the model-name check;
- ``data``: ``data`` and ``cache`` sections;
- ``faults``: fault injection and its environment variables;
- ``teachers``: ``ray-aekd teachers``; ``distill``: ``ray-aekd distill``/``relabel`` and presets;
  ``sweep``: ``ray-aekd sweep`` and its search space;
- ``reference``: writes docs/configuration.md from these dataclasses.

Importing this package imports neither torch, Ray nor MLflow: names are checked against the
catalogues of ``ray_aekd._names``; torch is imported only by the methods that build objects
(``DataConfig.split``, ``DistillTeacher.source``) and to check a ``torchvision:``/``timm:`` model.
"""

from ray_aekd.config._base import (
    ConfigError,
    Renamed,
    canonical_key,
    canonicalize,
    flatten,
    from_dict,
    set_dotted,
    to_data,
)
from ray_aekd.config.common import SCHEDULES, TrackingConfig, TrainConfig, check_model
from ray_aekd.config.data import CACHE_DTYPES, CACHE_MODES, CacheConfig, DataConfig, DistillDataConfig
from ray_aekd.config.distill import (
    PRESETS,
    DistillConfig,
    DistillTeacher,
    DistillTrackingConfig,
    LossConfig,
    PreprocessConfig,
    StudentConfig,
    WorkersConfig,
    apply_preset,
)
from ray_aekd.config.faults import (
    FAULTS_ENV,
    TEACHER_FAULTS_ENV,
    FaultsConfig,
    TeacherFaultsConfig,
    with_env_faults,
)
from ray_aekd.config.loading import dump_yaml, load_config
from ray_aekd.config.sweep import SchedulerConfig, SearchConfig, SweepConfig, SweepTrialsConfig, load_sweep
from ray_aekd.config.teachers import ResourcesConfig, TeachersConfig, TeacherSpec, TrialsConfig

#: The old private name of ``set_dotted`` (imported by code written before the split).
_set_dotted = set_dotted

__all__ = [
    "CACHE_DTYPES",
    "CACHE_MODES",
    "FAULTS_ENV",
    "PRESETS",
    "SCHEDULES",
    "TEACHER_FAULTS_ENV",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "DistillDataConfig",
    "DistillTeacher",
    "DistillTrackingConfig",
    "FaultsConfig",
    "LossConfig",
    "PreprocessConfig",
    "Renamed",
    "ResourcesConfig",
    "SchedulerConfig",
    "SearchConfig",
    "StudentConfig",
    "SweepConfig",
    "SweepTrialsConfig",
    "TeacherFaultsConfig",
    "TeacherSpec",
    "TeachersConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrialsConfig",
    "WorkersConfig",
    "apply_preset",
    "canonical_key",
    "canonicalize",
    "check_model",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_config",
    "load_sweep",
    "set_dotted",
    "to_data",
    "with_env_faults",
]
