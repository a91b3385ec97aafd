"""A named study end to end: the grid, the baselines, the report, the figures and the findings.

    python -m utils.study PRESET [--out DIR] [--data_dir DIR] [--device D] [-j N] [--dry-run]

    python -m utils.study cpu --data_dir ../shared/data     # the CPU study (results/cpu-study)
    python -m utils.study paper --dry-run                   # what the paper's grids would cost here

A study is one or more benchmarks (an entry script with its flags), each run as four sweeps of
`scripts/sweep.sh` into `<out>/<benchmark>/`:

- `grid/`: densities x inits x growths x seeds, isolated dynamic sparse training (the paper);
- `static/`: static sparse (`--update_frequency 0`) per init and density;
- `finetune/`: sparse fine-tuning (`--no-isolate`) per init and density, random growth;
- `dense/`: dense fine-tuning (`--no-sparse`) per seed;
- `<approach>/`: each other approach of the study (`--approach`: WSN, PackNet, SupSup) at the
  grid's densities with its init, per seed;
- `adaptive-<policy>/`: each adaptive-DST policy of the study (`--erk_power auto`,
  `--growth_later`, `--turnover_stop`) at the grid's densities, per seed;

then `python -m utils.report` and `python -m utils.findings` on `<out>` (report.md, report.csv,
figures/, findings.md, findings.json). Run the same command again and it continues where it
stopped: each sweep skips its complete runs and resumes the others. `--dry-run` prints every
sweep's runs and an estimate of the time, from the cost of a training step and of a test batch
measured now on the chosen device (seconds); it runs nothing else. `study.json` in `<out>`
records the preset, the commands, the commit, torch, the machine and the wall time: the time during
which at least one of the study's runs was working, read from the runs' logs, so that a study run in
several sittings (stopped and continued) counts each sitting and none of the pauses between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from utils import run_dir
from utils.cli import OneLineParser
from utils.errors import UserError
from utils.run_dir import write_text

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "scripts" / "sweep.sh"
STARTUP_SECONDS = 6.0  # a run's process start, data reading and model set-up
TASK_SECONDS = 2.5  # per task: its set-up, topology updates, saves. Both measured on the CPU study's
# 2-core VM: a run of the cpu preset took 108 s, where its training steps and test batches timed
# alone account for 82 s.
FULL_TRAIN_PER_CLASS = {"cifar100.py": 500, "miniImageNet100.py": 500}  # the full datasets (600 a class, 100 test)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One entry script and the flags every run of it gets."""

    name: str
    script: str
    flags: tuple[str, ...]

    def flag(self, name: str, default: str) -> str:
        flags = list(self.flags)
        return flags[flags.index(name) + 1] if name in flags else default


@dataclasses.dataclass(frozen=True)
class Study:
    """A preset: benchmarks, the grid's axes and seeds, and what it is for."""

    name: str
    about: str
    benchmarks: tuple[Benchmark, ...]
    densities: tuple[str, ...] = ("0.2", "0.1", "0.05")
    inits: tuple[str, ...] = ("ERK", "uniform")
    growths: tuple[str, ...] = ("random", "unfired", "momentum", "gradient")
    seeds: tuple[str, ...] = ("0", "1", "2")
    finetune_inits: tuple[str, ...] = ("ERK", "uniform")
    baseline_densities: tuple[str, ...] | None = None  # of static and fine-tuning (default: the grid's)
    # The other approaches and the init each runs with: WSN's own rule is the top fraction of every
    # layer (uniform), PackNet prunes every layer by the same fraction (uniform); SupSup uniform too,
    # as ERK keeps the smallest layers whole, where a supermask learns nothing (utils/approaches/supsup.py).
    peers: tuple[tuple[str, str], ...] = (("wsn", "uniform"), ("packnet", "uniform"), ("supsup", "uniform"))
    # Adaptive DST's policies: (name, init, growth, flags), each on ERK + momentum (or unfired, which
    # hands over to momentum), the strongest fixed setting of the cpu study's first runs, so that a
    # policy is compared with what it modifies. The turnover threshold 0.1 ends a task's updates after
    # its 4th or 5th of 6 in the cpu preset (the death rate is 0.17 at the 4th, 0.07 at the 5th).
    adaptive: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
        ("power", "ERK", "momentum", ("--erk_power", "auto")),
        ("mix", "ERK", "unfired", ("--growth_later", "momentum")),
        ("stop", "ERK", "momentum", ("--turnover_stop", "0.1")),
    )
    jobs: int = 1


def _cifar(tasks: int, per_task: int, *flags: str) -> tuple[str, ...]:
    return ("--num_tasks", str(tasks), "--num_classes", str(tasks * per_task), "--num_classes_per_task",
            str(per_task), *flags)


