"""`Masking.step` masks all gradients with one `torch._foreach_mul_`: bit-identical to the
per-layer loop it replaced, with the uint8 masks (CPU) and with the float masks CUDA uses."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparselearning.masked_layer as masked_layer
from sparselearning import Masking


def per_layer_loop(grads, masks):
    """The loop `Masking.step` ran before (one multiply per layer, by the uint8 mask)."""
    for grad, mask in zip(grads, masks):
        grad.mul_(mask)


def train_a_few_steps(steps: int = 5):
    """A later task (an earlier mask frozen) on a tiny net, with topology updates every 2 steps;
    returns every tensor a step touches, as raw bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4, bias=False))
    frozen = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.15
              for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    masking = Masking(optimizer, density=0.3, update_frequency=2, total_steps=steps, frozen=frozen, seed=0)
    masking.add_module(model)
    data = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=data), torch.randint(0, 4, (8,), generator=data)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        masking.step()
    tensors = [t for p in model.parameters() for t in (p, p.grad, *optimizer.state[p].values()) if t.dim() > 0]
    tensors += list(masking.masks.values()) + [layer.grad_mask.bool() for layer in masking.layers.values()]
    return [t.view(torch.uint8).clone() if t.dtype == torch.bool else t.view(torch.int32).clone() for t in tensors]


@pytest.mark.parametrize("float_masks", [False, True], ids=["uint8-masks", "float-masks"])
def test_the_fused_multiply_is_bit_identical_to_the_per_layer_loop(monkeypatch, float_masks):
    with monkeypatch.context() as patch:
        patch.setattr(torch, "_foreach_mul_", per_layer_loop)
        expected = train_a_few_steps()
    if float_masks:
        monkeypatch.setattr(masked_layer, "float_grad_mask", lambda device: True)
    got = train_a_few_steps()
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # the bits: -0.0 and 0.0 count as different


def test_float_grad_masks_follow_the_trainable_weights_through_updates(monkeypatch):
    monkeypatch.setattr(masked_layer, "float_grad_mask", lambda device: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16, bias=False), nn.Linear(16, 4, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masking = Masking(optimizer, density=0.4, update_frequency=1, total_steps=3, seed=0)
    masking.add_module(model)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 4, 4)), torch.arange(4)).backward()
        masking.step()
        for layer in masking.layers.values():
            assert layer.grad_mask.dtype == torch.float32 and layer.grad_mask is not layer.trainable_uint8
            assert torch.equal(layer.grad_mask, layer.trainable.float())
    assert masking.topology_updates == 3
