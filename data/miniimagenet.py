"""miniImageNet reader: the Kaggle zip (one folder of JPEGs per WordNet id), decoded once and cached.

The first call decodes every JPEG straight out of the zip (nothing is extracted, the zip is never
touched) and writes all images, resized, as one uint8 array to `miniImageNet_{size}px.npz` next to
the zip, whole or not at all; when the zip's folder is read-only (a shared data folder, say), into
the user's cache folder instead (`user_cache_path`). Later calls read that cache. The train/test split is made per class
at load time; both splits carry the miniImageNet normalization of `DATASET_STATS`.

One process at a time decodes, holding the lock file `.miniImageNet_{size}px.lock` in the folder
the cache goes to (`sparselearning.file_lock`): runs of a sweep started at once wait for it, then
read its cache; a dead decoder's lock is taken over.
"""

import errno
import hashlib
import logging
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.errors import DataError
from data.split import DATASET_STATS, Split
from sparselearning.atomic_file import write_atomically
from sparselearning.file_lock import LockFile

logger = logging.getLogger(__name__)

ZIP_NAME = "miniImageNet.zip"
CACHE_VERSION = 1
_JPEG_SUFFIXES = (".jpg", ".jpeg")
MIN_TRAIN_PER_CLASS = 2
"""Images a class must keep for training: BatchNorm normalizes with batch statistics, and a task of
one class with one training image would have batches of a single image."""


def load_miniimagenet(
    root: Path, *, image_size: int = 32, test_per_class: int = 100, seed: int = 0
) -> tuple[Split, Split]:
    """Return (train, test) from `<root>/miniImageNet.zip`, labels = index of the sorted class folder.

    Per class, a permutation drawn from `numpy.random.default_rng(seed)` of its sorted file names
    picks the first `test_per_class` images for test, the rest go to train. Within each split
    samples are ordered by class, then by file name. Both carry the miniImageNet normalization.
    """
    root = Path(root)
    if image_size < 1:
        raise DataError(f"image size must be positive, got {image_size}")
    if test_per_class < 1:
        raise DataError(f"test images per class must be positive, got {test_per_class}")
    zip_path = root / ZIP_NAME
    if not zip_path.is_file():
        raise DataError(
            f"miniImageNet not found at {zip_path}; download miniImageNet from Kaggle and put "
            f"{ZIP_NAME} in --data_dir (currently {root})"
        )
    images, labels, classes = _load_or_decode(zip_path, image_size, test_per_class)
    train_idx, test_idx = _split_indices(labels, classes, test_per_class, seed)
    return _take(images, labels, train_idx), _take(images, labels, test_idx)


READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
"""Why a cache may not be written next to the zip: the data folder is read-only."""


def cache_path(root: Path, image_size: int) -> Path:
    """Where the decoded images of `<root>/miniImageNet.zip` at `image_size` pixels are cached
    when `root` is writable."""
    return Path(root) / f"miniImageNet_{image_size}px.npz"


