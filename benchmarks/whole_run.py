"""The whole run: training images per second of the paper's 10-task CIFAR-100 command through
the real loop, against bare dense training on the same device in the same process.

Ours: `utils.experiment.run` (what `python cifar100.py` calls) with the paper's 10-task command
(10 tasks x 10 classes, ResNet-18, batch 64, density 0.2 ERK, random growth, update frequency
400) and `Repeats.run_epochs` epochs a task (2; --quick: 2 tasks, 1 epoch of 3 batches, on 20
training and 10 test random images a class), into a temporary output directory: data sets on
the device, Masking, metrics, evaluation after every task, checkpoints. Its throughput: training images processed (epochs x the images of each
task's batches, read as the run reads them) / the sum of the tasks' `train_seconds` in the
run's own records.

Baseline: bare dense training, forward, cross-entropy, backward and fused Adam, over the run's
first task's training images already normalized on the device in batches of 64 (no
augmentation, no masks, no metrics), one warm-up pass then the median of `bare_rounds` passes, measured before
and after the run (the mean of the two counts). `run_overhead` = bare images/s / ours (<= 1.15
on CUDA; informative on a CPU). The run's topology updates: at the paper's 400 batches none
falls in a short task; their cost is `topology`'s.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from benchmarks.report import Result, Row
from benchmarks.timing import timed
from benchmarks.workload import BATCH, DENSITY, SPARSE_INIT, Workload, write_standin_cifar100
from data import TensorLoader
from data.loader import batch_bounds
from utils import experiment
from utils.cli import Config, parse_config
from utils.train import Task


def run_config(work: Workload, output_dir: Path, data_dir: Path) -> Config:
    """The paper's 10-task CIFAR-100 command, shortened to the workload's epochs and tasks."""
    tasks, repeats = work.repeats.run_tasks, work.repeats
    argv = ["--num_tasks", str(tasks), "--num_classes", str(10 * tasks), "--num_classes_per_task", "10",
            "--sparse_init", SPARSE_INIT, "--growth", "random", "--density", str(DENSITY),
            "--update_frequency", "400", "--epochs", str(repeats.run_epochs), "--batch_size", str(BATCH),
            "--data_dir", str(data_dir), "--no-download", "--device", str(work.device),
            "--output_dir", str(output_dir)]
    if repeats.run_max_batches is not None:
        argv += ["--max_batches", str(repeats.run_max_batches)]
    return parse_config(argv, "cifar100")


def images_per_epoch(images: int, config: Config) -> int:
    """Training images one epoch of a task with `images` images processes."""
    bounds = batch_bounds(images, config.batch_size)[:config.max_batches]
    return sum(end - start for start, end in bounds)


def bare_images_per_second(work: Workload, task: Task) -> float:
    """Images per second of bare dense training steps over `task`'s training images on the device."""
    model = work.model(work.config.seed)
    optimizer = work.optimizer(model)
    loader = TensorLoader(task.train, batch_size=work.config.batch_size, train=False, device=work.device,
                          channels_last=work.accel.channels_last)  # normalized once, no augmentation
    batches = list(loader)[:work.repeats.run_max_batches]
    images = sum(len(y) for _, y in batches)

    def one_pass() -> None:
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            with work.accel.autocast():
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
            optimizer.step()

    one_pass()
    return images / statistics.median(timed(one_pass, work.device) for _ in range(work.repeats.bare_rounds))


def run(work: Workload) -> Result:
    with tempfile.TemporaryDirectory(prefix="benchmark-run-") as folder:
        data_dir = work.config.data_dir
        if work.repeats.run_small_data:  # --quick: 20 + 10 random images a class
            data_dir = Path(folder) / "data"
            write_standin_cifar100(data_dir, train_per_class=20, test_per_class=10)
        config = run_config(work, Path(folder) / "run", data_dir)
        tasks = experiment.build_tasks(config)  # what the run reads: its images, and the baseline's
        before = bare_images_per_second(work, tasks[0])
        start = time.perf_counter()
        results: dict[str, Any] = experiment.run(config)
        wall = time.perf_counter() - start
        after = bare_images_per_second(work, tasks[0])
    bare = (before + after) / 2
    images = sum(config.epochs * images_per_epoch(len(task.train.labels), config)
                 for task in tasks[:len(results["per_task"])])
    seconds = sum(record["train_seconds"] for record in results["per_task"])
    ours = images / seconds
    ratio = bare / ours
    label = f"{config.num_tasks} tasks x {config.epochs} epoch(s)"
    rows = [Row(f"whole run ({label}), training images/s, utils.experiment.run vs bare dense steps",
                f"{ours:.0f}/s", f"{bare:.0f}/s", ratio, key="run_overhead", checked=ratio),
            Row(f"whole run ({label}), wall time (set-up, training, evaluation, checkpoints)", f"{wall:.1f} s",
                f"{seconds:.1f} s training")]
    figures = {"run_overhead": ratio, "run_images_per_s": ours, "run_bare_images_per_s": bare,
               "run_bare_images_per_s_before_after": [before, after], "run_train_images": images,
               "run_train_seconds": seconds, "run_wall_seconds": wall, "run_tasks": config.num_tasks,
               "run_epochs": config.epochs, "run_acc": results["acc"]}
    return Result(rows, figures)
