"""The task-incremental run: for each task, train a sparse sub-network, then test every task.

`run(config)` is the whole experiment; both entry scripts call it. Reading order:
`run` -> `train_task` -> `train_epoch`, and `utils.evaluation` for the accuracy matrix.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DATASET_STATS, Split, TensorLoader, class_order, load_dataset, split_tasks
from models import build_model
from sparselearning import Masking, TaskMasks, derive_seed
from utils import run_dir
from utils.acceleration import Acceleration
from utils.cli import Config
from utils.errors import NonFiniteLoss, UserError
from utils.evaluation import EvaluatedNetworks, evaluate_row, predictions
from utils.metrics import METRIC_KEYS, format_report, summarize

log = logging.getLogger(__name__)

# Settings that may differ between a run and its resumption without changing its results.
RESUME_MAY_DIFFER = ("resume", "overwrite", "device", "data_dir", "download", "checkpoint_every")


@dataclass(frozen=True)
class Task:
    """One task: its index, its slice of the classifier, and its data."""

    index: int
    classes: slice
    train: Split
    test: Split


LOADER_STREAM, MASK_STREAM = 1, 2  # per task: derive_seed(config.seed, stream, task)


# ---------------------------------------------------------------------------- one task


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer for each task (the authors' choice).

    The fused implementations compute the same update in one kernel; on a CPU, fused Adam is
    about 5x faster than the default and, unlike it, not slowed by the zero moments of
    masked-out weights.
    """
    fused = torch.device(config.device).type in ("cpu", "cuda")
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.l2, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.l2,
                           fused=fused)


def train_epoch(
    model: nn.Module,
    loader: TensorLoader,
    optimizer: torch.optim.Optimizer,
    masking: Masking | None,
    task: Task,
    epoch: int,
    config: Config,
    accel: Acceleration,
) -> tuple[float, float]:
    """One pass over the task's training data; returns (mean loss, accuracy in percent).

    The loss is the cross-entropy over the task's slice of the logits (the task id is known).
    Loss, accuracy and the first batch with a non-finite loss are tracked on the device and read
    once, at the end: the loop never waits for the GPU. A non-finite loss raises NonFiniteLoss.
    """
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0  # device tensors after the first batch
    first_nonfinite = torch.tensor(-1, device=accel.device)
    for batch, (x, y) in enumerate(loader):
        if config.max_batches is not None and batch >= config.max_batches:
            break
        with accel.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits[:, task.classes].float(), y - task.classes.start)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if masking is not None:
            masking.step()
        else:
            optimizer.step()
        loss = loss.detach()
        first_nonfinite = torch.where((first_nonfinite < 0) & ~loss.isfinite(), batch, first_nonfinite)
        loss_sum += loss * len(y)
        correct += (predictions(logits.detach(), task.classes, config.eval) == y).sum()
        seen += len(y)
    if (bad := int(first_nonfinite)) >= 0:
        raise NonFiniteLoss(f"non-finite loss in task {task.index + 1}, epoch {epoch + 1}, batch {bad + 1}; "
                            "the finished tasks' results are in results.json (try a smaller --lr)")
    return float(loss_sum) / seen, 100.0 * float(correct) / seen


def batches_per_epoch(loader: TensorLoader, config: Config) -> int:
    return len(loader) if config.max_batches is None else min(len(loader), config.max_batches)


