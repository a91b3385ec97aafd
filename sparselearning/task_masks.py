"""`TaskMasks`: the per-task mask store that makes parameter isolation work.

Task t's network is its mask applied to the consolidated weights; the weights owned by
tasks before t (the union of their masks) are what task t must keep frozen. Masks are kept
bit-packed, in memory as on disk: one bit per weight per task (about 1.4 MB per task for
ResNet-18, where bool tensors would take 11 MB and float32 masks 45 MB), plus one running
union of all tasks, which is what the next task freezes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from sparselearning.atomic_file import write_atomically

Masks = dict[str, torch.Tensor]

_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits' order: the first weight is the high bit


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 weights per byte, on its own device (numpy.packbits layout)."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -len(flat) % 8))
    values = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * values).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | list[int]) -> torch.Tensor:
    """The bool tensor of `shape` that `pack_bits` packed into `packed`."""
    numel = int(torch.Size(shape).numel())
    values = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) & values).ne(0).view(-1)
    return bits[:numel].view(shape)


class TaskMasks:
    """The final masks of the finished tasks, in task order."""

    def __init__(self) -> None:
        self._packed: list[Masks] = []  # per task: parameter name -> packed uint8 bits
        self._shapes: dict[str, torch.Size] = {}
        self._union: Masks = {}  # bool union of every stored task's mask

    def add(self, masks: Masks) -> None:
        """Append a finished task's mask (bool tensors by parameter name)."""
        if self._packed and set(masks) != set(self._shapes):
            raise ValueError("a task's mask must cover the same parameters as the earlier tasks'")
        if not self._packed:
            self._shapes = {name: mask.shape for name, mask in masks.items()}
            self._union = {name: torch.zeros_like(mask, dtype=torch.bool) for name, mask in masks.items()}
        self._packed.append({name: pack_bits(mask.to(torch.bool)) for name, mask in masks.items()})
        for name, mask in masks.items():
            self._union[name] |= mask.to(device=self._union[name].device, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self._packed)

    def __getitem__(self, task: int) -> Masks:
        """Task `task`'s mask as bool tensors (unpacked anew on each call)."""
        return {name: unpack_bits(bits, self._shapes[name]) for name, bits in self._packed[task].items()}

    def frozen_before(self, task: int) -> Masks | None:
        """Union of the masks of tasks 0..task-1: the weights task `task` must not change."""
        if task == 0:
            return None
        if task == len(self):
            return {name: union.clone() for name, union in self._union.items()}
        union = self[0]
        for t in range(1, task):
            for name, mask in self[t].items():
                union[name] |= mask
        return union

    def capacity(self) -> dict[str, Any]:
        """Fraction of each layer's weights used by any task, by each task, and still free."""
        if not self._packed:
            return {"layers": {}, "total": {"used": 0.0, "free": 1.0, "per_task": []}}
        counts = [{name: int(mask.sum()) for name, mask in self[t].items()} for t in range(len(self))]
        layers = {}
        for name, used in self._union.items():
            numel = used.numel()
            fraction = int(used.sum()) / numel
            layers[name] = {"used": fraction, "free": 1 - fraction, "per_task": [c[name] / numel for c in counts]}
        numel = sum(mask.numel() for mask in self._union.values())
        used = sum(int(mask.sum()) for mask in self._union.values()) / numel
        per_task = [sum(c.values()) / numel for c in counts]
        return {"layers": layers, "total": {"used": used, "free": 1 - used, "per_task": per_task}}

    @contextlib.contextmanager
    def apply(self, model: nn.Module, task: int) -> Iterator[nn.Module]:
        """Within the block, `model` is task `task`'s network; its weights are restored after."""
        params = dict(model.named_parameters())
        saved = {}
        with torch.no_grad():
            for name, bits in self._packed[task].items():
                param = params[name]
                saved[name] = param.detach().clone()
                param.mul_(unpack_bits(bits.to(param.device), self._shapes[name]))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Bit-packed masks: per task and layer a uint8 tensor of ceil(numel / 8) bytes (on the CPU)."""
        shapes = {name: list(shape) for name, shape in self._shapes.items()}
        packed = [{name: bits.cpu() for name, bits in masks.items()} for masks in self._packed]
        return {"format": "bitpacked-v1", "shapes": shapes, "tasks": packed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> TaskMasks:
        """The store that `state_dict()` describes, its masks on `device`."""
        store = cls()
        for packed in state["tasks"]:
            store.add({name: unpack_bits(packed[name].to(device), shape) for name, shape in state["shapes"].items()})
        return store

    def save(self, path: str | os.PathLike) -> None:
        """Write the bit-packed masks to `path` atomically (whole file or none)."""
        state = self.state_dict()
        write_atomically(path, lambda f: torch.save(state, f))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TaskMasks:
        """The store that `save` wrote to `path`, its masks on `device`."""
        return cls.from_state_dict(torch.load(path, weights_only=True), device)
