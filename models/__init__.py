"""Backbones. `build_model(name, num_classes, width)` is the one way the training loop makes a network."""

import torch.nn as nn

from models.resnet import ResNet18

MODELS = {"resnet18": ResNet18}


def build_model(name: str, num_classes: int, width: int = 64) -> nn.Module:
    """The backbone called `name` with a classifier over `num_classes` classes; `width` channels in
    its first stage (64: the paper's network)."""
    if name not in MODELS:
        raise ValueError(f"unknown network {name!r}; choose from {sorted(MODELS)}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return MODELS[name](num_classes, width=width)
