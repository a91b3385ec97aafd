"""Shared fixtures and run helpers (`finished_run`, `run_once`), the `device` the
device-parametrised tests run on, and data for the tests that run the real loading code: the real
subsets in ../shared/data when present, otherwise small files generated in the same layouts, with
class-dependent colours so that a network can learn them.

`device` is "cpu" always and "cuda" when a GPU is there (skipped otherwise): `pytest -k cuda`
selects exactly the CUDA cases, which is how a GPU check runs them, so no other test may have
"cuda" in its name or ids (`pytest_collection_modifyitems` refuses one that does).

Tests start subprocesses with `run_process` / `start_process` (from `tests/suite_control.py`, the
suite's plugin): each in a session of its own, killed whole when it ends, when the test ends or
when the suite is interrupted; a test that signals its own process on purpose uses
`send_to_this_process`.
"""

import io
import json
import pickle
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.suite_control import run_process, send_to_this_process, start_process  # noqa: F401 (the tests' helpers)
from utils import run_dir
from utils.entry import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NO_GPU = "no CUDA device here (torch.cuda.is_available() is False): the CUDA case runs where there is one"
CUDA_CASE = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


# The narrowest ResNet-18 (8 channels in its first stage): for tests of machinery (saving, resuming,
# bookkeeping), which need the backbone's layers and shapes but not its capacity; tests of learning
# train the paper's width.
SMALL_NET = ("--net_width", "8")


def finished_run(benchmark: str, data_dir: Path, out: Path, *flags: str) -> dict:
    """A run of `benchmark` on the CPU from `data_dir` into `out` with `flags`, which must succeed;
    its results.json."""
    argv = ["--data_dir", str(data_dir), "--no-download", "--device", "cpu", "--output_dir", str(out), *flags]
    assert main(benchmark, argv) == 0
    return json.loads((out / run_dir.RESULTS_FILE).read_text())


def stop_at_step(monkeypatch: pytest.MonkeyPatch, cls: type, n: int) -> Callable[..., None]:
    """Make the n-th call of `cls.step` from now send SIGTERM to this process first: the run stops
    (exit code 3) after that step, as a stop request has it. Returns the real `step`, to put back."""
    real_step, calls = cls.step, []

    def step(self: Any) -> None:
        calls.append(1)
        if len(calls) == n:
            send_to_this_process(signal.SIGTERM)
        real_step(self)

    monkeypatch.setattr(cls, "step", step)
    return real_step


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: several intra-op threads only slow them down on a busy CPU. A module asks for
    it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_once(tmp_path_factory: pytest.TempPathFactory, name: str, data_dir: Path, *flags: str) -> tuple[Path, dict]:
    """`finished_run` of CIFAR-100 into a fresh folder named after `name`: for module-scoped
    fixtures whose run several tests read (never write)."""
    out = tmp_path_factory.mktemp(name) / "run"
    return out, finished_run("cifar100", data_dir, out, *flags)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: the CUDA case of a test parametrised by the `device` fixture")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA_CASE)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a test puts its tensors, models and loaders on: the CPU, and the GPU when there is one."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that `pytest -k cuda` would select although it is no CUDA case of `device`
    (-k matches the names of the test and its parents, its parameter ids and its markers)."""
    stray = [item.nodeid for item in items
             if any("cuda" in keyword.lower() for keyword in item.keywords) and item.get_closest_marker("cuda") is None]
    if stray:
        raise pytest.UsageError(f"{len(stray)} test(s) have 'cuda' in their name or ids, so `pytest -k cuda` (the GPU "
                                f"check) would select them: rename them or give them other ids: {', '.join(stray[:5])}")


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
    write_fake_cifar(root, {"train": 250, "test": 100}, classes=20)  # learnable classes for 3 tasks of 5 and more
    return root


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini")  # the cache is written next to the zip: never in shared/
    if (SHARED / "miniImageNet.zip").is_file():
        shutil.copy(SHARED / "miniImageNet.zip", root / "miniImageNet.zip")
    else:
        write_fake_miniimagenet(root / "miniImageNet.zip")
    return root
