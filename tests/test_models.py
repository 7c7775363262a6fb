"""The model registry: every registered network builds, runs and exposes its hint layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ray_aekd.models import ModelSpec, build_model, forward_with_feature, model_names, model_spec, register_model

EXPECTED = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_2", "wrn_40_2", "vgg8", "vgg13", "mobilenetv2", "shufflenetv2", "digits_mlp", "digits_cnn",
    "small_cnn8", "small_cnn16", "small_cnn32",
}  # fmt: skip


def test_registry_holds_the_kd_zoo():
    assert set(model_names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_builds_runs_and_gives_its_hint_feature(name):
    torch.manual_seed(0)
    spec = model_spec(name)
    channels = 1 if name.startswith("digits") else 3
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    x = torch.randn(2, channels, spec.input_size, spec.input_size)
    with torch.no_grad():
        logits, feature = forward_with_feature(model, x, spec.hint_layer)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all() and torch.isfinite(feature).all()
    assert feature.shape[0] == 2 and feature.dim() in (2, 4)


def test_resnet_sizes_match_the_papers():
    def params(name: str) -> float:
        return sum(p.numel() for p in build_model(name, 100).parameters()) / 1e6

    # ResNet-20 ~0.28 M, ResNet-56 ~0.86 M, ResNet-32x4 ~7.4 M, WRN-40-2 ~2.2 M (CIFAR-100 heads)
    assert params("resnet20") == pytest.approx(0.28, abs=0.02)
    assert params("resnet56") == pytest.approx(0.86, abs=0.03)
    assert params("resnet32x4") == pytest.approx(7.43, abs=0.1)
    assert params("wrn_40_2") == pytest.approx(2.25, abs=0.05)


def test_torchvision_models_by_name_without_download():
    model = build_model("torchvision:resnet18", num_classes=5)
    logits, feature = forward_with_feature(model, torch.randn(1, 3, 64, 64), "layer4")
    assert logits.shape == (1, 5) and feature.shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match="Unknown torchvision classification model 'resnet19'"):
        build_model("torchvision:resnet19", 5)
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("torchvision:resnet18", 5, in_channels=1)


def test_unknown_and_duplicate_names_are_errors():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet21'. Valid models: resnet8, resnet14"):
        build_model("resnet21", 10)
    with pytest.raises(ValueError, match="registered already"):
        register_model(ModelSpec("resnet20", lambda k, c: nn.Linear(1, k), "x", 32))
    with pytest.raises(ValueError, match="num_classes must be >= 2; got 1"):
        build_model("resnet20", 1)


def test_unknown_hint_layer_lists_the_layers():
    model = build_model("resnet8", 10)
    with pytest.raises(ValueError, match="no layer 'layer9'. Its top-level layers: stem, stages, head"):
        forward_with_feature(model, torch.randn(1, 3, 32, 32), "layer9")
