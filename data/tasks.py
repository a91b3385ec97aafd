"""Class orders and the split of a dataset into class-incremental tasks."""

from collections.abc import Sequence

import numpy as np
import torch

from data.errors import DataError
from data.split import Split

CLASS_ORDER_MODES = ("fixed", "random")


def class_order(num_classes: int, mode: str, seed: int) -> list[int]:
    """The order in which classes are assigned to tasks.

    "fixed" is 0..C-1 (the reference behaviour); "random" is a permutation drawn from
    `numpy.random.default_rng(seed)`.
    """
    if mode == "fixed":
        return list(range(num_classes))
    if mode == "random":
        return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
    raise DataError(f"unknown class order {mode!r}; choose one of {', '.join(CLASS_ORDER_MODES)}")


def split_tasks(
    split: Split, order: Sequence[int], num_tasks: int, classes_per_task: int
) -> list[Split]:
    """Cut a split into `num_tasks` tasks of `classes_per_task` classes each.

    Task t holds the samples whose original class is in order[t*k : (t+1)*k], in their original
    relative order, with labels remapped to the class's position in `order`, so task t has the
    labels t*k .. t*k+k-1. Classes of `order` past the last task, and classes not in `order`,
    are left out. Every task keeps the split's normalization.
    """
    if num_tasks < 1 or classes_per_task < 1:
        raise DataError(
            f"need at least one task of at least one class, got {num_tasks} tasks of "
            f"{classes_per_task} classes"
        )
    needed = num_tasks * classes_per_task
    if needed > len(order):
        raise DataError(
            f"{num_tasks} tasks of {classes_per_task} classes need {needed} classes, "
            f"the dataset has {len(order)}"
        )
    order_t = torch.as_tensor(list(order), dtype=torch.int64)
    if order_t.unique().numel() != order_t.numel() or (order_t.numel() and order_t.min() < 0):
        raise ValueError(f"class order must list distinct non-negative classes, got {list(order)}")

    labels = split.labels
    size = int(max(order_t.max().item(), labels.max().item() if labels.numel() else 0)) + 1
    position = torch.full((size,), -1, dtype=torch.int64)
    position[order_t] = torch.arange(order_t.numel())
    new_labels = position.to(labels.device)[labels]
    per_position = torch.bincount(new_labels[new_labels >= 0], minlength=needed)[:needed]
    if bool((per_position == 0).any()):
        present = int((torch.bincount(labels) > 0).sum()) if labels.numel() else 0
        missing = order[int(torch.nonzero(per_position == 0)[0])]
        raise DataError(
            f"{num_tasks} tasks of {classes_per_task} classes need {needed} classes, the data set has "
            f"images of {present} classes (none of class {missing})"
        )

    tasks = []
    for t in range(num_tasks):
        lo, hi = t * classes_per_task, (t + 1) * classes_per_task
        idx = torch.nonzero((new_labels >= lo) & (new_labels < hi)).squeeze(1)
        tasks.append(split._replace(images=split.images[idx].contiguous(), labels=new_labels[idx]))
    return tasks


def first_per_class(split: Split, n: int | None) -> Split:
    """The split with only the first `n` images of each class, in the split's order (all of them
    when `n` is None or a class has fewer): a smaller, deterministic version of the same data."""
    if n is None:
        return split
    if n < 1:
        raise DataError(f"need at least one image per class, got {n}")
    labels = split.labels
    if not labels.numel():
        return split
    order = torch.argsort(labels, stable=True)  # by class, each class in the split's order
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts  # position of each image within its class
    keep = torch.nonzero(rank < n).squeeze(1)
    if keep.numel() == labels.numel():
        return split
    return split._replace(images=split.images[keep].contiguous(), labels=labels[keep])
