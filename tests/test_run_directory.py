"""The run directory on a shared cluster: one run at a time, damaged and foreign files, a full disk,
and --resume knowing its run (wherever its directory went, and on which data it ran).

Runs are two small tasks on CPU (tests/conftest.py: cifar_dir); helpers from test_reliability.
"""

import datetime
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from sparselearning import atomic_file
from tests.conftest import SMALL_NET, write_fake_cifar
from tests.suite_control import run_process
from tests.test_reliability import ROOT, argv_for, comparable, results_of, start, terminal_lines, wait_for_log_line
from utils import experiment, run_dir, run_lock, train
from utils.cli import parse_config
from utils.entry import main
from utils.errors import UserError

SMALL = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "2",
         "--max_batches", "2", "--batch_size", "16", "--update_frequency", "2", "--growth", "momentum",
         "--sparse_init", "ERK", "--checkpoint_minutes", "0",  # the task in progress saved after every epoch
         "--test_per_class", "20",  # one test batch of 2 x 20 images a task
         "--task_inference", "none", *SMALL_NET]  # these runs test the run directory, not testing (or learning)


class Killed(BaseException):
    """The process dies here (as under SIGKILL: nothing in the program handles it)."""


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory) -> Path:
    """The directory of the uninterrupted run every resumed one is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL)) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(cifar_dir, tmp_path_factory) -> Path:
    """A run stopped at the start of task 2's second epoch: checkpoint.pt after task 1,
    task_in_progress.pt of task 2 after its first epoch. Tests use copies (`copy_of`)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    real_train_epoch, started = train.train_epoch, []

    def stop_at_the_fourth_epoch(*args, **kwargs):
        started.append(1)
        if len(started) == 4:
            raise Killed
        return real_train_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_epoch", stop_at_the_fourth_epoch)
        with pytest.raises(Killed):
            main("cifar100", argv_for(cifar_dir, out, *SMALL))
    assert run_dir.load_checkpoint(out / run_dir.PROGRESS_FILE)["epochs_done"] == 1
    return out


def copy_of(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def one_line_error(capsys) -> str:
    """The one line the last refused run printed (progress bars aside)."""
    err = terminal_lines(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- one run at a time

# Holds the run still right after its first progress checkpoint, the directory locked, as long as
# the test needs (it is killed).
PAUSE_AFTER_FIRST_PROGRESS = """
import os, sys, time
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(dst) == "task_in_progress.pt":
        print("paused", file=sys.stderr, flush=True)
        time.sleep(600)
os.replace = replace
from utils.entry import main
sys.exit(main("cifar100", sys.argv[1:]))
"""


def test_a_live_run_refuses_a_second_one_and_a_killed_runs_lock_does_not(cifar_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *SMALL)
    first = start(argv, tmp_path / "first.txt", driver=PAUSE_AFTER_FIRST_PROGRESS)
    try:
        wait_for_log_line(first, tmp_path / "first.txt", "paused")
        second = run_process([sys.executable, "cifar100.py", *argv, "--resume"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"{out} is in use by another run (pid {first.pid} on " in second.stderr
        saved = {path.name: path.read_bytes() for path in out.iterdir()}
        for flags in ([], ["--overwrite"]):
            assert main("cifar100", [*argv, *flags]) == 2
            assert "in use by another run" in one_line_error(capsys)
        assert {path.name: path.read_bytes() for path in out.iterdir()} == saved  # nothing touched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / run_lock.LOCK_FILE).exists()  # the killed run's lock file stays; its lock died with it
    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(results_of(reference))
    assert "resuming task 1 after epoch 1" in (out / run_dir.LOG_FILE).read_text()


def test_an_output_dir_that_is_a_file_is_one_line_and_left_alone(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("mine")
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL)) == 2
    assert f"--output_dir {out} is a file, not a directory" in one_line_error(capsys)
    assert out.read_text() == "mine"


def test_without_file_locks_a_run_warns_and_goes_on(cifar_dir, reference, tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    out = copy_of(reference, tmp_path / "run")
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL, "--resume")) == 0  # a finished run: printed
    assert "cannot lock" in caplog.text and "nothing stops a second run" in caplog.text


# ----------------------------------------------------------------------------- damaged files


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", [run_dir.CHECKPOINT_FILE, run_dir.RESULTS_FILE, run_dir.CONFIG_FILE])
def test_a_damaged_file_is_one_line_naming_it_and_overwrite_replaces_it(cifar_dir, interrupted, reference, tmp_path,
                                                                          capsys, name):
    out = copy_of(interrupted, tmp_path / "run")
    if name == run_dir.RESULTS_FILE:
        shutil.copy(reference / name, out / name)
    cut_in_half(out / name)
    damaged = (out / name).read_bytes()
    argv = argv_for(cifar_dir, out, *SMALL)
    for flags in (["--resume"], []):
        assert main("cifar100", [*argv, *flags]) == 2
        err = one_line_error(capsys)
        assert f"{out / name} is damaged" in err and "--overwrite to start again" in err
    assert (out / name).read_bytes() == damaged

    config = parse_config([*argv, "--overwrite"], "cifar100")  # the way out, up to the training itself
    assert run_dir.inspect_output_dir(config) == run_dir.Resumable()
    run_dir.prepare_output_dir(config)
    assert sorted(path.name for path in out.iterdir()) == [run_lock.LOCK_FILE, run_dir.CONFIG_FILE]


def test_a_damaged_task_in_progress_falls_back_to_the_checkpoint(cifar_dir, interrupted, reference, tmp_path, caplog):
    out = copy_of(interrupted, tmp_path / "run")
    cut_in_half(out / run_dir.PROGRESS_FILE)
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL, "--resume")) == 0
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and f"{run_dir.PROGRESS_FILE} is damaged" in warnings[0]
    assert "resuming from checkpoint.pt, after task 1" in warnings[0]
    assert comparable(results_of(out)) == comparable(results_of(reference))


