"""Student and teacher networks and their registry. Imports torch and torchvision only."""

from ray_aekd.models.cifar_resnet import CifarResNet, cifar_resnet
from ray_aekd.models.registry import (
    ModelSpec,
    build_model,
    forward_with_feature,
    model_names,
    model_spec,
    register_model,
)

__all__ = [
    "CifarResNet",
    "ModelSpec",
    "build_model",
    "cifar_resnet",
    "forward_with_feature",
    "model_names",
    "model_spec",
    "register_model",
]
