"""The task-incremental run: for each task, train a sparse sub-network, then test every task.

`run(config)` is the whole experiment; both entry scripts call it. Reading order: `run` ->
`utils.train.train_task` (one task) -> `utils.evaluation.evaluate_row` (a row of the accuracy
matrix); `utils.run_dir` owns the run directory's files and the policy for reusing one.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

import numpy as np
import torch

from data import TensorLoader, class_order, first_per_class, load_dataset, split_tasks
from models import build_model
from sparselearning import TaskMasks, derive_seed
from utils import run_dir, run_lock
from utils.acceleration import Acceleration, switches_restored
from utils.chance import found_note
from utils.cli import MIN_BATCH, Config
from utils.environment import environment
from utils.epoch_metrics import TensorBoardLog, mark_tested, metrics_csv
from utils.errors import NonFiniteLoss, RunStopped, UserError
from utils.evaluation import EvaluatedNetworks, evaluate_row
from utils.metrics import (AGNOSTIC_KEYS, METRIC_KEYS, format_agnostic_report, format_report, fwt_meaning,
                           summarize, summarize_agnostic)
from utils.stopping import StopNow, StopRequest
from utils.task_inference import AgnosticRow, TaskInference
from utils.train import CUDA_STREAM, Task, TrainedTask, global_rng_state, restore_global_rng_state, train_task

log = logging.getLogger(__name__)


def build_tasks(config: Config) -> list[Task]:
    """Read the dataset and cut it into the run's tasks (classes in `--class_order`)."""
    train, test = load_dataset(config.dataset, config.data_dir, download=config.download,
                               image_size=config.image_size, test_per_class=config.test_per_class, seed=config.seed)
    order = class_order(config.num_classes, config.class_order, config.seed)
    k = config.num_classes_per_task
    train = first_per_class(train, config.train_per_class)
    if config.dataset == "cifar100":  # miniImageNet's reader holds out test_per_class itself
        test = first_per_class(test, config.test_per_class)
    train_tasks = split_tasks(train, order, config.num_tasks, k)
    test_tasks = split_tasks(test, order, config.num_tasks, k)
    for t, split in enumerate(train_tasks):
        if len(split.labels) < MIN_BATCH:
            raise UserError(
                f"task {t} (classes {order[t * k:(t + 1) * k]}) has {len(split.labels)} training image(s) in "
                f"{config.data_dir}: a training batch needs at least {MIN_BATCH} (BatchNorm normalizes with the "
                "statistics of each batch); use data with more images per class or more --num_classes_per_task")
    return [Task(t, slice(t * k, (t + 1) * k), train_tasks[t], test_tasks[t]) for t in range(config.num_tasks)]


def run(config: Config) -> dict[str, Any]:
    """The whole experiment; writes config.json, train.log, checkpoint.pt, results.json, report.txt.

    Everything that can fail because of the user's input (the output directory, the data) is
    checked before the first file of the run is written. The directory is held locked
    (`utils.run_lock`) from before its first file to the end: one run per directory at a time.
    """
    out = config.output_dir
    tasks = None if run_lock.output_dir_exists(out) else build_tasks(config)  # a new directory only for data that loads
    with run_lock.hold(out, stale_minutes=config.lock_stale_minutes):
        resumable = run_dir.inspect_output_dir(config)
        if resumable.finished is not None:
            log.info("%s holds a finished run: nothing to do", out)
            return resumable.finished
        tasks = build_tasks(config) if tasks is None else tasks
        config = run_dir.with_data_fingerprint(config, run_dir.data_fingerprint(tasks))
        run_dir.check_same_data(config, resumable)
        run_dir.prepare_output_dir(config)
        handler = run_dir.attach_log_file(out)
        log.info("%s (process %d on %s)", run_dir.STARTED, os.getpid(), socket.gethostname())  # a sitting begins
        try:
            with StopRequest().installed() as stop, switches_restored():  # the device's switches: for this run only
                experiment = Experiment(config, tasks)
                try:
                    return experiment.run(resumable.saved, resumable.in_progress, stop)
                finally:
                    experiment.close()
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