# ----------------------------------------------------------------------------- files that are not ours


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


FOREIGN = {
    "a user's config": (run_dir.CONFIG_FILE, b'{"dataset": "mine", "lr": 0.1}\n'),
    "a user's config, not JSON": (run_dir.CONFIG_FILE, b"lr: 0.1\nepochs: 3\n"),
    "JSON that is not a run's results": (run_dir.RESULTS_FILE, b'{"acc": 93.1, "config": {}}\n'),
    "another program's checkpoint": (run_dir.CHECKPOINT_FILE, torch_bytes({"state_dict": {"w": torch.ones(3)},
                                                                           "epoch": 7})),
    "a checkpoint of objects": (run_dir.PROGRESS_FILE, torch_bytes({"when": datetime.date(2024, 1, 1)})),
    "bytes that are no checkpoint": (run_dir.CHECKPOINT_FILE, b"not a zip archive\n"),
    "a user's log alone": (run_dir.LOG_FILE, b"my notes\n"),
    "a user's metrics.csv alone": (run_dir.METRICS_FILE, b"epoch,loss\n1,0.5\n"),
}


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]], ids=["plain", "resume", "overwrite"])
@pytest.mark.parametrize("case", FOREIGN)
def test_a_file_that_is_not_ours_is_never_touched_whatever_the_flags(cifar_dir, tmp_path, capsys, case, flags):
    name, data = FOREIGN[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(data)
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL, *flags)) == 2
    err = one_line_error(capsys)
    assert f"{out / name} is not this program's" in err and "move it away" in err
    assert (out / name).read_bytes() == data
    assert sorted(path.name for path in out.iterdir()) == sorted([name, run_lock.LOCK_FILE])


# ----------------------------------------------------------------------------- a full disk


