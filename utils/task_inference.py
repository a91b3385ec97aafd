"""Task-agnostic testing: the task id of a test batch is hidden and inferred, then the batch is
predicted within the inferred task's classes by the inferred task's network.

The paper tests with the task id given (task-incremental). Here, after training task i, each test
batch of a task j <= i is assigned to one of the tasks 0..i trained so far by one of:

- ``confidence``: every candidate task's network (its mask applied, as for testing) runs on the
  batch; the task whose network is most confident within its own classes wins (the mean over
  the batch of the largest softmax probability);
- ``entropy``: the same, the task with the lowest mean entropy over its own classes wins;
- ``oneshot``: SupSup's one-shot rule (Wortsman et al., NeurIPS 2020): one forward pass of the
  weights times the superposition sum_t a_t M_t of the candidates' masks (all a_t = 1/T), the
  entropy H of the output over the candidates' classes, one backward pass; the task whose
  coefficient's gradient dH/da_t is the most negative (raising a_t lowers H the most) wins;
- ``calibrated``: ``confidence`` relative to the network's own usual confidence: each claim is
  divided by the network's mean confidence on its own task's training images (`measure_calibration`:
  measured once right after the task is trained, without augmentation, in batches of the test
  batch size; never on test images). The networks of different tasks are not calibrated against
  each other (with uniform init, task 1's network is the most confident on every task's images,
  so raw confidences send most batches to task 1); a network that is confident on everything is
  also confident on its own training images, and the ratio removes that.

A batch assigned to the wrong task counts all its images as wrong; one assigned to its own task
counts what its network predicts right (as the task-aware test does). BatchNorm normalizes with
each batch's statistics, so a test batch must hold images of one task: `--test_batch_size` matters.

Cost: ``confidence``/``entropy`` need every candidate network's forward pass on every batch, but a
network keeps its outputs on a test set while its weights stay the same (`EvaluatedNetworks`):
with isolation, row i runs only task i's network on tasks 0..i and tasks 0..i-1's networks on task
i's batches, 2i + 1 test sets in all, one of which (task i's network on its own test set) the
task-aware test then reuses. A dense network serves every candidate with one forward pass.
``oneshot`` needs one forward and one backward pass per batch and row (the superposition changes
with every row), plus each task's own network on its own test set once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from data import TensorLoader
from sparselearning import TaskMasks
from sparselearning.task_masks import Masks
from utils.evaluation import EvaluatedNetworks, percent, predictions, task_network
from utils.stopping import StopRequest

INFERENCE_METHODS = ("none", "confidence", "entropy", "oneshot", "calibrated")
"""`--task_inference` choices; "none" tests with the task id given only."""

CALIBRATED_METHODS = ("calibrated",)
"""Methods that weigh each network's claims by what it claims on its own task's training images
(`measure_calibration`, once right after the task is trained)."""

DEFAULT_METHOD = "none"
"""The default: the paper's protocol (task id given), which needs no inference. Inference is
beyond the paper, costs (a third of a 10-task CIFAR-100 run's time on a CPU, measured with
"confidence") and, with the paper's default uniform init, finds the task at about chance."""

Autocast = Callable[[], contextlib.AbstractContextManager]
Outputs = tuple[list[tuple[torch.Tensor, ...]], "torch.Tensor | None"]
"""One network on one test set: per batch its logits within each candidate task's classes, and
(on its own task's test set) the right predictions per batch."""


@dataclass(frozen=True)
class AgnosticRow:
    """Row i of the task-agnostic accuracy matrix, and what it took."""

    accuracy: np.ndarray  # percent, per test task; NaN for tasks not trained yet
    task_id_accuracy: float  # percent of test batches of tasks 0..i assigned to their own task
    seconds: float
    forward_passes: int  # network forward passes over one test batch
    backward_passes: int


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 (from bfloat16 autocast, say), or in their own wider type."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def mean_confidence(logits: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of the largest softmax probability."""
    return at_least_float32(logits).log_softmax(1).max(1).values.exp().mean()


def claims(logits: torch.Tensor, method: str, calibration: float | None = None) -> torch.Tensor:
    """How strongly a batch's logits within one task's classes claim that task (higher wins): the
    mean largest softmax probability (confidence), minus the mean entropy (entropy), or the mean
    largest probability over `calibration`, the network's mean on its own training images
    (calibrated)."""
    if method == "entropy":
        log_p = at_least_float32(logits).log_softmax(1)
        return (log_p.exp() * log_p).sum(1).mean().unsqueeze(0)  # minus the entropy
    confidence = mean_confidence(logits)
    return (confidence / calibration if method == "calibrated" else confidence).unsqueeze(0)


