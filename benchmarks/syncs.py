"""Host-device synchronisations: how often the training loop makes the host wait for the GPU.

A CUDA step that never syncs lets the host queue the next kernels while the GPU works; one
`.item()`, `int(tensor)`, `nonzero()` or blocking copy per step serializes them. Counted with
`torch.cuda.set_sync_debug_mode("warn")`, which makes every synchronizing CUDA operation emit a
warning (the mode in effect before is restored after):

- `syncs_per_step`: through the loop's real per-step path, `utils.train.train_epoch` (forward,
  loss, backward, `Masking.step`, the loss/accuracy accumulation, the stop check) of the first
  task: (syncs of an epoch of 2N batches - syncs of an epoch of N batches) / N, so the epoch's
  own start (its shuffle) and end (reading loss and accuracy once) cancel out. One untimed
  epoch of N batches comes first.
- `syncs_per_topology_update`: one `Masking.update_topology` of a later task, per growth mode
  (the set-up of `topology`); an update every few hundred steps may sync.

On a CPU there is nothing to wait for: the rows say "n/a (cpu)" and the JSON holds null.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch

from benchmarks.report import NOT_ON_CPU, Result, Row
from benchmarks.step import first_task
from benchmarks.topology import prepared_update
from benchmarks.workload import Workload
from sparselearning import GROWTH_MODES
from utils.train import TaskTraining, train_epoch

SYNC_WARNING = "called a synchronizing CUDA operation"  # the text of c10's warn_or_error_on_sync


def count_sync_warnings(fn: Callable[[], object]) -> int:
    """How many synchronisation warnings calling `fn` emits (every one counts, repeats included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return sum(SYNC_WARNING in str(warning.message) for warning in caught)


def syncs_during(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronisations of the host with `device` while `fn` runs; None (and `fn` not called)
    where the device is not CUDA."""
    if device.type != "cuda":
        return None
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return count_sync_warnings(fn)
    finally:
        torch.cuda.set_sync_debug_mode(before)


def epoch_syncs(work: Workload, batches: int) -> int | None:
    """Synchronisations in one `train_epoch` of `batches` batches of the first task."""
    config = dataclasses.replace(work.config, max_batches=batches)
    training = TaskTraining(work.model(config.seed), work.tasks[0], None, config, work.accel)
    return syncs_during(lambda: train_epoch(training, 0), work.device)


def per_step(work: Workload) -> tuple[float | None, int]:
    """Synchronisations per training step, and the N they were counted over."""
    n = work.repeats.sync_batches
    epoch_syncs(work, n)  # warm-up: first-use initialisation is no step's cost
    short, long = epoch_syncs(work, n), epoch_syncs(work, 2 * n)
    return (None if short is None else (long - short) / n), n


def run(work: Workload) -> Result:
    if work.device.type != "cuda":
        rows = [Row("host syncs per training step (train_epoch)", NOT_ON_CPU, key="syncs_per_step"),
                Row("host syncs per topology update", NOT_ON_CPU)]
        return Result(rows, {"syncs_per_step": None, "syncs_per_topology_update": None,
                             "syncs_per_topology_update_by_growth": None})
    steps, n = per_step(work)
    first = first_task(work)
    by_growth = {growth: syncs_during(prepared_update(work, growth, first), work.device) for growth in GROWTH_MODES}
    rows = [Row(f"host syncs per training step (train_epoch, {2 * n} vs {n} batches)", f"{steps:g}",
                key="syncs_per_step", checked=steps),
            Row("host syncs per topology update (" + ", ".join(f"{g} {c}" for g, c in by_growth.items()) + ")",
                f"{max(by_growth.values())}")]
    figures = {"syncs_per_step": steps, "syncs_counted_over_batches": n,
               "syncs_per_topology_update": max(by_growth.values()), "syncs_per_topology_update_by_growth": by_growth}
    return Result(rows, figures)