class FullDisk:
    """A file on a disk that fills up after `room` bytes: a write past it writes what fits, then
    raises ENOSPC, as the operating system does."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        fits = min(len(data), self.room)
        self.file.write(data[:fits])
        self.room -= fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def fill_the_disk_at(monkeypatch, name: str, nth: int, room: int = 1 << 20) -> None:
    """The n-th atomic write of `name` (counted from 1) runs out of space after `room` bytes."""
    opened = []

    def open_on_a_disk_that_fills(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if Path(path).name == f".{name}.tmp":
            opened.append(path)
            if len(opened) == nth:
                return FullDisk(file, room)
        return file

    monkeypatch.setattr(atomic_file, "open", open_on_a_disk_that_fills, raising=False)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(cifar_dir, reference, tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *SMALL)
    fill_the_disk_at(monkeypatch, run_dir.CHECKPOINT_FILE, nth=2, room=4096)  # the checkpoint after task 2
    assert main("cifar100", argv) == 2
    err = one_line_error(capsys)
    assert f"cannot write {out / run_dir.CHECKPOINT_FILE}: no space left on device" in err and "--resume" in err
    assert run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["tasks_done"] == 1  # the previous one, whole
    assert not (out / f".{run_dir.CHECKPOINT_FILE}.tmp").exists()

    monkeypatch.undo()
    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(results_of(reference))


def test_a_full_disk_while_writing_json_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / run_dir.RESULTS_FILE
    run_dir.write_json(target, {"a": 1})
    fill_the_disk_at(monkeypatch, run_dir.RESULTS_FILE, nth=1, room=3)
    with pytest.raises(UserError, match=re.escape(f"cannot write {target}: no space left on device")):
        run_dir.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.RESULTS_FILE]


def test_a_full_disk_under_the_log_is_one_warning_not_a_traceback_per_record(tmp_path, capsys):
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler = run_dir.attach_log_file(tmp_path)
    file, handler.stream = handler.stream, Full()
    try:
        for epoch in range(3):
            run_dir.log.info("epoch %d", epoch)
    finally:
        logging.getLogger().removeHandler(handler)
        file.close()
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "cannot write" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], err
    assert "Traceback" not in err and "Logging error" not in err


# ----------------------------------------------------------------------------- --resume knows its run


@pytest.mark.parametrize("how", ["moved", "symlinked_relative"])
def test_a_moved_or_symlinked_run_directory_resumes(cifar_dir, interrupted, reference, tmp_path, monkeypatch, how):
    out = copy_of(interrupted, tmp_path / "first" / "run")
    if how == "moved":
        out = Path(shutil.move(out, tmp_path / "elsewhere"))
    else:
        (tmp_path / "link").symlink_to(out, target_is_directory=True)
        monkeypatch.chdir(tmp_path)
        out = Path("link")
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL, "--resume")) == 0
    assert comparable(results_of(out)) == comparable(results_of(reference))


def test_resuming_on_other_data_is_refused(cifar_dir, interrupted, tmp_path, capsys):
    other = tmp_path / "other_data"
    write_fake_cifar(other, {"train": 30, "test": 10}, classes=4)
    out = copy_of(interrupted, tmp_path / "run")
    assert main("cifar100", argv_for(other, out, *SMALL, "--resume")) == 2
    err = one_line_error(capsys)
    assert f"--resume: {out} was run on other data (its train and test images or labels differ" in err


def test_a_run_recorded_without_a_data_fingerprint_still_resumes(cifar_dir, interrupted, reference, tmp_path):
    out = copy_of(interrupted, tmp_path / "run")
    for name in (run_dir.CHECKPOINT_FILE, run_dir.PROGRESS_FILE):
        state = run_dir.load_checkpoint(out / name)
        del state["config"][run_dir.FINGERPRINT]
        run_dir.save_checkpoint(out / name, state)
    assert main("cifar100", argv_for(cifar_dir, out, *SMALL, "--resume")) == 0
    assert comparable(results_of(out)) == comparable(results_of(reference))
    recorded = run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["config"][run_dir.FINGERPRINT]
    assert recorded == json.loads((out / run_dir.CONFIG_FILE).read_text())[run_dir.FINGERPRINT]


def test_the_data_fingerprint_is_cheap_deterministic_and_sees_a_changed_label_or_pixel(cifar_dir, tmp_path):
    config = parse_config(argv_for(cifar_dir, tmp_path / "run"), "cifar100")  # every class of the data set
    tasks = experiment.build_tasks(config)
    began = time.perf_counter()
    fingerprint = run_dir.data_fingerprint(tasks)
    seconds = time.perf_counter() - began
    assert seconds < 1.0, f"{seconds:.2f} s for {sum(len(task.train.labels) for task in tasks)} training images"
    assert run_dir.data_fingerprint(tasks) == fingerprint
    tasks[-1].test.labels[0] += 1
    changed = run_dir.data_fingerprint(tasks)
    assert changed["train"] == fingerprint["train"] and changed["test"] != fingerprint["test"]
    tasks[0].train.images[0, 0, 0, 0] ^= 1
    assert run_dir.data_fingerprint(tasks)["train"] != fingerprint["train"]
