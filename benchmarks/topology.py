"""Topology update: one full prune-and-grow on every sparse layer of ResNet-18, per growth mode.

Each mode gets a later task's Masking (density 0.2 ERK, the first task's mask frozen) after
one training step (so that the optimizer has state, which an update zeroes where it prunes,
and momentum growth has running averages) and the dense gradient of a second batch, as
`Masking.step` hands it to an update. The timed call is
`Masking.update_topology` at the start of the task, where the prune fraction is largest
(about 0.5 of each layer's active weights). The baseline is the same update done the way the
authors' code does it, with a full `torch.sort` per layer for pruning and for (gradient)
growth. `topology_ms` is the slowest mode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.report import Result, Row, ms
from benchmarks.step import first_task
from benchmarks.timing import alternating_medians
from benchmarks.workload import Workload
from sparselearning import GROWTH_MODES, Masking

SORT_BASELINE = "sort-based (authors')"


def sort_based_update(masking: Masking) -> None:
    """Baseline: magnitude pruning and gradient growth with a full sort per layer."""
    rate = masking.death_rate_at(masking.steps)
    with torch.no_grad():
        for name, p in masking.params.items():
            count = masking.counts[name]
            k = math.ceil(rate * count)
            if count == p.numel() or k == 0:
                continue
            mask = masking.masks[name].view(-1)
            magnitude = torch.where(mask, p.view(-1).abs(), math.inf)
            mask[torch.sort(magnitude).indices[:k]] = False
            scores = torch.where(mask, -math.inf, p.grad.view(-1).abs())
            mask[torch.sort(scores, descending=True).indices[:k]] = True


def prepared_update(work: Workload, growth: str,
                    first: tuple[nn.Module, dict[str, torch.Tensor]]) -> Callable[[], None]:
    """One topology update of a later task just begun after `first` (a model and the mask to
    freeze), by `growth` or by the sort-based baseline, ready to call."""
    model, frozen = copy.deepcopy(first[0]), first[1]
    optimizer = work.optimizer(model)
    masking = work.masking(model, optimizer, growth=growth if growth in GROWTH_MODES else "gradient",
                           frozen=frozen, seed=1)
    batch = work.fixed_batch()
    work.training_step(model, optimizer, batch, masking)()  # Adam state, which an update must zero too
    optimizer.zero_grad(set_to_none=True)  # the dense gradient of a batch, as step() hands it to an update
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    return masking.update_topology if growth in GROWTH_MODES else (lambda: sort_based_update(masking))


def update_seconds(work: Workload, growth: str, first: tuple[nn.Module, dict[str, torch.Tensor]]) -> float:
    """Median seconds of one `prepared_update`."""
    update = prepared_update(work, growth, first)
    return alternating_medians([update], work.device, repeats=work.repeats.topology_rounds, warmup=0)[0]


def run(work: Workload) -> Result:
    first = first_task(work)
    seconds = {growth: update_seconds(work, growth, first) for growth in (*GROWTH_MODES, SORT_BASELINE)}
    baseline = seconds.pop(SORT_BASELINE)
    rows = [Row(f"topology update, {growth} growth", ms(s), ms(baseline), s / baseline, key="topology_ms",
                checked=s * 1e3) for growth, s in seconds.items()]
    figures = {"topology_ms": max(seconds.values()) * 1e3,
               "topology_ms_by_growth": {growth: s * 1e3 for growth, s in seconds.items()},
               "topology_sort_baseline_ms": baseline * 1e3, "topology_rounds": work.repeats.topology_rounds}
    return Result(rows, figures)
