"""`TaskMasks`: the per-task mask store that makes parameter isolation work.

Task t's network is its mask applied to the consolidated weights; the weights owned by
tasks before t (the union of their masks) are what task t must keep frozen. On disk every
mask is bit-packed: one bit per weight per task (about 1.4 MB per task for ResNet-18,
where float32 masks would take 45 MB).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

Masks = dict[str, torch.Tensor]


class TaskMasks:
    """The final masks of the finished tasks, in task order."""

    def __init__(self) -> None:
        self._tasks: list[Masks] = []

    def add(self, masks: Masks) -> None:
        """Append a finished task's mask (bool tensors by parameter name)."""
        if self._tasks and set(masks) != set(self._tasks[0]):
            raise ValueError("a task's mask must cover the same parameters as the earlier tasks'")
        self._tasks.append({name: mask.detach().to(torch.bool).clone() for name, mask in masks.items()})

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, task: int) -> Masks:
        """Task `task`'s mask: the stored tensors themselves, to be read, not modified."""
        return self._tasks[task]

    def frozen_before(self, task: int) -> Masks | None:
        """Union of the masks of tasks 0..task-1: the weights task `task` must not change."""
        if task == 0:
            return None
        union = {name: mask.clone() for name, mask in self._tasks[0].items()}
        for masks in self._tasks[1:task]:
            for name, mask in masks.items():
                union[name] |= mask
        return union

    def capacity(self) -> dict[str, Any]:
        """Fraction of each layer's weights used by any task, by each task, and still free."""
        union = self.frozen_before(len(self))
        if union is None:
            return {"layers": {}, "total": {"used": 0.0, "free": 1.0, "per_task": []}}
        layers = {}
        for name, used in union.items():
            numel = used.numel()
            fraction = int(used.sum()) / numel
            per_task = [int(masks[name].sum()) / numel for masks in self._tasks]
            layers[name] = {"used": fraction, "free": 1 - fraction, "per_task": per_task}
        numel = sum(mask.numel() for mask in union.values())
        used = sum(int(mask.sum()) for mask in union.values()) / numel
        per_task = [sum(int(m.sum()) for m in masks.values()) / numel for masks in self._tasks]
        return {"layers": layers, "total": {"used": used, "free": 1 - used, "per_task": per_task}}

    @contextlib.contextmanager
    def apply(self, model: nn.Module, task: int) -> Iterator[nn.Module]:
        """Within the block, `model` is task `task`'s network; its weights are restored after."""
        params = dict(model.named_parameters())
        saved = {}
        with torch.no_grad():
            for name, mask in self._tasks[task].items():
                saved[name] = params[name].detach().clone()
                params[name].mul_(mask.to(params[name].device))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Bit-packed masks: per task and layer a uint8 tensor of ceil(numel / 8) bytes."""
        shapes = {name: list(mask.shape) for name, mask in self._tasks[0].items()} if self._tasks else {}
        packed = [
            {name: torch.from_numpy(np.packbits(mask.cpu().numpy().ravel())) for name, mask in masks.items()}
            for masks in self._tasks
        ]
        return {"format": "bitpacked-v1", "shapes": shapes, "tasks": packed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> TaskMasks:
        store = cls()
        for packed in state["tasks"]:
            masks = {}
            for name, shape in state["shapes"].items():
                numel = int(np.prod(shape))
                bits = np.unpackbits(packed[name].numpy(), count=numel)
                masks[name] = torch.from_numpy(bits.astype(bool)).view(shape).to(device)
            store._tasks.append(masks)
        return store

    def save(self, path: str | os.PathLike) -> None:
        """Write the bit-packed masks to `path` atomically (whole file or none)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TaskMasks:
        return cls.from_state_dict(torch.load(path, weights_only=True), device)
