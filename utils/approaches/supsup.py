"""SupSup, Supermasks in Superposition (Wortsman et al., NeurIPS 2020): fixed random weights, a learned mask per task.

The weights are drawn once, before the first task, as signed constants (each weight's sign from
the default initialization, its magnitude sqrt(2 / fan_in), the same for the whole layer) and
never train. Each task learns its own scores (fresh, kaiming-uniform), and its network is the
weights times its mask: in each layer the weights with the largest |score|, as many as
`--density` and `--sparse_init` allocate (edge-popup; the gradient reaches the scores straight
through). Tasks share no trainable state, so nothing is forgotten, and a task's accuracy depends
only on its own scores. With the task id hidden, `--task_inference oneshot` is SupSup's one-shot
rule on these masks.

Taken from SupSup's paper and code (RAIVNLab/supsup): signed-constant weights (fan_in, ReLU gain),
|score| top-k per layer with kaiming-uniform score init and a plain straight-through gradient,
a fresh optimizer per task over the scores only (their Adam lr 1e-3 is this project's default).
Where we differ: the run's LR schedule and weight decay (SupSup: cosine annealing, weight decay
1e-4 on the scores); BatchNorm uses batch statistics, so there are no per-task BatchNorm
statistics (SupSup keeps running statistics per task). Use `--sparse_init uniform` (the same
density in every layer, as the study runs it): ERK keeps its smallest layers whole (at density
0.1 and 0.2 the ResNet-18's stem, shortcuts and classifier), and a supermask over a whole layer is
all ones, so those layers learn nothing and are the same random constants for every task
(SupSup's er_sparsity caps a layer at half its weights); a run that keeps a layer whole says so
in its log.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from sparselearning import allocate_counts, maskable_weights
from sparselearning.supermask import SupermaskScores, masked_forward
from utils.approaches.base import Approach, Mask
from utils.approaches.wsn import capacity_of, owned_by_earlier_tasks, scored_mask_step_macs

if TYPE_CHECKING:
    from utils.cli import Config

log = logging.getLogger(__name__)


def signed_constant_(weight: torch.Tensor) -> None:
    """In place: sign(w) * sqrt(2 / fan_in), SupSup's "signed_constant" initialization (kaiming's ReLU gain)."""
    fan_in = weight[0].numel()  # in_features, or in_channels x kernel size
    with torch.no_grad():
        weight.copy_(weight.sign() * math.sqrt(2.0 / fan_in))


class SupSup(Approach):
    """Signed-constant weights that never train; per task, scores whose top |score| per layer is its mask."""

    name = "supsup"

    def __init__(self, model: nn.Module, frozen: Mask | None, config: Config, total_steps: int, seed: int,
                 carried: Any = None) -> None:
        self.params = maskable_weights(model)
        if frozen is None:  # the first task: the weights become SupSup's, for good
            for p in self.params.values():
                signed_constant_(p)
        device = next(iter(self.params.values())).device
        counts = allocate_counts({name: p.shape for name, p in self.params.items()}, config.density,
                                 config.sparse_init)
        whole = [name for name, count in counts.items() if count == self.params[name].numel()]
        if whole and frozen is None:
            log.warning("SupSup: %d layer(s) kept whole by --sparse_init %s at density %g (%s): their mask is all "
                        "ones, so they learn nothing and stay the same random constants for every task; "
                        "--sparse_init uniform keeps every layer sparse", len(whole), config.sparse_init,
                        config.density, ", ".join(whole[:4]) + (" ..." if len(whole) > 4 else ""))
        self.scores = SupermaskScores(self.params, counts, torch.Generator(device=device).manual_seed(seed))
        self.owned = owned_by_earlier_tasks(self.params, frozen)
        super().__init__(model, frozen, config, total_steps, seed, carried)

    def trained_parameters(self) -> list[torch.Tensor]:
        return self.scores.parameters()  # the weights never train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.scores.training_masks()
        return masked_forward(self.model, x, {name: p.detach() * masks[name] for name, p in self.params.items()})

    def step_macs(self) -> int:
        return scored_mask_step_macs(self, self.scores.counts)

    def finish(self) -> tuple[Mask, dict[str, Any]]:
        mask = self.scores.masks()
        return mask, capacity_of(mask, self.owned)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.load_state_dict(state["scores"])
