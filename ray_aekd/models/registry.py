"""Model registry: every network a config can name, plus any torchvision or timm classifier.

``build_model("resnet20", num_classes=100)``, ``build_model("torchvision:resnet18", 10)`` or
``build_model("timm:resnet18", 10)`` (timm is an optional extra: ``pip install "ray-aekd[timm]"``).
Each registered model has a default hint layer (a named submodule whose output FitNet-style
hints use) and its native input size. ``forward_with_feature`` returns logits and the output
of any named submodule, for any model, through a forward hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ray_aekd._names import TIMM_PREFIX, TORCHVISION_PREFIX, unknown_model_message
from ray_aekd.core.features import forward_with_feature
from ray_aekd.models.cifar_nets import VGG, MobileNetV2, ShuffleNetV2, SmallCNN, WideResNet
from ray_aekd.models.cifar_resnet import CifarResNet
from ray_aekd.models.digits_nets import DigitsCNN, DigitsMLP

__all__ = ["ModelSpec", "build_model", "forward_with_feature", "model_names", "model_spec", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model.

    Attributes:
        name: registry name.
        build: ``(num_classes, in_channels) -> nn.Module``.
        hint_layer: default submodule name for hint distillation (None: name one yourself).
        input_size: native input side in pixels (32 for CIFAR nets, 8 for digits).
    """

    name: str
    build: Callable[[int, int], nn.Module]
    hint_layer: str | None
    input_size: int


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Add a model to the registry; a name that exists already is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"A model named {spec.name!r} is registered already.")
    if spec.name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        raise ValueError(
            f"Model names starting with {TORCHVISION_PREFIX!r} or {TIMM_PREFIX!r} are reserved for those libraries."
        )
    _REGISTRY[spec.name] = spec


def model_names() -> tuple[str, ...]:
    """Registered names (torchvision models are named ``torchvision:<name>`` on top)."""
    return tuple(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered or torchvision model; unknown names list the valid ones."""
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_spec(name)
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    if name not in _REGISTRY:
        raise ValueError(unknown_model_message(name, tuple(_REGISTRY)))
    return _REGISTRY[name]


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model (no pretrained weights are downloaded).

    Args:
        name: a registered name (``model_names()``) or ``torchvision:<name>``.
        num_classes: K >= 2.
        in_channels: input channels (1 for digits, 3 for RGB).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1; got {in_channels}.")
    return model_spec(name).build(num_classes, in_channels)


def _torchvision_spec(name: str) -> ModelSpec:
    import torchvision

    arch = name[len(TORCHVISION_PREFIX) :]
    valid = torchvision.models.list_models(module=torchvision.models)
    if arch not in valid:
        raise ValueError(f"Unknown torchvision classification model {arch!r}. Valid: {', '.join(sorted(valid))}.")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 input channels; got in_channels = {in_channels}.")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

    return ModelSpec(name=name, build=build, hint_layer=None, input_size=224)


def _timm_spec(name: str) -> ModelSpec:
    try:
        import timm
    except ImportError:
        raise ValueError(
            f'{name!r} needs timm, which is not installed; install the extra: pip install "ray-aekd[timm]" '
            '(or pip install -e ".[timm]" in a checkout).'
        ) from None
    arch = name[len(TIMM_PREFIX) :]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(f"Unknown timm model {arch!r} (timm.list_models() names the {len(timm.list_models())}).{hint}")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    return ModelSpec(name=name, build=build, hint_layer=None, input_size=224)


def _resnet(depth: int, width: int = 16, stem_width: int | None = None) -> Callable[[int, int], nn.Module]:
    return lambda k, c: CifarResNet(depth, num_classes=k, width=width, in_channels=c, stem_width=stem_width)


def _wide_resnet(depth: int) -> Callable[[int, int], nn.Module]:
    return lambda k, c: WideResNet(depth, 2, k, in_channels=c)


def _vgg(blocks: list[list[int]]) -> Callable[[int, int], nn.Module]:
    return lambda k, c: VGG(blocks, k, in_channels=c)


def _small_cnn(width: int) -> Callable[[int, int], nn.Module]:
    return lambda k, c: SmallCNN(width, k, in_channels=c)


_VGG_BLOCKS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}

for _depth in (8, 14, 20, 32, 56, 110):
    register_model(ModelSpec(f"resnet{_depth}", _resnet(_depth), "stages", 32))
for _depth in (8, 32):
    register_model(ModelSpec(f"resnet{_depth}x4", _resnet(_depth, width=64, stem_width=32), "stages", 32))
for _depth in (16, 40):
    register_model(ModelSpec(f"wrn_{_depth}_2", _wide_resnet(_depth), "stage3", 32))
for _name, _blocks in _VGG_BLOCKS.items():
    register_model(ModelSpec(_name, _vgg(_blocks), "block5", 32))
register_model(ModelSpec("mobilenetv2", lambda k, c: MobileNetV2(k, in_channels=c), "blocks", 32))
register_model(ModelSpec("shufflenetv2", lambda k, c: ShuffleNetV2(k, in_channels=c), "stage3", 32))
for _width in (8, 16, 32):
    register_model(ModelSpec(f"small_cnn{_width}", _small_cnn(_width), "stage3", 32))
register_model(ModelSpec("digits_mlp", lambda k, c: DigitsMLP(k, in_features=64 * c), "body", 8))
register_model(ModelSpec("digits_cnn", lambda k, c: DigitsCNN(k, in_channels=c), "conv2", 8))
