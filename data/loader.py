"""The tensor batch loader: the whole split lives on the device as one uint8 tensor.

Batches are cut with tensor ops; training batches are shuffled and augmented (random crop with
zero padding, horizontal flip) by one gather per batch from a view of every crop of every image,
so loading never becomes the bottleneck. Batches are normalized with the split's own
normalization (`Split.normalization`) unless the caller gives `mean=` and `std=`.

No batch holds a single image: the models normalize with the statistics of each batch
(BatchNorm without running averages), which one image does not have (and at 1x1 feature maps
BatchNorm refuses it). A last batch that would hold one image is merged into the one before it,
which then holds `batch_size + 1`; `len(loader)` counts the batches so cut. Every image is still
seen once per epoch, and the number of batches changes only when the split's size leaves a
remainder of exactly one image.
"""

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from data.split import Normalization, Split


class TensorLoader:
    """Iterate over (x, y) batches of a Split: x float32 [B, 3, H, W] normalized, y int64, on `device`.

    train=True: a new shuffle every epoch and per-sample random crop (offsets in [0, 2*pad] after
    zero padding by `pad`) and horizontal flip (p=0.5), all drawn from one CPU generator seeded
    once with `seed`, so two loaders with the same seed give identical epochs.
    train=False: fixed order, no augmentation. The last partial batch is kept in both cases, merged
    into the one before it when it would hold a single image (`batch_bounds`). Training needs
    `batch_size` >= 2 and at least 2 images (ValueError otherwise).
    mean, std: per-channel normalization of the pixels scaled to [0, 1]; both or neither. When
    neither is given the split's `normalization` is used (ValueError if it has none).
    channels_last=True: batches come in channels_last memory format (faster convolutions on GPUs).
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        train: bool,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        pad: int = 4,
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if pad < 0:
            raise ValueError(f"crop padding must be non-negative, got {pad}")
        mean, std = _resolve_normalization(split, mean, std)
        channels = split.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
        if split.images.dtype != torch.uint8 or split.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {split.images.dtype} "
                f"{tuple(split.images.shape)}"
            )
        if split.labels.shape != split.images.shape[:1]:
            raise ValueError(f"{len(split.labels)} labels for {len(split.images)} images")
        if train and min(batch_size, len(split.labels)) < 2:
            raise ValueError(f"training batches need at least 2 images (BatchNorm normalizes with batch "
                             f"statistics): batch size {batch_size}, {len(split.labels)} images")

        self.batch_size = batch_size
        self.train = train
        self.pad = pad
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device = torch.device(device)
        images = split.images.to(self.device).contiguous()
        if train:  # every crop and flip of every image, as a view: a batch is then one gather
            self._windows = augmentation_windows(images, pad)
        else:
            self.images = images
        self.labels = split.labels.to(self.device, torch.int64)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift: one addcmul per batch, straight from uint8.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self._generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random state from which the next epoch's shuffle and augmentation are drawn."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._generator.set_state(state["generator"])

    def __len__(self) -> int:
        return len(batch_bounds(len(self.labels), self.batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            return self._eval_batches()
        # All of the epoch's random numbers are drawn now, so an epoch does not depend on how
        # far the previous one was consumed.
        n, g = len(self.labels), self._generator
        order = torch.randperm(n, generator=g)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        return self._train_batches(*(t.to(self.device) for t in (order, dy, dx, flip)))

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start, end in batch_bounds(len(self.labels), self.batch_size):
            yield self._normalize(self.images[start:end]), self.labels[start:end]

    def _train_batches(
        self, order: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start, end in batch_bounds(len(self.labels), self.batch_size):
            part = slice(start, end)
            idx, f = order[part], flip[part]
            # the flipped copy's window at 2*pad - dx is the flip of the window at dx
            images = self._windows[f.long(), idx, :, dy[part], torch.where(f, 2 * self.pad - dx[part], dx[part])]
            yield self._normalize(images), self.labels[idx]

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, images, self._scale).contiguous(memory_format=self.memory_format)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The (start, end) of each batch of `n` samples cut `batch_size` at a time, the last one partial;
    a last batch of a single image is merged into the one before it (which then holds
    `batch_size + 1`). Only a split of one image, or `batch_size` 1, gives batches of one.
    """
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _resolve_normalization(
    split: Split, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Normalization:
    """The explicit `mean` and `std` when given (both), else the split's own normalization."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean= and std=, or neither to use the split's normalization")
    if mean is not None and std is not None:
        return Normalization(tuple(mean), tuple(std))
    if split.normalization is None:
        raise ValueError(
            "the split carries no normalization: pass mean= and std=, or build it with "
            "Split(images, labels, normalization=Normalization(mean, std))"
        )
    return split.normalization


def augmentation_windows(images: torch.Tensor, pad: int) -> torch.Tensor:
    """All random crops and flips of `images` [N, C, H, W] as one strided view
    [2, N, C, 2*pad+1, 2*pad+1, H, W]: [0] crops of the zero-padded images, [1] crops of their
    horizontally flipped copies, at every (dy, dx) offset. Costs two padded copies, no more.
    """
    h, w = images.shape[2:]
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    return torch.stack([padded, padded.flip(3)]).unfold(3, h, 1).unfold(4, w, 1)