@torch.no_grad()
def measure_calibration(model: nn.Module, task_masks: TaskMasks, t: int, own: slice, train: TensorLoader,
                        autocast: Autocast = contextlib.nullcontext, stop: StopRequest | None = None) -> float:
    """Task t's mean confidence within its classes `own` on its training images `train` (a loader
    with train=False: fixed order, no augmentation; batches of the test batch size, as BatchNorm
    uses batch statistics): the mean over batches of `mean_confidence`. Reads the weights only.
    With `stop`, a stop requested before a batch raises StopNow."""
    model.eval()
    per_batch = []
    with task_network(model, task_masks, t):
        for x, _ in train:
            if stop is not None:
                stop.check()
            with autocast():
                logits = model(x)
            per_batch.append(mean_confidence(logits[:, own]))
    return float(torch.stack(per_batch).mean())


def superposition_gradient(model: nn.Module, masks: list[Masks], x: torch.Tensor, classes: list[slice],
                           autocast: Autocast = contextlib.nullcontext) -> torch.Tensor:
    """dH/da_t for each of the T candidate masks at a_t = 1/T: H is the mean entropy of the softmax
    over the candidates' classes of the network whose masked weights are W * sum_t a_t M_t.

    One forward and one backward pass: with G = dH/dW' at W' = W * sum_t a_t M_t, the chain rule
    gives dH/da_t = sum over the masked weights of G * W * M_t. The model's parameters, their
    gradients and its buffers are left as they were.
    """
    params = dict(model.named_parameters())
    names = list(masks[0])
    weights = {name: params[name].detach() for name in names}
    superposed = {name: (weights[name] * (sum(m[name].to(weights[name].dtype) for m in masks) / len(masks)))
                  .requires_grad_() for name in names}
    columns = torch.cat([torch.arange(c.start, c.stop, device=x.device) for c in classes])
    with torch.enable_grad():
        with autocast():
            logits = torch.func.functional_call(model, superposed, (x,), strict=False)
        log_p = at_least_float32(logits[:, columns]).log_softmax(1)
        entropy = -(log_p.exp() * log_p).sum(1).mean()
        grads = torch.autograd.grad(entropy, [superposed[name] for name in names])
    weighted = [grad * weights[name] for grad, name in zip(grads, names)]
    return torch.stack([sum((g * m[name]).sum() for g, name in zip(weighted, names)) for m in masks])


