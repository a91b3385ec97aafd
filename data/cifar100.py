"""CIFAR-100 reader: the official python pickles, read directly (no md5 check of the pickles).

A missing dataset is downloaded by one process at a time, holding the lock file
`<data_dir>/.cifar-100-python.lock` (`sparselearning.file_lock`): runs of a sweep started at once
wait for it, then read what it downloaded; a dead downloader's lock is taken over.
"""

import logging
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.split import DATASET_STATS, Split
from sparselearning.file_lock import wait_and_hold

logger = logging.getLogger(__name__)

FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
LOCK_FILE = ".cifar-100-python.lock"
"""Next to the data, held while one process downloads it (`sparselearning.file_lock`): the other runs
of a sweep started at once wait for it, then read what it downloaded."""


def load_cifar100(root: Path, *, download: bool) -> tuple[Split, Split]:
    """Read `<root>/cifar-100-python/{train,test}` and return (train, test) with fine labels,
    each carrying the CIFAR-100 normalization of `DATASET_STATS`.

    When the folder is missing and `download` is true, the official archive is downloaded
    (its md5 is checked) into `root` and extracted there, by one process at a time
    (`_download_once`).
    """
    root = Path(root)
    folder = root / FOLDER
    if not folder.exists():
        if not download:
            raise DataError(
                f"CIFAR-100 not found at {folder}; download {URL} and extract it into {root}, "
                "or pass --data_dir DIR with DIR/cifar-100-python/ in it (--no-download forbids downloading)"
            )
        _download_once(root)
    return _read_pickle(folder / "train"), _read_pickle(folder / "test")


def _download_once(root: Path) -> None:
    """Download into `root` under the lock `<root>/.cifar-100-python.lock`: while another process
    downloads, wait for it and use its result; download only if the data is still missing then (it
    failed, or its lock went stale: a dead process on this host, or no heartbeat for 10 minutes)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with wait_and_hold(root / LOCK_FILE, doing=f"downloading CIFAR-100 into {root}"):
            if (root / FOLDER).exists():
                logger.info("CIFAR-100 is at %s now (downloaded by another run)", root / FOLDER)
                return
            _download(root)
    except OSError as exc:  # the folder or its lock file cannot be made: a read-only folder, say
        raise _download_error(root, exc) from exc


def _download(root: Path) -> None:
    """Download and extract the official archive so that `<root>/cifar-100-python` appears whole."""
    # Imported here: torchvision is only needed for this rare path.
    from torchvision.datasets import utils as tv_utils

    folder = root / FOLDER
    logger.info("CIFAR-100 not found at %s: downloading %s", folder, URL)
    try:
        # Extract into a temporary folder next to the target and move the result into place,
        # so an interrupted extraction never leaves a half-written cifar-100-python/.
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar100-extract-") as tmp:
            tv_utils.download_and_extract_archive(
                url=URL, download_root=str(root), extract_root=tmp, md5=ARCHIVE_MD5
            )
            extracted = Path(tmp) / FOLDER
            if not extracted.is_dir():
                raise RuntimeError(f"the archive holds no {FOLDER}/ folder")
            _move_into_place(extracted, folder)
    except Exception as exc:  # offline, bad md5, disk full, ...: all end the same way for the user
        raise _download_error(root, exc) from exc


def _move_into_place(extracted: Path, folder: Path) -> None:
    """Rename `extracted` to `folder`; a `folder` that another process put there meanwhile is kept."""
    try:
        os.replace(extracted, folder)
    except OSError:
        if not folder.is_dir():
            raise
        logger.info("CIFAR-100 was put at %s by another process meanwhile: keeping that copy", folder)


def _download_error(root: Path, exc: BaseException) -> DataError:
    return DataError(
        f"CIFAR-100 not found at {root / FOLDER} (download failed: {exc}); download {URL} "
        f"and extract it into {root}, or pass --data_dir DIR with DIR/cifar-100-python/ in it "
        "(and --no-download to skip the download)"
    )


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
