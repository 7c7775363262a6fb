"""A model's logits together with one inner layer's output, for hint (feature-level) distillation."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["forward_with_feature"]


def forward_with_feature(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``x`` and also return the output of its submodule ``layer``.

    Returns:
        logits ``[B, K]`` and the feature (whatever shape that layer outputs).
    """
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"Model has no layer {layer!r}. Its top-level layers: {', '.join(names)}.") from None
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _in, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"Layer {layer!r} ran {len(captured)} times in one forward pass; name a layer that runs once.")
    return logits, captured[0]
