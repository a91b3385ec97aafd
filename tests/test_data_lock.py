"""Data for runs started at once (data/cifar100.py, data/miniimagenet.py): CIFAR-100 is downloaded and
the miniImageNet cache built by one process, under a lock file next to the data; the others wait
for it and read its result, and take over when it died.

The download is a stand-in (`_download` replaced in the loader processes) that counts its calls in
a file and writes a small folder in CIFAR-100's pickle layout; miniImageNet is the stand-in zip of
tests/test_data.py.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data import DataError, cifar100, miniimagenet
from sparselearning import file_lock
from tests.suite_control import start_process
from tests.test_data import GEN_CLASSES, GEN_TEST_PER_CLASS, write_mini_zip

ROOT = Path(__file__).resolve().parents[1]

# Each loader: marks itself ready, then loads. The stand-in download records its call, waits
# until <ready count> loaders are ready (all of them inside the loader), sleeps <pause> seconds
# and writes the data (into a temporary folder, renamed into place, as the real one).
PRELUDE = """
import logging, os, pickle, sys, time
from pathlib import Path
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(message)s")
from sparselearning import file_lock
file_lock.POLL_SECONDS = 0.05
root, calls, ready, n_ready, pause = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

def record_call_and_wait():
    with open(calls, "a") as f:
        f.write(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < n_ready and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(pause)
"""

CIFAR_LOADER = PRELUDE + """
from data import cifar100

def stand_in_download(root):
    record_call_and_wait()
    tmp = root / f".stand-in-{os.getpid()}"
    (tmp / cifar100.FOLDER).mkdir(parents=True)
    for split in ("train", "test"):
        entry = {"data": np.full((100, 3072), 7, np.uint8), "fine_labels": list(range(100))}
        with open(tmp / cifar100.FOLDER / split, "wb") as f:
            pickle.dump(entry, f)
    os.replace(tmp / cifar100.FOLDER, root / cifar100.FOLDER)
    tmp.rmdir()

cifar100._download = stand_in_download
(ready / str(os.getpid())).touch()
train, test = cifar100.load_cifar100(root, download=True)
print("loaded", len(train.labels), len(test.labels), int(train.images.sum()), flush=True)
"""

MINI_LOADER = PRELUDE + """
import hashlib
from data import miniimagenet
real_decode = miniimagenet._decode_zip

def counted_decode(*args, **kwargs):
    record_call_and_wait()
    return real_decode(*args, **kwargs)

miniimagenet._decode_zip = counted_decode
(ready / str(os.getpid())).touch()
train, test = miniimagenet.load_miniimagenet(root, image_size=8, test_per_class=int(sys.argv[6]))
digest = hashlib.sha256(train.images.numpy().tobytes() + test.images.numpy().tobytes()).hexdigest()
print("loaded", len(train.labels), len(test.labels), digest, flush=True)
"""


class Loader:
    """A loader process, its stdout and stderr in files."""

    def __init__(self, script: str, folder: Path, name: str, *args: str) -> None:
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = start_process([sys.executable, "-c", script, *args], cwd=ROOT, stdout=out, stderr=err)

    def finish(self, timeout: float = 120) -> str:
        """Its stdout, once it ended with exit code 0."""
        code = self.process.wait(timeout=timeout)
        assert code == 0, self.err.read_text()
        return self.out.read_text()

    def said(self) -> str:
        return self.err.read_text()


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def places(tmp_path) -> tuple[Path, Path, Path]:
    """(data root, the file counting the stand-in's calls, the folder of ready marks)."""
    root, ready = tmp_path / "data", tmp_path / "ready"
    root.mkdir()
    ready.mkdir()
    return root, tmp_path / "calls.txt", ready


def calls_in(calls: Path) -> list[int]:
    return [int(line) for line in calls.read_text().split()] if calls.exists() else []


def test_three_runs_started_at_once_download_cifar_once_and_all_load_it(places, tmp_path):
    root, calls, ready = places
    loaders = [Loader(CIFAR_LOADER, tmp_path, f"run{i}", str(root), str(calls), str(ready), "3", "0.5")
               for i in range(3)]
    outputs = [loader.finish() for loader in loaders]
    assert calls_in(calls) and len(calls_in(calls)) == 1, calls_in(calls)  # exactly one download
    downloader = calls_in(calls)[0]
    assert outputs == [f"loaded 100 100 {7 * 100 * 3072}\n"] * 3
    waiters = [loader for loader in loaders if loader.process.pid != downloader]
    for waiter in waiters:
        said = waiter.said()
        assert f"waiting for pid {downloader} on " in said and "to finish downloading CIFAR-100" in said
        assert "CIFAR-100 is at" in said and "downloaded by another run" in said
    assert sorted(os.listdir(root)) == [cifar100.FOLDER]  # no lock file, no temporary folder


def test_a_download_killed_midway_is_taken_over_by_a_waiting_run(places, tmp_path):
    root, calls, ready = places
    holder = Loader(CIFAR_LOADER, tmp_path, "holder", str(root), str(calls), str(ready), "0", "600")
    wait_until(lambda: calls_in(calls) == [holder.process.pid], "the first run to start downloading")
    waiter = Loader(CIFAR_LOADER, tmp_path, "waiter", str(root), str(calls), str(ready), "0", "0")
    wait_until(lambda: "waiting for" in waiter.said() or waiter.process.poll() is not None,
               "the second run to wait")
    assert f"waiting for pid {holder.process.pid} on " in waiter.said()
    holder.process.send_signal(signal.SIGKILL)
    holder.process.wait()

    assert waiter.finish() == f"loaded 100 100 {7 * 100 * 3072}\n"
    said = waiter.said()
    assert f"taking over the lock {root / cifar100.LOCK_FILE} from pid {holder.process.pid}" in said
    assert "no longer exists on this host" in said
    assert calls_in(calls) == [holder.process.pid, waiter.process.pid]
    assert sorted(os.listdir(root)) == [cifar100.FOLDER]


def test_a_waiting_run_downloads_itself_when_the_holder_failed(tmp_path, monkeypatch, caplog):
    """In one process: the first download fails after the second run began waiting for it; the
    second, once the lock is free and the data still missing, downloads itself."""
    monkeypatch.setattr(file_lock, "POLL_SECONDS", 0.02)
    waiting = threading.Event()
    downloads: list[str] = []

    def stand_in_download(root: Path) -> None:
        downloads.append(threading.current_thread().name)
        if len(downloads) == 1:
            wait_until(waiting.is_set, "the second run to wait", timeout=30)
            raise DataError("CIFAR-100 not found (download failed: offline)")
        write_small_cifar(root / cifar100.FOLDER)

    monkeypatch.setattr(cifar100, "_download", stand_in_download)
    caplog.set_level("INFO", logger="sparselearning.file_lock")
    results: dict[str, object] = {}

    def load(name: str) -> None:
        try:
            results[name] = cifar100.load_cifar100(tmp_path, download=True)
        except DataError as error:
            results[name] = error

    first = threading.Thread(target=load, args=("first",), name="first")
    first.start()
    wait_until(lambda: downloads == ["first"], "the first download")
    second = threading.Thread(target=load, args=("second",), name="second")
    second.start()
    wait_until(lambda: "waiting for" in caplog.text, "the second run to wait")
    waiting.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert isinstance(results["first"], DataError)
    assert downloads == ["first", "second"]
    train, test = results["second"]
    assert len(train.labels) == 100 and len(test.labels) == 100
    assert sorted(os.listdir(tmp_path)) == [cifar100.FOLDER]


def write_small_cifar(folder: Path) -> None:
    import pickle

    folder.mkdir(parents=True)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": np.zeros((100, 3072), np.uint8), "fine_labels": list(range(100))}, f)


def test_three_runs_started_at_once_build_the_miniimagenet_cache_once(places, tmp_path):
    root, calls, ready = places
    write_mini_zip(root / miniimagenet.ZIP_NAME, GEN_CLASSES)
    loaders = [Loader(MINI_LOADER, tmp_path, f"run{i}", str(root), str(calls), str(ready), "3", "0.5",
                      str(GEN_TEST_PER_CLASS)) for i in range(3)]
    outputs = [loader.finish() for loader in loaders]
    assert len(calls_in(calls)) == 1, calls_in(calls)  # decoded once
    assert len(set(outputs)) == 1 and outputs[0].startswith("loaded ")
    decoder = calls_in(calls)[0]
    for loader in loaders:
        said = loader.said()
        if loader.process.pid != decoder:
            assert f"waiting for pid {decoder} on " in said and "to finish decoding" in said
            assert "loaded" in said and "from cache" in said
    assert sorted(os.listdir(root)) == sorted([miniimagenet.ZIP_NAME, miniimagenet.cache_path(root, 8).name])


def test_a_download_finishing_second_keeps_the_copy_already_in_place(tmp_path):
    """Two downloads can still overlap (a live downloader judged stale after 10 minutes without a
    heartbeat): the second one's rename finds the folder there and keeps it, with no error."""
    write_small_cifar(tmp_path / "first" / cifar100.FOLDER)
    write_small_cifar(tmp_path / "second" / cifar100.FOLDER)
    target = tmp_path / cifar100.FOLDER
    os.replace(tmp_path / "first" / cifar100.FOLDER, target)
    cifar100._move_into_place(tmp_path / "second" / cifar100.FOLDER, target)
    assert sorted(os.listdir(target)) == ["test", "train"]
