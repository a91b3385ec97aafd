"""Training one task: its sparse sub-network, its optimizer, its epochs.

`train_task` is the loop; `TaskTraining` is everything the task's training holds (model,
optimizer, LR schedule, Masking, loader, the kept best epoch, the random state), with one
`state_dict()` / `load_state_dict()`: what a progress checkpoint saves is, by construction, what
`--resume` restores. `train_epoch` is one pass over the task's training data.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import Split, TensorLoader
from sparselearning import derive_seed
from utils.acceleration import Acceleration
from utils.approaches import Approach, approach_class
from utils.cli import Config
from utils.epoch_metrics import epoch_row
from utils.errors import NonFiniteLoss, RunStopped
from utils.evaluation import predictions
from utils.stopping import StopRequest

log = logging.getLogger(__name__)

LOADER_STREAM, MASK_STREAM, CUDA_STREAM = 1, 2, 3  # per task: derive_seed(config.seed, stream, task)


def approach_state(state: dict[str, Any]) -> Any:
    """The approach's part of a saved task (`TaskTraining.state_dict()`, or a kept epoch): saved as
    "masking" (DST's Masking state, None when dense) before training moved behind `utils.approaches`."""
    return state["approach"] if "approach" in state else state["masking"]


def global_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The states of torch's global generators a task checkpoint saves: the CPU's, and the CUDA
    generator of `device` when the run trains on one (its Philox state, a CPU byte tensor).

    The run draws from neither once the model is built: the loader, the masks and fresh weights
    have generators of their own, saved with their objects (the loader's is a CPU generator on
    every device, so a CPU and a GPU run of a seed shuffle and augment alike). They are saved so
    that a resumed task continues any draw from them exactly (an op added later, a library's).
    """
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_global_rng_state(state: dict[str, Any], device: torch.device, seed: int) -> None:
    """Put back what `global_rng_state` saved, on the device the run resumes on.

    A checkpoint without them (an earlier version's) leaves the generators as they are. One saved
    on a GPU and resumed elsewhere: its CUDA state is of no use there, said in a warning. One
    without a CUDA state resumed on a GPU (saved on a CPU, or by an earlier version): the CUDA
    generator is seeded from `seed` (derive_seed(--seed, CUDA_STREAM, task)), said in a warning.
    Either way the run goes on deterministically, but it is not the uninterrupted run of this device.
    """
    if "torch_rng" in state:  # absent from checkpoints of earlier versions
        torch.set_rng_state(state["torch_rng"])
    saved = state.get("cuda_rng")
    if device.type != "cuda":
        if saved is not None:
            log.warning("the task's checkpoint holds a CUDA random state, which this run on %s does not use (saved "
                        "on a GPU: the run goes on deterministically, but it is not the run the GPU would have made)",
                        device)
        return
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)
        return
    torch.cuda.manual_seed_all(seed)  # the run's device among them (a run trains on one)
    log.warning("the task's checkpoint holds no CUDA random state (saved on a CPU, or by an earlier version): "
                "the CUDA generator is seeded from --seed; the run goes on deterministically, but it is not the "
                "run this GPU would have made uninterrupted")


@dataclass(frozen=True)
class Task:
    """One task: its index, its slice of the classifier, and its data."""

    index: int
    classes: slice
    train: Split
    test: Split


class TrainedTask(NamedTuple):
    """What training a task leaves: its network's mask (None: the whole model), its record, and
    what its approach hands to the next task's (`Approach.carry`; None for most)."""

    mask: dict[str, torch.Tensor] | None
    record: dict[str, Any]
    carry: Any = None


@dataclass
class EpochProgress:
    """An epoch under way: the loader's state before the epoch drew its shuffle and augmentation,
    the batches done, and the sums the epoch's loss and accuracy come from (device tensors once a
    batch is done). Saved when a run stops mid-epoch, so that it continues exactly there."""

    loader: dict[str, Any]
    first_nonfinite: torch.Tensor  # the first batch with a non-finite loss, -1 while there is none
    batches_done: int = 0
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seen: int = 0

    def add(self, batch: int, loss: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        """Count one finished batch (no host synchronisation)."""
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~loss.isfinite(), batch, self.first_nonfinite)
        self.loss_sum += loss * images
        self.correct += correct
        self.seen += images
        self.batches_done = batch + 1

    def state_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> EpochProgress:
        """The saved sums on `device` (the loader's generator state stays a CPU state)."""
        return cls(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in state.items()})


def batches_per_epoch(loader: TensorLoader, config: Config) -> int:
    return len(loader) if config.max_batches is None else min(len(loader), config.max_batches)


class TaskTraining:
    """The state of one task in training.

    Built fresh for the task: a shuffling, augmenting loader with the task's own seed, and the
    task's approach (`utils.approaches`: DST's Masking with the earlier tasks' weights `frozen`,
    its initial mask drawn, or another) with its fresh optimizer and LR schedule (DST's:
    MultiStepLR, x0.1 at 50 % and 75 % of the epochs). `end_epoch` keeps the epoch the task will
    keep (`--keep best_train`: the best training accuracy; `last`) among those the approach allows.
    """

    # What state_dict() holds, each part once. Objects with their own state_dict():
    OBJECTS = ("model", "optimizer", "scheduler", "approach", "loader", "epoch_progress")
    # ... and plain values: epochs finished, the kept epoch and its copy (see `state_dict`), the
    # finished epochs' rows of metrics.csv (`utils.epoch_metrics`).
    VALUES = ("epochs_done", "best_acc", "best_epoch", "kept", "epoch_rows")
    # ... and the approach's training cost so far, "train_cost" (`Approach.count_step`; not in the
    # approach's own state, which the kept epoch also copies: the cost counts every epoch).

    def __init__(self, model: nn.Module, task: Task, frozen: dict[str, torch.Tensor] | None, config: Config,
                 accel: Acceleration, carried: Any = None) -> None:
        self.model, self.task, self.config, self.accel = model, task, config, accel
        self.loader = TensorLoader(task.train, batch_size=config.batch_size, train=True, device=accel.device,
                                   seed=derive_seed(config.seed, LOADER_STREAM, task.index),
                                   channels_last=accel.channels_last)
        self.approach: Approach = approach_class(config)(
            model, frozen, config, total_steps=config.epochs * batches_per_epoch(self.loader, config),
            seed=derive_seed(config.seed, MASK_STREAM, task.index), carried=carried)
        self.approach.measure(tuple(task.train.images.shape[1:]))  # the layers' MACs for the task's images
        self.optimizer = self.approach.optimizer
        self.scheduler = self.approach.make_scheduler(config.epochs)
        self.epochs_done = 0
        self.best_acc, self.best_epoch = -math.inf, -1
        self.kept: dict[str, Any] | None = None  # a copy of the kept epoch; None: the current state
        self.epoch_rows: list[dict[str, Any]] = []
        self.epoch_progress: EpochProgress | None = None  # an epoch stopped half-way, to continue
        self._earlier_seconds, self._started = 0.0, time.perf_counter()
        self._saved_epochs, self._saved_at = 0, time.monotonic()  # the last progress save (or the start)

    @property
    def seconds(self) -> float:
        """Seconds spent training this task, in this process and (when resumed) earlier ones."""
        return self._earlier_seconds + time.perf_counter() - self._started

    def progress_save_due(self) -> bool:
        """Save the task in progress now? When at least --checkpoint_every epochs and at least
        --checkpoint_minutes minutes have passed since the last save (or the start), except after
        the last epoch (the task's end writes the run's checkpoint). --checkpoint_every 0: never."""
        every, minutes = self.config.checkpoint_every, self.config.checkpoint_minutes
        if every == 0 or self.epochs_done >= self.config.epochs:
            return False
        return self.epochs_done - self._saved_epochs >= every and time.monotonic() - self._saved_at >= 60 * minutes

    def saved(self) -> None:
        """Note that the task in progress was just saved (the cadence counts from here)."""
        self._saved_epochs, self._saved_at = self.epochs_done, time.monotonic()

    def end_epoch(self, loss: float, acc: float) -> None:
        """Record the epoch's row, step the LR schedule, keep this epoch if it is the one the task keeps."""
        self.epoch_rows.append(epoch_row(self.task.index, self.epochs_done, loss, acc,
                                         self.scheduler.get_last_lr()[0], self.approach.topology_updates,
                                         self.seconds))
        self.scheduler.step()
        epoch, self.epochs_done = self.epochs_done, self.epochs_done + 1
        if self.approach.keepable() and (self.config.keep == "last" or acc > self.best_acc):
            self.best_acc, self.best_epoch = acc, epoch
            last = self.epochs_done == self.config.epochs
            self.kept = self._snapshot() if self.config.keep == "best_train" and not last else None
        self.approach.end_epoch(self.epochs_done)

    def _snapshot(self) -> dict[str, Any]:
        """Copies of the weights and the approach's state, to go back to this epoch at the end."""
        weights = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        return {"model": weights, "approach": self.approach.state_dict()}

    def finish(self) -> TrainedTask:
        """Go back to the kept epoch; the task's final mask (None: the whole model), its record and carry."""
        updates = self.approach.topology_updates  # in training, all epochs
        if self.kept is not None:
            self.model.load_state_dict(self.kept["model"])
            self.approach.load_state_dict(approach_state(self.kept))
        record: dict[str, Any] = {
            "task": self.task.index + 1,  # as the log numbers tasks: from 1
            "classes": [self.task.classes.start, self.task.classes.stop - 1],  # first and last, as in the log
            "train_seconds": self.seconds,
            "kept_epoch": self.best_epoch + 1,
            "train_acc": self.best_acc,
        }
        mask, extra = self.approach.finish()
        record.update(extra)
        record.update(self.approach.cost_record(mask))  # FLOPs of training (all epochs) and of the network
        if mask is not None:
            record["topology_updates"] = updates
            record["mask_bits"] = sum(m.numel() for m in mask.values())  # stored bit-packed: one a maskable weight
        return TrainedTask(mask, record, self.approach.carry())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the task exactly (references; save it before training on).

        Nothing twice: when the kept epoch is the current state, `kept` is saved as None and
        `kept_is_current` says to copy the current state again on loading.
        """
        state: dict[str, Any] = {"task": self.task.index, "seconds": self.seconds,
                                 **global_rng_state(self.accel.device)}
        for name in self.OBJECTS:
            part = getattr(self, name)
            state[name] = part.state_dict() if part is not None else None
        state |= {name: getattr(self, name) for name in self.VALUES}
        state["train_cost"] = {"macs": self.approach.train_macs, "images": self.approach.train_images}
        kept_is_current = (self.kept is not None and self.best_epoch == self.epochs_done - 1
                           and self.epoch_progress is None)
        return state | {"kept": None if kept_is_current else self.kept, "kept_is_current": kept_is_current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; the objects were built fresh for the same task."""
        # In this order (Masking enforces its masks on the optimizer's state); the last part, an epoch
        # stopped half-way, is no object until then: it is rebuilt from its state below.
        for name in self.OBJECTS[:-1]:
            part = getattr(self, name)
            part.load_state_dict(approach_state(state) if name == "approach" else state[name])
        partial = state.get("epoch_progress")  # absent from checkpoints of earlier versions, like the RNG states
        self.epoch_progress = EpochProgress.from_state_dict(partial, self.accel.device) if partial else None
        for name in self.VALUES:
            if name in state:  # epoch_rows: absent from checkpoints of earlier versions
                setattr(self, name, state[name])
        cost = state.get("train_cost")  # absent from checkpoints of earlier versions, which did not count
        if cost is not None:
            self.approach.train_macs, self.approach.train_images = cost["macs"], cost["images"]
        elif self.epochs_done or self.epoch_progress is not None:
            self.approach.train_macs = None  # steps were trained uncounted: the training cost is not known
        if state.get("kept_is_current"):
            self.kept = self._snapshot()
        restore_global_rng_state(state, self.accel.device,
                                 derive_seed(self.config.seed, CUDA_STREAM, self.task.index))
        self._earlier_seconds, self._started = state["seconds"], time.perf_counter()
        self.saved()


def train_epoch(training: TaskTraining, epoch: int, stop: StopRequest | None = None) -> tuple[float, float] | None:
    """One pass over the task's training data; returns (mean loss, accuracy in percent), or None
    when `stop` was requested: the epoch then stops after the current optimizer step and
    `training.epoch_progress` says where (a saved epoch in progress continues from there).

    The loss is the cross-entropy over the task's slice of the logits (the task id is known).
    Loss, accuracy and the first batch with a non-finite loss are tracked on the device and read
    once, at the end: the loop never waits for the GPU. A non-finite loss raises NonFiniteLoss.
    """
    model, task, config, accel = training.model, training.task, training.config, training.accel
    model.train()
    no_nonfinite = torch.tensor(-1, device=accel.device)
    progress = training.epoch_progress or EpochProgress(training.loader.state_dict(), no_nonfinite)
    training.loader.load_state_dict(progress.loader)  # an epoch continued draws its shuffle again
    total = batches_per_epoch(training.loader, config)
    for batch, (x, y) in itertools.islice(enumerate(training.loader), progress.batches_done, total):
        with accel.autocast():
            logits = training.approach.forward(x)
        loss = F.cross_entropy(logits[:, task.classes].float(), y - task.classes.start)
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.approach.step()  # the optimizer's step, as the approach restricts it
        training.approach.count_step(len(y))  # its training FLOPs
        correct = (predictions(logits.detach(), task.classes, config.eval) == y).sum()
        progress.add(batch, loss.detach(), correct, len(y))
        if stop is not None and stop.requested and progress.batches_done < total:  # else: end the epoch
            training.epoch_progress = progress
            return None
    training.epoch_progress = None
    if (bad := int(progress.first_nonfinite)) >= 0:
        raise NonFiniteLoss(f"non-finite loss in task {task.index + 1}, epoch {epoch + 1}, batch {bad + 1}; "
                            "the finished tasks' results are in results.json (try a smaller --lr)")
    return float(progress.loss_sum) / progress.seen, 100.0 * float(progress.correct) / progress.seen


def train_task(
    model: nn.Module,
    task: Task,
    frozen: dict[str, torch.Tensor] | None,
    config: Config,
    accel: Acceleration,
    in_progress: dict[str, Any] | None = None,
    save_progress: Callable[[dict[str, Any]], None] | None = None,
    stop: StopRequest | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    carried: Any = None,
) -> TrainedTask:
    """Train `model` on one task; return the task's final mask (None: the whole model), a record,
    and what its approach hands on to the next task's (`carried` is what the previous one handed on).

    `in_progress` (a `TaskTraining.state_dict()`) continues the task from there, exactly. The
    task's state goes to `save_progress` when `TaskTraining.progress_save_due`, and when `stop` is
    requested, after the current optimizer step; RunStopped is then raised. `on_epoch` gets the
    task's epoch rows (`utils.epoch_metrics`) at the start and after every epoch.
    """
    training = TaskTraining(model, task, frozen, config, accel, carried)
    if in_progress is not None:
        training.load_state_dict(in_progress)
    if on_epoch is not None:
        on_epoch(training.epoch_rows)
    # A progress bar on a terminal; where stderr is a file (sweep logs, SLURM) a line per epoch instead.
    bar = sys.stderr.isatty()
    progress = tqdm(range(training.epochs_done, config.epochs), desc=f"task {task.index + 1}", unit="epoch",
                    initial=training.epochs_done, total=config.epochs, leave=False, disable=not bar)
    for epoch in progress:
        result = train_epoch(training, epoch, stop)
        if result is not None:
            loss, acc = result
            training.end_epoch(loss, acc)
            if on_epoch is not None:
                on_epoch(training.epoch_rows)
            progress.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}")
            log.log(logging.DEBUG if bar else logging.INFO, "task %d epoch %d: loss %.4f, train accuracy %.2f%%",
                    task.index + 1, epoch + 1, loss, acc)
        stopping = stop is not None and stop.requested and training.epochs_done < config.epochs
        if save_progress is not None and (stopping or training.progress_save_due()):
            save_progress(training.state_dict())
            training.saved()
        if stopping:
            where = (f"epoch {epoch + 1}, batch {training.epoch_progress.batches_done}" if result is None
                     else f"after epoch {epoch + 1}")
            raise RunStopped(f"{stop.name} in task {task.index + 1}, {where}")
    return training.finish()
