"""PackNet (Mallya and Lazebnik, CVPR 2018): train the free weights densely, prune, retrain, freeze.

A task first trains every weight no earlier task owns (dense over the free weights; earlier
tasks' weights are used, frozen) for `--prune_after` epochs (default: two thirds of the task's
epochs, rounded, and at least one less than all, PackNet's 20 + 10). Then it keeps, in each
layer, its share of the backbone by magnitude: the largest |w| among the free weights, as many
as `--density` and `--sparse_init` allocate to the layer (`sparselearning.allocate_counts`,
DST's allocation), or all of them when fewer are free; the other free weights return to zero.
It retrains the kept weights for the remaining epochs, and they are frozen for later tasks. A
task's network is every earlier task's weights plus its own, as in PackNet, so the networks grow
task by task; the backbone is full after about 1/density tasks, and a task that finds a layer
full keeps nothing new there (logged).

Taken from PackNet's paper and code (arunmallya/packnet): one-shot magnitude pruning per layer
of the task's own weights only; pruned weights zero, restarted from zero by the next task
(`--new_weights zero`, the default); earlier tasks' weights fixed; a task's network = the
weights of tasks 1..t; the schedule of its scripts (train 20 epochs at lr 1e-3, x0.1 after 10;
retrain 10 epochs at 1e-4): `--lr` x0.1 from half the dense phase, retraining at a tenth of
`--lr`. Where we differ: the task's share is `--density` of the backbone, the budget the DST runs
get (PackNet prunes a fraction of the free weights, e.g. 50 % or 75 %); the task is pruned as it
stands at the end of its dense phase (no validation split to pick the phase's best epoch) and
retrains with the dense phase's optimizer state (PackNet starts a new optimizer); this backbone has no
biases or BatchNorm parameters (PackNet fixes them after the first task); the classifier is one
shared layer with the loss on the task's slice, not a head per task.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from sparselearning import Masking, allocate_counts, top_indices
from utils.approaches.base import Approach, Mask
from utils.approaches.dst import capacity_record

if TYPE_CHECKING:
    from utils.cli import Config

log = logging.getLogger(__name__)


def prune_after(epochs: int, flag: int | None) -> int:
    """The epochs a task trains densely before it is pruned: `--prune_after` (`flag`), by default two
    thirds of the task's `epochs` (PackNet's 20 of 30), rounded, between 1 and epochs - 1."""
    return flag if flag is not None else max(1, min(epochs - 1, round(2 * epochs / 3)))


def lr_factor(epoch: int, dense_epochs: int) -> float:
    """PackNet's schedule as a factor of `--lr` in `epoch` (from 0): 1, x0.1 from half the dense
    phase (when it has two epochs or more), and 0.1 while retraining."""
    return 1.0 if epoch < max(1, math.ceil(dense_epochs / 2)) else 0.1


class PackNet(Approach):
    """Dense training of the free weights, one-shot magnitude pruning to the task's share, retraining."""

    name = "packnet"

    def __init__(self, model: nn.Module, frozen: Mask | None, config: Config, total_steps: int, seed: int,
                 carried: Any = None) -> None:
        super().__init__(model, frozen, config, total_steps, seed, carried)
        # Every weight in the mask, the earlier tasks' frozen: the free ones train (a later task's start at zero).
        self.masking = Masking(self.optimizer, density=1.0, sparse_init=config.sparse_init, growth="random",
                               update_frequency=0, total_steps=total_steps, frozen=frozen,
                               new_weights=config.new_weights, seed=seed)
        self.masking.add_module(model)
        self.pruned = False

    def make_scheduler(self, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        dense_epochs = prune_after(epochs, self.config.prune_after)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda epoch: lr_factor(epoch, dense_epochs))

    def step(self) -> None:
        self.masking.step()

    def step_macs(self) -> int:
        """3 f_S of the task's network: before pruning every weight (dense, 3 f_D), afterwards the
        earlier tasks' weights plus the task's kept ones."""
        return 3 * self.network_macs(self.masking.counts)

    def end_epoch(self, epochs_done: int) -> None:
        if epochs_done == prune_after(self.config.epochs, self.config.prune_after):
            self.masking.restrict(self.kept_mask())
            self.pruned = True

    def kept_mask(self) -> Mask:
        """The earlier tasks' weights and, per layer, the task's share of its free weights by |w|."""
        layers = self.masking.layers
        shares = allocate_counts({name: layer.param.shape for name, layer in layers.items()}, self.config.density,
                                 self.config.sparse_init)
        keep, full = {}, []
        for name, layer in layers.items():
            free = int(layer.trainable.sum())
            if free < shares[name]:
                full.append(f"{name} ({free} free of a share of {shares[name]})")
            chosen = top_indices(layer.param.detach().abs().view(-1), min(shares[name], free),
                                 exclude=~layer.trainable.view(-1))
            mask = layer.frozen.clone()
            mask.view(-1)[chosen] = True
            keep[name] = mask
        if full:
            log.warning("PackNet: %d layer(s) have fewer free weights than the task's share, which keeps them all: "
                        "%s", len(full), ", ".join(full[:4]) + (" ..." if len(full) > 4 else ""))
        return keep

    def keepable(self) -> bool:
        return self.pruned  # an epoch before pruning is not the network the task leaves

    def finish(self) -> tuple[Mask, dict[str, Any]]:
        return self.masking.consolidate(), capacity_record(self.masking)

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "masking": self.masking.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pruned"] and not self.pruned:
            self.masking.restrict({name: mask.to(torch.bool) for name, mask in state["masking"]["masks"].items()})
        self.pruned = state["pruned"]
        self.masking.load_state_dict(state["masking"])
