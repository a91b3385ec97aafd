"""scripts/sweep.sh and scripts/sweep_slurm.sh: real tiny sweeps of cifar100.py (run, skip, resume,
fail, SLURM array), the report on them, the commands they build, and the user errors they catch.

The real runs read ../shared/data when present, else a generated CIFAR-100 stand-in (as in
test_end_to_end.py). Tests of the scheduling itself (GPU pinning, runs at a time, interruption)
use a stand-in entry script that only sleeps and writes a results.json: it is a test double for
the sweep's bookkeeping, not a run.
"""

import csv
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL_NET
from tests.suite_control import run_process, start_process
from utils import report
from utils.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
SWEEP, SWEEP_SLURM = ROOT / "scripts" / "sweep.sh", ROOT / "scripts" / "sweep_slurm.sh"
GRID_ENV = ("DENSITIES", "INITS", "GROWTHS", "SEEDS", "OUT", "JOBS", "PER_GPU", "PYTHON", "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_JOB_ID", "SWEEP_SIGNAL_SECONDS", "SWEEP_TIME", "SWEEP_GPUS")


def tiny_flags(data_dir: Path, tasks: int = 2, max_batches: int = 3) -> list[str]:
    """A run of a few seconds: `tasks` tasks of 2 classes, 1 epoch of `max_batches` batches, tested
    on 2 x 16 images a task (two batches), on the narrow backbone."""
    return ["--data_dir", str(data_dir), "--no-download", "--num_tasks", str(tasks), "--num_classes", str(2 * tasks),
            "--num_classes_per_task", "2", "--epochs", "1", "--max_batches", str(max_batches), "--batch_size", "16",
            "--test_per_class", "16", "--test_batch_size", "16", "--device", "cpu", "--update_frequency", "2",
            "--task_inference", "confidence", *SMALL_NET]


def environment(**extra: str) -> dict[str, str]:
    """This environment without grid settings; no GPUs; one thread per run (runs go in parallel)."""
    env = {k: v for k, v in os.environ.items() if k not in GRID_ENV}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    return env


def run_script(script: Path, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
               timeout: float = 300) -> subprocess.CompletedProcess:
    return run_process(["bash", str(script), *map(str, args)], env=env or environment(), capture_output=True,
                       text=True, timeout=timeout, cwd=cwd)


def results(directory: Path) -> dict:
    return json.loads((directory / "results.json").read_text())