PRESETS: dict[str, Study] = {study.name: study for study in (
    Study("tiny", "seconds on stand-in data: the whole path on the narrow backbone, for the tests",
          (Benchmark("cifar100_2tasks", "cifar100.py",
                     _cifar(2, 2, "--epochs", "1", "--train_per_class", "8", "--test_per_class", "4",
                                "--batch_size", "8", "--update_frequency", "1", "--task_inference", "calibrated",
                                "--net_width", "8")),),
          densities=("0.2",), growths=("random",), seeds=("0",), finetune_inits=("ERK",), peers=(("wsn", "uniform"),),
          adaptive=(("mix", "ERK", "random", ("--growth_later", "momentum")),), jobs=2),
    # The cpu preset's scale, chosen by measurement on a 2-core VM: a run (10 tasks, 40 training and
    # 20 test images a class, 2 epochs of batches of 32: 26 steps a task, a topology update every 4,
    # so 6 a task; calibrated task inference) took 108 s alone with 2 threads, and learns well above
    # chance (ACC 20-36 %, chance 10 %). The study itself, two runs at a time with one thread each:
    # 185-240 s a run on the quiet VM, so the paper's 102 runs in about 2.9 hours and all 156 in about
    # 4.5 (measured wall time 6 h 40 min on a VM shared with development: results/cpu-study).
    Study("cpu", "the paper's 10-task CIFAR-100 split on the bundled subset (40 training and 20 test images a "
                 "class, 2 epochs): every grid cell x 3 seeds, the baselines, the other approaches and adaptive "
                 "DST, about 4.5 hours on 2 quiet CPU cores",
          (Benchmark("cifar100_10tasks", "cifar100.py",
                     _cifar(10, 10, "--epochs", "2", "--train_per_class", "40", "--test_per_class", "20",
                                "--batch_size", "32", "--update_frequency", "4", "--task_inference", "calibrated")),),
          finetune_inits=("ERK",), jobs=2),
    Study("paper", "the paper's four benchmark settings at full scale (100 or 25 epochs a task, 3 seeds)",
          (Benchmark("cifar100_5tasks", "cifar100.py", _cifar(5, 20, "--epochs", "100", "--update_frequency", "100")),
           Benchmark("cifar100_10tasks", "cifar100.py", _cifar(10, 10, "--epochs", "100", "--update_frequency", "400")),
           Benchmark("cifar100_20tasks", "cifar100.py", _cifar(20, 5, "--epochs", "25", "--update_frequency", "100")),
           Benchmark("miniImageNet_10tasks", "miniImageNet100.py",
                     ("--num_tasks", "10", "--num_classes", "100", "--num_classes_per_task", "10", "--epochs", "100",
                      "--update_frequency", "400")))),
)}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One `scripts/sweep.sh` call of a study."""

    part: str
    out: Path
    grid: tuple[str, ...]  # sweep.sh's grid options
    script: str
    flags: tuple[str, ...]

    def command(self, jobs: int, dry_run: bool = False) -> list[str]:
        return ["bash", str(SWEEP), "-j", str(jobs), *self.grid, "--out", str(self.out),
                *(["--dry-run"] if dry_run else []), "--", self.script, *self.flags]

    @property
    def runs(self) -> int:
        options = dict(zip(self.grid[::2], self.grid[1::2]))
        return math.prod(len(options[axis].split(",")) for axis in ("--densities", "--inits", "--growths", "--seeds"))


def sweeps(study: Study, out: Path, extra: Sequence[str]) -> list[Sweep]:
    """Every sweep of the study, in the order they run: per benchmark grid, static, finetune, dense."""
    result = []
    seeds, densities = ",".join(study.seeds), ",".join(study.densities)
    baseline_densities = ",".join(study.baseline_densities or study.densities)
    for bench in study.benchmarks:
        flags = (*bench.flags, *extra)
        without_inference = _without(flags, "--task_inference")  # it needs isolated masks
        folder = out / bench.name
        result += [
            Sweep("grid", folder / "grid", ("--densities", densities, "--inits", ",".join(study.inits),
                                            "--growths", ",".join(study.growths), "--seeds", seeds),
                  bench.script, flags),
            Sweep("static", folder / "static", ("--densities", baseline_densities, "--inits", ",".join(study.inits),
                                                "--growths", "random", "--seeds", seeds),
                  bench.script, (*_without(flags, "--update_frequency"), "--update_frequency", "0")),
            Sweep("finetune", folder / "finetune", ("--densities", baseline_densities,
                                                    "--inits", ",".join(study.finetune_inits),
                                                    "--growths", "random", "--seeds", seeds),
                  bench.script, (*without_inference, "--no-isolate")),
            Sweep("dense", folder / "dense", ("--densities", "1", "--inits", "uniform", "--growths", "random",
                                              "--seeds", seeds), bench.script, (*without_inference, "--no-sparse")),
        ]
        result += [Sweep(approach, folder / approach,
                         ("--densities", densities, "--inits", init, "--growths", "random", "--seeds", seeds),
                         bench.script, (*flags, "--approach", approach))
                   for approach, init in study.peers]
        result += [Sweep(f"adaptive-{name}", folder / f"adaptive-{name}",
                         ("--densities", densities, "--inits", init, "--growths", growth, "--seeds", seeds),
                         bench.script, (*flags, *policy))
                   for name, init, growth, policy in study.adaptive]
    return result


def _without(flags: Sequence[str], name: str) -> tuple[str, ...]:
    """`flags` without `name` and its value."""
    flags = list(flags)
    if name in flags:
        i = flags.index(name)
        del flags[i:i + 2]
    return tuple(flags)


# ---- the estimate ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds per image of a masked training step and of a test forward pass, measured now."""

    train: float
    test: float
    device: str


