"""Per-epoch metrics of a run, as files: `metrics.csv` always, TensorBoard event files on request.

One row per task x epoch (`EPOCH_COLUMNS`): the epoch's mean training loss and accuracy, the
learning rate it trained with, the task's topology updates so far, the task's training seconds so
far, and, on the row of the epoch the task kept (`--keep`), the task's test accuracy measured
after it. The rows are part of the run's saved state (the task in progress holds its own, the
checkpoint those of the finished tasks), so a resumed run writes the same rows as an
uninterrupted one (all but the seconds); `metrics.csv` is rewritten whole after every epoch.

TensorBoard (`--tensorboard`, needs the optional `tensorboard` package) gets the same scalars, with
the run's epoch count as the step, plus each row of the accuracy matrix; a resumed run discards the
events of the epochs it trains again.
"""

from __future__ import annotations

import csv
import io
import importlib.util
from pathlib import Path
from typing import Any

EPOCH_COLUMNS = ("task", "epoch", "loss", "train_acc", "test_acc", "kept", "lr", "topology_updates", "task_seconds")
"""metrics.csv's columns: task and epoch counted from 1; accuracies in percent; `test_acc` empty but
on the kept epoch's row; `kept` 1 on that row; `task_seconds` the task's training time so far."""


def epoch_row(task: int, epoch: int, loss: float, train_acc: float, lr: float, topology_updates: int,
              task_seconds: float) -> dict[str, Any]:
    """One epoch's row (`task` and `epoch` counted from 0 here, from 1 in the row)."""
    return {"task": task + 1, "epoch": epoch + 1, "loss": loss, "train_acc": train_acc, "test_acc": None,
            "kept": 0, "lr": lr, "topology_updates": topology_updates, "task_seconds": task_seconds}


def mark_tested(rows: list[dict[str, Any]], kept_epoch: int, test_acc: float) -> None:
    """Write the task's test accuracy on the row of the epoch it kept (`kept_epoch` from 1)."""
    for row in rows:
        if row["epoch"] == kept_epoch:
            row.update(test_acc=test_acc, kept=1)


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text with a header (an empty cell for a missing value)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in EPOCH_COLUMNS})
    return text.getvalue()


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """The run's scalars as TensorBoard events in `folder` (`<output_dir>/tensorboard`), step = epochs
    trained in the run so far (task t's epoch e is step (t - 1) x epochs + e, both counted from 1)."""

    def __init__(self, folder: Path, epochs_per_task: int, first_step: int) -> None:
        """`first_step`: the step of the first epoch this process trains; events of a previous
        process at that step or later (epochs trained again after a resume) are discarded."""
        from torch.utils.tensorboard import SummaryWriter  # optional: only with --tensorboard

        self.epochs_per_task, self.first_step = epochs_per_task, first_step
        self.writer = SummaryWriter(str(folder), purge_step=first_step)

    def step(self, row: dict[str, Any]) -> int:
        return (row["task"] - 1) * self.epochs_per_task + row["epoch"]

    def epoch(self, row: dict[str, Any]) -> None:
        """The epoch's scalars, unless an earlier process logged them (a resumed task's rows so far)."""
        step = self.step(row)
        if step < self.first_step:
            return
        for key in ("loss", "train_acc", "lr", "topology_updates"):
            self.writer.add_scalar(f"train/{key}", row[key], step)
        self.writer.flush()

    def task_tested(self, task: int, accuracies: list[float]) -> None:
        """After task `task` (from 1): each task's test accuracy so far (the matrix's row) and their mean."""
        step = task * self.epochs_per_task
        for j, acc in enumerate(accuracies):
            self.writer.add_scalar(f"test/task_{j + 1}", acc, step)
        self.writer.add_scalar("test/mean_so_far", sum(accuracies) / len(accuracies), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
