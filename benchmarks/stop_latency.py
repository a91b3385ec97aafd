"""How long a stop signal waits on this machine: the longest piece of work a run does not
interrupt, plus the save that follows the stop. This is the measurement behind the default
warning of scripts/sweep_slurm.sh (--signal-seconds 120: SIGUSR1 that long before SLURM's time
limit, for each run to finish its piece and save).

    python -m benchmarks.stop_latency [--rounds N] [--device cpu|cuda] [--json PATH] [--save_dir DIR]

A run looks at a stop request after every optimizer step and before every test or calibration
batch (utils/stopping.py). A signal therefore waits for at most one of these pieces:

- training step: one batch of `utils.train.train_epoch` (forward, loss, backward, `Masking.step`),
  with the default --update_frequency 400, so no topology update;
- step with a topology update: the same with --update_frequency 1, a prune-and-regrow at every
  step (near the initial death rate: the task counts 20 epochs x 20 batches);
- test / calibration batch: `utils.evaluation.evaluate` over one test batch (a calibration batch
  is the same forward pass over training images);
- one-shot batch: `utils.task_inference.superposition_gradient` on one test batch over 10 tasks'
  masks (a forward and a backward pass of the superposed network, as --task_inference oneshot
  does for each test batch once 10 tasks are trained).

The run then saves, with `utils.run_dir.save_checkpoint` (temporary file, fsync, rename), into a
temporary folder under --save_dir (default: the system's; give the file system the runs write to):

- task in progress: `TaskTraining.state_dict()` with the run's config, two epochs in, the kept
  epoch (--keep best_train) an earlier one, so saved as a copy: the largest such file;
- checkpoint.pt: the config, the weights and 10 tasks' masks (TaskMasks), as after task 10.

Settings: ResNet-18 (100 classes) with each benchmark's default flags (density 0.2, batch 64 on
cifar100 and 128 on miniImageNet, test batch 128): CIFAR-100 at 32 px, miniImageNet at 32 px and
at 84 px (--image_size 84). Random images stand in for the data and the 10 tasks' masks are
copies of one: what a piece costs depends on the sizes only, so no data set is read. Each piece
and save runs once untimed, then --rounds times; the table shows the median and the max seconds.
The worst case is the slowest piece plus the slowest save (their max), over all settings.

Independent of `python -m benchmarks` (no target, and minutes on a CPU at 84 px).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import timed
from data import Normalization, Split, TensorLoader
from models import build_model
from sparselearning import TaskMasks
from utils import run_dir
from utils.acceleration import Acceleration
from utils.cli import Config, parse_config
from utils.environment import PROJECT_ROOT, environment
from utils.evaluation import evaluate
from utils.run_dir import write_json
from utils.task_inference import superposition_gradient
from utils.train import Task, TaskTraining, train_epoch

SWEEP_SCRIPT = PROJECT_ROOT / "scripts" / "sweep_slurm.sh"
TASKS = 10  # tasks of 10 classes: the one-shot superposition and the checkpoint's masks
CLASSES_PER_TASK = 10
TRAIN_BATCHES = 20  # the task's training split in batches: 20 epochs x 20 = 400 steps, one topology update's worth
NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

# The pieces a stop waits for, and the saves after it: JSON key -> table label.
PIECES: dict[str, str] = {
    "step": "training step (Masking.step)",
    "topology_step": "step with a topology update",
    "test_batch": "test / calibration batch",
    "oneshot_batch": f"one-shot task-inference batch ({TASKS} tasks)",
}
SAVES: dict[str, str] = {
    "save_in_progress": "save: task in progress",
    "save_checkpoint": f"save: checkpoint.pt ({TASKS} tasks)",
}


@dataclass(frozen=True)
class Setting:
    benchmark: str
    image_size: int

    @property
    def label(self) -> str:
        return f"{self.benchmark} {self.image_size}px"

    @property
    def key(self) -> str:
        return f"{self.benchmark}_{self.image_size}px"


SETTINGS = (Setting("cifar100", 32), Setting("miniImageNet", 32), Setting("miniImageNet", 84))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stop_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each piece and save (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (atomically)")
    parser.add_argument("--save_dir", type=Path, help="where to time the saves (a temporary folder in it; "
                        "default: the system's temporary folder)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.json and not args.json.resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its folder does not exist")
    if args.save_dir and not args.save_dir.is_dir():
        parser.error(f"--save_dir {args.save_dir}: no such folder")
    return args


def default_signal_seconds() -> int | None:
    """--signal-seconds's default in scripts/sweep_slurm.sh (None if it cannot be read)."""
    try:
        found = re.search(r"^SIGNAL_SECONDS=\$\{SWEEP_SIGNAL_SECONDS:-(\d+)\}", SWEEP_SCRIPT.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def spread(fn: Callable[[], object], device: torch.device, rounds: int) -> dict[str, float]:
    """Median and max seconds of `rounds` calls of `fn`, after one untimed call."""
    fn()
    seconds = [timed(fn, device) for _ in range(rounds)]
    return {"median": statistics.median(seconds), "max": max(seconds)}


def random_split(images: int, size: int) -> Split:
    """`images` random images of `size` px, labelled with the first task's classes in turn."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator)
    return Split(pixels, torch.arange(images) % CLASSES_PER_TASK, NORMALIZATION)


def task_training(config: Config, accel: Acceleration, task: Task) -> TaskTraining:
    """The first task in training on a fresh ResNet-18, as `utils.train.train_task` builds it."""
    torch.manual_seed(config.seed)
    model = accel.prepare(build_model(config.net_name, config.num_classes, config.net_width).to(accel.device))
    return TaskTraining(model, task, None, config, accel)


def one_step(training: TaskTraining) -> Callable[[], None]:
    """One optimizer step of the training loop: an epoch cut to its first batch (--max_batches 1);
    the Masking keeps the task's full count of steps, so its death rate is a real one."""
    training.config = dataclasses.replace(training.config, max_batches=1)
    return lambda: train_epoch(training, 0)


def measure(setting: Setting, device: str, rounds: int, save_dir: Path | None) -> dict[str, Any]:
    """The pieces' and saves' seconds (median, max) and the saves' bytes in one setting."""
    with tempfile.TemporaryDirectory(prefix="stop-latency-", dir=save_dir) as folder:
        config = parse_config(["--device", device, "--image_size", str(setting.image_size),
                               "--output_dir", folder], setting.benchmark)
        accel = Acceleration.for_config(config)
        size, batch, test_batch = setting.image_size, config.batch_size, config.test_batch_size
        task = Task(0, slice(0, CLASSES_PER_TASK), random_split(TRAIN_BATCHES * batch, size),
                    random_split(test_batch, size))
        seconds: dict[str, dict[str, float]] = {}

        training = task_training(config, accel, task)
        seconds["step"] = spread(one_step(training), accel.device, rounds)
        updating = task_training(dataclasses.replace(config, update_frequency=1), accel, task)
        seconds["topology_step"] = spread(one_step(updating), accel.device, rounds)
        del updating

        model = training.model
        test = TensorLoader(task.test, batch_size=test_batch, train=False, device=accel.device,
                            channels_last=accel.channels_last)
        seconds["test_batch"] = spread(lambda: evaluate(model, test, task.classes, config.eval,
                                                        autocast=accel.autocast), accel.device, rounds)
        masks = [{name: mask.clone() for name, mask in training.approach.masking.masks.items()} for _ in range(TASKS)]
        x = next(iter(test))[0]
        classes = [slice(CLASSES_PER_TASK * t, CLASSES_PER_TASK * (t + 1)) for t in range(TASKS)]
        seconds["oneshot_batch"] = spread(lambda: superposition_gradient(model, masks, x, classes, accel.autocast),
                                          accel.device, rounds)

        # Two epochs in, the kept one the first: the task in progress holds a copy of it.
        training.end_epoch(1.0, 50.0)
        training.end_epoch(1.0, 40.0)
        progress_state = {"config": config.to_dict(), **training.state_dict()}
        assert progress_state["kept"] is not None, "the kept epoch should be saved as a copy"
        progress = Path(folder) / run_dir.PROGRESS_FILE
        seconds["save_in_progress"] = spread(lambda: run_dir.save_checkpoint(progress, progress_state),
                                             accel.device, rounds)
        store = TaskMasks()
        for mask in masks:
            store.add(mask)
        checkpoint_state = {"config": config.to_dict(), "model": model.state_dict(), "task_masks": store.state_dict(),
                            "tasks_done": TASKS}
        checkpoint = Path(folder) / run_dir.CHECKPOINT_FILE
        seconds["save_checkpoint"] = spread(lambda: run_dir.save_checkpoint(checkpoint, checkpoint_state),
                                            accel.device, rounds)
        sizes = {"save_in_progress": progress.stat().st_size, "save_checkpoint": checkpoint.stat().st_size}
    return {"benchmark": setting.benchmark, "image_size": setting.image_size, "batch_size": batch,
            "test_batch_size": test_batch, "seconds": seconds, "bytes": sizes, "worst": worst_case(seconds)}


def worst_case(seconds: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The slowest piece and the slowest save (their max seconds), and the two together."""
    piece = max(PIECES, key=lambda key: seconds[key]["max"])
    save = max(SAVES, key=lambda key: seconds[key]["max"])
    return {"piece": piece, "save": save, "seconds": seconds[piece]["max"] + seconds[save]["max"]}


def format_table(settings: dict[str, dict[str, Any]]) -> str:
    """Pieces and saves down, settings across; each cell median / max seconds."""
    header = ["median / max seconds"] + [f"{s['benchmark']} {s['image_size']}px" for s in settings.values()]
    cells = [header, ["batch (train / test)"] + [f"{s['batch_size']} / {s['test_batch_size']}"
                                                 for s in settings.values()]]
    for key, label in {**PIECES, **SAVES}.items():
        row = [label]
        for s in settings.values():
            cell = f"{s['seconds'][key]['median']:.2f} / {s['seconds'][key]['max']:.2f}"
            row.append(cell + (f" ({s['bytes'][key] / 1e6:.0f} MB)" if key in SAVES else ""))
        cells.append(row)
    cells.append(["worst: slowest piece + save (max)"] + [f"{s['worst']['seconds']:.2f}" for s in settings.values()])
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    machine = environment(torch.device(args.device))
    print(f"machine: {machine['device_name']}, {machine['cpu_cores']} cores, {machine['cpu_threads']} torch threads, "
          f"torch {machine['torch']}, device {machine['device']}; load average {load_before:.2f}", flush=True)
    settings: dict[str, dict[str, Any]] = {}
    for i, setting in enumerate(SETTINGS, start=1):
        began = time.perf_counter()
        settings[setting.key] = measure(setting, args.device, args.rounds, args.save_dir)
        print(f"[{i}/{len(SETTINGS)}] {setting.label}: {time.perf_counter() - began:.1f} s", flush=True)
    worst_key = max(settings, key=lambda key: settings[key]["worst"]["seconds"])
    worst = settings[worst_key]
    worst_case_figure = {"setting": worst_key, **worst["worst"],
                         "piece_seconds": worst["seconds"][worst["worst"]["piece"]]["max"],
                         "save_seconds": worst["seconds"][worst["worst"]["save"]]["max"]}
    signal_seconds = default_signal_seconds()
    print()
    print(format_table(settings))
    print(f"\nworst case: {worst['benchmark']} {worst['image_size']}px, "
          f"{PIECES[worst_case_figure['piece']]} {worst_case_figure['piece_seconds']:.2f} s + "
          f"{SAVES[worst_case_figure['save']]} {worst_case_figure['save_seconds']:.2f} s "
          f"= {worst_case_figure['seconds']:.2f} s"
          + (f"; scripts/sweep_slurm.sh --signal-seconds {signal_seconds} (default) leaves "
             f"{signal_seconds / worst_case_figure['seconds']:.1f}x that" if signal_seconds else ""))
    total, load_after = time.perf_counter() - start, os.getloadavg()[0]
    print(f"{args.rounds} timed round(s) each; total {total:.1f} s; load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    return {"machine": machine, "rounds": args.rounds, "settings": settings, "worst_case": worst_case_figure,
            "signal_seconds_default": signal_seconds, "save_dir": str(args.save_dir or tempfile.gettempdir()),
            "total_seconds": total, "load_average": {"before": load_before, "after": load_after}}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        write_json(args.json, report)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
