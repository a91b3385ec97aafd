"""The training loop's own overhead: a real epoch and a real evaluation, each against the bare
model work they contain, measured alternately in one process.

`epoch_overhead`: `utils.train.train_task` for one epoch of the first task (the run's Config:
10 tasks of CIFAR-100, density 0.2 ERK, random growth, update frequency 400, --epochs 1; 2500
images = 40 batches of 64 with the shared subset), called afresh each round and timed from the
call to its return, so it counts everything train_task does: the TensorLoader
(shuffle, augmentation), a fresh fused Adam and MultiStepLR, the Masking (ERK allocation and
initial mask), the masked steps, loss and accuracy metrics, tqdm, and the final consolidation
and capacity record. No topology update falls in one 40-batch epoch (one every 400 batches:
see `topology` for its cost) and `--keep best_train` takes no snapshot when the epoch is the
last. Divided by: the same number of bare dense steps (forward, backward, fused Adam) on a
fixed batch, timed as one block, i.e. batches x the mean bare step. The two alternate; the
bare steps are warmed up first, train_task is not (every task of a run starts cold too).
`epoch_loop_seconds` is train_task's own `train_seconds`: its epoch loop without the set-up.

`eval_overhead`: `utils.evaluation.evaluate_row` for the last row of a 10-task run (every task's
network, each its TaskMasks mask applied, on its own test TensorLoader, batch 128; 10 x 1000
test images) divided by the bare forward pass (no_grad, eval mode, no masks) over the same
batches, normalized beforehand. One untimed round of each, then they alternate.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any

import torch

from benchmarks.report import Result, Row
from benchmarks.timing import alternating_medians
from benchmarks.workload import Workload
from utils.evaluation import evaluate_row
from utils.train import Task, batches_per_epoch, train_task


def run_epoch(work: Workload) -> Result:
    config, task = work.config, work.tasks[0]
    model = work.model(config.seed)
    dense = copy.deepcopy(model)
    dense_step = work.training_step(dense, work.optimizer(dense), work.fixed_batch())
    batches = batches_per_epoch(work.loader(task.train, train=True), config)
    records: list[dict[str, Any]] = []

    def bare_steps() -> None:
        for _ in range(batches):
            dense_step()

    def epoch() -> None:
        records.append(train_task(model, task, None, config, work.accel).record)

    for _ in range(2):
        dense_step()
    bare, real = alternating_medians([bare_steps, epoch], work.device, repeats=work.repeats.epoch_rounds, warmup=0)
    ratio = real / bare
    row = Row(f"training epoch, train_task vs {batches} bare dense steps", f"{real:.2f} s", f"{bare:.2f} s", ratio,
              key="epoch_overhead", checked=ratio)
    figures = {"epoch_overhead": ratio, "epoch_seconds": real, "epoch_batches": batches,
               "epoch_bare_steps_seconds": bare, "epoch_bare_step_ms": bare / batches * 1e3,
               "epoch_loop_seconds": statistics.median(r["train_seconds"] for r in records),
               "epoch_rounds": work.repeats.epoch_rounds}
    return Result([row], figures)


def first_images(task: Task, n: int | None) -> Task:
    if n is None:
        return task
    test = task.test._replace(images=task.test.images[:n], labels=task.test.labels[:n])
    return dataclasses.replace(task, test=test)


def run_eval(work: Workload) -> Result:
    config = work.config
    tasks = [first_images(task, work.repeats.eval_images_per_task) for task in work.tasks[:work.repeats.eval_tasks]]
    loaders = [work.loader(task.test, train=False) for task in tasks]
    model = work.model()
    store = work.mask_store(model, len(tasks))
    inputs = [x for loader in loaders for x, _ in loader]

    def bare_forward() -> None:
        model.eval()
        with torch.no_grad(), work.accel.autocast():
            for x in inputs:
                model(x)

    def row_of_accuracies() -> None:
        evaluate_row(model, store, [task.classes for task in tasks], loaders, len(tasks) - 1, mode=config.eval,
                     autocast=work.accel.autocast)

    bare, real = alternating_medians([bare_forward, row_of_accuracies], work.device,
                                     repeats=work.repeats.eval_rounds)
    ratio = real / bare
    images = sum(len(task.test.labels) for task in tasks)
    row = Row(f"evaluation, evaluate_row vs bare forward ({len(tasks)} tasks, {images} images)", f"{real:.2f} s",
              f"{bare:.2f} s", ratio, key="eval_overhead", checked=ratio)
    figures = {"eval_overhead": ratio, "eval_seconds": real, "eval_bare_forward_seconds": bare,
               "eval_tasks": len(tasks), "eval_images": images, "eval_rounds": work.repeats.eval_rounds}
    return Result([row], figures)
