"""Reliability: a killed run resumes to the same results, outputs are whole, bad input costs nothing.

The interrupted runs are separate processes killed with SIGKILL, on the real CIFAR-100 subset
when ../shared/data is present (generated stand-ins otherwise), three small tasks.
"""

import csv
import io
import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from tests.conftest import SMALL_NET
from tests.suite_control import run_process, send_to_this_process, start_process
from utils import run_dir
from utils.entry import main

ROOT = Path(__file__).resolve().parents[1]
# Small batches, small test sets (one batch of 2 x 20 images a task), no task inference and the
# narrow backbone: these runs test saving and resuming, not learning (task inference across a resume:
# tests/test_end_to_end.py).
SPLIT = ["--num_tasks", "3", "--num_classes", "6", "--num_classes_per_task", "2", "--batch_size", "16",
         "--test_per_class", "20", "--task_inference", "none", *SMALL_NET]
THREE_TASKS = [*SPLIT, "--epochs", "3", "--max_batches", "3", "--update_frequency", "2", "--growth", "momentum",
               "--sparse_init", "ERK", "--checkpoint_minutes", "0"]  # the task in progress saved after every epoch
TIMING_KEYS = {"train_seconds"}
COST_KEYS = {"seconds", "forward_passes", "backward_passes"}  # task inference's cost: a resumed run recomputes


