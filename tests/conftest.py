import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs a fixed set of examples so that a red build always reproduces; locally hypothesis
# explores new examples each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance shared by every test that needs it."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_teachers(tmp_path_factory):
    """Three small digits teachers trained in-process (a few seconds), each with noisy labels on
    its own classes so that they disagree, saved as checkpoints. Returns ``{name: folder}``."""
    import torch

    from ray_aekd.core.step import classification_epoch, make_optimizer
    from ray_aekd.data import normalize, split_indices
    from ray_aekd.data.labels import corrupt_labels
    from ray_aekd.data.sources import digits_source
    from ray_aekd.models import build_model
    from ray_aekd.models.checkpoint import CheckpointMetadata, save_checkpoint

    source = digits_source()
    train, _ = split_indices(len(source), 0.2, seed=0)  # the split distillation uses with seed 0
    x = normalize(source.images[train], source.mean, source.std)
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for m, (name, arch, classes) in enumerate(
        [("cnn_a", "digits_cnn", [0, 1, 2]), ("cnn_b", "digits_cnn", [3, 4, 5]), ("mlp_c", "digits_mlp", [6, 7, 8])]
    ):
        gen = torch.Generator().manual_seed(m)
        y = corrupt_labels(source.labels[train], classes, 0.6, 10, gen)
        torch.manual_seed(m)
        model = build_model(arch, 10, in_channels=1)
        optimizer, _ = make_optimizer(model, 0.05, 0.9, 5e-4, "constant", epochs=4)
        for _ in range(4):
            order = torch.randperm(len(y), generator=gen)
            classification_epoch(model, ((x[order[i : i + 64]], y[order[i : i + 64]]) for i in range(0, len(y), 64)),
                                 optimizer)  # fmt: skip
        meta = CheckpointMetadata(
            architecture=arch, num_classes=10, input_shape=(1, 8, 8), mean=source.mean, std=source.std,
            dataset="digits", seed=m,
        )  # fmt: skip
        save_checkpoint(str(root / name), model, meta)
        out[name] = str(root / name)
    return out


def teacher_overrides(teachers: dict[str, str], names=("cnn_a", "cnn_b", "mlp_c")) -> list[str]:
    """``--set`` lines that point a distillation config's teachers at ``teachers``."""
    items = ", ".join(f"{{name: {n}, checkpoint: '{teachers[n]}'}}" for n in names)
    return [f"teachers=[{items}]"]


@contextlib.contextmanager
def loaded_script(path: Path):
    """A benchmark script imported as a module (named after its file) for the duration."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
