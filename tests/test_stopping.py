"""Stopping within the warning: a stop signal is honoured before the next test or calibration batch
(not only after an optimizer step), Ctrl-C again stops at once, Ctrl-C while the script starts is
one line, and each of these leaves a run that --resume finishes with the uninterrupted results.

Small runs on the CIFAR-100 subset (../shared/data, or generated stand-ins): three tasks of two
classes, small test sets in several batches, so that a row of tests has batches to stop between.
"""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_NET
from tests.suite_control import send_to_this_process, start_process
from utils import experiment, run_dir
from utils.entry import main
from utils.stopping import StoppedAtOnce, StopRequest

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_TASK = 4  # --epochs 2 x --max_batches 2
FLAGS = ["--num_tasks", "3", "--num_classes", "6", "--num_classes_per_task", "2", "--epochs", "2",
         "--max_batches", "2", "--batch_size", "16", "--test_batch_size", "16", "--test_per_class", "24",
         "--train_per_class", "24", "--checkpoint_minutes", "1000",  # 3 test (and calibration) batches per task
         *SMALL_NET]
COST_KEYS = {"seconds", "forward_passes", "backward_passes"}  # task inference's cost: a resumed run recomputes


def argv_for(data_dir: Path, out: Path, method: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--no-download", "--device", "cpu", "--output_dir", str(out), *FLAGS,
            "--task_inference", method]


def results_of(out: Path) -> dict:
    return json.loads((out / run_dir.RESULTS_FILE).read_text())


def comparable(results: dict) -> dict:
    """results.json less what may differ between an interrupted run and an uninterrupted one:
    timings, task inference's cost, the environment."""
    def without_cost(inference):
        return None if inference is None else {k: v for k, v in inference.items() if k not in COST_KEYS}

    kept = {k: v for k, v in results.items() if k not in ("environment", "config")}
    kept["task_inference"] = without_cost(results["task_inference"])
    kept["per_task"] = [{k: without_cost(v) if k == "task_inference" else v for k, v in task.items()
                         if k != "train_seconds"} for task in results["per_task"]]
    return kept


def metrics_rows(out: Path) -> list[dict]:
    """metrics.csv's rows less the seconds (a resumed task's clock goes on from its save)."""
    with open(out / run_dir.METRICS_FILE, newline="") as f:
        return [{k: v for k, v in row.items() if k != "task_seconds"} for row in csv.DictReader(f)]


class References(dict):
    """Uninterrupted runs' output directories by --task_inference, each run when first asked for."""

    def __init__(self, data_dir: Path, folders: pytest.TempPathFactory) -> None:
        super().__init__()
        self.data_dir, self.folders = data_dir, folders

    def __missing__(self, method: str) -> Path:
        out = self.folders.mktemp(f"reference-{method}") / "run"
        assert main("cifar100", argv_for(self.data_dir, out, method)) == 0
        self[method] = out
        return out


@pytest.fixture(scope="module")
def references(cifar_dir, tmp_path_factory) -> References:
    return References(cifar_dir, tmp_path_factory)


class EvalPasses:
    """Counts the model's forward passes in eval mode (tests, calibration, task inference) after
    task 2's training began; sends SIGTERM to this process during the `at`-th of them."""

    def __init__(self, at: int) -> None:
        self.at, self.train_passes, self.eval_passes, self.after_signal = at, 0, 0, 0

    def hook(self, module: torch.nn.Module, args, output) -> None:
        if module.training:
            self.train_passes += 1
        elif self.train_passes > STEPS_PER_TASK:  # task 2 was trained
            self.eval_passes += 1
            if self.eval_passes == self.at:
                send_to_this_process(signal.SIGTERM)
            elif self.eval_passes > self.at:
                self.after_signal += 1


@pytest.mark.parametrize(("method", "at", "where"), [
    ("none", 2, "the accuracy matrix's row"),
    ("calibrated", 2, "the calibration on the training images (3 batches)"),
    ("calibrated", 5, "the task-agnostic row (after the calibration's 3 batches)"),
    ("oneshot", 2, "the one-shot row (a forward and a backward pass per batch)"),
])
def test_a_stop_while_testing_stops_before_the_next_batch_and_resume_gives_the_uninterrupted_results(
        cifar_dir, references, tmp_path, monkeypatch, capsys, method, at, where):
    passes = EvalPasses(at)
    real_build = experiment.build_model

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_hook(passes.hook)
        return model

    monkeypatch.setattr(experiment, "build_model", build_model)
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, method)
    assert main("cifar100", argv) == 3
    assert passes.eval_passes == passes.at and passes.after_signal == 0, f"a batch of {where} ran after the stop"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGTERM in task 2, while testing it" in err and "--resume" in err
    stopped = results_of(out)
    assert stopped["resumable"] is True and stopped["tasks_done"] == 1
    assert stopped["acc_matrix"][1] == [None] * 3
    saved = run_dir.load_checkpoint(out / run_dir.PROGRESS_FILE)
    assert saved["task"] == 1 and saved[experiment.Experiment.TRAINED] is True
    monkeypatch.setattr(experiment, "build_model", real_build)

    assert main("cifar100", [*argv, "--resume"]) == 0
    reference = references[method]
    assert comparable(results_of(out)) == comparable(results_of(reference))
    assert metrics_rows(out) == metrics_rows(reference)
    resumed_log = (out / run_dir.LOG_FILE).read_text().split("resuming task 2 after its training")
    assert len(resumed_log) == 2 and "task 2 epoch" not in resumed_log[1]  # tested again, not trained again
    assert not (out / run_dir.PROGRESS_FILE).exists()


