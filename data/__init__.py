"""Datasets as uint8 tensors, class-incremental task splits and the tensor batch loader."""

import logging
from pathlib import Path

from data.cifar100 import load_cifar100
from data.loader import TensorLoader
from data.miniimagenet import load_miniimagenet
from data.split import Split
from data.tasks import class_order, split_tasks
from utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["Split", "load_dataset", "DATASET_STATS", "class_order", "split_tasks", "TensorLoader"]

# Per-channel (mean, std) of the pixels scaled to [0, 1], for normalization.
DATASET_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # Measured on the full official CIFAR-100 training set.
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Not measured on miniImageNet: the usual ImageNet statistics, as commonly used for it.
    "miniImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def load_dataset(
    name: str,
    data_dir: Path,
    *,
    download: bool = True,
    image_size: int = 32,
    test_per_class: int = 100,
    seed: int = 0,
) -> tuple[Split, Split]:
    """Return (train, test) of the named dataset ("cifar100" or "miniImageNet") from `data_dir`.

    `download` applies to CIFAR-100 only (miniImageNet must be fetched by hand from Kaggle);
    `image_size`, `test_per_class` and `seed` apply to miniImageNet only (CIFAR-100 keeps its
    official 32 px images and split).
    """
    if name == "cifar100":
        if image_size != 32:
            logger.warning("CIFAR-100 images are 32 px; ignoring image_size=%d", image_size)
        return load_cifar100(Path(data_dir), download=download)
    if name == "miniImageNet":
        return load_miniimagenet(
            Path(data_dir), image_size=image_size, test_per_class=test_per_class, seed=seed
        )
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_STATS)}")
