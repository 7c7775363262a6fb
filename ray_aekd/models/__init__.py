"""Student and teacher networks. Imports torch only."""

from ray_aekd.models.cifar_resnet import CifarResNet, cifar_resnet

__all__ = ["CifarResNet", "cifar_resnet"]
