"""The in-memory form of one dataset split: all images as one uint8 tensor."""

from typing import NamedTuple

import torch


class Split(NamedTuple):
    """Images and labels of one split (train or test, or one task of it).

    `images` is uint8 [N, 3, H, W], contiguous; `labels` is int64 [N].
    """

    images: torch.Tensor
    labels: torch.Tensor
