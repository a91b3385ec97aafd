"""Backbones. `build_model(name, num_classes)` is the one way the training loop makes a network."""

import torch.nn as nn

from models.resnet import ResNet18

MODELS = {"resnet18": ResNet18}


def build_model(name: str, num_classes: int) -> nn.Module:
    """The backbone called `name` with a classifier over `num_classes` classes."""
    if name not in MODELS:
        raise ValueError(f"unknown network {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](num_classes)
