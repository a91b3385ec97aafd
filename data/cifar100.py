"""CIFAR-100 reader: the official python pickles, read directly (no md5 check of the pickles)."""

import logging
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.split import DATASET_STATS, Split

logger = logging.getLogger(__name__)

FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)


def load_cifar100(root: Path, *, download: bool) -> tuple[Split, Split]:
    """Read `<root>/cifar-100-python/{train,test}` and return (train, test) with fine labels,
    each carrying the CIFAR-100 normalization of `DATASET_STATS`.

    When the folder is missing and `download` is true, the official archive is downloaded
    (its md5 is checked) into `root` and extracted there.
    """
    root = Path(root)
    folder = root / FOLDER
    if not folder.exists():
        if not download:
            raise DataError(
                f"CIFAR-100 not found at {folder}; download {URL} and extract it into {root}, "
                "or pass --data_dir DIR with DIR/cifar-100-python/ in it (--no-download forbids downloading)"
            )
        _download(root)
    return _read_pickle(folder / "train"), _read_pickle(folder / "test")


def _download(root: Path) -> None:
    """Download and extract the official archive so that `<root>/cifar-100-python` appears whole."""
    # Imported here: torchvision is only needed for this rare path.
    from torchvision.datasets import utils as tv_utils

    folder = root / FOLDER
    logger.info("CIFAR-100 not found at %s: downloading %s", folder, URL)
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Extract into a temporary folder next to the target and move the result into place,
        # so an interrupted extraction never leaves a half-written cifar-100-python/.
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar100-extract-") as tmp:
            tv_utils.download_and_extract_archive(
                url=URL, download_root=str(root), extract_root=tmp, md5=ARCHIVE_MD5
            )
            extracted = Path(tmp) / FOLDER
            if not extracted.is_dir():
                raise RuntimeError(f"the archive holds no {FOLDER}/ folder")
            os.replace(extracted, folder)
    except Exception as exc:  # offline, bad md5, disk full, ...: all end the same way for the user
        raise DataError(
            f"CIFAR-100 not found at {folder} (download failed: {exc}); download {URL} "
            f"and extract it into {root}, or pass --data_dir DIR with DIR/cifar-100-python/ in it "
            "(and --no-download to skip the download)"
        ) from exc


def _read_pickle(path: Path) -> Split:
    """Read one official CIFAR-100 pickle into a Split (images uint8 [N, 3, 32, 32])."""
    if not path.is_file():
        raise DataError(
            f"CIFAR-100 is incomplete: {path} is missing; download {URL} and extract it into "
            f"{path.parent.parent}"
        )
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"])
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError, ImportError, IndexError) as exc:
        raise DataError(f"cannot read CIFAR-100 file {path}: {type(exc).__name__}: {exc}") from exc

    n = labels.shape[0]
    expected = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.shape != (n, expected):
        raise DataError(
            f"cannot read CIFAR-100 file {path}: expected uint8 data of shape ({n}, {expected}), "
            f"got {data.dtype} {data.shape}"
        )
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"cannot read CIFAR-100 file {path}: fine labels outside 0..{NUM_CLASSES - 1}"
        )

    # Each row holds the R, G and B planes of a 32x32 image, row-major: reshaping gives [N, 3, H, W].
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(n, *IMAGE_SHAPE)))
    logger.info("read %d CIFAR-100 images from %s", n, path)
    return Split(images=images, labels=torch.from_numpy(labels), normalization=DATASET_STATS["cifar100"])
