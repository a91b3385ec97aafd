"""Tests of data/: the dataset readers, the task split and the tensor batch loader (CPU, fast).

Readers run on small files generated here in the official layouts (always) and on the real
subsets in ../shared/data (when present; that folder is read-only, so the zip is copied first).
"""

import errno
import hashlib
import io
import math
import os
import pickle
import shutil
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (DATASET_STATS, DataError, Normalization, Split, TensorLoader, class_order, load_dataset,
                  split_tasks)
from data.cifar100 import load_cifar100
from data import miniimagenet
from data.loader import batch_bounds
from data.miniimagenet import cache_path, load_miniimagenet, user_cache_path

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_CIFAR = REAL_DATA / "cifar-100-python"
REAL_ZIP = REAL_DATA / "miniImageNet.zip"
HAS_REAL_CIFAR = (REAL_CIFAR / "train").is_file() and (REAL_CIFAR / "test").is_file()
HAS_REAL_ZIP = REAL_ZIP.is_file()

# ----------------------------------------------------------------------------------------------
# CIFAR-100
# ----------------------------------------------------------------------------------------------

GEN_CIFAR_PER_CLASS = {"train": 2, "test": 1}


def known_image() -> np.ndarray:
    """A [3, 32, 32] image whose planes tell the channel and the axis apart."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([rows * 8, cols * 8, np.full((32, 32), 7)]).astype(np.uint8)


def write_cifar(root: Path) -> dict[str, np.ndarray]:
    """Write a small cifar-100-python/ in the official pickle layout; return the raw `data` rows."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    for name, per_class in GEN_CIFAR_PER_CLASS.items():
        labels = rng.permutation(np.tile(np.arange(100), per_class))
        raw = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        raw[0] = known_image().reshape(-1)
        entry = {
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name} batch",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": raw,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=4)
        rows[name] = raw
        rows[name + "_labels"] = labels
    meta = {"fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return rows


@pytest.fixture(params=["generated", pytest.param("real", marks=pytest.mark.skipif(
    not HAS_REAL_CIFAR, reason="no real CIFAR-100 in ../shared/data"))])
def cifar_root(request, tmp_path) -> tuple[Path, dict[str, int]]:
    """(root holding cifar-100-python/, images per class of train and test)."""
    if request.param == "real":
        return REAL_DATA, {"train": 250, "test": 100}
    write_cifar(tmp_path)
    return tmp_path, GEN_CIFAR_PER_CLASS


def test_cifar_shapes_dtypes_and_labels(cifar_root):
    root, per_class = cifar_root
    train, test = load_cifar100(root, download=False)
    for split, name in ((train, "train"), (test, "test")):
        n = 100 * per_class[name]
        assert split.images.shape == (n, 3, 32, 32)
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert split.labels.min() == 0 and split.labels.max() == 99
        assert torch.equal(torch.bincount(split.labels), torch.full((100,), per_class[name]))
        assert split.normalization == DATASET_STATS["cifar100"]


def test_cifar_pixel_layout(tmp_path):
    rows = write_cifar(tmp_path)
    train, test = load_cifar100(tmp_path, download=False)
    assert torch.equal(train.images[0], torch.from_numpy(known_image()))
    assert train.images[0, 0, 5, 3] == 5 * 8 and train.images[0, 1, 5, 3] == 3 * 8
    assert torch.equal(train.images.reshape(len(train.images), -1), torch.from_numpy(rows["train"]))
    assert torch.equal(test.labels, torch.from_numpy(rows["test_labels"]))


@pytest.mark.skipif(not HAS_REAL_CIFAR, reason="no real CIFAR-100 in ../shared/data")
def test_real_cifar_sizes_and_pixel_statistics():
    train, test = load_cifar100(REAL_DATA, download=False)
    assert len(train.labels) == 25_000 and len(test.labels) == 10_000
    mean = (train.images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(DATASET_STATS["cifar100"][0]), atol=0.02)


def test_missing_cifar_without_download_names_the_path(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found") as err:
        load_cifar100(root, download=False)
    assert str(root / "cifar-100-python") in str(err.value)
    assert not root.exists()


def test_cifar_download_failure_is_a_data_error(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    def offline(**kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="download failed") as err:
        load_cifar100(tmp_path, download=True)
    assert str(tmp_path / "cifar-100-python") in str(err.value)
    assert "--data_dir" in str(err.value) and "--no-download" in str(err.value)  # the ways out, named
    assert os.listdir(tmp_path) == []  # no half-extracted folder left behind


def test_cifar_download_extracts_into_place(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    source = tmp_path / "source"
    rows = write_cifar(source)
    calls = []

    def fake_download(*, url, download_root, extract_root=None, md5=None, **kwargs):
        calls.append((url, md5))
        target = Path(extract_root or download_root) / "cifar-100-python"
        shutil.copytree(source / "cifar-100-python", target)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    root = tmp_path / "root"
    train, _ = load_cifar100(root, download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                      "eb9058c3a382ffc7106e4002c42a8d85")]
    assert torch.equal(train.images.reshape(len(train.images), -1), torch.from_numpy(rows["train"]))
    assert sorted(os.listdir(root)) == ["cifar-100-python"]


@pytest.mark.parametrize("content", [
    b"not a pickle at all",
    pickle.dumps({"data": np.zeros((2, 5), np.uint8), "fine_labels": [0, 1]}),  # wrong shape
    pickle.dumps({"fine_labels": [0]}),  # no data
])
def test_malformed_cifar_is_a_data_error(tmp_path, content):
    write_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(content)
    with pytest.raises(DataError, match="cannot read CIFAR-100"):
        load_cifar100(tmp_path, download=False)


# ----------------------------------------------------------------------------------------------
# miniImageNet
# ----------------------------------------------------------------------------------------------

# Deliberately not in sorted order, with unequal class sizes.
GEN_CLASSES = {"n03000000": 10, "n01000000": 8, "n02000000": 9}
GEN_COLORS = {"n03000000": (220, 30, 30), "n01000000": (30, 220, 30), "n02000000": (30, 30, 220)}
GEN_TEST_PER_CLASS = 3


def jpeg_bytes(wnid: str, k: int, size: int = 40) -> bytes:
    """Top half: the class colour; bottom half: a grey level that tells the file number k."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[: size // 2] = GEN_COLORS[wnid]
    pixels[size // 2:] = 10 + 20 * k
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_mini_zip(path: Path, classes: dict[str, int], top: str | None = None) -> None:
    """A Kaggle-layout zip; members are written in a scrambled order so the reader must sort."""
    prefix = f"{top}/" if top else ""
    members = [(wnid, k) for wnid, n in classes.items() for k in range(n)]
    order = np.random.default_rng(1).permutation(len(members))
    with zipfile.ZipFile(path, "w") as zf:
        if top:
            zf.writestr(prefix, b"")
            for wnid in classes:
                zf.writestr(f"{prefix}{wnid}/", b"")
        for i in order:
            wnid, k = members[i]
            zf.writestr(f"{prefix}{wnid}/{wnid}{k:08d}.jpg", jpeg_bytes(wnid, k))


def file_number(images: torch.Tensor) -> np.ndarray:
    """Decode k from the grey bottom half of generated images."""
    grey = images[:, :, -images.shape[2] // 4:, :].float().mean(dim=(1, 2, 3)).numpy()
    return np.rint((grey - 10) / 20).astype(int)


@pytest.fixture(params=["flat", "nested", pytest.param("real", marks=pytest.mark.skipif(
    not HAS_REAL_ZIP, reason="no real miniImageNet.zip in ../shared/data"))])
def mini_root(request, tmp_path) -> tuple[str, Path]:
    """(kind, a fresh folder holding only miniImageNet.zip)."""
    root = tmp_path / "data"
    root.mkdir()
    if request.param == "real":
        shutil.copy(REAL_ZIP, root / "miniImageNet.zip")
    else:
        write_mini_zip(root / "miniImageNet.zip", GEN_CLASSES,
                       top="miniImageNet" if request.param == "nested" else None)
    return request.param, root


@pytest.fixture
def open_calls(monkeypatch) -> list[object]:
    """Record every call of PIL.Image.open (the reader must look it up at call time)."""
    calls: list[object] = []
    real_open = Image.open

    def spy(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return calls


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_miniimagenet_cache_and_no_side_effects(mini_root, open_calls):
    kind, root = mini_root
    zip_path = root / "miniImageNet.zip"
    stat = zip_path.stat()
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    before = tree(root)

    train, test = load_miniimagenet(root, image_size=32, test_per_class=GEN_TEST_PER_CLASS)
    n_images = len(train.labels) + len(test.labels)
    assert len(open_calls) == n_images

    cache = cache_path(root, 32)
    assert cache.name == "miniImageNet_32px.npz" and cache.is_file()
    assert tree(root) == before | {cache.name}  # nothing extracted, no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert cache.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as any file the user makes
    assert zip_path.stat().st_size == stat.st_size and zip_path.stat().st_mtime_ns == stat.st_mtime_ns
    assert hashlib.sha256(zip_path.read_bytes()).hexdigest() == digest

    open_calls.clear()
    train2, test2 = load_miniimagenet(root, image_size=32, test_per_class=GEN_TEST_PER_CLASS)
    assert open_calls == []  # served from the cache
    for a, b in ((train, train2), (test, test2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert tree(root) == before | {cache.name}


def test_miniimagenet_splits(mini_root):
    kind, root = mini_root
    tpc = 10 if kind == "real" else GEN_TEST_PER_CLASS
    train, test = load_miniimagenet(root, image_size=32, test_per_class=tpc, seed=0)
    for split in (train, test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.images.is_contiguous() and split.labels.dtype == torch.int64
        assert split.normalization == DATASET_STATS["miniImageNet"]
    if kind == "real":
        assert len(train.labels) == 5000 and len(test.labels) == 1000
        assert torch.equal(torch.bincount(test.labels), torch.full((100,), 10))
        assert torch.equal(torch.bincount(train.labels), torch.full((100,), 50))
    else:
        counts = [GEN_CLASSES[w] for w in sorted(GEN_CLASSES)]
        assert torch.bincount(test.labels).tolist() == [tpc] * len(counts)
        assert torch.bincount(train.labels).tolist() == [c - tpc for c in counts]

    same_train, same_test = load_miniimagenet(root, image_size=32, test_per_class=tpc, seed=0)
    assert torch.equal(same_test.images, test.images) and torch.equal(same_train.images, train.images)
    other_train, other_test = load_miniimagenet(root, image_size=32, test_per_class=tpc, seed=1)
    assert not torch.equal(other_test.images, test.images)
    assert torch.equal(other_test.labels, test.labels)  # same sizes per class, other images


@pytest.mark.parametrize("seed", [0, 5])
def test_miniimagenet_labels_and_split_follow_sorted_names(tmp_path, seed):
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    train, test = load_miniimagenet(
        tmp_path, image_size=16, test_per_class=GEN_TEST_PER_CLASS, seed=seed)
    wnids = sorted(GEN_CLASSES)
    rng = np.random.default_rng(seed)
    for label, wnid in enumerate(wnids):
        expected_test = np.sort(rng.permutation(GEN_CLASSES[wnid])[:GEN_TEST_PER_CLASS])
        in_test, in_train = test.images[test.labels == label], train.images[train.labels == label]
        # Label = position of the class folder in sorted order: check the class colour.
        top = torch.cat([in_test, in_train])[:, :, :4].float().mean(dim=(0, 2, 3))
        assert torch.allclose(top, torch.tensor(GEN_COLORS[wnid], dtype=torch.float32), atol=12)
        # Test = first test_per_class of a seeded permutation of the sorted file names;
        # each split keeps file-name order.
        assert file_number(in_test).tolist() == expected_test.tolist()
        expected_train = np.setdiff1d(np.arange(GEN_CLASSES[wnid]), expected_test)
        assert file_number(in_train).tolist() == expected_train.tolist()


@pytest.fixture
def read_only_folder():
    """Make a folder read-only (chmod 0o555; for root too, whom the bits do not stop, the reader
    takes them as the owner's intent); writable again afterwards, so that it can be cleaned up."""
    made: list[Path] = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


def test_miniimagenet_read_only_data_folder_caches_in_the_user_cache(tmp_path, monkeypatch, read_only_folder,
                                                                     open_calls, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    write_mini_zip(data_dir / "miniImageNet.zip", GEN_CLASSES)
    before = tree(data_dir)
    read_only_folder(data_dir)

    with caplog.at_level("INFO", logger="data"):
        train, test = load_miniimagenet(data_dir, test_per_class=GEN_TEST_PER_CLASS)
    cache = user_cache_path(data_dir / "miniImageNet.zip", 32)
    assert cache.is_file() and cache.is_relative_to(tmp_path / "xdg")
    assert tree(data_dir) == before  # nothing written into the read-only folder
    said = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
    assert len(said) == 1 and str(cache) in said[0]

    open_calls.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="data"):
        train2, test2 = load_miniimagenet(data_dir, test_per_class=GEN_TEST_PER_CLASS)
    assert open_calls == []  # served from the user cache
    assert not any("read-only" in r.getMessage() for r in caplog.records)
    for a, b in ((train, train2), (test, test2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # Another data folder with its own zip never shares that cache.
    assert user_cache_path(tmp_path / "other" / "miniImageNet.zip", 32) != cache


def test_miniimagenet_read_only_file_system_caches_in_the_user_cache(tmp_path, monkeypatch):
    """A folder that looks writable but refuses the write (a read-only mount: EROFS)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data_dir = tmp_path / "mounted"
    data_dir.mkdir()
    write_mini_zip(data_dir / "miniImageNet.zip", GEN_CLASSES)
    real = miniimagenet.write_atomically

    def read_only_mount(path, write, **kwargs):
        if Path(path).parent == data_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, write, **kwargs)

    monkeypatch.setattr(miniimagenet, "write_atomically", read_only_mount)
    load_miniimagenet(data_dir, test_per_class=GEN_TEST_PER_CLASS)
    assert user_cache_path(data_dir / "miniImageNet.zip", 32).is_file()
    assert sorted(p.name for p in data_dir.iterdir()) == ["miniImageNet.zip"]


def test_miniimagenet_cache_beside_a_read_only_zip_is_read(tmp_path, monkeypatch, read_only_folder, open_calls):
    """A data folder prepared with its cache (a shared one, say) is read as it is, even read-only."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)
    read_only_folder(tmp_path)
    open_calls.clear()
    load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)
    assert open_calls == [] and not (tmp_path / "xdg").exists()


def test_miniimagenet_image_size_and_separate_caches(tmp_path):
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    small, _ = load_miniimagenet(tmp_path, image_size=16, test_per_class=GEN_TEST_PER_CLASS)
    large, _ = load_miniimagenet(tmp_path, image_size=40, test_per_class=GEN_TEST_PER_CLASS)
    assert small.images.shape[2:] == (16, 16) and large.images.shape[2:] == (40, 40)
    assert cache_path(tmp_path, 16).is_file() and cache_path(tmp_path, 40).is_file()


def test_miniimagenet_failed_cache_write_is_only_a_warning(tmp_path, monkeypatch, caplog):
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    real_savez = np.savez

    def disk_full(file, **arrays):
        real_savez(file, **arrays)  # half of the file is written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with caplog.at_level("WARNING", logger="data.miniimagenet"):
        train, test = load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)
    assert len(train.labels) + len(test.labels) == sum(GEN_CLASSES.values())
    assert "could not write cache" in caplog.text and "No space left on device" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["miniImageNet.zip"]  # no cache, no temp file


def test_miniimagenet_changed_zip_is_decoded_again(tmp_path, open_calls):
    zip_path = tmp_path / "miniImageNet.zip"
    write_mini_zip(zip_path, GEN_CLASSES)
    load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)

    # Same content, new mtime: decoded again.
    open_calls.clear()
    st = zip_path.stat()
    os.utime(zip_path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)
    assert len(open_calls) == sum(GEN_CLASSES.values())

    # New content: the new images are served, and the cache follows.
    bigger = dict(GEN_CLASSES, n01000000=11)
    write_mini_zip(zip_path, bigger)
    train, test = load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)
    assert len(train.labels) + len(test.labels) == sum(bigger.values())
    open_calls.clear()
    train, test = load_miniimagenet(tmp_path, test_per_class=GEN_TEST_PER_CLASS)
    assert open_calls == [] and len(train.labels) + len(test.labels) == sum(bigger.values())


def test_miniimagenet_missing_zip_names_the_path(tmp_path):
    with pytest.raises(DataError, match="Kaggle") as err:
        load_miniimagenet(tmp_path)
    assert str(tmp_path / "miniImageNet.zip") in str(err.value)


def test_miniimagenet_bad_zips_are_data_errors(tmp_path):
    zip_path = tmp_path / "miniImageNet.zip"
    zip_path.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_miniimagenet(tmp_path)

    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("n01000000/readme.txt", b"no images here")
    with pytest.raises(DataError, match="no JPEG"):
        load_miniimagenet(tmp_path)

    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("n01000000/n0100000000000001.jpg", b"\xff\xd8 truncated jpeg")
        zf.writestr("n01000000/n0100000000000002.jpg", jpeg_bytes("n01000000", 2))
        zf.writestr("n01000000/n0100000000000003.jpg", jpeg_bytes("n01000000", 3))
    with pytest.raises(DataError, match="n0100000000000001.jpg"):
        load_miniimagenet(tmp_path, test_per_class=1)
    assert sorted(os.listdir(tmp_path)) == ["miniImageNet.zip"]  # no cache of a failed decode


@pytest.mark.parametrize("test_per_class", [8, 7])  # 7: one image left for training, a batch of one
def test_miniimagenet_too_few_images_per_class(tmp_path, open_calls, test_per_class):
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    with pytest.raises(DataError, match="n01000000 has 8 images.*leave 2 for training.*--test_per_class"):
        load_miniimagenet(tmp_path, test_per_class=test_per_class)
    assert open_calls == []  # found from the zip's listing, before decoding a single image
    assert sorted(os.listdir(tmp_path)) == ["miniImageNet.zip"]  # and no cache written


def test_miniimagenet_refuses_an_image_size_that_would_not_fit_in_memory(tmp_path, open_calls, monkeypatch):
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    n = sum(GEN_CLASSES.values())
    monkeypatch.setattr(miniimagenet, "available_memory", lambda: n * 3 * 16 * 16)  # exactly 16 px
    with pytest.raises(DataError) as err:
        load_miniimagenet(tmp_path, image_size=17, test_per_class=GEN_TEST_PER_CLASS)
    message = str(err.value)
    assert "\n" not in message
    assert f"{n} miniImageNet images at --image_size 17 need 22.9 KiB of memory once decoded" in message
    assert "this machine has 20.2 KiB available; use a smaller --image_size" in message
    assert open_calls == [] and sorted(os.listdir(tmp_path)) == ["miniImageNet.zip"]  # nothing decoded or cached
    train, _ = load_miniimagenet(tmp_path, image_size=16, test_per_class=GEN_TEST_PER_CLASS)  # just fits
    assert train.images.shape[2:] == (16, 16)


def test_available_memory_is_what_linux_says_this_process_can_use():
    available = miniimagenet.available_memory()
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    assert isinstance(available, int) and 0 < available <= total


# ----------------------------------------------------------------------------------------------
# load_dataset and DATASET_STATS
# ----------------------------------------------------------------------------------------------


def test_load_dataset_dispatches(tmp_path):
    write_cifar(tmp_path)
    write_mini_zip(tmp_path / "miniImageNet.zip", GEN_CLASSES)
    train, test = load_dataset("cifar100", tmp_path, download=False)
    assert len(train.labels) == 200 and len(test.labels) == 100
    assert train.normalization == test.normalization == DATASET_STATS["cifar100"]
    train, test = load_dataset("miniImageNet", tmp_path, image_size=8, test_per_class=2, seed=3)
    assert train.images.shape[2:] == (8, 8) and len(test.labels) == 2 * len(GEN_CLASSES)
    assert train.normalization == test.normalization == DATASET_STATS["miniImageNet"]
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar10", tmp_path)


def test_dataset_stats():
    assert set(DATASET_STATS) == {"cifar100", "miniImageNet"}
    for mean, std in DATASET_STATS.values():
        assert len(mean) == len(std) == 3 and all(0 < v < 1 for v in (*mean, *std))
    assert DATASET_STATS["cifar100"].mean == DATASET_STATS["cifar100"][0]
    assert set(data.__all__) == {"Split", "Normalization", "DataError", "load_dataset", "DATASET_STATS",
                                 "CLASS_ORDER_MODES", "class_order", "first_per_class", "split_tasks", "TensorLoader"}


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


def test_class_order():
    assert class_order(100, "fixed", seed=7) == list(range(100))
    order = class_order(100, "random", seed=7)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert all(type(c) is int for c in order)
    assert order == class_order(100, "random", seed=7)
    assert order != class_order(100, "random", seed=8)
    with pytest.raises(DataError, match="class order"):
        class_order(100, "shuffled", seed=0)


def labelled_split(num_classes: int, per_class: int, seed: int = 0) -> Split:
    """Shuffled labels; pixel [0, 0, 0] of sample i holds i, so samples can be traced."""
    labels = torch.from_numpy(np.random.default_rng(seed).permutation(
        np.repeat(np.arange(num_classes), per_class)))
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return Split(images=images, labels=labels)


def test_split_tasks_remaps_labels_and_keeps_order():
    split = labelled_split(num_classes=10, per_class=6)
    order = class_order(10, "random", seed=3)
    tasks = split_tasks(split, order, num_tasks=4, classes_per_task=2)  # 2 classes left out
    assert len(tasks) == 4
    for t, task in enumerate(tasks):
        assert len(task.labels) == 12 and task.labels.dtype == torch.int64
        assert task.images.dtype == torch.uint8 and task.images.is_contiguous()
        assert sorted(task.labels.unique().tolist()) == [2 * t, 2 * t + 1]
        source = task.images[:, 0, 0, 0].long()
        assert torch.all(source[1:] > source[:-1])  # original relative order
        original = split.labels[source]
        assert torch.equal(torch.tensor(order)[task.labels], original)
        assert torch.equal(task.images, split.images[source])
        task_classes = torch.tensor(order[2 * t:2 * t + 2])
        expected = torch.nonzero(torch.isin(split.labels, task_classes)).squeeze(1)
        assert torch.equal(source, expected)


def test_split_tasks_fixed_order_and_too_many_tasks():
    split = labelled_split(num_classes=6, per_class=3)
    tasks = split_tasks(split, class_order(6, "fixed", 0), num_tasks=3, classes_per_task=2)
    for t, task in enumerate(tasks):
        assert torch.equal(task.labels, split.labels[task.images[:, 0, 0, 0].long()])
        assert set(task.labels.tolist()) == {2 * t, 2 * t + 1}
    with pytest.raises(DataError, match="need 8 classes"):
        split_tasks(split, list(range(6)), num_tasks=4, classes_per_task=2)


def test_split_tasks_keeps_the_normalization():
    plain = labelled_split(num_classes=4, per_class=2)
    assert all(task.normalization is None for task in split_tasks(plain, [0, 1, 2, 3], 2, 2))
    split = plain._replace(normalization=DATASET_STATS["miniImageNet"])
    for task in split_tasks(split, [3, 1, 0, 2], num_tasks=2, classes_per_task=2):
        assert task.normalization == DATASET_STATS["miniImageNet"]


# ----------------------------------------------------------------------------------------------
# TensorLoader
# ----------------------------------------------------------------------------------------------

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # x = pixels / 255


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo the identity normalization exactly."""
    return torch.round(x * 255).to(torch.uint8)


def indexed_split(n: int, size: int = 32, seed: int = 0) -> Split:
    """Random images, label i for sample i."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return Split(images=images, labels=torch.arange(n))


def epoch(loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("train", [True, False])
def test_loader_batches_shapes_and_dtypes(train, device):
    split = indexed_split(10, size=8)._replace(normalization=DATASET_STATS["cifar100"])
    loader = TensorLoader(split, batch_size=4, train=train, device=device)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8) and x.device.type == device.type
        assert y.dtype == torch.int64 and y.device.type == device.type
    assert len(TensorLoader(split, batch_size=5, train=train, **IDENTITY)) == 2
    assert len(TensorLoader(split, batch_size=64, train=train, **IDENTITY)) == 1


def test_eval_loader_is_fixed_and_plainly_normalized(device):
    mean, std = DATASET_STATS["cifar100"]
    split = indexed_split(50)._replace(normalization=Normalization(mean, std))
    loader = TensorLoader(split, batch_size=16, train=False, seed=1, device=device)  # the split's own normalization
    x1, y1 = epoch(loader)
    x2, y2 = epoch(loader)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x1, y1 = x1.cpu(), y1.cpu()
    assert torch.equal(y1, split.labels)  # the test order on every device
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    plain = (split.images.float() / 255 - mean_t) / std_t
    assert torch.allclose(x1, plain, atol=1e-5, rtol=0)


def test_explicit_mean_and_std_override_the_splits_normalization():
    split = indexed_split(20, size=8)
    with pytest.raises(ValueError, match="carries no normalization: pass mean= and std="):
        TensorLoader(split, batch_size=4, train=False)
    with pytest.raises(ValueError, match="both mean= and std=, or neither"):
        TensorLoader(split._replace(normalization=DATASET_STATS["cifar100"]), batch_size=4, train=False,
                     mean=(0.0, 0.0, 0.0))
    own = split._replace(normalization=Normalization(**IDENTITY))
    x, _ = epoch(TensorLoader(own, batch_size=4, train=False))
    assert torch.equal(to_pixels(x), split.images)
    overridden = split._replace(normalization=DATASET_STATS["cifar100"])
    x, _ = epoch(TensorLoader(overridden, batch_size=4, train=False, **IDENTITY))
    assert torch.equal(to_pixels(x), split.images)


def test_loader_argument_mistakes_are_value_errors():
    split = indexed_split(4, size=8)
    with pytest.raises(ValueError, match="batch size must be positive, got 0"):
        TensorLoader(split, batch_size=0, train=True, **IDENTITY)
    with pytest.raises(ValueError, match="crop padding must be non-negative, got -1"):
        TensorLoader(split, batch_size=2, train=True, pad=-1, **IDENTITY)


def test_loader_mistakes_that_would_train_on_one_image_are_value_errors():
    with pytest.raises(ValueError, match="training batches need at least 2 images.*batch size 1, 4 images"):
        TensorLoader(indexed_split(4, size=8), batch_size=1, train=True, **IDENTITY)
    with pytest.raises(ValueError, match="training batches need at least 2 images.*batch size 8, 1 images"):
        TensorLoader(indexed_split(1, size=8), batch_size=8, train=True, **IDENTITY)
    assert [len(y) for _, y in TensorLoader(indexed_split(3, size=8), batch_size=1, train=False, **IDENTITY)] == [1] * 3


@pytest.mark.parametrize("n", range(1, 40))
@pytest.mark.parametrize("batch_size", [2, 3, 7, 16])
def test_batches_never_hold_one_image_and_change_only_for_a_remainder_of_one(n, batch_size):
    bounds = batch_bounds(n, batch_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # every sample once, in order
    sizes = [end - start for start, end in bounds]
    assert all(size == batch_size for size in sizes[:-1])
    plain = math.ceil(n / batch_size)  # the count before the merge
    if n % batch_size == 1 and n > 1:
        assert len(bounds) == plain - 1 and sizes[-1] == batch_size + 1
    else:
        assert len(bounds) == plain and 1 <= sizes[-1] <= batch_size
    assert 1 not in sizes or n == 1


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(("n", "sizes"), [(21, [10, 11]), (22, [10, 10, 2]), (11, [11]), (10, [10])])
def test_loader_merges_a_last_batch_of_one_image(train, n, sizes):
    loader = TensorLoader(indexed_split(n, size=8), batch_size=10, train=train, **IDENTITY)
    batches = [y for _, y in loader]
    assert [len(y) for y in batches] == sizes and len(loader) == len(sizes)
    assert torch.equal(torch.sort(torch.cat(batches)).values, torch.arange(n))


def test_train_loader_visits_each_sample_once_per_epoch_and_reshuffles():
    loader = TensorLoader(indexed_split(103, size=8), batch_size=10, train=True, **IDENTITY)
    orders = [epoch(loader)[1] for _ in range(3)]
    for order in orders:
        assert torch.equal(torch.sort(order).values, torch.arange(103))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_train_loader_is_deterministic_per_seed(device):
    """Same seed, same epochs (shuffle, crops and flips) on every device: the loader draws them from a
    CPU generator, so a loader on `device` gives exactly the batches of the CPU loader."""
    split = indexed_split(64)
    a = TensorLoader(split, batch_size=16, train=True, seed=3, **IDENTITY)  # on the CPU
    b, c = (TensorLoader(split, batch_size=16, train=True, seed=s, device=device, **IDENTITY) for s in (3, 4))
    for _ in range(2):
        (xa, ya), (xb, yb), (_, yc) = epoch(a), epoch(b), epoch(c)
        assert xb.device.type == yb.device.type == device.type
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
        assert not torch.equal(ya, yc.cpu())


def test_train_augmentation_is_a_padded_crop_and_maybe_a_flip(device):
    pad, n = 2, 40
    split = indexed_split(n, size=8)
    padded = torch.nn.functional.pad(split.images, (pad, pad, pad, pad))
    x, y = (t.cpu() for t in epoch(TensorLoader(split, batch_size=16, train=True, pad=pad, device=device, **IDENTITY)))
    seen_flip = set()
    offsets = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    for out, i in zip(to_pixels(x), y.tolist()):
        matches = []
        for dy, dx in offsets:
            crop = padded[i, :, dy:dy + 8, dx:dx + 8]
            matches += [(dy, dx, False)] if torch.equal(out, crop) else []
            matches += [(dy, dx, True)] if torch.equal(out, crop.flip(-1)) else []
        assert len(matches) == 1, f"sample {i} is no crop/flip of its source"
        seen_flip.add(matches[0][2])
    assert seen_flip == {False, True}


def constant_split(n: int, value: int = 200) -> Split:
    images = torch.full((n, 3, 32, 32), value, dtype=torch.uint8)
    return Split(images=images, labels=torch.zeros(n, dtype=torch.int64))


def test_random_crop_statistics():
    n, pad, size = 2000, 4, 32
    x, _ = epoch(TensorLoader(constant_split(n), batch_size=256, train=True, pad=pad, **IDENTITY))
    pixels = to_pixels(x)
    assert set(pixels.unique().tolist()) == {0, 200}  # only padding or image
    is_pad = pixels[:, 0] == 0

    # Expected padded fraction: offsets d uniform on 0..2p, |d - p| rows/columns of padding.
    shift = np.abs(np.arange(2 * pad + 1) - pad).mean()
    expected = 1 - (1 - shift / size) ** 2
    assert abs(is_pad.float().mean().item() - expected) < 0.01

    # Offsets recovered per sample from the padded rows/columns are uniform on 0..2p.
    for axis in (1, 2):  # rows, columns of [N, H, W]
        line_is_pad = is_pad.all(dim=3 - axis)  # [N, size]: whole row (or column) padded
        before = line_is_pad[:, : size // 2].sum(1)
        after = line_is_pad[:, size // 2:].sum(1)
        assert torch.all((before == 0) | (after == 0))
        offset = pad - before + after
        freq = torch.bincount(offset, minlength=2 * pad + 1).float() / n
        assert freq.numel() == 2 * pad + 1
        assert torch.all((freq - 1 / (2 * pad + 1)).abs() < 0.03), freq

    eval_x, _ = epoch(TensorLoader(constant_split(n), batch_size=256, train=False, pad=pad, **IDENTITY))
    assert torch.all(to_pixels(eval_x) == 200)


def two_halves_split(n: int) -> Split:
    images = torch.full((n, 3, 32, 32), 50, dtype=torch.uint8)
    images[..., 16:] = 150
    return Split(images=images, labels=torch.zeros(n, dtype=torch.int64))


@pytest.mark.parametrize("pad", [4, 0])
def test_random_flip_statistics(pad):
    n = 2000
    split = two_halves_split(n)
    x, _ = epoch(TensorLoader(split, batch_size=256, train=True, pad=pad, **IDENTITY))
    pixels = to_pixels(x)
    # Whatever the crop offset (|shift| <= 4), pixel (16, 8) stays in the half it came from.
    left = pixels[:, 0, 16, 8]
    assert set(left.unique().tolist()) <= {50, 150}
    flipped = (left == 150).float().mean().item()
    assert abs(flipped - 0.5) < 0.05  # ~4.5 standard deviations of a fair coin over 2000 samples
    if pad == 0:
        original = split.images[0]
        is_original = (pixels == original).flatten(1).all(1)
        is_flipped = (pixels == original.flip(-1)).flatten(1).all(1)
        assert torch.all(is_original ^ is_flipped)
    eval_x, _ = epoch(TensorLoader(split, batch_size=256, train=False, pad=pad, **IDENTITY))
    assert torch.equal(to_pixels(eval_x), split.images)


def test_a_task_with_one_training_image_is_one_line_and_exit_2(tmp_path, capsys):
    """A one-class task whose class has a single training image cannot make a training batch."""
    from tests.conftest import write_fake_cifar
    from utils.entry import main

    write_fake_cifar(tmp_path / "data", {"train": 1, "test": 3})
    out = tmp_path / "run"
    code = main("cifar100", ["--data_dir", str(tmp_path / "data"), "--num_tasks", "2", "--num_classes", "2",
                             "--num_classes_per_task", "1", "--epochs", "1", "--device", "cpu",
                             "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "task 0 (classes [0]) has 1 training image(s)" in err and "Traceback" not in err
    assert not out.exists()  # checked before the run's directory is made


def test_first_per_class_keeps_each_class_s_first_images_in_order():
    labels = torch.tensor([3, 1, 3, 3, 1, 2, 1, 3])
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 2, 2).contiguous()
    split = Split(images, labels, DATASET_STATS["cifar100"])
    kept = data.first_per_class(split, 2)
    assert kept.labels.tolist() == [3, 1, 3, 1, 2]
    assert kept.images[:, 0, 0, 0].tolist() == [0, 1, 2, 4, 5]  # the first two of each class, in order
    assert kept.normalization == split.normalization
    assert data.first_per_class(split, None) is split and data.first_per_class(split, 4) is split
    with pytest.raises(DataError):
        data.first_per_class(split, 0)


def test_train_and_test_per_class_cap_a_cifar_run_s_tasks(cifar_dir):
    from utils.cli import parse_config
    from utils.experiment import build_tasks

    flags = ["--data_dir", str(cifar_dir), "--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2",
             "--device", "cpu"]
    full = build_tasks(parse_config(flags, "cifar100"))
    small = build_tasks(parse_config([*flags, "--train_per_class", "7", "--test_per_class", "3"], "cifar100"))
    for task, whole in zip(small, full):
        assert torch.bincount(task.train.labels).tolist()[-2:] == [7, 7]
        assert torch.bincount(task.test.labels).tolist()[-2:] == [3, 3]
        for c in task.train.labels.unique():
            assert torch.equal(task.train.images[task.train.labels == c], whole.train.images[whole.train.labels == c][:7])