def measure_costs(device: str, image_size: int, batch_size: int, test_batch_size: int = 128,
                  repeats: int = 3, width: int = 64) -> Costs:
    """Time ResNet-18 training steps (Adam, a density-0.2 mask) and test batches on `device`."""
    from models import build_model
    from sparselearning import Masking

    model = build_model("resnet18", 100, width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    masking = Masking(optimizer, density=0.2, sparse_init="uniform", update_frequency=0, total_steps=10**6, seed=0)
    masking.add_module(model)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x)[:, :10], y).backward()
        masking.step()

    def test() -> None:
        with torch.no_grad():
            model(torch.randn(test_batch_size, 3, image_size, image_size, device=device))

    return Costs(_seconds(step, repeats) / batch_size, _seconds(test, repeats) / test_batch_size, device)


def _seconds(work, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def run_seconds(sweep: Sweep, costs: Costs) -> float:
    """Estimated seconds of one run of `sweep`: training steps, testing after every task, task
    inference when the run asks for it, and the process's start. With isolation a task's network
    never changes, so the run tests each network on each test set once (`EvaluatedNetworks`):
    T test sets with the task id given, T x T with task inference (plus the calibration on each
    task's training images); without isolation row i tests i networks again."""
    flags = Benchmark("", sweep.script, sweep.flags)
    tasks, per_task = int(flags.flag("--num_tasks", "10")), int(flags.flag("--num_classes_per_task", "10"))
    train_per_class = int(flags.flag("--train_per_class", str(FULL_TRAIN_PER_CLASS[sweep.script])))
    test_per_class = min(int(flags.flag("--test_per_class", "100")), 100)
    epochs = int(flags.flag("--epochs", "20"))
    train_images, test_images = tasks * per_task * train_per_class, per_task * test_per_class
    isolated = "--no-isolate" not in sweep.flags and "--no-sparse" not in sweep.flags
    test_sets = tasks if isolated else sum(range(1, tasks + 1))
    seconds = epochs * train_images * costs.train
    if flags.flag("--task_inference", "none") != "none":
        seconds += (tasks * tasks * test_images + train_images) * costs.test
    else:
        seconds += test_sets * test_images * costs.test
    return seconds + STARTUP_SECONDS + tasks * TASK_SECONDS


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


# ---- running it ------------------------------------------------------------------------------

def sweep_environment(device: str, jobs: int) -> dict[str, str]:
    """The environment of the sweeps: runs use this Python (sweep.sh reads $PYTHON), and on a CPU
    each of the `jobs` runs at a time gets an equal share of the cores as torch threads (several
    runs with all cores each would fight for them)."""
    env = {**os.environ, "PYTHON": sys.executable}
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


LOG_TIME = "%Y-%m-%d %H:%M:%S"
# Where a run's log begins a sitting: its start line (`run_dir.STARTED`), and in logs of earlier
# versions, which had none, a resume's line or an hour without any line (a run started again from
# scratch after a stop in its first task left no other mark).
SITTING_MARKS = (f" {run_dir.STARTED} (", " resuming ")
SILENT_SECONDS = 3600.0


def working_intervals(log: Path) -> list[tuple[float, float]]:
    """The sittings of one run: (first, last) time stamp of the log's lines from each start of the
    run to the next (a sitting's start-up before its first line is not counted)."""
    intervals: list[list[float]] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            stamp = datetime.datetime.strptime(line[:19], LOG_TIME).timestamp()
        except ValueError:
            continue  # a message's continuation line
        if (not intervals or any(mark in line for mark in SITTING_MARKS)
                or stamp - intervals[-1][1] > SILENT_SECONDS):
            intervals.append([stamp, stamp])
        intervals[-1][1] = stamp
    return [(start, end) for start, end in intervals]


def logged_wall_seconds(out: Path) -> float:
    """Seconds during which at least one run under `out` was working: the union of every run's
    sittings (`working_intervals` of each run's log)."""
    intervals = sorted(i for log in out.rglob(run_dir.LOG_FILE) for i in working_intervals(log))
    total, covered_to = 0.0, -math.inf
    for start, end in intervals:
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def run_study(study: Study, out: Path, extra: Sequence[str], jobs: int, device: str) -> int:
    """Run every sweep, then the report and the findings; the exit code of the first failed sweep
    (1 failed run, 3 a run stopped by a signal), else 0."""
    record_path = out / "study.json"
    env = sweep_environment(device, jobs)
    plan = sweeps(study, out, extra)
    status = 0
    for sweep in plan:
        print(f"== {sweep.out.relative_to(out)}: {sweep.runs} runs", flush=True)
        code = subprocess.run(sweep.command(jobs), env=env).returncode
        if code == 130:
            return 130
        status = status or code
    seconds = logged_wall_seconds(out)
    write_text(record_path, json.dumps({
        "preset": study.name, "about": study.about, "command": shlex.join(sys.argv),
        "sweeps": [shlex.join(sweep.command(jobs)) for sweep in plan], "commit": commit(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": machine(), "device": device,
        "threads_per_run": env.get("OMP_NUM_THREADS"), "wall_seconds": round(seconds, 1),
        "complete": status == 0}, indent=1) + "\n")
    from utils import findings, report

    report.main([str(out)])
    findings.main([str(out)])
    print(f"study {study.name}: {'complete' if status == 0 else 'NOT complete (run it again)'} in {out} "
          f"({format_duration(seconds)} of sweeps in all)")
    return status


def dry_run(study: Study, out: Path, extra: Sequence[str], jobs: int, device: str) -> int:
    plan = sweeps(study, out, extra)
    env = sweep_environment(device, jobs)
    for sweep in plan:
        subprocess.run(sweep.command(jobs, dry_run=True), env=env, check=False)
    total = 0.0
    print(f"\nEstimate for study {study.name} on {device} ({machine()}), {jobs} run(s) at a time:")
    costs: dict[tuple[int, int, int], Costs] = {}
    for sweep in plan:
        flags = Benchmark("", sweep.script, sweep.flags)
        size = int(flags.flag("--image_size", "32" if sweep.script == "cifar100.py" else "84"))
        batch = int(flags.flag("--batch_size", "64" if sweep.script == "cifar100.py" else "128"))
        width = int(flags.flag("--net_width", "64"))
        if (size, batch, width) not in costs:
            costs[(size, batch, width)] = measure_costs(device, size, batch, width=width)
        each = run_seconds(sweep, costs[(size, batch, width)])
        total += each * sweep.runs
        print(f"  {sweep.out.relative_to(out)}: {sweep.runs} runs x {format_duration(each)}")
    # On a CPU, runs at a time share the cores: measured on 2 cores, two runs of one thread each
    # took 91 s a run where one run of two threads took 108 s. So the estimate is the time of the
    # runs one after the other, each with all the cores (what was timed), an upper bound.
    wall = total if device == "cpu" else total / jobs
    print(f"  {sum(s.runs for s in plan)} runs, about {format_duration(wall)}"
          + (" (the runs one after the other with all the cores; several at a time gain little on a CPU)"
             if device == "cpu" else f" with {jobs} at a time") + "; a training step costs "
          + ", ".join(f"{1000 * c.train:.2f} ms an image at {s[0]} px" for s, c in costs.items())
          + f", measured now on {device}")
    if device != "cpu":
        print("  GPU time: not measured (the estimate above times one step on this GPU; the study itself was "
              "not run on one)")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m utils.study", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS), help="the study: " + "; ".join(
        f"{name}: {study.about}" for name, study in PRESETS.items()))
    parser.add_argument("--out", type=Path, help="the study's folder (default: runs/study-<preset>)")
    parser.add_argument("--data_dir", type=Path, help="passed to every run (default: the scripts' data/)")
    parser.add_argument("--device", help="passed to every run (default: cuda if available, else cpu)")
    parser.add_argument("-j", "--jobs", type=int, help="runs at a time (default: the preset's)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and the estimated time; run nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        study = PRESETS[args.preset]
        jobs = args.jobs or study.jobs
        if jobs < 1:
            raise UserError(f"-j must be >= 1, got {jobs}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extra = ["--device", device, *(["--data_dir", str(args.data_dir)] if args.data_dir else [])]
        out = args.out or Path("runs") / f"study-{study.name}"
        if args.dry_run:
            return dry_run(study, out, extra, jobs, device)
        out.mkdir(parents=True, exist_ok=True)
        return run_study(study, out, extra, jobs, device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("study interrupted: run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