class TaskInference:
    """Measures rows of the task-agnostic accuracy matrix with one method, reusing what the networks
    computed before while their weights stay the same (shared with the task-aware test's `tested`).

    `calibrate` and `row` take an optional `stop` (`utils.stopping.StopRequest`): a stop requested
    before any batch raises StopNow, abandoning the calibration or row (nothing of it is kept but the
    outputs of the networks that finished a whole test set, valid while their weights stay the same)."""

    def __init__(self, method: str, mode: str, autocast: Autocast = contextlib.nullcontext,
                 tested: EvaluatedNetworks | None = None) -> None:
        if method not in INFERENCE_METHODS[1:]:
            raise ValueError(f"task inference method must be one of {INFERENCE_METHODS[1:]}, got {method!r}")
        self.method, self.mode, self.autocast = method, mode, autocast
        self.tested = EvaluatedNetworks() if tested is None else tested
        self.calibration: dict[int, float] = {}  # per task: its network's `measure_calibration`
        self._forward = self._backward = 0
        self._calibration_cost = (0.0, 0)  # seconds and forward passes not yet counted in a row

    @property
    def needs_training_images(self) -> bool:
        """Whether each task's network must be calibrated on its training images (`calibrate`)."""
        return self.method in CALIBRATED_METHODS

    def calibrate(self, model: nn.Module, task_masks: TaskMasks, t: int, own: slice, train: TensorLoader,
                  stop: StopRequest | None = None) -> None:
        """Measure task t's `measure_calibration` on its training images (right after training it);
        its cost is counted in the next row's."""
        start = time.perf_counter()
        self.calibration[t] = measure_calibration(model, task_masks, t, own, train, self.autocast, stop)
        seconds, passes = self._calibration_cost
        self._calibration_cost = (seconds + time.perf_counter() - start, passes + len(train))

    def state_dict(self) -> list[float]:
        """The calibrations measured so far, task by task (a run's checkpoint keeps them)."""
        return [self.calibration[t] for t in sorted(self.calibration)]

    def load_state_dict(self, state: list[float]) -> None:
        self.calibration = dict(enumerate(state))

    def row(self, model: nn.Module, task_masks: TaskMasks, classes: list[slice], loaders: list[TensorLoader],
            i: int, stop: StopRequest | None = None) -> AgnosticRow:
        """Row i (right after training task i): task j's test batches, j <= i, their task inferred
        among tasks 0..i; `classes[j]`/`loaders[j]` are task j's classifier slice and test batches."""
        if self.method == "oneshot" and len(task_masks) <= i:
            raise ValueError("oneshot task inference needs a mask per task (a sparse run)")
        if self.needs_training_images and any(t not in self.calibration for t in range(i + 1)):
            raise ValueError(f"{self.method} task inference needs every task's calibration (calibrate)")
        start, self._forward, self._backward = time.perf_counter(), 0, 0
        model.eval()
        if self.method == "oneshot":
            chosen = self._oneshot_choices(model, task_masks, classes, loaders, i, stop)
            correct = [self._outputs(model, task_masks, j, classes, loaders, [j], stop)[j][1] for j in range(i + 1)]
        else:
            scores, correct = self._network_scores(model, task_masks, classes, loaders, i, stop)
            chosen = [s.argmax(1) for s in scores]
        accuracy = np.full(len(loaders), np.nan)
        hits, batches = 0, 0
        for j in range(i + 1):
            right = chosen[j] == j
            hits, batches = hits + int(right.sum()), batches + len(right)
            accuracy[j] = percent((correct[j] * right).sum(), len(loaders[j].labels))
        (seconds, passes), self._calibration_cost = self._calibration_cost, (0.0, 0)
        return AgnosticRow(accuracy, 100.0 * hits / batches, time.perf_counter() - start + seconds,
                           self._forward + passes, self._backward)

    # ---------------------------------------------------------------- confidence and entropy

    def _network_scores(self, model: nn.Module, task_masks: TaskMasks, classes: list[slice],
                        loaders: list[TensorLoader], i: int,
                        stop: StopRequest | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per test task j <= i: the claims of candidates 0..i on each batch ([batches, i + 1]) and
        the right predictions of task j's own network per batch."""
        if len(task_masks) <= i:  # dense: one network serves every candidate, one pass per batch
            outputs = [self._run(model, loaders[j], classes[: i + 1], classes[j], stop) for j in range(i + 1)]
            scores = [torch.stack([torch.cat([claims(z, self.method, self.calibration.get(t))
                                              for t, z in enumerate(zs)]) for zs in logits])
                      for logits, _ in outputs]
            return scores, [correct for _, correct in outputs]
        columns: list[list[torch.Tensor]] = [[] for _ in range(i + 1)]
        correct: list[torch.Tensor] = []
        for t in range(i + 1):
            outputs = self._outputs(model, task_masks, t, classes, loaders, range(i + 1), stop)
            for j in range(i + 1):
                columns[j].append(torch.cat([claims(z, self.method, self.calibration.get(t))
                                             for z, in outputs[j][0]]))
            correct.append(outputs[t][1])
        return [torch.stack(c, 1) for c in columns], correct

    def _outputs(self, model: nn.Module, task_masks: TaskMasks, t: int, classes: list[slice],
                 loaders: list[TensorLoader], tests: Sequence[int], stop: StopRequest | None) -> dict[int, Outputs]:
        """Task t's network on the test sets `tests`: per set its `Outputs`, kept while the
        network's weights stay the same (one check of them per call). On its own test set, the
        same passes give the task-aware test's accuracy, kept for it: the same predictions of
        the same batches, so the same figure, without passes of its own."""
        kept = self.tested.results(model, task_masks, t)
        missing = [j for j in tests if ("outputs", j) not in kept]
        if missing:
            with task_network(model, task_masks, t):
                for j in missing:
                    kept[("outputs", j)] = self._run(model, loaders[j], [classes[t]], classes[t] if t == j else None,
                                                     stop)
            if t in missing:
                own = percent(kept[("outputs", t)][1].sum(), len(loaders[t].labels))
                kept.setdefault(EvaluatedNetworks.ACCURACY, own)
        return {j: kept[("outputs", j)] for j in tests}

    def _run(self, model: nn.Module, loader: TensorLoader, candidates: list[slice], own: slice | None,
             stop: StopRequest | None) -> Outputs:
        """One network over `loader`: per batch its logits within each candidate's classes, and
        with `own` (the test task's classes) the number of right predictions within them."""
        logits_by_batch, correct = [], []
        with torch.no_grad():
            for x, y in loader:
                if stop is not None:
                    stop.check()
                with self.autocast():
                    logits = model(x)
                self._forward += 1
                logits_by_batch.append(tuple(at_least_float32(logits[:, c]) for c in candidates))
                if own is not None:
                    correct.append((predictions(logits, own, self.mode) == y).sum())
        return logits_by_batch, torch.stack(correct) if own is not None else None

    # ---------------------------------------------------------------- one-shot

    def _oneshot_choices(self, model: nn.Module, task_masks: TaskMasks, classes: list[slice],
                         loaders: list[TensorLoader], i: int, stop: StopRequest | None) -> list[torch.Tensor]:
        """Per test task j <= i, the task each of its batches is assigned to by the one-shot rule."""
        params = dict(model.named_parameters())
        masks = [{name: m.to(params[name].device) for name, m in task_masks[t].items()} for t in range(i + 1)]
        chosen = []
        for j in range(i + 1):
            picks = []
            for x, _ in loaders[j]:
                if stop is not None:
                    stop.check()
                picks.append(superposition_gradient(model, masks, x, classes[: i + 1], self.autocast).argmin())
                self._forward += 1
                self._backward += 1
            chosen.append(torch.stack(picks))
        return chosen
