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
from sparselearning.checks import check_int, check_mask_dict, check_mask_names, check_mask_shapes, some

Masks = dict[str, torch.Tensor]

_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits' order: the first weight is the high bit
FORMAT = "bitpacked-v1"  # `TaskMasks.state_dict()`'s layout


class TaskIndexError(IndexError, ValueError):
    """A task index out of range: an IndexError (so iterating a `TaskMasks` stops at its end)
    that is also the ValueError the core raises for every bad argument."""


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
    """The final masks of the finished tasks, in task order (task indices 0..len-1).

    Every task's mask covers the same parameters, by name, with the same shapes, as bool tensors;
    a mask of another kind, a task index out of range or a model without the masked weights is
    refused with a `ValueError`.
    """

    def __init__(self) -> None:
        self._packed: list[Masks] = []  # per task: parameter name -> packed uint8 bits
        self._shapes: dict[str, torch.Size] = {}
        self._union: Masks = {}  # bool union of every stored task's mask

    def add(self, masks: Masks) -> None:
        """Append a finished task's mask (bool tensors by parameter name, e.g. `Masking.consolidate()`);
        every task's mask covers the same parameters with the same shapes as the first's."""
        masks = check_mask_dict("masks", masks)
        if not masks:
            raise ValueError("masks is empty: a task's mask must cover the maskable weights (add the dict that "
                             "Masking.consolidate() returns)")
        if self._packed:
            check_mask_names("masks", masks, self._shapes, complete=True, known_as="the earlier tasks' masks")
            check_mask_shapes("masks", masks, self._shapes, expected_as="the earlier tasks'")
        else:
            self._shapes = {name: mask.shape for name, mask in masks.items()}
            self._union = {name: torch.zeros_like(mask, dtype=torch.bool) for name, mask in masks.items()}
        self._packed.append({name: pack_bits(mask) for name, mask in masks.items()})
        for name, mask in masks.items():
            self._union[name] |= mask.to(device=self._union[name].device)

    def __len__(self) -> int:
        return len(self._packed)

    def __getitem__(self, task: int) -> Masks:
        """Task `task`'s mask as bool tensors (unpacked anew on each call)."""
        task = self._check_task("TaskMasks[task]", task, len(self) - 1)
        return {name: unpack_bits(bits, self._shapes[name]) for name, bits in self._packed[task].items()}

    def frozen_before(self, task: int) -> Masks | None:
        """Union of the masks of tasks 0..task-1: the weights task `task` must not change
        (task 0..len(self): the next task's is the union of all)."""
        task = self._check_task("frozen_before(task)", task, len(self))
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
        """Within the block, `model` is task `task`'s network; its weights are restored after.
        `model` must have every masked weight, by name and shape."""
        task = self._check_task("apply(model, task)", task, len(self) - 1)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters())
        missing = [name for name in self._shapes if name not in params]
        if missing:
            raise ValueError(f"the model lacks the masked weights {some(missing, 8)} (its parameters are "
                             f"{some(params)}): apply the masks to the model they were made for")
        wrong = [f"{name!r} is {tuple(params[name].shape)}, its masks {tuple(shape)}"
                 for name, shape in self._shapes.items() if params[name].shape != shape]
        if wrong:
            raise ValueError(f"the model's weights have other shapes than the stored masks: {'; '.join(wrong[:4])}: "
                             "apply the masks to the model they were made for")
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

    def _check_task(self, what: str, task: object, last: int) -> int:
        """`task` as an index in 0..last, else a `TaskIndexError` naming `what`."""
        task = check_int(f"{what}: task", task)
        if not 0 <= task <= last:
            if last < 0:
                raise TaskIndexError(f"{what}: task {task} out of range: no task is stored yet")
            raise TaskIndexError(f"{what}: task {task} out of range: {len(self)} stored, so it must be in 0..{last}")
        return task

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Bit-packed masks: per task and layer a uint8 tensor of ceil(numel / 8) bytes (on the CPU)."""
        shapes = {name: list(shape) for name, shape in self._shapes.items()}
        packed = [{name: bits.cpu() for name, bits in masks.items()} for masks in self._packed]
        return {"format": FORMAT, "shapes": shapes, "tasks": packed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> TaskMasks:
        """The store that `state_dict()` describes, its masks on `device`."""
        _check_state(state)
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


def _check_state(state: Any) -> None:
    """Refuse (ValueError) what is not a `TaskMasks.state_dict()`: another format, tasks of other
    layers than `shapes` names, or bits of the wrong number or kind."""
    if not isinstance(state, dict) or not {"shapes", "tasks"} <= set(state):
        raise ValueError("state is not a TaskMasks.state_dict(): it needs 'shapes' and 'tasks'")
    if state.get("format", FORMAT) != FORMAT:
        raise ValueError(f"state has the format {state['format']!r}; this version reads {FORMAT!r}")
    shapes = state["shapes"]
    for t, packed in enumerate(state["tasks"]):
        if not isinstance(packed, dict):
            raise ValueError(f"state's task {t} is not a dict of packed masks by name")
        check_mask_names(f"state's task {t}", packed, shapes, complete=True, known_as="the state's shapes")
        for name, bits in packed.items():
            numel = int(torch.Size(shapes[name]).numel())
            if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != -(-numel // 8):
                raise ValueError(f"state's task {t} has bits of {name!r} that are not {-(-numel // 8)} packed "
                                 f"uint8 bytes (its shape {list(shapes[name])} has {numel} weights)")
