"""WSN, Winning SubNetworks (Kang et al., ICML 2022): a learned score per weight picks each task's mask.

Every maskable weight has a score, learned with the weights by the same optimizer. A task's
mask is, in each layer, the weights with the largest |score|, as many as `--density` and
`--sparse_init` allocate (`--sparse_init uniform`: the top `--density` fraction of every layer,
WSN's rule); the forward pass uses weight x mask and the gradient reaches the scores straight
through. Only weights in the current mask that no earlier task owns train; earlier tasks' weights
in the mask are reused frozen (their scores still train, so the task decides which to reuse).
At the task's end its mask is the top-|score| mask of the epoch it keeps; its weights join the
frozen ones. The scores are carried from task to task (the next task's first mask is the last
task's), as in WSN's code.

Taken from WSN's paper and code (ihaeyong/WSN): |score| top-c per layer, plain straight-through
gradient, kaiming-uniform score init (a = sqrt(5)), scores carried over, one optimizer (Adam,
lr 1e-3, no weight decay: this project's defaults) for weights and scores, a fresh one per task,
gradient of earlier tasks' weights zeroed. Where we differ: the run's LR schedule (WSN halves the
LR on a validation plateau), no validation split; weights that leave the mask keep their values,
and so can Adam's momentum move them (as in WSN), but an earlier task's weights are put back to
their stored values after every step, so they stay bit-identical whatever the optimizer (WSN
only zeroes their gradients); the classifier is one shared masked layer, not a head per task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from sparselearning import allocate_counts, maskable_weights
from sparselearning.supermask import SupermaskScores, masked_forward
from utils.approaches.base import Approach, Mask

if TYPE_CHECKING:
    from utils.cli import Config


def scored_mask_step_macs(approach: Approach, counts: dict[str, int]) -> int:
    """The per-image MACs of a training step of a mask chosen by scores (WSN, SupSup): the forward
    pass and the activations' gradients through the mask (f_S each, `counts` its per-layer sizes);
    every score gets a gradient, which needs the dense weight gradient (f_D): 2 f_S + f_D."""
    return 2 * approach.network_macs(counts) + approach.dense_macs


def owned_by_earlier_tasks(params: dict[str, nn.Parameter], frozen: Mask | None) -> Mask:
    """`frozen` on the weights' device, with an all-False mask for every weight it lacks (or all, when None)."""
    return {name: (frozen[name].to(p.device) if frozen is not None and name in frozen
                   else torch.zeros_like(p, dtype=torch.bool)) for name, p in params.items()}


def capacity_of(mask: Mask, owned: Mask) -> dict[str, float]:
    """A task's record entries from its mask and the earlier tasks' weights: its density, the share of
    the backbone any task has used, the share of its mask reused from earlier tasks, the share still free."""
    numel = sum(m.numel() for m in mask.values())
    task = sum(int(m.sum()) for m in mask.values())
    used = sum(int((m | owned[n]).sum()) for n, m in mask.items())
    reused = sum(int((m & owned[n]).sum()) for n, m in mask.items())
    return {"density": task / numel, "capacity_used": used / numel, "capacity_reused": reused / numel,
            "capacity_free": 1 - used / numel}


class WSN(Approach):
    """Scores and weights trained together; the mask is the top |score| per layer; earlier tasks' weights frozen."""

    name = "wsn"

    def __init__(self, model: nn.Module, frozen: Mask | None, config: Config, total_steps: int, seed: int,
                 carried: Any = None) -> None:
        self.params = maskable_weights(model)
        device = next(iter(self.params.values())).device
        counts = allocate_counts({name: p.shape for name, p in self.params.items()}, config.density,
                                 config.sparse_init)
        self.scores = SupermaskScores(self.params, counts, torch.Generator(device=device).manual_seed(seed))
        if carried is not None:  # WSN's scores go on from the previous task
            self.scores.load_state_dict(carried)
        self.owned = owned_by_earlier_tasks(self.params, frozen)
        self.stored = {name: torch.where(self.owned[name], p.detach(), 0.0) for name, p in self.params.items()}
        super().__init__(model, frozen, config, total_steps, seed, carried)

    def trained_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) + self.scores.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.scores.training_masks()
        return masked_forward(self.model, x, {name: p * masks[name] for name, p in self.params.items()})

    def step(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is not None:
                    p.grad.masked_fill_(self.owned[name], 0.0)  # WSN's rule
        self.optimizer.step()
        with torch.no_grad():  # and exactly: weight decay or momentum cannot move an earlier task's weight
            for name, p in self.params.items():
                torch.where(self.owned[name], self.stored[name], p, out=p)

    def step_macs(self) -> int:
        return scored_mask_step_macs(self, self.scores.counts)

    def finish(self) -> tuple[Mask, dict[str, Any]]:
        mask = self.scores.masks()
        return mask, capacity_of(mask, self.owned)

    def carry(self) -> dict[str, torch.Tensor]:
        return self.scores.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.load_state_dict(state["scores"])