def argv_for(data_dir: Path, out: Path, *flags: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--no-download", "--device", "cpu", "--output_dir", str(out), *flags]


def without_cost(inference: dict | None) -> dict | None:
    """Task inference's record less its cost: a resumed run has no cached outputs, so it does more passes."""
    return None if inference is None else {k: v for k, v in inference.items() if k not in COST_KEYS}


def comparable(results: dict) -> dict:
    """Everything in results.json that must not depend on interruptions: all but timings, task inference's
    cost and the environment."""
    kept = {k: v for k, v in results.items() if k not in ("environment", "config")}
    kept["task_inference"] = without_cost(results.get("task_inference"))
    kept["per_task"] = [{k: (without_cost(v) if k == "task_inference" else v) for k, v in task.items()
                         if k not in TIMING_KEYS} for task in results["per_task"]]
    return kept


def results_of(out: Path) -> dict:
    return json.loads((out / run_dir.RESULTS_FILE).read_text())


def epoch_rows(out: Path) -> list[dict]:
    """metrics.csv's rows less the seconds (a resumed task's clock includes its replayed epochs)."""
    with open(out / run_dir.METRICS_FILE, newline="") as f:
        return [{k: v for k, v in row.items() if k != "task_seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference_run(cifar_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    # no saves of the task in progress: they change no result (that is what these tests check)
    assert main("cifar100", argv_for(cifar_dir, out, *THREE_TASKS, "--checkpoint_minutes", "1000")) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    return results_of(reference_run)


def start(argv: list[str], stderr: Path, driver: str | None = None) -> subprocess.Popen:
    """The run in its own process; stderr (progress bars included) goes to a file, never a pipe
    nobody reads while the run is going (a full pipe would block it)."""
    command = [sys.executable, "-c", driver, *argv] if driver else [sys.executable, "cifar100.py", *argv]
    with open(stderr, "w") as err:
        return start_process(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)


def wait_for_log_line(process: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before logging {text!r}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no {text!r} in {log} after {timeout} s")


# ----------------------------------------------------------------------------- kill and resume


def test_a_run_killed_in_the_middle_of_a_task_resumes_to_the_same_results(cifar_dir, reference, reference_run,
                                                                         tmp_path):
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *THREE_TASKS)
    process = start(argv, tmp_path / "stderr.txt")
    wait_for_log_line(process, out / run_dir.LOG_FILE, "task 2 epoch 2:")  # the moment, picked from the log
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / run_dir.RESULTS_FILE).exists()
    assert (out / run_dir.PROGRESS_FILE).exists()  # saved after every epoch (--checkpoint_every 1)

    assert main("cifar100", argv) == 2  # an unfinished run is not silently restarted
    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(reference)
    assert "resuming task 2 after epoch" in (out / run_dir.LOG_FILE).read_text()
    assert epoch_rows(out) == epoch_rows(reference_run)  # each epoch once, as if never interrupted
    assert len(epoch_rows(out)) == 3 * 3


# Kills the run when the n-th rename onto the named file is about to happen: the temporary file
# is there, cut to half its size, as if the machine had died while writing it.
KILL_DURING_WRITE = """
import os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
real_replace, renames = os.replace, []
def replace(src, dst):
    if os.path.basename(dst) == target:
        renames.append(dst)
        if len(renames) == nth:
            with open(src, "r+b") as f:
                f.truncate(os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
from utils.entry import main
sys.exit(main("cifar100", sys.argv[3:]))
"""


@pytest.mark.parametrize(("target", "nth"), [
    (run_dir.CHECKPOINT_FILE, 2),  # the checkpoint after task 2
    (run_dir.PROGRESS_FILE, 4),  # the task in progress: task 2 after epoch 2 (2 per task: not after the last)
    (run_dir.RESULTS_FILE, 1),
])
def test_a_run_killed_while_writing_a_file_resumes_to_the_same_results(cifar_dir, reference, tmp_path,
                                                                        target, nth):
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *THREE_TASKS)
    process = start([target, str(nth), *argv], tmp_path / "stderr.txt", driver=KILL_DURING_WRITE)
    assert process.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    half_written = out / f".{target}.tmp"
    assert half_written.exists()  # the torn file is only ever the temporary one
    if target == run_dir.RESULTS_FILE:
        assert not (out / target).exists()
    else:
        run_dir.load_checkpoint(out / target)  # the previous version, whole

    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(reference)
    assert not half_written.exists() or half_written.stat().st_size > 0  # a leftover is ignored, never read


# ----------------------------------------------------------------------------- the output directory


def test_a_finished_run_is_refused_reprinted_with_resume_and_replaced_with_overwrite(
        cifar_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    small = [*SPLIT, "--epochs", "1", "--max_batches", "2"]
    argv = argv_for(cifar_dir, out, *small)
    assert main("cifar100", argv) == 0
    first = results_of(out)
    capsys.readouterr()

    assert main("cifar100", argv) == 2
    err = terminal_lines(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "finished run" in err and "--resume" in err and "--overwrite" in err

    log_size = (out / run_dir.LOG_FILE).stat().st_size
    assert main("cifar100", [*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "ACCURACY MATRIX" in printed and results_of(out) == first
    assert (out / run_dir.LOG_FILE).stat().st_size == log_size  # nothing was run again

    (out / "notes.txt").write_text("mine")
    assert main("cifar100", [*argv, "--overwrite"]) == 0
    assert comparable(results_of(out)) == comparable(first)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes the run's files only
    assert (out / run_dir.LOG_FILE).read_text().count("task 1/3") == 1  # a fresh log


# ----------------------------------------------------------------------------- a diverging run


def test_a_non_finite_loss_stops_the_run_and_keeps_the_finished_tasks(cifar_dir, tmp_path, monkeypatch, capsys):
    real_cross_entropy, calls = F.cross_entropy, []

    def cross_entropy(*args, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == 9 else loss  # task 2 (6 batches per task), epoch 1, batch 3

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    out = tmp_path / "run"
    flags = [*SPLIT, "--epochs", "2", "--max_batches", "3"]
    assert main("cifar100", argv_for(cifar_dir, out, *flags)) == 1
    err = terminal_lines(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "non-finite loss in task 2, epoch 1, batch 3" in err
    results = results_of(out)
    assert results["complete"] is False and results["tasks_done"] == 1 and len(results["per_task"]) == 1
    assert "task 2, epoch 1, batch 3" in results["stopped"]
    assert results["acc_matrix"][0][0] is not None and results["acc_matrix"][1] == [None, None, None]
    assert results["acc"] == results["acc_matrix"][0][0]  # the metrics of the one finished task
    assert main("cifar100", argv_for(cifar_dir, out, *flags)) == 2
    assert "unfinished run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def terminal_lines(stderr: str) -> str:
    """What a terminal shows of `stderr`: a progress bar redrawn with \\r leaves only its last state."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    return "\n".join(line for line in lines if line)


def check_user_error(argv: list[str], expected: str, capsys, benchmark: str = "cifar100") -> None:
    """Exit code 2, one line on stderr that says `expected`, nothing written."""
    out = Path(argv[argv.index("--output_dir") + 1])
    assert main(benchmark, argv) == 2
    err = terminal_lines(capsys.readouterr().err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err
    assert not out.exists(), "an output directory was created for a run that could not start"


@pytest.mark.parametrize(("flags", "expected"), [
    (["--num_classes", "30"], "--num_classes 30 != --num_tasks 10 x --num_classes_per_task 10"),
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--density", "1.01"], "--density must be in (0, 1]"),
    (["--death_rate", "1"], "--death_rate must be in [0, 1)"),
    (["--death_rate", "-0.5"], "--death_rate must be in [0, 1)"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--num_tasks", "0", "--num_classes", "0"], "--num_tasks must be >= 1"),
    (["--num_classes_per_task", "0"], "--num_classes_per_task must be >= 1"),
    (["--update_frequency", "-1"], "--update_frequency must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--image_size", "7"], "--image_size must be >= 8"),
    (["--test_per_class", "0"], "--test_per_class must be >= 1"),
    (["--dataset", "miniImageNet"], "use miniImageNet100.py"),
    (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
    (["--sparse_init", "normal"], "invalid choice: 'normal'"),
    (["--growth", "magnitude"], "invalid choice: 'magnitude'"),
    (["--death", "random"], "invalid choice: 'random'"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--net_name", "resnet50"], "invalid choice: 'resnet50'"),
    (["--new_weights", "ones"], "invalid choice: 'ones'"),
    (["--class_order", "sorted"], "invalid choice: 'sorted'"),
    (["--keep", "best_test"], "invalid choice: 'best_test'"),
    (["--eval", "all"], "invalid choice: 'all'"),
    (["--epochs", "two"], "invalid int value: 'two'"),
])
def test_every_invalid_setting_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, flags, expected):
    check_user_error(argv_for(tmp_path / "data", tmp_path / "out", *flags), expected, capsys)


def jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (84, 84, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def class_members(classes: int, per_class: int) -> dict[str, bytes]:
    image = jpeg_bytes()
    return {f"n{c:08d}/n{c:08d}_{k:04d}.jpg": image for c in range(classes) for k in range(per_class)}


MINI_FLAGS = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--test_per_class", "2"]


def broken_zips(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each broken miniImageNet download: its folder and what the error must say."""
    cases = {}

    def case(name: str, expected: str, members: dict[str, bytes] | None = None, raw: bytes | None = None):
        root = folder / name
        root.mkdir()
        if raw is not None:
            (root / "miniImageNet.zip").write_bytes(raw)
        elif members is not None:
            write_zip(root / "miniImageNet.zip", members)
        cases[name] = (root, expected)

    case("missing", "miniImageNet not found")
    case("not_a_zip", "miniImageNet.zip", raw=b"this is an HTML error page, not a zip\n" * 20)
    write_zip(folder / "whole.zip", class_members(4, 5))
    whole = (folder / "whole.zip").read_bytes()
    case("truncated", "miniImageNet.zip", raw=whole[: len(whole) // 2])
    case("no_class_folders", "not inside a class folder", {"a.jpg": jpeg_bytes(), "b.jpg": jpeg_bytes(1)})
    case("no_images", "holds no JPEG images", {"n00000001/readme.txt": b"hello"})
    case("too_few_per_class", "has 2 images, need more than test_per_class=2",
         {**class_members(4, 5), **{k.replace("n00000003", "n00000009"): v
                                    for k, v in class_members(4, 2).items() if "n00000003" in k}})
    case("too_few_classes", "images of 3 classes", class_members(3, 5))
    case("undecodable", "n00000001/broken.jpg", {**class_members(4, 5), "n00000001/broken.jpg": b"\xff\xd8 not a jpeg"})
    return cases


@pytest.mark.parametrize("name", ["missing", "not_a_zip", "truncated", "no_class_folders", "no_images",
                                  "too_few_per_class", "too_few_classes", "undecodable"])
def test_every_data_error_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, name):
    root, expected = broken_zips(tmp_path)[name]
    check_user_error(argv_for(root, tmp_path / "out", *MINI_FLAGS), expected, capsys, benchmark="miniImageNet")


def test_missing_cifar_without_download_is_one_line_exit_2(tmp_path, capsys):
    check_user_error(argv_for(tmp_path / "empty", tmp_path / "out"), "cifar-100-python", capsys)


def test_a_script_run_never_shows_a_traceback_for_bad_input(tmp_path):
    """The same, through the real script in its own process."""
    result = run_process([sys.executable, "miniImageNet100.py", *argv_for(tmp_path, tmp_path / "out", *MINI_FLAGS)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "miniImageNet not found" in result.stderr
    assert not (tmp_path / "out").exists()


# Two fresh runs with the same seed give identical results (metrics, matrix, weights):
# tests/test_end_to_end.py::test_same_seed_same_results_bit_for_bit; and the resumed runs above
# are compared with a fresh one.


# ----------------------------------------------------------------------------- stop signals and checkpoint cadence

HEADLINE = ("acc_matrix", "acc", "bwt", "fwt")


def test_a_signal_mid_task_saves_exits_3_and_resume_gives_the_uninterrupted_results(cifar_dir, reference, tmp_path):
    """SLURM's warning signal, to a real process (SIGTERM: the in-process tests below)."""
    sig = signal.SIGUSR1
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *THREE_TASKS, "--checkpoint_minutes", "1000")  # no save but the signal's
    process = start(argv, tmp_path / "stderr.txt")
    wait_for_log_line(process, out / run_dir.LOG_FILE, "task 2 epoch 1:")  # the moment, picked from the log
    process.send_signal(sig)
    assert process.wait(timeout=300) == 3
    stderr = terminal_lines((tmp_path / "stderr.txt").read_text())
    assert f"stopped by {sig.name} in task 2" in stderr.splitlines()[-1] and "--resume" in stderr.splitlines()[-1]
    assert "Traceback" not in stderr
    assert (out / run_dir.PROGRESS_FILE).exists()
    stopped = results_of(out)
    assert stopped["complete"] is False and stopped["resumable"] is True and stopped["tasks_done"] == 1
    assert "stopped by" in (out / run_dir.LOG_FILE).read_text().splitlines()[-1]

    assert main("cifar100", argv) == 2  # still an unfinished run: --resume continues it
    assert main("cifar100", [*argv, "--resume"]) == 0
    resumed = results_of(out)
    assert {k: resumed[k] for k in HEADLINE} == {k: reference[k] for k in HEADLINE}
    assert comparable(resumed) == comparable(reference)


def test_a_stop_in_the_middle_of_an_epoch_continues_from_that_batch_bit_identically(cifar_dir, reference, tmp_path,
                                                                                      monkeypatch, capsys):
    """The signal arrives during the 5th optimizer step (task 2, epoch 1, batch 2): the step
    finishes, the epoch in progress is saved with its batch position and sums, and --resume
    continues with batch 3 of the same shuffle."""
    from sparselearning import Masking

    real_step, steps = Masking.step, []

    def step(self):
        steps.append(1)
        if len(steps) == 11:  # 9 steps per task (3 epochs x 3 batches): task 2, epoch 1, batch 2
            send_to_this_process(signal.SIGTERM)
        real_step(self)

    monkeypatch.setattr(Masking, "step", step)
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *THREE_TASKS, "--checkpoint_minutes", "1000")
    assert main("cifar100", argv) == 3
    assert "stopped by SIGTERM in task 2, epoch 1, batch 2" in capsys.readouterr().err
    progress = run_dir.load_checkpoint(out / run_dir.PROGRESS_FILE)
    assert (progress["task"], progress["epochs_done"], progress["epoch_progress"]["batches_done"]) == (1, 0, 2)
    monkeypatch.setattr(Masking, "step", real_step)

    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(reference)


SIGNAL_DURING_WRITE = """
import os, signal, sys
target = sys.argv[1]
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the file is being saved
        os.kill(os.getpid(), signal.SIGTERM)  # and a second one
    real_replace(src, dst)
os.replace = replace
from utils.entry import main
sys.exit(main("cifar100", sys.argv[2:]))
"""


def test_signals_during_a_save_leave_every_file_whole_and_the_run_resumable(cifar_dir, reference, tmp_path):
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *THREE_TASKS)
    process = start([run_dir.PROGRESS_FILE, *argv], tmp_path / "stderr.txt", driver=SIGNAL_DURING_WRITE)
    assert process.wait(timeout=300) == 3, (tmp_path / "stderr.txt").read_text()
    run_dir.load_checkpoint(out / run_dir.PROGRESS_FILE)  # whole
    assert results_of(out)["resumable"] is True
    assert main("cifar100", [*argv, "--resume"]) == 0
    assert comparable(results_of(out)) == comparable(reference)


@pytest.mark.parametrize(("minutes", "progress_saves"), [("0", 4), ("1000", 0)])
def test_the_task_in_progress_is_saved_by_epochs_and_minutes(cifar_dir, tmp_path, monkeypatch, minutes,
                                                             progress_saves):
    """--checkpoint_minutes 0: after every epoch but a task's last (2 tasks x 2); a long interval:
    only the task ends' checkpoints."""
    saves = []
    real_save = run_dir.save_checkpoint
    monkeypatch.setattr(run_dir, "save_checkpoint", lambda path, state: saves.append(path.name) or real_save(path, state))
    flags = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "3",
             "--max_batches", "2", "--batch_size", "16", "--test_per_class", "20", "--checkpoint_minutes", minutes,
             *SMALL_NET]
    assert main("cifar100", argv_for(cifar_dir, tmp_path / "run", *flags)) == 0
    assert saves.count(run_dir.PROGRESS_FILE) == progress_saves
    assert saves.count(run_dir.CHECKPOINT_FILE) == 2


def test_a_save_holds_the_kept_epoch_only_when_it_is_not_the_current_state(cifar_dir, tmp_path, monkeypatch):
    saved = []
    real_save = run_dir.save_checkpoint
    monkeypatch.setattr(run_dir, "save_checkpoint", lambda path, state: saved.append(state) or real_save(path, state))
    flags = ["--num_tasks", "1", "--num_classes", "2", "--num_classes_per_task", "2", "--epochs", "5",
             "--max_batches", "2", "--batch_size", "16", "--test_per_class", "20", "--checkpoint_minutes", "0",
             *SMALL_NET]
    assert main("cifar100", argv_for(cifar_dir, tmp_path / "run", *flags)) == 0
    progress = [state for state in saved if "epochs_done" in state]
    assert progress
    for state in progress:
        current = state["best_epoch"] == state["epochs_done"] - 1
        assert state["kept_is_current"] == current
        assert (state["kept"] is None) == current  # a copy of the current state is never saved twice


def test_a_run_saved_on_another_kind_of_device_resumes_here(cifar_dir, tmp_path, monkeypatch):
    """Files written on a GPU: their config says cuda and the mask generator's state is a CUDA
    (Philox) state of 16 bytes. Made here from a CPU run stopped in task 2, they resume on the CPU."""
    import torch

    from sparselearning import Masking

    real_step, steps = Masking.step, []

    def step(self):
        steps.append(1)
        if len(steps) == 9:  # 6 steps per task: task 2, epoch 2, batch 1
            send_to_this_process(signal.SIGTERM)
        real_step(self)

    monkeypatch.setattr(Masking, "step", step)
    out = tmp_path / "run"
    argv = argv_for(cifar_dir, out, *SPLIT, "--epochs", "3", "--max_batches", "2", "--update_frequency", "2")
    assert main("cifar100", argv) == 3
    monkeypatch.setattr(Masking, "step", real_step)
    for name in (run_dir.CHECKPOINT_FILE, run_dir.PROGRESS_FILE):
        state = run_dir.load_checkpoint(out / name)
        state["config"]["device"] = "cuda"
        if name == run_dir.PROGRESS_FILE:
            state["approach"]["generator"] = torch.arange(16, dtype=torch.uint8)  # a Philox state's size
        run_dir.save_checkpoint(out / name, state)

    assert main("cifar100", [*argv, "--resume"]) == 0
    resumed = results_of(out)
    assert resumed["complete"] is True and resumed["bwt"] == 0.0
    assert "another kind of device" in (out / run_dir.LOG_FILE).read_text()
