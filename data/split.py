"""The in-memory form of one dataset split (all images as one uint8 tensor), the per-channel
normalization it carries, and `DATASET_STATS`, the one table of each dataset's normalization."""

from typing import NamedTuple

import torch


class Normalization(NamedTuple):
    """Per-channel mean and std of the pixels scaled to [0, 1]: x = (pixels / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_STATS: dict[str, Normalization] = {
    # Measured on the full official CIFAR-100 training set.
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Not measured on miniImageNet: the usual ImageNet statistics, as commonly used for it.
    "miniImageNet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Split(NamedTuple):
    """Images and labels of one split (train or test, or one task of it).

    `images` is uint8 [N, 3, H, W], contiguous; `labels` is int64 [N]. `normalization` is the
    dataset's (the readers set it from `DATASET_STATS`, `split_tasks` keeps it); None for a split
    built by hand without one, whose `TensorLoader` then needs explicit `mean=` and `std=`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    normalization: Normalization | None = None
