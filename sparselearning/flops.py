"""The compute of a network's conv and linear layers, dense or under a mask: MACs and FLOPs per image.

One MAC (multiply-accumulate) is one multiply and one add; one FLOP is one multiply or one add,
so FLOPs = 2 x MACs (`FLOPS_PER_MAC`).

Counted as RigL (Evci et al., 2020) and the sparse-training papers after it (ITOP, SparCL)
count: only the multiply-accumulates of the maskable weights (`maskable_weights`: conv and
linear weights). Biases, BatchNorm, activations, pooling and residual additions are not counted:
they cost a few operations per activation, small next to the layers' products, and a mask does
not change them. A conv weight is used once per position of its layer's output, so a layer's dense
MACs per image are weight.numel() x H_out x W_out (a linear layer: weight.numel(), times the
positions when its input has extra dimensions), and under a mask each active weight costs the
same: a layer with `count` of its `numel` weights active costs count x (dense MACs / numel),
an exact integer. Masked-out weights are counted as skipped, as the papers count them, although
dense kernels (this project's) multiply their zeros too.

    macs = layer_macs(model, (3, 32, 32))     # dense MACs per image of each maskable weight
    network_macs(macs)                        # the dense network, per image
    network_macs(macs, task_mask)             # the network a mask gives
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from sparselearning.masking import MASKABLE_TYPES, maskable_weights

FLOPS_PER_MAC = 2
"""One MAC is a multiply and an add: two FLOPs."""


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """The dense multiply-accumulates per image of every maskable weight of `model`, by its name
    in `maskable_weights(model)`, for one input of `input_shape` (one image, without the batch
    dimension: e.g. (3, 32, 32)).

    Measured with forward hooks on one all-zero input of shape (1, *input_shape) on the model's
    device, under torch.no_grad, with every module in eval mode (each module's training mode is
    restored afterwards, and the hooks are removed, even on an error; a compiled model runs
    eagerly). Per call of a conv or linear module: weight.numel() x the positions of its output
    (a conv's H_out x W_out; a linear layer's 1, or the positions of an input with extra
    dimensions). A module called more than once adds each call; a tied weight (one tensor in
    several modules) is counted once, under its first name, with the calls of all its modules.
    A weight no forward pass reaches costs 0. Every value is a multiple of its weight's numel().
    """
    weights = maskable_weights(model)
    if not weights:
        raise ValueError("the model has no conv or linear weights to count")
    first_name = {id(weight): name for name, weight in weights.items()}
    macs = dict.fromkeys(weights, 0)

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        weight = module.weight
        # output: (1, out_channels, *spatial) for a conv, (1, ..., out_features) for a linear layer
        positions = output.numel() // weight.shape[0] if isinstance(module, nn.Linear) else output[0, 0].numel()
        macs[first_name[id(weight)]] += weight.numel() * positions

    sample = next(iter(weights.values()))
    modes = {module: module.training for module in model.modules()}
    hooks = []
    try:
        for module in model.modules():
            if isinstance(module, MASKABLE_TYPES):
                hooks.append(module.register_forward_hook(count))
        model.eval()
        x = torch.zeros((1, *input_shape), device=sample.device, dtype=sample.dtype)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return macs


def sparse_macs(macs: Mapping[str, int], counts: Mapping[str, int], numels: Mapping[str, int]) -> int:
    """Per-image MACs of a network with `counts[name]` of the `numels[name]` weights of each
    layer active (`macs`: `layer_macs`): sum of count x (macs // numel), exact, in Python ints
    (no device synchronisation: what a training loop can ask at every step)."""
    return sum(counts[name] * (layer // numels[name]) for name, layer in macs.items())


def network_macs(macs: Mapping[str, int], masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """Per-image MACs of the network `masks` gives (name -> bool tensor of its weight's shape, one
    for every layer of `macs`, `layer_macs`): each active weight of a layer costs its macs // numel.
    None: the dense network, sum(macs.values())."""
    if masks is None:
        return sum(macs.values())
    return sparse_macs(macs, {name: int(masks[name].sum()) for name in macs},
                       {name: masks[name].numel() for name in macs})
