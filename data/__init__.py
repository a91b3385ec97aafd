"""Datasets as uint8 tensors, class-incremental task splits and the tensor batch loader.

Every split a reader returns carries its dataset's normalization (`Split.normalization`, from
`DATASET_STATS`), which `split_tasks` keeps and `TensorLoader` applies. Problems a user can cause
with data raise `DataError`.
"""

import logging
from pathlib import Path

from data.cifar100 import load_cifar100
from data.errors import DataError
from data.loader import TensorLoader
from data.miniimagenet import load_miniimagenet
from data.split import DATASET_STATS, Normalization, Split
from data.tasks import CLASS_ORDER_MODES, class_order, first_per_class, split_tasks

logger = logging.getLogger(__name__)

__all__ = ["Split", "Normalization", "DataError", "load_dataset", "DATASET_STATS", "CLASS_ORDER_MODES",
           "class_order", "first_per_class", "split_tasks", "TensorLoader"]


def load_dataset(
    name: str,
    data_dir: Path,
    *,
    download: bool = True,
    image_size: int = 32,
    test_per_class: int = 100,
    seed: int = 0,
) -> tuple[Split, Split]:
    """Return (train, test) of the named dataset ("cifar100" or "miniImageNet") from `data_dir`,
    each carrying the dataset's normalization.

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
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_STATS)}")