def _writable(folder: Path) -> bool:
    """Whether the cache may go into `folder`: the user may write there, and the folder is not
    marked read-only (no write permission bit), which counts even for root, whom permission bits do
    not stop (a shared data folder made read-only on purpose). A read-only file system is found
    when the write fails (`READ_ONLY`)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def user_cache_path(zip_path: Path, image_size: int) -> Path:
    """Where they are cached when the zip's folder is read-only: the user's cache folder
    (`$XDG_CACHE_HOME`, else `~/.cache`), in a folder of its own per zip (named by a digest of the
    zip's absolute path, so two data folders never share a cache)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    zip_id = hashlib.blake2b(str(Path(zip_path).resolve()).encode(), digest_size=8).hexdigest()
    return base / "dst-continual" / "miniImageNet" / zip_id / f"miniImageNet_{image_size}px.npz"


def _split_indices(
    labels: np.ndarray, classes: list[str], test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the train and test samples, drawn per class from one seeded generator.

    `labels` must be sorted by class with each class's samples in file-name order (the cache order).
    """
    rng = np.random.default_rng(seed)
    num_classes = len(classes)
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    is_test = np.zeros(len(labels), dtype=bool)
    _check_class_sizes(counts, classes, test_per_class)
    for c in range(num_classes):
        chosen = rng.permutation(int(counts[c]))[:test_per_class]
        is_test[starts[c] + chosen] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _check_class_sizes(counts: np.ndarray, classes: list[str], test_per_class: int) -> None:
    """DataError unless every class keeps `MIN_TRAIN_PER_CLASS` images for training after
    `test_per_class` for test."""
    for c, count in enumerate(counts):
        if count < test_per_class + MIN_TRAIN_PER_CLASS:
            raise DataError(
                f"miniImageNet class {classes[c]} has {count} images, need more than "
                f"test_per_class={test_per_class} + {MIN_TRAIN_PER_CLASS - 1} to leave "
                f"{MIN_TRAIN_PER_CLASS} for training (--test_per_class)"
            )


def _take(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(
        images=torch.from_numpy(np.ascontiguousarray(images[idx])),
        labels=torch.from_numpy(labels[idx].astype(np.int64)),
        normalization=DATASET_STATS["miniImageNet"],
    )


def _zip_key(zip_path: Path) -> tuple[int, int]:
    stat = zip_path.stat()
    return stat.st_size, stat.st_mtime_ns


def _load_or_decode(zip_path: Path, image_size: int,
                    test_per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The decoded images from the cache, or decoded from the zip (after checking, from its listing
    alone, that every class has enough images for `test_per_class`) and then cached.

    One process at a time decodes (`_decode_lock`): the other runs of a sweep started at once wait
    for it, then read its cache."""
    key = _zip_key(zip_path)
    cached = _read_caches(zip_path, image_size, key)
    if cached is not None:
        return cached
    lock = _decode_lock(zip_path, image_size)
    try:
        cached = _read_caches(zip_path, image_size, key)  # written by a run that held the lock before
        if cached is not None:
            return cached
        return _decode_and_cache(zip_path, image_size, test_per_class, key)
    finally:
        if lock is not None:
            lock.release()


def _read_caches(zip_path: Path, image_size: int,
                 key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The arrays of the first valid cache, beside the zip or in the user's cache folder."""
    for cache in (cache_path(zip_path.parent, image_size), user_cache_path(zip_path, image_size)):
        cached = _read_cache(cache, key, image_size)
        if cached is not None:
            return cached
    return None


def _decode_lock(zip_path: Path, image_size: int) -> LockFile | None:
    """Hold `.miniImageNet_<size>px.lock` beside the zip (in the user's cache folder when the zip's
    folder is read-only), waiting while another process decodes; None, warned, where neither
    folder takes a lock file (the zip is then decoded without one)."""
    name, error = f".miniImageNet_{image_size}px.lock", None
    for folder in _lock_folders(zip_path, image_size):
        lock = LockFile(folder / name)
        try:
            lock.wait_to_acquire(f"decoding {zip_path}")
        except OSError as exc:
            error = exc
            continue
        return lock
    logger.warning("cannot make a lock file for decoding %s (%s): another run may decode it at the same time",
                   zip_path, error)
    return None


def _lock_folders(zip_path: Path, image_size: int) -> Iterator[Path]:
    """Where the decode lock may go, in order: the zip's folder if writable, then the user cache's
    (made only when it comes to that)."""
    if _writable(zip_path.parent):
        yield zip_path.parent
    elsewhere = user_cache_path(zip_path, image_size).parent
    try:
        elsewhere.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    yield elsewhere


def _decode_and_cache(zip_path: Path, image_size: int, test_per_class: int,
                      key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode the zip and cache the images beside it, or in the user's cache folder when its folder is read-only."""
    beside, elsewhere = cache_path(zip_path.parent, image_size), user_cache_path(zip_path, image_size)
    images, labels, files, classes = _decode_zip(zip_path, image_size, test_per_class)
    arrays = (images, labels, files, classes)
    if not (_writable(zip_path.parent) and _write_cache(beside, key, image_size, *arrays, read_only_ok=True)):
        logger.info("the data folder %s is read-only: caching the decoded images in %s instead",
                    zip_path.parent, elsewhere)
        try:
            elsewhere.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning("could not make %s (%s): the zip will be decoded again next time", elsewhere.parent, exc)
        else:
            _write_cache(elsewhere, key, image_size, *arrays)
    return images, labels, classes


def _read_cache(
    cache: Path, key: tuple[int, int], image_size: int
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The cached arrays, or None when there is no cache or it was made from another zip."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as npz:
            stored_key = (int(npz["zip_size"]), int(npz["zip_mtime_ns"]))
            if int(npz["version"]) != CACHE_VERSION or int(npz["image_size"]) != image_size:
                logger.info("cache %s has another format: decoding the zip again", cache)
                return None
            if stored_key != key:
                logger.info("the zip changed since %s was written: decoding it again", cache)
                return None
            images, labels, classes = npz["images"], npz["labels"], [str(c) for c in npz["classes"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        logger.warning("ignoring unreadable cache %s (%s): decoding the zip again", cache, exc)
        return None
    logger.info("loaded %d miniImageNet images from cache %s", len(labels), cache)
    return images, labels, classes


def _write_cache(
    cache: Path,
    key: tuple[int, int],
    image_size: int,
    images: np.ndarray,
    labels: np.ndarray,
    files: list[str],
    classes: list[str],
    read_only_ok: bool = False,
) -> bool:
    """Write the cache whole or not at all (`write_atomically`: several runs of a sweep may write
    it at once); warn if impossible. False, without a warning, when `read_only_ok` and the folder is
    read-only (the caller writes it elsewhere); otherwise True."""

    def write(f: BinaryIO) -> None:
        np.savez(
            f,
            version=np.int64(CACHE_VERSION),
            image_size=np.int64(image_size),
            zip_size=np.int64(key[0]),
            zip_mtime_ns=np.int64(key[1]),
            images=images,
            labels=labels,
            files=np.array(files),
            classes=np.array(classes),
        )

    try:
        write_atomically(cache, write, shared=True)
    except OSError as exc:
        if read_only_ok and exc.errno in READ_ONLY:
            return False
        logger.warning(
            "could not write cache %s (%s): the zip will be decoded again next time", cache, exc
        )
        return True
    logger.info("cached decoded miniImageNet images in %s", cache)
    return True


def _list_jpegs(zf: zipfile.ZipFile, zip_path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """JPEG members sorted by (class folder, file name), their labels and the sorted class names."""
    by_class: dict[str, list[str]] = {}
    for name in zf.namelist():
        path = PurePosixPath(name)
        if name.endswith("/") or path.suffix.lower() not in _JPEG_SUFFIXES:
            continue
        if path.name.startswith("._") or "__MACOSX" in path.parts:  # macOS archive metadata
            continue
        if len(path.parts) < 2:
            raise DataError(
                f"{zip_path}: image {name} is not inside a class folder; expected the Kaggle "
                "layout <wnid>/<file>.jpg"
            )
        by_class.setdefault(path.parent.name, []).append(name)
    if not by_class:
        raise DataError(
            f"{zip_path} holds no JPEG images; expected the Kaggle layout <wnid>/<file>.jpg"
        )
    classes = sorted(by_class)
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        members = sorted(by_class[wnid], key=lambda n: PurePosixPath(n).name)
        files.extend(members)
        labels.extend([label] * len(members))
    return files, np.asarray(labels, dtype=np.int64), classes


def _decode_zip(
    zip_path: Path, image_size: int, test_per_class: int
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Decode every JPEG of the zip, as RGB resized (bilinear) to image_size x image_size, once
    the listing shows every class has more than `test_per_class` images."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            files, labels, classes = _list_jpegs(zf, zip_path)
            _check_class_sizes(np.bincount(labels, minlength=len(classes)), classes, test_per_class)
            _check_memory(len(files), image_size)
            logger.info(
                "decoding %d miniImageNet images of %d classes from %s (once; cached afterwards)",
                len(files), len(classes), zip_path,
            )
            images = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
            progress = tqdm(files, desc="decoding miniImageNet", unit="img", leave=False, disable=None)  # None: a tty
            for i, name in enumerate(progress):
                images[i] = _decode_one(zf, name, image_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DataError(f"cannot read {zip_path}: {exc}; download it again") from exc
    except OSError as exc:  # unreadable zip or corrupt image (PIL raises OSError subclasses)
        raise DataError(f"cannot read {zip_path}: {exc}") from exc
    return images, labels, files, classes


def _check_memory(n_images: int, image_size: int) -> None:
    """DataError when `n_images` decoded at `image_size` pixels would not fit in the memory this
    process can use (checked from the zip's listing, before decoding a single image)."""
    needed = n_images * 3 * image_size * image_size
    available = available_memory()
    if available is not None and needed > available:
        raise DataError(
            f"{n_images} miniImageNet images at --image_size {image_size} need {_size(needed)} of "
            f"memory once decoded, this machine has {_size(available)} available; use a smaller --image_size"
        )


def _size(n_bytes: float) -> str:
    """`n_bytes` for a reader, e.g. 2.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"


def available_memory() -> int | None:
    """Bytes of memory this process may still fill: /proc/meminfo's MemAvailable (else the free
    pages from sysconf), capped by the memory limit of its cgroup (SLURM's --mem is one); None
    when neither can be read."""
    known = [n for n in (_system_available_memory(), _cgroup_memory_limit()) if n is not None]
    return min(known) if known else None


def _system_available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_memory_limit() -> int | None:
    """The lowest memory limit of this process's cgroup and the cgroups above it (v2 memory.max,
    v1 memory.limit_in_bytes; SLURM may set it on the job's cgroup, above the task's), if any."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for parts in (line.split(":", 2) for line in lines):
        if len(parts) != 3 or not (parts[1] == "" or "memory" in parts[1].split(",")):
            continue
        root, name = ((Path("/sys/fs/cgroup"), "memory.max") if parts[1] == ""
                      else (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"))
        folder = root / parts[2].lstrip("/")
        for above in (folder, *folder.parents):  # up to root (a cgroup namespace starts there)
            if not above.is_relative_to(root):
                break
            try:
                value = (above / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit():  # v2 writes "max" for no limit
                limits.append(int(value))
    return min(limits) if limits else None


def _decode_one(zf: zipfile.ZipFile, name: str, image_size: int) -> np.ndarray:
    with zf.open(name) as f:
        try:
            with Image.open(f) as img:
                rgb = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise OSError(f"image {name} cannot be decoded ({type(exc).__name__})") from exc
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