def test_ctrl_c_while_stopping_stops_at_once_and_other_signals_are_ignored():
    request = StopRequest()
    with request.installed():
        send_to_this_process(signal.SIGTERM)
        send_to_this_process(signal.SIGUSR1)  # ignored: the saves go on (a cluster's SIGTERM after its warning)
        assert request.name == "SIGTERM"
        with pytest.raises(StoppedAtOnce):
            send_to_this_process(signal.SIGINT)
        send_to_this_process(signal.SIGINT)  # once is enough: the way out is not interrupted again
    assert request.name == "SIGTERM"


def test_an_interrupt_a_host_passes_on_after_a_saved_stop_reports_the_stop(cifar_dir, tmp_path, monkeypatch, capsys):
    """A host's own SIGTERM handler that raises KeyboardInterrupt: the run saves first, then the host's
    handler interrupts; main reports the saved stop, not an interruption before training."""
    from sparselearning import Masking

    real_step, steps = Masking.step, []

    def step(self):
        steps.append(1)
        if len(steps) == STEPS_PER_TASK + 1:  # task 2, epoch 1, batch 1
            send_to_this_process(signal.SIGTERM)
        real_step(self)

    def host(signum, frame):
        raise KeyboardInterrupt("the host stops")

    monkeypatch.setattr(Masking, "step", step)
    previous = signal.signal(signal.SIGTERM, host)
    try:
        code = main("cifar100", argv_for(cifar_dir, tmp_path / "run", "none"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert "stopped by SIGTERM in task 2, epoch 1, batch 1" in err[-1] and "--resume" in err[-1]
    assert not any("before training began" in line for line in err)


# Sends SIGINT to this process during the 7th optimizer step (task 2, epoch 2, batch 1) and makes
# the save that follows slow: half the checkpoint is written, then a file named by argv[1] says
# so and the save waits (for the second Ctrl-C, which the test sends).
SLOW_SAVE_AFTER_CTRL_C = """
import io, os, signal, sys, time
from pathlib import Path
import torch
from sparselearning import Masking
marker, steps, stopping = Path(sys.argv[1]), [], []
real_step, real_save = Masking.step, torch.save
def step(self):
    steps.append(1)
    if len(steps) == 7:
        os.kill(os.getpid(), signal.SIGINT)
        stopping.append(1)
    real_step(self)
def save(obj, f, *args, **kwargs):
    if not stopping:
        return real_save(obj, f, *args, **kwargs)
    data = io.BytesIO()
    real_save(obj, data)
    f.write(data.getvalue()[: len(data.getvalue()) // 2])
    marker.write_text("saving")
    time.sleep(300)
    f.write(data.getvalue()[len(data.getvalue()) // 2:])
Masking.step, torch.save = step, save
from utils.entry import main
sys.exit(main("cifar100", sys.argv[2:]))
"""


def test_ctrl_c_again_while_saving_exits_130_at_once_and_keeps_what_was_saved(cifar_dir, references, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "saving"
    argv = [*argv_for(cifar_dir, out, "none"), "--checkpoint_minutes", "0"]  # the task in progress saved every epoch
    with open(tmp_path / "stderr.txt", "w") as err:
        process = start_process([sys.executable, "-c", SLOW_SAVE_AFTER_CTRL_C, str(marker), *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.monotonic() < deadline, "the save after the first Ctrl-C never began"
        time.sleep(0.02)
    before = run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)  # task 1's, whole
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert time.monotonic() - sent < 10  # at once, not after the save (it waits 300 s)
    stderr = (tmp_path / "stderr.txt").read_text()
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and "Ctrl-C while stopping" in last and "--resume" in last
    assert not list(out.glob(".*.tmp"))  # the abandoned file is gone whole
    assert run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["tasks_done"] == before["tasks_done"] == 1
    progress = run_dir.load_checkpoint(out / run_dir.PROGRESS_FILE)  # the previous save, whole: after epoch 1
    assert (progress["task"], progress["epochs_done"], progress["epoch_progress"]) == (1, 1, None)

    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(results_of(references["none"]))


@pytest.mark.parametrize("script", ["cifar100.py", "miniImageNet100.py"])
def test_ctrl_c_while_the_script_starts_is_one_line_and_exit_130(tmp_path, script):
    """SIGINT while the script imports torch (before main() handles it), sent until the process ends."""
    with open(tmp_path / "stderr.txt", "w") as err:
        process = start_process([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    maps = Path(f"/proc/{process.pid}/maps")
    while "libtorch" not in maps.read_text():  # torch's libraries are being loaded: the imports are under way
        assert process.poll() is None, "the script ended before importing torch"
        time.sleep(0.002)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.wait(timeout=10) == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines() == ["interrupted while starting; nothing was run"]
