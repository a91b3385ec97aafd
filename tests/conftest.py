"""Data for the tests that run the real loading code: the real subsets in ../shared/data when
present, otherwise small files generated in the same layouts, with class-dependent colours so that
a network can learn them."""

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def class_images(label: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n noisy HxWx3 uint8 images whose colour layout depends on the class."""
    base = np.zeros((size, size, 3))
    base[:, :, label % 3] = 200
    base[: size // 2, :, (label // 3) % 3] += 50 * (1 + label % 4)
    noise = rng.normal(0, 30, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_fake_cifar(root: Path, per_class: dict[str, int], classes: int = 10) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        labels = np.repeat(np.arange(100), n)
        images = np.zeros((len(labels), 32, 32, 3), dtype=np.uint8)
        for c in range(classes):
            images[labels == c] = class_images(c, n, 32, rng)
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                         "batch_label": split}, f, protocol=4)


def write_fake_miniimagenet(path: Path, classes: int = 10, per_class: int = 60) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(100):
            wnid = f"n{c:08d}"
            images = class_images(c if c < classes else 0, per_class if c < classes else 12, 84, rng)
            for k, image in enumerate(images):
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=90)
                zf.writestr(f"{wnid}/{wnid}{k:08d}.jpg", buf.getvalue())


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    if (SHARED / "cifar-100-python" / "train").is_file():
        return SHARED
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, {"train": 250, "test": 100})
    return root


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini")  # the cache is written next to the zip: never in shared/
    if (SHARED / "miniImageNet.zip").is_file():
        shutil.copy(SHARED / "miniImageNet.zip", root / "miniImageNet.zip")
    else:
        write_fake_miniimagenet(root / "miniImageNet.zip")
    return root