GRID = ["--densities", "0.2,0.1", "--growths", "random,unfired", "--inits", "ERK", "--seeds", "0"]
POINTS = ["ERK_random_d0.2_s0", "ERK_unfired_d0.2_s0", "ERK_random_d0.1_s0", "ERK_unfired_d0.1_s0"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cifar_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """A real 2 x 2 sweep (densities x growths), two runs at a time."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    done = run_script(SWEEP, "-j", "2", *GRID, "--out", out, "--", "cifar100.py", *tiny_flags(cifar_dir))
    return out, done


# ---- local sweep: run, skip, resume, fail ----------------------------------------------------

def test_the_sweep_runs_every_point_two_at_a_time(swept):
    out, done = swept
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "4 points" in lines[0] and "2 at a time" in lines[0]
    assert "start" in lines[1] and "start" in lines[2]  # the second starts before the first ends
    assert lines[-1].endswith("4 succeeded, 0 failed, 0 skipped (already complete)")
    assert sorted(p.name for p in out.iterdir()) == sorted([*POINTS, "logs", "sweep_flags.txt"])
    for name in POINTS:
        init, growth, density, seed = name.split("_")
        config = results(out / name)["config"]
        assert results(out / name).get("complete", True)
        assert (config["sparse_init"], config["growth"], config["density"], config["seed"]) == (
            init, growth, float(density[1:]), int(seed[1:]))
        assert config["num_tasks"] == 2 and config["epochs"] == 1 and config["max_batches"] == 3
        log = (out / "logs" / f"{name}.log").read_text()
        assert log.count("==== ") == 1 and "results written to" in log


def test_a_second_sweep_skips_every_complete_point(swept, cifar_dir):
    out, _ = swept
    again = run_script(SWEEP, "-j", "2", *GRID, "--out", out, "--", "cifar100.py", *tiny_flags(cifar_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("] skip ") == 4 and "start" not in again.stdout
    assert again.stdout.splitlines()[-1].endswith("0 succeeded, 0 failed, 4 skipped (already complete)")
    for name in POINTS:
        assert (out / "logs" / f"{name}.log").read_text().count("==== ") == 1  # not run again


def test_a_killed_run_is_resumed_by_the_next_sweep(tmp_path, cifar_dir):
    out, point = tmp_path / "sweep", tmp_path / "sweep" / "uniform_gradient_d0.1_s0"
    args = ["--densities", "0.1", "--growths", "gradient", "--inits", "uniform", "--out", out, "--",
            "cifar100.py", *tiny_flags(cifar_dir, tasks=3, max_batches=4)]
    first = start_process(["bash", str(SWEEP), *map(str, args)], env=environment(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (point / "checkpoint.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its run, as if the machine went down
        first.wait()
    assert (point / "checkpoint.pt").exists() and not (point / "results.json").exists()

    second = run_script(SWEEP, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resume   uniform_gradient_d0.1_s0" in second.stdout
    assert second.stdout.splitlines()[-1].endswith("1 succeeded, 0 failed, 0 skipped (already complete)")
    log = (out / "logs" / "uniform_gradient_d0.1_s0.log").read_text()
    assert log.count("==== ") == 2 and "resuming" in log.split("==== ")[-1]
    finished = results(point)
    assert len(finished["acc_matrix"]) == 3 and len(finished["per_task"]) == 3


def test_a_failing_run_fails_the_sweep_and_is_listed(tmp_path, cifar_dir):
    out = tmp_path / "sweep"
    flags = tiny_flags(cifar_dir)
    flags[flags.index("--data_dir") + 1] = str(tmp_path / "no_data_here")
    done = run_script(SWEEP, "--densities", "0.2", "--growths", "random", "--inits", "ERK", "--out", out,
                      "--", "cifar100.py", *flags)
    assert done.returncode == 1
    assert "FAILED   ERK_random_d0.2_s0" in done.stdout
    assert done.stdout.splitlines()[-2].endswith("0 succeeded, 1 failed, 0 skipped (already complete)")
    assert done.stdout.splitlines()[-1].startswith("failed: ERK_random_d0.2_s0 (exit 2, log: ")
    assert "error:" in (out / "logs" / "ERK_random_d0.2_s0.log").read_text()


def test_a_run_that_stopped_early_counts_as_failed_and_is_retried_only_on_request(tmp_path):
    out = tmp_path / "sweep"
    (out / "ERK_random_d0.2_s0").mkdir(parents=True)
    (out / "ERK_random_d0.2_s0" / "results.json").write_text('{"config": {}, "complete": false}')
    grid = ["--densities", "0.2", "--growths", "random", "--inits", "ERK", "--out", out]
    done = run_script(SWEEP, *grid, "--", "cifar100.py")
    assert done.returncode == 1 and "stopped early" in done.stdout
    assert not (out / "logs").exists()  # not run
    retry = run_script(SWEEP, *grid, "--retry-failed", "--dry-run", "--", "cifar100.py")
    assert retry.returncode == 0
    command = shlex.split(retry.stdout.splitlines()[1].split(": ", 1)[1])
    assert command[-1] == "--overwrite" and "--resume" not in command


# ---- SLURM array -----------------------------------------------------------------------------

def test_each_slurm_array_task_runs_its_point_as_the_local_sweep_does(swept, tmp_path, cifar_dir):
    local, _ = swept
    out = tmp_path / "array"
    args = ["--densities", "0.2", "--growths", "random,unfired", "--inits", "ERK", "--out", out, "--",
            "cifar100.py", *tiny_flags(cifar_dir)]
    shutil.copytree(local / POINTS[0], out / POINTS[0])  # point 0 is complete: its task skips it
    skipped = run_script(SWEEP_SLURM, *args, env=environment(SLURM_ARRAY_TASK_ID="0"))
    assert skipped.returncode == 0 and f"point 0 {POINTS[0]}: skip (complete)" in skipped.stdout
    assert not (out / "logs").exists()
    done = run_script(SWEEP_SLURM, *args, env=environment(SLURM_ARRAY_TASK_ID="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"point 1 {POINTS[1]}: done" in done.stdout
    assert "results written to" in (out / "logs" / f"{POINTS[1]}.log").read_text()
    # the same settings and seed as the local sweep's point: the same numbers, bit for bit
    assert results(out / POINTS[1])["acc_matrix"] == results(local / POINTS[1])["acc_matrix"]
    outside = run_script(SWEEP_SLURM, *args, env=environment(SLURM_ARRAY_TASK_ID="2"))
    assert outside.returncode == 2 and "outside the grid (0-1)" in outside.stderr


def test_slurm_dry_run_prints_the_sbatch_command_and_the_grid(tmp_path):
    out = tmp_path / "array"
    done = run_script(SWEEP_SLURM, "--dry-run", "--partition", "gpu-a100", "--gpus", "2", "--time", "12:00:00",
                      "--max-running", "3", "--sbatch-arg=--account=cl", *GRID, "--out", out,
                      "--", "cifar100.py", "--epochs", "25", env=environment(SWEEP_MEM="32G"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    sbatch = shlex.split(lines[0])
    assert sbatch[0] == "sbatch" and "--array=0-3%3" in sbatch
    for option in ("--partition=gpu-a100", "--gres=gpu:2", "--time=12:00:00", "--mem=32G", "--account=cl",
                   "--signal=B:USR1@120", "--requeue", "--open-mode=append"):
        assert option in sbatch
    script_at = sbatch.index(str(SWEEP_SLURM))
    assert sbatch[script_at + 1:] == ["--signal-seconds", "120", "--per-gpu", "1", "--densities", "0.2,0.1",
                                      "--inits", "ERK", "--growths", "random,unfired", "--seeds", "0", "--out",
                                      str(out), "--", str(ROOT / "cifar100.py"), "--epochs", "25"]
    assert lines[1] == "on USR1 (120 s before the time limit) a run saves and the array task requeues itself"
    assert lines[2].startswith("grid: 4 points")
    assert [line.split()[:3] for line in lines[3:]] == [[str(i), "new", f"{name}:"] for i, name in enumerate(POINTS)]
    assert not out.exists()  # a dry run creates nothing


@pytest.mark.parametrize(("options", "env", "seconds"), [
    (["--signal-seconds", "300"], {}, 300),
    ([], {"SWEEP_SIGNAL_SECONDS": "45"}, 45),
    (["--signal-seconds=600"], {"SWEEP_SIGNAL_SECONDS": "45"}, 600),  # the option wins
    (["--signal-seconds", "0"], {}, 0),
    ([], {"SWEEP_SIGNAL_SECONDS": "0"}, 0),
])
def test_slurm_warning_signal_seconds_from_option_or_environment(tmp_path, options, env, seconds):
    done = run_script(SWEEP_SLURM, "--dry-run", *options, *GRID, "--out", tmp_path / "o", "--", "cifar100.py",
                      env=environment(**env))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    sbatch = shlex.split(lines[0])
    assert sbatch[sbatch.index(str(SWEEP_SLURM)) + 1:][:2] == ["--signal-seconds", str(seconds)]  # for the tasks
    if seconds:
        assert f"--signal=B:USR1@{seconds}" in sbatch and "--requeue" in sbatch
        assert lines[1] == f"on USR1 ({seconds} s before the time limit) a run saves and the array task requeues itself"
    else:
        assert not any(word.startswith(("--signal=", "--requeue", "--open-mode")) for word in sbatch)
        assert lines[1].startswith("no warning signal (--signal-seconds 0)")


@pytest.mark.parametrize(("options", "env"), [(["--per-gpu", "3"], {}), ([], {"PER_GPU": "3"}),
                                              (["--per-gpu", "3"], {"PER_GPU": "1"})])  # the option wins
def test_slurm_per_gpu_packs_k_points_into_each_array_task(tmp_path, options, env):
    out = tmp_path / "array"
    grid = ["--densities", "0.2,0.1,0.05", "--growths", "random,unfired", "--inits", "ERK", "--out", str(out)]
    done = run_script(SWEEP_SLURM, "--dry-run", *options, *grid, "--", "cifar100.py", env=environment(**env))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    sbatch = shlex.split(lines[0])
    assert "--array=0-1" in sbatch and "--gres=gpu:1" in sbatch  # 6 points, 3 per task: 2 tasks
    assert sbatch[sbatch.index(str(SWEEP_SLURM)) + 1:][:4] == ["--signal-seconds", "120", "--per-gpu", "3"]
    assert lines[1] == "on USR1 (120 s before the time limit) each of its runs saves and the array task requeues itself"
    assert lines[2] == ("2 array tasks, up to 3 points each at the same time on the task's one GPU: "
                        "task 0: points 0,1,2; task 1: points 3,4,5")
    assert lines[3].startswith("grid: 6 points") and len(lines) == 4 + 6
    five = run_script(SWEEP_SLURM, "--dry-run", "--per-gpu", "2", *grid[:1], "0.2,0.1", *grid[2:], "--seeds", "0",
                      "--growths", "random,unfired,gradient,momentum,gradient", "--", "cifar100.py")
    assert five.returncode == 0 and "--array=0-4" in five.stdout.splitlines()[0]  # 10 points, 2 per task
    assert five.stdout.splitlines()[2].endswith("task 3: points 6,7; task 4: points 8,9")


def test_slurm_submission_without_sbatch_is_a_user_error(tmp_path):
    if shutil.which("sbatch"):
        pytest.skip("sbatch is installed here")
    done = run_script(SWEEP_SLURM, *GRID, "--out", tmp_path / "x", "--", "cifar100.py")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "sbatch not found" in done.stderr


# ---- the report on the real sweep ------------------------------------------------------------

def test_the_report_tables_the_sweep(swept, tmp_path, capsys):
    out, _ = swept
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("| ")]
    # the task-aware table, the task-agnostic one (tiny_flags: --task_inference), the backbone used, the FLOPs
    assert len(tables) == 4
    for line, growth in zip(tables[3][2:], ("random", "unfired")):
        train = [100 * results(out / f"ERK_{growth}_d{d}_s0")["train_flops_fraction"] for d in ("0.2", "0.1")]
        assert line.startswith(f"| ERK + {growth} | {train[0]:.1f} / ") and f"| {train[1]:.1f} / " in line
    for line, growth in zip(tables[2][2:], ("random", "unfired")):
        used = [100 * results(out / f"ERK_{growth}_d{d}_s0")["per_task"][-1]["capacity_used"] for d in ("0.2", "0.1")]
        assert line == f"| ERK + {growth} | {used[0]:.2f} (n=1) | {used[1]:.2f} (n=1) |"
    for table, metric in zip(tables, ("acc", "acc_agnostic")):
        assert table[0] == "| init + growth | 80 % | 90 % | BWT |" and len(table) == 4  # header, rule, 2 rows
        for line, growth in zip(table[2:], ("random", "unfired")):
            accs = [results(out / f"ERK_{growth}_d{d}_s0")[metric] for d in ("0.2", "0.1")]
            assert line.startswith(f"| ERK + {growth} | {accs[0]:.2f} (n=1) | {accs[1]:.2f} (n=1) | ")
    assert tables[0][2].endswith(" | 0.00 ± 0.00 |")  # isolation: no forgetting when the task id is given
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert sorted(Path(row["run"]).name for row in rows) == sorted(POINTS)
    assert {row["status"] for row in rows} == {"complete"}
    if report.load_pyplot() is not None:
        assert len(list((tmp_path / "figures" / "acc_matrix").glob("*.png"))) == 4


# ---- commands, scheduling and user errors (no real runs) -------------------------------------

def commands(stdout: str) -> list[list[str]]:
    """The commands of a --dry-run listing."""
    return [shlex.split(line.split(": ", 1)[1]) for line in stdout.splitlines()[1:]]


def test_every_command_of_the_grid_parses_to_its_point(tmp_path):
    done = run_script(SWEEP, "--dry-run", "--seeds", "0,1", "--out", tmp_path, "--", "cifar100.py",
                      "--num_tasks", "5", "--num_classes", "100", "--num_classes_per_task", "20",
                      "--update_frequency", "100", env=environment(DENSITIES="0.2,0.1,0.05", INITS="ERK"),
                      cwd=tmp_path)  # the entry script is found in the project root
    assert done.returncode == 0, done.stderr
    configs = [parse_config(argv[2:], "cifar100") for argv in commands(done.stdout)]
    assert all(argv[:2] == [sys.executable, str(ROOT / "cifar100.py")] for argv in commands(done.stdout))
    assert len(configs) == 3 * 1 * 4 * 2
    assert {(c.density, c.sparse_init, c.growth, c.seed) for c in configs} == {
        (d, "ERK", g, s) for d in (0.2, 0.1, 0.05) for g in ("random", "unfired", "momentum", "gradient")
        for s in (0, 1)}
    assert {(c.num_tasks, c.update_frequency) for c in configs} == {(5, 100)}
    assert all(c.resume and c.output_dir.parent == tmp_path for c in configs)
    assert len({c.output_dir for c in configs}) == len(configs)
    assert [c.seed for c in configs] == [0] * 12 + [1] * 12  # seeds vary slowest


def test_the_default_sweep_folder_names_the_script_and_the_tasks():
    done = run_script(SWEEP, "--dry-run", "--densities", "0.2", "--growths", "random", "--inits", "ERK",
                      "--", "miniImageNet100.py", "--num_tasks=10", env=environment(INITS="uniform", SEEDS="4"))
    assert done.stdout.count("\n") == 2  # the header and one point: options override the environment
    assert "--output_dir runs/sweep-miniImageNet100-10tasks/ERK_random_d0.2_s4 --resume" in done.stdout


FAKE_ENTRY = '''"""Test double of an entry script: writes its pid, sleeps, records its GPU and arguments."""
import json, os, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
start = time.time()
time.sleep(float(os.environ["FAKE_SECONDS"]))
record = {"start": start, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv}
json.dump(record, open(os.path.join(out, "results.json"), "w"))
'''


@pytest.fixture
def fake_entry(tmp_path) -> Path:
    path = tmp_path / "fake_entry.py"
    path.write_text(FAKE_ENTRY)
    return path


def fake_gpus(tmp_path: Path, count: int) -> str:
    """A PATH whose nvidia-smi lists `count` GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    listing = "".join(f"GPU {i}: Fake GPU (UUID: GPU-{i})\\n" for i in range(count))
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\nprintf "{listing}"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def max_overlap(records: list[dict]) -> int:
    """The largest number of runs that were running at the same moment."""
    return max(sum(r["start"] <= s["start"] < r["end"] for r in records) for s in records)


@pytest.mark.parametrize("visible,expected_gpus", [(None, {"0", "1"}), ("3,5", {"3", "5"})])
def test_one_run_per_gpu_each_pinned_to_its_gpu(tmp_path, fake_entry, visible, expected_gpus):
    env = environment(PATH=fake_gpus(tmp_path, 2), FAKE_SECONDS="1.5")
    if visible is None:
        del env["CUDA_VISIBLE_DEVICES"]  # detect with nvidia-smi
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible
    done = run_script(SWEEP, *GRID, "--out", tmp_path / "out", "--", fake_entry, env=env)
    assert done.returncode == 0, done.stderr
    assert "2 at a time" in done.stdout
    records = [results(tmp_path / "out" / name) for name in POINTS]
    assert {r["gpu"] for r in records} == expected_gpus
    assert max_overlap(records) == 2
    for r in records:  # the runs at the same time are on different GPUs
        assert all(s["gpu"] != r["gpu"] for s in records if s is not r and r["start"] <= s["start"] < r["end"])


@pytest.mark.parametrize(("options", "env", "slots"), [
    (["--per-gpu", "1"], {}, "2 runs at a time: slot 0 on GPU 0, slot 1 on GPU 1"),
    (["--per-gpu", "2"], {}, "4 runs at a time: slots 0,2 on GPU 0, slots 1,3 on GPU 1"),
    (["--per-gpu=3"], {}, "6 runs at a time: slots 0,2,4 on GPU 0, slots 1,3,5 on GPU 1"),
    ([], {"PER_GPU": "2"}, "4 runs at a time: slots 0,2 on GPU 0, slots 1,3 on GPU 1"),
    (["--per-gpu", "2"], {"PER_GPU": "5"}, "4 runs at a time: slots 0,2 on GPU 0, slots 1,3 on GPU 1"),
    (["--per-gpu", "2", "-j", "3"], {}, "3 runs at a time: slots 0,2 on GPU 0, slot 1 on GPU 1"),  # -j wins
    (["--per-gpu", "2"], {"JOBS": "1"}, "1 run at a time: slot 0 on GPU 0"),
])
def test_per_gpu_packs_k_runs_on_each_gpu_in_the_dry_run(tmp_path, options, env, slots):
    env = environment(PATH=fake_gpus(tmp_path, 2), **env)
    del env["CUDA_VISIBLE_DEVICES"]  # the two GPUs of the fake nvidia-smi -L
    done = run_script(SWEEP, *options, "--dry-run", *GRID, "--out", tmp_path / "out", "--", "cifar100.py", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(f"{slots.split()[0]} at a time, GPUs 0,1") and lines[1] == slots
    assert [line.split()[:3] for line in lines[2:]] == [[f"[{i + 1}/4]", "new", f"{name}:"]
                                                        for i, name in enumerate(POINTS)]
    assert not (tmp_path / "out").exists()


def test_per_gpu_runs_k_at_once_on_each_gpu_each_pinned(tmp_path, fake_entry):
    grid = ["--densities", "0.2,0.1,0.05", "--growths", "random,unfired", "--inits", "ERK"]  # 6 points
    env = environment(PATH=fake_gpus(tmp_path, 2), FAKE_SECONDS="1.5")
    del env["CUDA_VISIBLE_DEVICES"]
    done = run_script(SWEEP, "--per-gpu", "2", *grid, "--out", tmp_path / "out", "--", fake_entry, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[1] == "4 runs at a time: slots 0,2 on GPU 0, slots 1,3 on GPU 1"
    names = [f"ERK_{g}_d{d}_s0" for d in ("0.2", "0.1", "0.05") for g in ("random", "unfired")]
    records = {name: results(tmp_path / "out" / name) for name in names}
    for name, record in records.items():  # each run saw the GPU the sweep says it started it on
        assert f" {name} on GPU {record['gpu']} (log: " in done.stdout
    by_gpu = {gpu: [r for r in records.values() if r["gpu"] == gpu] for gpu in ("0", "1")}
    assert sum(map(len, by_gpu.values())) == 6
    assert max_overlap(list(records.values())) == 4
    assert max(max_overlap(runs) for runs in by_gpu.values() if runs) == 2  # never more than K on one GPU


def test_without_gpus_one_run_at_a_time_unless_told(tmp_path, fake_entry):
    done = run_script(SWEEP, *GRID, "--out", tmp_path / "out", "--", fake_entry,
                      env=environment(FAKE_SECONDS="0.3"))
    assert done.returncode == 0 and "1 at a time, no GPU" in done.stdout
    records = [results(tmp_path / "out" / name) for name in POINTS]
    assert max_overlap(records) == 1 and {r["gpu"] for r in records} == {""}
    done = run_script(SWEEP, *GRID, "--out", tmp_path / "out3", "--", fake_entry,
                      env=environment(FAKE_SECONDS="1.5", JOBS="3"))
    assert done.returncode == 0 and max_overlap([results(tmp_path / "out3" / n) for n in POINTS]) == 3


def test_a_sweep_folder_refuses_other_flags_for_every_run(tmp_path, fake_entry):
    out, env = tmp_path / "out", environment(FAKE_SECONDS="0")
    assert run_script(SWEEP, *GRID, "--out", out, "--", fake_entry, "--epochs", "5", env=env).returncode == 0
    done = run_script(SWEEP, *GRID, "--out", out, "--", fake_entry, "--epochs", "6", env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"{out} was swept with other flags (fake_entry.py --epochs 5)" in done.stderr
    slurm = run_script(SWEEP_SLURM, *GRID, "--out", out, "--dry-run", "--", fake_entry, "--epochs", "6", env=env)
    assert slurm.returncode == 2 and "was swept with other flags" in slurm.stderr
    again = run_script(SWEEP, *GRID, "--out", out, "--", fake_entry, "--epochs", "5", env=env)
    assert again.returncode == 0 and "4 skipped" in again.stdout


def test_an_interrupted_sweep_stops_its_runs(tmp_path, fake_entry):
    out = tmp_path / "out"
    sweep = start_process(["bash", str(SWEEP), "-j", "2", *GRID, "--out", str(out), "--", str(fake_entry)],
                          env=environment(FAKE_SECONDS="60"), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid_files = [out / name / "pid" for name in POINTS[:2]]
    deadline = time.monotonic() + 30
    while not all(p.exists() and p.read_text() for p in pid_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    stdout, _ = sweep.communicate(timeout=30)
    assert sweep.returncode == 130
    assert "0 succeeded, 0 failed, 0 skipped" in stdout
    assert "interrupted: stopped 2 run(s) (ERK_random_d0.2_s0 ERK_unfired_d0.2_s0)" in stdout
    for path in pid_files:
        stat = Path(f"/proc/{path.read_text()}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"  # gone (or a zombie)


@pytest.mark.parametrize("args", [
    ["--bogus", "--", "cifar100.py"],
    ["cifar100.py"],
    ["--densities", "0.2"],
    ["--"],
    ["--", "--num_tasks", "2"],
    ["-j", "0", "--", "cifar100.py"],
    ["-j", "two", "--", "cifar100.py"],
    ["--per-gpu", "0", "--", "cifar100.py"],
    ["--per-gpu", "two", "--", "cifar100.py"],
    ["--per-gpu", "-1", "--", "cifar100.py"],
    ["--per-gpu", "1.5", "--", "cifar100.py"],
    ["--per-gpu"],
    ["--per-gpu", "2", "--", "cifar100.py"],  # no GPU here: nothing to pack
    ["-j"],
    ["--out"],
    ["--densities", "--", "cifar100.py"],
    ["--inits", "ERK,bogus", "--", "cifar100.py"],
    ["--densities", "0.2,high", "--", "cifar100.py"],
    ["--", "cifar100.py", "--seed", "3"],
    ["--", "cifar100.py", "--output_dir=x"],
    ["--", "no_such_script.py"],
])
def test_a_usage_mistake_is_one_line_and_exit_2(args):
    done = run_script(SWEEP, *args)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith("sweep.sh: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "x", "--", "cifar100.py"], "--gpus needs a number"),
    (["--per-gpu", "0", "--", "cifar100.py"], "--per-gpu needs a whole number of runs per GPU >= 1, got '0'"),
    (["--per-gpu", "many", "--", "cifar100.py"], "--per-gpu needs a whole number"),
    (["--per-gpu", "2", "--gpus", "2", "--", "cifar100.py"], "it needs --gpus 1, got --gpus 2"),
    (["--per-gpu", "2", "--gpus", "0", "--", "cifar100.py"], "it needs --gpus 1, got --gpus 0"),
    (["--", "cifar100.py", "--resume"], "--resume is set by the sweep"),
    (["--partition"], "--partition needs a value"),
    (["-j", "2", "--", "cifar100.py"], "unknown option '-j'"),
    (["--signal-seconds", "soon", "--", "cifar100.py"], "--signal-seconds needs a number of seconds from 0 to 65535"),
    (["--signal-seconds", "65536", "--", "cifar100.py"], "from 0 to 65535 (SLURM's limit), got '65536'"),
    (["--signal-seconds", "-5", "--", "cifar100.py"], "--signal-seconds needs a number"),
    (["--time", "2", "--", "cifar100.py"], "--signal-seconds 120 is not shorter than --time 2 (120 s)"),
    (["--time", "1:30", "--", "cifar100.py"], "--signal-seconds 120 is not shorter than --time 1:30 (90 s)"),
    (["--time", "0-0:02", "--", "cifar100.py"], "not shorter than --time 0-0:02 (120 s)"),
    (["--time", "1:00:00", "--signal-seconds", "3600", "--", "cifar100.py"], "not shorter than --time 1:00:00 (3600 s)"),
])
def test_a_slurm_usage_mistake_is_one_line_and_exit_2(args, message):
    done = run_script(SWEEP_SLURM, "--dry-run", *args)
    assert done.returncode == 2 and done.stderr.startswith("sweep_slurm.sh: ") and done.stderr.count("\n") == 1
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("limit", ["3", "2:01", "0:2:01", "0-0:03", "1-0", "1-0:0:0", "UNLIMITED"])
def test_a_time_limit_longer_than_the_warning_is_accepted(tmp_path, limit):
    done = run_script(SWEEP_SLURM, "--dry-run", "--time", limit, *GRID, "--out", tmp_path / "o", "--", "cifar100.py")
    assert done.returncode == 0, done.stderr
    assert f"--time={limit}" in shlex.split(done.stdout.splitlines()[0])


# ---- SLURM time limits: the warning signal, exit code 3, requeue ------------------------------

STOPPABLE_ENTRY = '''"""Test double of an entry script that saves and exits 3 on SIGUSR1, as a run does on a signal."""
import os, signal, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
def stop(signum, frame):
    open(os.path.join(out, "signal"), "w").write(str(signum))
    sys.exit(3)
signal.signal(signal.SIGUSR1, stop)
open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
if "FAKE_EXIT" in os.environ:
    sys.exit(int(os.environ["FAKE_EXIT"]))
time.sleep(60)
sys.exit(0)
'''
ONE_POINT = ["--densities", "0.2", "--growths", "random", "--inits", "ERK"]


@pytest.fixture
def array_task(tmp_path) -> tuple[list[str], Path, Path]:
    """(arguments of a one-point sweep of the stoppable entry, its run directory, the file where a
    fake scontrol on PATH records its arguments, one call a line)."""
    entry, calls = tmp_path / "stoppable_entry.py", tmp_path / "scontrol_calls"
    entry.write_text(STOPPABLE_ENTRY)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >>{shlex.quote(str(calls))}\n')
    (bin_dir / "scontrol").chmod(0o755)
    args = [*ONE_POINT, "--out", str(tmp_path / "out"), "--", str(entry)]
    return args, tmp_path / "out" / "ERK_random_d0.2_s0", calls


def task_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Array task 0 of SLURM job 4242, with the fake scontrol first on PATH."""
    return environment(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_ARRAY_JOB_ID="4242",
                       SLURM_ARRAY_TASK_ID="0", **extra)


def test_a_run_stopped_by_a_signal_requeues_its_array_task(tmp_path, array_task):
    args, point, calls = array_task
    done = run_script(SWEEP_SLURM, *args, env=task_environment(tmp_path, FAKE_EXIT="3"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls.read_text() == "requeue 4242_0\n"  # ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    assert "stopped by a signal, saved (exit 3); requeueing array task 4242_0" in done.stdout


@pytest.mark.parametrize("code", [0, 1, 2, 130])
def test_other_exit_codes_do_not_requeue(tmp_path, array_task, code):
    args, point, calls = array_task
    done = run_script(SWEEP_SLURM, *args, env=task_environment(tmp_path, FAKE_EXIT=str(code)))
    assert done.returncode == code and (point / "pid").exists()
    assert not calls.exists()


@pytest.mark.parametrize("how", ["--signal-seconds 0", "by hand"])
def test_without_the_warning_signal_or_outside_slurm_exit_3_is_not_requeued(tmp_path, array_task, how):
    args, point, calls = array_task
    env = task_environment(tmp_path, FAKE_EXIT="3")
    if how == "by hand":
        del env["SLURM_ARRAY_JOB_ID"]
    done = run_script(SWEEP_SLURM, *(["--signal-seconds", "0"] if how != "by hand" else []), *args, env=env)
    assert done.returncode == 3 and not calls.exists()
    assert "stopped by a signal, saved (exit 3); the same command (or submitting the array again) continues it" \
        in done.stdout


def test_usr1_to_the_batch_shell_reaches_the_run_which_saves_and_requeues(tmp_path, array_task):
    args, point, calls = array_task
    shell = start_process(["bash", str(SWEEP_SLURM), *args], env=task_environment(tmp_path), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ((point / "pid").exists() and (point / "pid").read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        shell.send_signal(signal.SIGUSR1)  # as sbatch --signal=B:USR1@120 does: to the batch shell only
        stdout, stderr = shell.communicate(timeout=30)
    finally:
        shell.kill()
    assert (point / "signal").read_text() == str(int(signal.SIGUSR1))  # the run got it
    assert shell.returncode == 0, stdout + stderr
    assert "USR1 (the time limit is near): asking the run to save and stop" in stdout
    assert calls.read_text() == "requeue 4242_0\n"


def packed(args: list[str], k: int = 2) -> list[str]:
    """The one-point sweep `args` as a sweep of two points (growths random, unfired), k per array task."""
    return ["--per-gpu", str(k), *args[:args.index("--")], "--growths", "random,unfired", *args[args.index("--"):]]


def test_a_packed_array_task_forwards_usr1_to_every_run_and_requeues_once(tmp_path, array_task):
    args, point, calls = array_task
    points = [point, point.parent / "ERK_unfired_d0.2_s0"]
    shell = start_process(["bash", str(SWEEP_SLURM), *packed(args)], env=task_environment(tmp_path), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all((p / "pid").exists() and (p / "pid").read_text() for p in points) \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # both points of task 0 run at the same time
        shell.send_signal(signal.SIGUSR1)
        stdout, stderr = shell.communicate(timeout=30)
    finally:
        shell.kill()
    assert shell.returncode == 0, stdout + stderr
    assert all((p / "signal").read_text() == str(int(signal.SIGUSR1)) for p in points)  # both runs got it
    assert stdout.count("USR1 (the time limit is near): asking the run to save and stop") == 2
    assert calls.read_text() == "requeue 4242_0\n"  # one requeue for the task, after both saved
    assert ("points 0 ERK_random_d0.2_s0, 1 ERK_unfired_d0.2_s0: stopped by a signal, saved (exit 3); "
            "requeueing array task 4242_0 to continue them") in stdout


@pytest.mark.parametrize("other", ["complete", "failed"])
def test_a_packed_array_task_skips_complete_points_and_fails_on_a_failed_one(tmp_path, array_task, other):
    args, point, calls = array_task
    second = point.parent / "ERK_unfired_d0.2_s0"  # point 1: complete, or stopped early (failed)
    second.mkdir(parents=True)
    (second / "results.json").write_text('{"config": {}}' if other == "complete" else '{"complete": false}')
    done = run_script(SWEEP_SLURM, *packed(args), env=task_environment(tmp_path, FAKE_EXIT="3"))
    assert (point / "pid").exists() and not (second / "pid").exists()  # point 1 is not run
    assert calls.read_text() == "requeue 4242_0\n"  # point 0 was stopped: the task is requeued anyway
    assert "point 0 ERK_random_d0.2_s0: stopped by a signal, saved (exit 3); requeueing" in done.stdout
    if other == "complete":
        assert done.returncode == 0 and "point 1 ERK_unfired_d0.2_s0: skip (complete)" in done.stdout
    else:  # a failed point fails the task, requeued or not
        assert done.returncode == 1 and "point 1 ERK_unfired_d0.2_s0: FAILED" in done.stdout
    env = task_environment(tmp_path)
    env["SLURM_ARRAY_TASK_ID"] = "1"  # 2 points, 2 per task: task 0 only
    outside = run_script(SWEEP_SLURM, *packed(args), env=env)
    assert outside.returncode == 2 and "outside the grid (0-0: array tasks of 2 points each)" in outside.stderr


def test_the_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh"))
    done = run_process([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout


STOPPING_ENTRY = '''"""Test double of an entry script stopped by a signal: saves nothing, exits 3 (resumable)."""
import os, sys
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "config.json"), "w").write("{}")
sys.exit(3)
'''


def test_a_run_stopped_by_a_signal_is_not_a_failure_and_the_next_sweep_resumes_it(tmp_path):
    entry = tmp_path / "stopping_entry.py"
    entry.write_text(STOPPING_ENTRY)
    out = tmp_path / "out"
    done = run_script(SWEEP, *GRID, "--out", out, "--", entry, env=environment())
    assert done.returncode == 3, done.stdout + done.stderr
    assert "0 succeeded, 0 failed" in done.stdout and done.stdout.count("stopped by a signal, saved:") == 4
    dry = run_script(SWEEP, *GRID, "--out", out, "--dry-run", "--", entry, env=environment())
    assert dry.stdout.count("--resume") == 4  # unfinished: resumed next time
