"""Data pipeline: augmented training batches per second, ours vs the usual torchvision pipeline.

Ours: `data.TensorLoader(train=True)`, batch 64: the task's images as one uint8 tensor on the
device, shuffled, randomly cropped (zero padding 4), flipped and normalized batch-wise.
Baseline: the same images as uint8 HWC arrays, `PIL.Image.fromarray` per item, then
`Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`,
through `torch.utils.data.DataLoader(num_workers=2, batch_size=64, shuffle=True,
persistent_workers=True)`. Both produce the same thing: a normalized float batch and its labels
(moved to the device). The images are the first task's (10 classes, 2500 with the shared
subset). One untimed epoch of each comes first (it starts the baseline's worker processes, so
their start-up is not timed); then full epochs alternate (10) and the median epoch counts.
Ours takes about 20 ms an epoch, so this figure moves by 20 % between runs on a shared machine.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from benchmarks.report import Result, Row
from benchmarks.timing import alternating_medians
from benchmarks.workload import Workload

WORKERS = 2


class PilImages(Dataset):
    """uint8 HWC images, each turned into a PIL image and transformed when read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def torchvision_loader(work: Workload) -> DataLoader:
    split = work.tasks[0].train
    mean, std = work.mean_std
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = PilImages(split.images.permute(0, 2, 3, 1).contiguous().numpy(), split.labels.numpy(), transform)
    return DataLoader(dataset, batch_size=work.config.batch_size, shuffle=True, num_workers=WORKERS,
                      persistent_workers=True)


def consume(loader, device: torch.device) -> None:
    """One epoch of batches, each on the device."""
    for x, y in loader:
        x.to(device, non_blocking=True)
        y.to(device, non_blocking=True)


def run(work: Workload) -> Result:
    ours, baseline = work.loader(work.tasks[0].train, train=True), torchvision_loader(work)
    batches = len(ours)  # == len(baseline): the same images, the last partial batch kept by both
    seconds = alternating_medians([lambda: consume(ours, work.device), lambda: consume(baseline, work.device)],
                                  work.device, repeats=work.repeats.data_epochs)
    del baseline  # stops its worker processes
    ours_rate, baseline_rate = batches / seconds[0], batches / seconds[1]
    speedup = ours_rate / baseline_rate
    row = Row(f"data, augmented batches/s ({batches} x {work.config.batch_size} images)",
              f"{ours_rate:.0f}/s", f"{baseline_rate:.0f}/s", speedup, key="data_speedup", checked=speedup)
    figures = {"data_speedup": speedup, "data_ours_batches_per_s": ours_rate,
               "data_baseline_batches_per_s": baseline_rate, "data_batches_per_epoch": batches,
               "data_images": len(work.tasks[0].train.labels), "data_epochs_timed": work.repeats.data_epochs,
               "data_baseline_workers": WORKERS}
    return Result([row], figures)
