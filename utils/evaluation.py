"""Testing: predictions, the accuracy of one network on one test set, and the accuracy matrix.

After training task i, row i of the matrix holds task j's network on task j's test set for
j <= i, and, above the diagonal, the authors' forward-transfer probe (task i's network on task
j's test set, labels shifted onto task i's classes). Task j's network is its mask applied to the
shared weights (`TaskMasks.apply`), in place: no copies of the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from data import TensorLoader
from sparselearning import TaskMasks
from utils.stopping import StopRequest

log = logging.getLogger(__name__)


def predictions(logits: torch.Tensor, classes: slice, mode: str) -> torch.Tensor:
    """Predicted class indices: argmax over the task's own classes ("task") or all ("all_logits")."""
    if mode == "task":
        return logits[:, classes].argmax(1) + classes.start
    return logits.argmax(1)


def percent(correct: torch.Tensor | int, seen: int) -> float:
    """Accuracy in percent from a count of right predictions (the one formula every test uses)."""
    return 100.0 * float(correct) / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, classes: slice, mode: str, label_shift: int = 0,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             stop: StopRequest | None = None) -> float:
    """Test accuracy in percent of `model` on `loader`, predicting within `classes`.

    `label_shift` maps the labels of another task onto `classes` (the authors' FWT probe).
    Test batches come in a fixed order without augmentation; BatchNorm uses batch statistics.
    With `stop`, a stop requested before a batch raises StopNow (`StopRequest.check`).
    """
    model.eval()
    correct, seen = 0, 0
    for x, y in loader:
        if stop is not None:
            stop.check()
        with autocast():
            logits = model(x)
        correct += (predictions(logits, classes, mode) == y - label_shift).sum()
        seen += len(y)
    return percent(correct, seen)


def task_network(model: nn.Module, task_masks: TaskMasks, index: int) -> contextlib.AbstractContextManager:
    """Context in which `model` is task `index`'s network (its mask applied), if sparse."""
    return task_masks.apply(model, index) if len(task_masks) > index else contextlib.nullcontext(model)


class EvaluatedNetworks:
    """What each task's network computed on the fixed test batches, kept while its weights stay the same.

    A network tested again on the same fixed test batches gives the same results if its weights
    are the same. With isolation, task j's weights never change after task j, so the lower
    triangle of the accuracy matrix would re-run the same forward passes row after row (half of
    a run's evaluation time), and task inference would re-run every earlier network on every
    earlier test set. `results` compares the network's weights with those it had when the
    results were computed, exactly, and empties them when they differ (without isolation, say).
    Under the key `ACCURACY`, a network's accuracy on its own test set (see `accuracy`).
    """

    ACCURACY = "accuracy"

    def __init__(self) -> None:
        self._weights: dict[int, list[torch.Tensor]] = {}
        self._results: dict[int, dict[Any, Any]] = {}

    @staticmethod
    def weights(model: nn.Module, task_masks: TaskMasks, index: int) -> list[torch.Tensor]:
        """Copies of everything task `index`'s network computes with: its mask's entries of the
        masked parameters, every other parameter and every buffer whole. (Copies: a view would
        change with the model and always compare equal.)"""
        masks = task_masks[index]
        values = []
        for name, param in model.named_parameters():
            mask = masks.get(name)
            values.append(param.detach().clone() if mask is None else param.detach()[mask.to(param.device)])
        return values + [buffer.detach().clone() for buffer in model.buffers()]

    def results(self, model: nn.Module, task_masks: TaskMasks, index: int) -> dict[Any, Any]:
        """The results kept for task `index`'s (sparse) network, by key: the caller's to read and
        fill. Emptied first if the network's weights changed since the last call."""
        weights = self.weights(model, task_masks, index)
        before = self._weights.get(index)
        if before is None or not all(torch.equal(a, b) for a, b in zip(weights, before, strict=True)):
            self._results[index] = {}
        self._weights[index] = weights
        return self._results[index]

    def accuracy(self, model: nn.Module, task_masks: TaskMasks, index: int, test: Callable[[], float]) -> float:
        """Task `index`'s accuracy on its own test set: `test()`, unless the network is unchanged."""
        if len(task_masks) <= index:  # dense: nothing identifies a task's network
            return test()
        kept = self.results(model, task_masks, index)
        if self.ACCURACY in kept:
            log.debug("task %d's network is unchanged: its test accuracy stays %.2f%%", index + 1, kept[self.ACCURACY])
        else:
            kept[self.ACCURACY] = test()
        return kept[self.ACCURACY]


def evaluate_row(
    model: nn.Module, task_masks: TaskMasks, classes: list[slice], loaders: list[TensorLoader], i: int, *,
    mode: str, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    tested: EvaluatedNetworks | None = None, stop: StopRequest | None = None,
) -> np.ndarray:
    """Row i of the accuracy matrix, measured now (right after training task i).

    `classes[j]` and `loaders[j]` are task j's classifier slice and test batches; `mode` is how a
    prediction is made (see `predictions`), `autocast` the forward passes' context. Above the
    diagonal, task j's labels are shifted onto task i's classes. With `tested`, a network tested
    before with the same weights keeps its accuracy (see EvaluatedNetworks). With `stop`, a stop
    requested before any test batch raises StopNow: the row is abandoned, to be measured again.
    """
    row = np.full(len(loaders), np.nan)
    for j, loader in enumerate(loaders):
        network = min(i, j)
        shift = classes[j].start - classes[i].start if j > i else 0
        with task_network(model, task_masks, network):
            def test() -> float:
                return evaluate(model, loader, classes[network], mode, shift, autocast, stop)

            own = j <= i and tested is not None
            row[j] = tested.accuracy(model, task_masks, j, test) if own else test()
    return row