def train_task(
    model: nn.Module,
    task: Task,
    frozen: dict[str, torch.Tensor] | None,
    config: Config,
    accel: Acceleration,
    in_progress: dict[str, Any] | None = None,
    save_progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Train `model` on one task; return the task's final mask (None when dense) and a record.

    Fresh optimizer and MultiStepLR (x0.1 at 50 % and 75 % of the epochs). The task keeps the
    weights and mask of its best-training-accuracy epoch (`--keep best_train`) or its last.
    Every `--checkpoint_every` epochs the whole state of the task goes to `save_progress`;
    `in_progress` (such a state) continues the task from there, exactly.
    """
    stats = DATASET_STATS[config.dataset]
    loader = TensorLoader(task.train, batch_size=config.batch_size, train=True, mean=stats[0], std=stats[1],
                          device=accel.device, seed=derive_seed(config.seed, LOADER_STREAM, task.index),
                          channels_last=accel.channels_last)
    optimizer = make_optimizer(config, model)
    milestones = [int(config.epochs * 0.5), int(config.epochs * 0.75)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    masking = None
    if config.sparse:
        masking = Masking(
            optimizer, density=config.density, sparse_init=config.sparse_init, death=config.death,
            growth=config.growth, death_rate=config.death_rate, update_frequency=config.update_frequency,
            total_steps=config.epochs * batches_per_epoch(loader, config), frozen=frozen,
            new_weights=config.new_weights, seed=derive_seed(config.seed, MASK_STREAM, task.index),
        )
        masking.add_module(model)

    first_epoch, earlier_seconds = 0, 0.0
    best_acc, best_epoch, kept = -math.inf, -1, None
    if in_progress is not None:  # the objects above are fresh: now load their saved states
        model.load_state_dict(in_progress["model"])
        optimizer.load_state_dict(in_progress["optimizer"])
        scheduler.load_state_dict(in_progress["scheduler"])
        if masking is not None:
            masking.load_state_dict(in_progress["masking"])
        loader.load_state_dict(in_progress["loader"])
        if "torch_rng" in in_progress:  # absent from checkpoints of earlier versions
            torch.set_rng_state(in_progress["torch_rng"])
        first_epoch, earlier_seconds = in_progress["epochs_done"], in_progress["seconds"]
        best_acc, best_epoch, kept = in_progress["best_acc"], in_progress["best_epoch"], in_progress["kept"]

    start = time.perf_counter()
    progress = tqdm(range(first_epoch, config.epochs), desc=f"task {task.index + 1}", unit="epoch",
                    initial=first_epoch, total=config.epochs, leave=False)
    for epoch in progress:
        loss, acc = train_epoch(model, loader, optimizer, masking, task, epoch, config, accel)
        scheduler.step()
        progress.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}")
        log.debug("task %d epoch %d: loss %.4f, train accuracy %.2f%%", task.index + 1, epoch + 1, loss, acc)
        if config.keep == "last" or acc > best_acc:
            best_acc, best_epoch = acc, epoch
            if config.keep == "best_train" and epoch < config.epochs - 1:
                kept = snapshot(model, masking)
            else:
                kept = None  # the current state is the one to keep
        if save_progress is not None and checkpoint_due(epoch + 1, config):
            save_progress({
                "task": task.index, "epochs_done": epoch + 1, "seconds": earlier_seconds + time.perf_counter() - start,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "masking": masking.state_dict() if masking is not None else None, "loader": loader.state_dict(),
                "torch_rng": torch.get_rng_state(), "best_acc": best_acc, "best_epoch": best_epoch, "kept": kept,
            })
    if kept is not None:
        restore(model, masking, kept)
    seconds = earlier_seconds + time.perf_counter() - start

    record: dict[str, Any] = {
        "task": task.index,
        "classes": [task.classes.start, task.classes.stop],
        "train_seconds": seconds,
        "kept_epoch": best_epoch + 1,
        "train_acc": best_acc,
    }
    if masking is None:
        return None, record
    capacity = masking.capacity()["total"]
    record.update(density=capacity["task"], capacity_used=capacity["used"],
                  capacity_reused=capacity["reused"], capacity_free=capacity["free"])
    return masking.consolidate(), record


def checkpoint_due(epochs_done: int, config: Config) -> bool:
    """Save the task in progress now? Every --checkpoint_every epochs, except after the last
    (the task's end writes the run's checkpoint)."""
    every = config.checkpoint_every
    return every > 0 and epochs_done % every == 0 and epochs_done < config.epochs


def snapshot(model: nn.Module, masking: Masking | None) -> dict[str, Any]:
    """Copies of everything `restore` needs to go back to this point of the task."""
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"model": weights, "masking": masking.state_dict() if masking is not None else None}


def restore(model: nn.Module, masking: Masking | None, kept: dict[str, Any]) -> None:
    model.load_state_dict(kept["model"])
    if masking is not None:
        masking.load_state_dict(kept["masking"])


# ---------------------------------------------------------------------------- the run


def capacity_summary(record: dict[str, Any]) -> str:
    """How much of the backbone a sparse task used, for the log."""
    if "density" not in record:
        return ""
    return (f"; weights: {100 * record['density']:.1f} % in its mask, {100 * record['capacity_reused']:.1f} % "
            f"reused from earlier tasks, {100 * record['capacity_free']:.1f} % still free")


def build_tasks(config: Config) -> list[Task]:
    train, test = load_dataset(config.dataset, config.data_dir, download=config.download,
                               image_size=config.image_size, test_per_class=config.test_per_class, seed=config.seed)
    order = class_order(config.num_classes, config.class_order, config.seed)
    k = config.num_classes_per_task
    train_tasks = split_tasks(train, order, config.num_tasks, k)
    test_tasks = split_tasks(test, order, config.num_tasks, k)
    return [Task(t, slice(t * k, (t + 1) * k), train_tasks[t], test_tasks[t]) for t in range(config.num_tasks)]


@dataclass
class Resumable:
    """What an output directory already holds: a finished run's results, the run after its last
    finished task, and the task in progress (each None when absent)."""

    finished: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None
    in_progress: dict[str, Any] | None = None


def inspect_output_dir(config: Config) -> Resumable:
    """Decide, without writing anything, whether the run may use `--output_dir`, and load what
    `--resume` continues from.

    A directory holding a finished run is refused unless --resume (which returns its results) or
    --overwrite; one holding an unfinished run unless --resume or --overwrite.
    """
    out = config.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a directory")
    paths = {name: out / name for name in (run_dir.RESULTS_FILE, run_dir.CHECKPOINT_FILE, run_dir.PROGRESS_FILE)}
    present = [name for name, path in paths.items() if path.exists()]
    if not present or config.overwrite:
        return Resumable()
    results = _read_results(paths[run_dir.RESULTS_FILE])
    finished = results is not None and results.get("complete", True)
    if not config.resume:
        state = "a finished run" if finished else "an unfinished run"
        raise UserError(f"{out} holds {state}; pass --resume to "
                        f"{'print its results' if finished else 'continue it'} or --overwrite to start again")
    if finished:
        _check_same_config(config, results)
        return Resumable(finished=results)
    saved, in_progress = (run_dir.load_checkpoint(paths[name]) if paths[name].exists() else None
                          for name in (run_dir.CHECKPOINT_FILE, run_dir.PROGRESS_FILE))
    for state in (saved, in_progress):
        _check_same_config(config, state)
    return Resumable(saved=saved, in_progress=in_progress)


def _read_results(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path} ({error}); pass --overwrite to start again") from None


def _check_same_config(config: Config, state: dict[str, Any] | None) -> None:
    now = config.to_dict()
    changed = [k for k, v in (state or {}).get("config", {}).items()
               if k not in RESUME_MAY_DIFFER and now.get(k) != v]
    if changed:
        raise UserError(f"--resume: {config.output_dir} was run with other settings ({', '.join(changed)}); "
                        "use a new --output_dir")


def create_output_dir(config: Config) -> None:
    """Make the run directory; with --overwrite, remove the files of the run it held."""
    out = config.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            for name in run_dir.RUN_FILES:
                (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {out}: {error.strerror}") from None


def run(config: Config) -> dict[str, Any]:
    """The whole experiment; writes config.json, train.log, checkpoint.pt, results.json, report.txt.

    Everything that can fail because of the user's input (the output directory, the data) is
    checked before the first file is written.
    """
    resumable = inspect_output_dir(config)
    if resumable.finished is not None:
        log.info("%s holds a finished run: nothing to do", config.output_dir)
        return resumable.finished
    tasks = build_tasks(config)
    create_output_dir(config)
    handler = run_dir.attach_log_file(config.output_dir)
    try:
        return _run(config, tasks, resumable.saved, resumable.in_progress)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _run(config: Config, tasks: list[Task], resumed: dict[str, Any] | None,
         in_progress: dict[str, Any] | None) -> dict[str, Any]:
    out, accel = config.output_dir, Acceleration.for_run(config)
    run_dir.write_json(out / run_dir.CONFIG_FILE, config.to_dict())
    torch.manual_seed(config.seed)
    model = accel.prepare(build_model(config.net_name, config.num_classes).to(accel.device))
    stats = DATASET_STATS[config.dataset]
    test_loaders = [TensorLoader(task.test, batch_size=config.test_batch_size, train=False, mean=stats[0],
                                 std=stats[1], device=accel.device, channels_last=accel.channels_last)
                    for task in tasks]

    acc = np.full((config.num_tasks, config.num_tasks), np.nan)
    task_masks, records, first, tested = TaskMasks(), [], 0, EvaluatedNetworks()
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        task_masks = TaskMasks.from_state_dict(resumed["task_masks"], accel.device)
        acc = np.array(resumed["acc_matrix"], dtype=float)
        records, first = resumed["per_task"], resumed["tasks_done"]
        log.info("resuming %s after task %d of %d", out, first, config.num_tasks)
    if in_progress is not None and in_progress["task"] != first:
        in_progress = None  # left over from a task that finished after it was saved
    if in_progress is not None:
        log.info("resuming task %d after epoch %d", first + 1, in_progress["epochs_done"])

    def save_progress(state: dict[str, Any]) -> None:
        run_dir.save_checkpoint(out / run_dir.PROGRESS_FILE, {"config": config.to_dict(), **state})

    for t in range(first, config.num_tasks):
        task = tasks[t]
        frozen = task_masks.frozen_before(t) if config.isolate else None
        try:
            mask, record = train_task(model, task, frozen, config, accel, in_progress, save_progress)
        except NonFiniteLoss as stop:
            write_results(config, accel, acc, records, stopped=str(stop))
            raise
        in_progress = None
        if mask is not None:
            task_masks.add(mask)
        acc[t] = evaluate_row(model, task_masks, [task.classes for task in tasks], test_loaders, t, config, accel,
                              tested)
        record["test_acc"] = float(acc[t, t])
        records.append(record)
        log.info("task %d/%d (classes %d-%d): train %.2f%% (epoch %d), test %.2f%%, %.1f s%s",
                 t + 1, config.num_tasks, task.classes.start, task.classes.stop - 1, record["train_acc"],
                 record["kept_epoch"], acc[t, t], record["train_seconds"], capacity_summary(record))
        run_dir.save_checkpoint(out / run_dir.CHECKPOINT_FILE, {
            "config": config.to_dict(), "model": model.state_dict(), "task_masks": task_masks.state_dict(),
            "acc_matrix": acc.tolist(), "per_task": records, "tasks_done": t + 1,
        })
        (out / run_dir.PROGRESS_FILE).unlink(missing_ok=True)
    return write_results(config, accel, acc, records)


def write_results(config: Config, accel: Acceleration, acc: np.ndarray, records: list[dict[str, Any]],
                  stopped: str | None = None) -> dict[str, Any]:
    """results.json and report.txt of the tasks done so far; `stopped` says why a run ended early.

    The metrics of a stopped run are those of its finished tasks, as if the run had had that many.
    """
    done = len(records)
    metrics = summarize(acc[:done, :done]) if done else dict.fromkeys(METRIC_KEYS)
    report = format_report(acc[:done, :done]) if done else "no task finished"
    results = {
        "complete": stopped is None,
        "tasks_done": done,
        **({"stopped": stopped} if stopped else {}),
        "config": config.to_dict(),
        "acc_matrix": [[None if math.isnan(v) else v for v in row] for row in acc.tolist()],
        **metrics,
        "per_task": records,
        "environment": run_dir.environment(accel.device),
    }
    run_dir.write_json(config.output_dir / run_dir.RESULTS_FILE, results)
    run_dir.write_text(config.output_dir / run_dir.REPORT_FILE, report + "\n")
    return results