class Experiment:
    """The run's state between tasks: the shared model, the finished tasks' masks, the accuracy
    matrix and the per-task records; saved whole to checkpoint.pt after every task."""

    TRAINED = "trained"  # in task_in_progress.pt: the task is trained, its row not measured (`trained_state`)

    def __init__(self, config: Config, tasks: list[Task]) -> None:
        """`config` goes into every file the run saves (`to_dict()`); `run()` passes it with the
        data's fingerprint (`run_dir.RecordedConfig`), already written to config.json."""
        self.config, self.tasks = config, tasks
        self.accel = Acceleration.for_config(config)
        self.accel.apply()  # process-wide (cuDNN, determinism, cuBLAS workspace): before the first CUDA call
        torch.manual_seed(config.seed)
        model = build_model(config.net_name, config.num_classes, config.net_width)
        self.model = self.accel.prepare(model.to(self.accel.device))
        self.test_loaders = [TensorLoader(task.test, batch_size=config.test_batch_size, train=False,
                                          device=self.accel.device, channels_last=self.accel.channels_last)
                             for task in tasks]
        self.acc = np.full((config.num_tasks, config.num_tasks), np.nan)
        self.task_masks, self.records, self.tested = TaskMasks(), [], EvaluatedNetworks()
        self.carried: Any = None  # what the last task's approach handed on to the next (`Approach.carry`)
        self.inference = None if config.task_inference == "none" else TaskInference(
            config.task_inference, config.eval, self.accel.autocast, self.tested)
        self.acc_agnostic = np.full_like(self.acc, np.nan)
        self.epoch_rows: list[dict[str, Any]] = []  # metrics.csv's rows of the finished tasks ...
        self.task_rows: list[dict[str, Any]] = []  # ... and of the task in training
        self.tensorboard: TensorBoardLog | None = None

    def run(self, saved: dict[str, Any] | None, in_progress: dict[str, Any] | None,
            stop: StopRequest | None = None) -> dict[str, Any]:
        """Train and test the tasks not done yet; return the results (also written to results.json).

        When `stop` is requested, the task in progress is saved after the current optimizer step
        (while its tests run: as trained, before the next test batch, the tests abandoned; between
        tasks, the finished task's checkpoint is written), results.json is written marked
        incomplete and resumable, and RunStopped is raised.
        """
        config, out = self.config, self.config.output_dir
        if saved is not None:
            self.load_state_dict(saved)
            log.info("resuming %s after task %d of %d", out, len(self.records), config.num_tasks)
        first = len(self.records)
        if in_progress is not None and in_progress["task"] != first:
            in_progress = None  # left over from a task that finished after it was saved
        if in_progress is not None and in_progress.get(self.TRAINED):
            log.info("resuming task %d after its training: testing it", first + 1)
        elif in_progress is not None:
            log.info("resuming task %d after epoch %d", first + 1, in_progress["epochs_done"])
        if config.tensorboard:
            done = first * config.epochs + (in_progress["epochs_done"] if in_progress is not None else 0)
            self.tensorboard = TensorBoardLog(out / run_dir.TENSORBOARD_DIR, config.epochs, first_step=done + 1)
        for t in range(first, config.num_tasks):
            try:
                self.train_and_test(self.tasks[t], in_progress, stop)
            except NonFiniteLoss as diverged:
                self.write_results(stopped=str(diverged))
                raise
            except RunStopped as stopped:
                raise self.stopped(str(stopped)) from None
            in_progress = None
            run_dir.save_checkpoint(out / run_dir.CHECKPOINT_FILE, {"config": config.to_dict(), **self.state_dict()})
            (out / run_dir.PROGRESS_FILE).unlink(missing_ok=True)
            if stop is not None and stop.requested and t + 1 < config.num_tasks:
                raise self.stopped(f"{stop.name} after task {t + 1}")
        results = self.write_results()
        acc, bwt, fwt, above = (("n/a" if results[key] is None else f"{results[key]:.2f}")
                                for key in ("acc", "bwt", "fwt", "fwt_above_chance"))
        log.info("finished %d tasks: ACC %s %%, BWT %s, FWT %s (%s), FWT above chance %s (GEM's, with chance for an "
                 "untrained network), %s; results in %s", config.num_tasks, acc, bwt, fwt,
                 fwt_meaning(config.num_classes_per_task), above, final_agnostic_summary(results), out)
        return results

    def stopped(self, where: str) -> RunStopped:
        """Write results.json of the tasks done, marked resumable; the error that ends the run."""
        self.write_results(stopped=f"stopped by {where}", resumable=True)
        how = f"continue with the same command and --resume (--output_dir {self.config.output_dir})"
        log.warning("stopped by %s: everything is saved; %s", where, how)
        return RunStopped(f"stopped by {where}; saved: {how}")

    def train_and_test(self, task: Task, in_progress: dict[str, Any] | None, stop: StopRequest | None = None) -> None:
        """Train `task` (continuing `in_progress` if given), store its mask, measure its matrix row.

        A stop while the row is measured abandons it: the trained task is saved (`trained_state`)
        and RunStopped raised; `--resume` then measures the row again, whole, without training."""
        config, t = self.config, task.index
        if in_progress is not None and in_progress.get(self.TRAINED):
            mask, record, carry = self.load_trained(in_progress)
        else:
            frozen = self.task_masks.frozen_before(t) if config.isolate else None
            mask, record, carry = train_task(self.model, task, frozen, config, self.accel, in_progress,
                                             self.save_progress, stop, on_epoch=self.epoch_done, carried=self.carried)
        if mask is not None:
            self.task_masks.add(mask)
        rng = global_rng_state(self.accel.device)  # as training left it
        try:
            agnostic, self.acc[t] = self.test_rows(task, stop)
        except StopNow:
            self.save_progress(self.trained_state(t, TrainedTask(mask, record, carry), rng))
            raise RunStopped(f"{stop.name} in task {t + 1}, while testing it (its training is saved; "
                             "the tests run again)") from None
        if agnostic is not None:
            self.acc_agnostic[t] = agnostic.accuracy
            record["task_inference"] = {"task_id_accuracy": agnostic.task_id_accuracy, "seconds": agnostic.seconds,
                                        "forward_passes": agnostic.forward_passes,
                                        "backward_passes": agnostic.backward_passes}
        record["test_acc"] = float(self.acc[t, t])
        self.records.append(record)
        self.carried = carry
        self.task_tested(t, record)
        log.info("task %d/%d (classes %d-%d): train %.2f%% (epoch %d), test %.2f%%, %.1f s%s%s",
                 t + 1, config.num_tasks, task.classes.start, task.classes.stop - 1, record["train_acc"],
                 record["kept_epoch"], self.acc[t, t], record["train_seconds"], capacity_summary(record),
                 self.agnostic_summary(t))

    def test_rows(self, task: Task, stop: StopRequest | None = None) -> tuple[AgnosticRow | None, np.ndarray]:
        """Row t of the task-agnostic matrix (None without task inference) and of the accuracy matrix,
        right after training task t. StopNow if `stop` is requested before any test batch."""
        config, t = self.config, task.index
        classes = [task.classes for task in self.tasks]
        agnostic = None
        if self.inference is not None:  # first: its passes of a new network on its own test set serve both tests
            if self.inference.needs_training_images:  # task t's network as every later row tests it
                train_images = TensorLoader(task.train, batch_size=config.test_batch_size, train=False,
                                            device=self.accel.device, channels_last=self.accel.channels_last)
                self.inference.calibrate(self.model, self.task_masks, t, task.classes, train_images, stop)
            agnostic = self.inference.row(self.model, self.task_masks, classes, self.test_loaders, t, stop)
        row = evaluate_row(self.model, self.task_masks, classes, self.test_loaders, t, mode=config.eval,
                           autocast=self.accel.autocast, tested=self.tested, stop=stop)
        return agnostic, row

    def trained_state(self, t: int, trained: TrainedTask, rng: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Task t once trained, before its row is measured: what `train_task` returned (the mask
        bit-packed), the weights, the task's epoch rows and `rng`, the random states training left
        (`global_rng_state`); saved as the task in progress, with `epochs_done` all the epochs."""
        packed = None
        if trained.mask is not None:
            store = TaskMasks()
            store.add(trained.mask)
            packed = store.state_dict()
        return {"task": t, "epochs_done": self.config.epochs, self.TRAINED: True, "model": self.model.state_dict(),
                "mask": packed, "record": trained.record, "carry": trained.carry, "epoch_rows": self.task_rows, **rng}

    def load_trained(self, state: dict[str, Any]) -> TrainedTask:
        """Back to the moment `trained_state` was saved; what `train_task` returned."""
        self.model.load_state_dict(state["model"])
        self.task_rows = state["epoch_rows"]
        restore_global_rng_state(state, self.accel.device, derive_seed(self.config.seed, CUDA_STREAM, state["task"]))
        mask = None if state["mask"] is None else TaskMasks.from_state_dict(state["mask"], self.accel.device)[0]
        return TrainedTask(mask, state["record"], state.get("carry"))  # "carry": absent from earlier versions

    def epoch_done(self, rows: list[dict[str, Any]]) -> None:
        """The task in training finished an epoch (or started, with the rows of its epochs done):
        metrics.csv, and TensorBoard's scalars of the new epoch."""
        self.task_rows = rows
        self.write_metrics()
        if self.tensorboard is not None and rows:
            self.tensorboard.epoch(rows[-1])

    def task_tested(self, t: int, record: dict[str, Any]) -> None:
        """Task t was tested: its test accuracy on the row of the epoch it kept; its rows join the
        finished tasks' (saved with the checkpoint)."""
        mark_tested(self.task_rows, record["kept_epoch"], record["test_acc"])
        self.epoch_rows, self.task_rows = self.epoch_rows + self.task_rows, []
        self.write_metrics()
        if self.tensorboard is not None:
            self.tensorboard.task_tested(t + 1, self.acc[t, :t + 1].tolist())

    def write_metrics(self) -> None:
        run_dir.write_text(self.config.output_dir / run_dir.METRICS_FILE, metrics_csv(self.epoch_rows + self.task_rows))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def save_progress(self, state: dict[str, Any]) -> None:
        """Save the task in progress (a `TaskTraining.state_dict()`) with the run's config."""
        run_dir.save_checkpoint(self.config.output_dir / run_dir.PROGRESS_FILE,
                                {"config": self.config.to_dict(), **state})

    def state_dict(self) -> dict[str, Any]:
        calibration = {} if self.inference is None else {"calibration": self.inference.state_dict()}
        carried = {} if self.carried is None else {"approach_carry": self.carried}
        return {**calibration, **carried, "model": self.model.state_dict(), "task_masks": self.task_masks.state_dict(),
                "acc_matrix": self.acc.tolist(), "acc_matrix_agnostic": self.acc_agnostic.tolist(),
                "per_task": self.records, "tasks_done": len(self.records), "epoch_rows": self.epoch_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.task_masks = TaskMasks.from_state_dict(state["task_masks"], self.accel.device)
        if self.inference is not None and "calibration" in state:  # task inference's per-task calibrations
            self.inference.load_state_dict(state["calibration"])
        self.acc = np.array(state["acc_matrix"], dtype=float)
        if "acc_matrix_agnostic" in state:  # checkpoints from before task inference have none
            self.acc_agnostic = np.array(state["acc_matrix_agnostic"], dtype=float)
        self.records = state["per_task"]
        self.carried = state.get("approach_carry")
        self.epoch_rows = state.get("epoch_rows", [])  # absent from checkpoints of earlier versions

    def write_results(self, stopped: str | None = None, resumable: bool = False) -> dict[str, Any]:
        """results.json and report.txt of the tasks done so far; `stopped` says why a run ended early,
        `resumable` that --resume continues it (a signal; not a diverged run).

        The metrics of a stopped run are those of its finished tasks, as if the run had had that many.
        """
        done, acc, out = len(self.records), self.acc, self.config.output_dir
        results = {
            "complete": stopped is None,
            "tasks_done": done,
            **({"stopped": stopped, "resumable": resumable} if stopped else {}),
            "config": self.config.to_dict(),
            "acc_matrix": [[None if math.isnan(v) else v for v in row] for row in acc.tolist()],
            **(summarize(acc[:done, :done], self.config.num_classes_per_task) if done
               else dict.fromkeys(METRIC_KEYS)),
            **self.agnostic_results(),
            "train_flops_fraction": train_flops_fraction(self.records),
            "per_task": self.records,
            "environment": environment(self.accel.device),
        }
        report = format_report(acc[:done, :done], self.config.num_classes_per_task) if done else "no task finished"
        if results["acc_agnostic"] is not None:
            report += "\n\n" + format_agnostic_report(self.acc_agnostic[:done, :done], results["task_id_accuracy"],
                                                       self.config.task_inference, self.config.test_batch_size)
        run_dir.write_json(out / run_dir.RESULTS_FILE, results)
        run_dir.write_text(out / run_dir.REPORT_FILE, report + "\n")
        return results


    def agnostic_results(self) -> dict[str, Any]:
        """results.json's task-agnostic part: the method, its cost, the matrix and its figures
        (None without task inference, or when rows are missing: a run resumed from a checkpoint
        made before task inference existed)."""
        config, done = self.config, len(self.records)
        rows = [record.get("task_inference") for record in self.records]
        if self.inference is None or not done or None in rows:
            return {"task_inference": {"method": config.task_inference}, "acc_matrix_agnostic": None,
                    **dict.fromkeys(AGNOSTIC_KEYS)}
        matrix = self.acc_agnostic[:done, :done]
        cost = {key: sum(row[key] for row in rows) for key in ("seconds", "forward_passes", "backward_passes")}
        return {"task_inference": {"method": config.task_inference, "test_batch_size": config.test_batch_size, **cost},
                "acc_matrix_agnostic": [[None if math.isnan(v) else v for v in row] for row in self.acc_agnostic.tolist()],
                **summarize_agnostic(matrix, [row["task_id_accuracy"] for row in rows])}

    def agnostic_summary(self, t: int) -> str:
        """Task t's task-agnostic figures, for the log."""
        if self.inference is None:
            return ""
        row = self.records[t]["task_inference"]
        return (f"; task id hidden ({self.config.task_inference}): test {self.acc_agnostic[t, t]:.2f}%, mean "
                f"{np.mean(self.acc_agnostic[t, :t + 1]):.2f}% over tasks 1-{t + 1}, "
                f"{found_note(row['task_id_accuracy'], t + 1)} ({row['seconds']:.1f} s)")


def final_agnostic_summary(results: dict[str, Any]) -> str:
    """The finished run's task-agnostic figures for the log's last line (or that there are none)."""
    method = results["task_inference"]["method"]
    if results["acc_agnostic"] is None:
        return f"task id given only (--task_inference {method})"
    found = results["task_id_accuracy"]
    return (f"task-agnostic ACC {results['acc_agnostic']:.2f} % ({method}; last row: "
            f"{found_note(found[-1], len(found))})")


def train_flops_fraction(records: list[dict[str, Any]]) -> float | None:
    """The run's training FLOPs as a fraction of dense training's on the same images: the tasks'
    `train_flops` summed over their `train_flops_dense` summed. None when no task is done or a task's
    cost is not known (counted from a checkpoint of an earlier version)."""
    pairs = [(record.get("train_flops"), record.get("train_flops_dense")) for record in records]
    if not pairs or any(flops is None or dense is None for flops, dense in pairs):
        return None
    return sum(flops for flops, _ in pairs) / sum(dense for _, dense in pairs)


def capacity_summary(record: dict[str, Any]) -> str:
    """How much of the backbone a sparse task used, for the log."""
    if "density" not in record:
        return ""
    return (f"; {record['topology_updates']} topology updates; weights: {100 * record['density']:.1f} % in its "
            f"mask, {100 * record['capacity_reused']:.1f} % reused from earlier tasks, "
            f"{100 * record['capacity_free']:.1f} % still free")
