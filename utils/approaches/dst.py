"""The paper's approach and its baselines: dynamic sparse training with `Masking`, and dense fine-tuning.

`DST` is the paper's method: each task gets a sparse mask (`--density`, `--sparse_init`), the
weights of earlier tasks frozen, its topology updated every `--update_frequency` steps (prune by
magnitude, regrow by `--growth`). Two of the paper's baselines are DST with a flag:
static sparse training (`--update_frequency 0`: the initial mask is kept) and sparse fine-tuning
(`--no-isolate`: nothing is frozen, so later tasks overwrite earlier ones). Its adaptive variants
are DST with a flag too (`--erk_power`, `--growth_later`, `--turnover_stop`: see `Masking`).
`Dense` is dense fine-tuning (`--no-sparse`): the whole network trains on every task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from sparselearning import Masking, auto_erk_power
from utils.approaches.base import Approach, Mask

if TYPE_CHECKING:
    from utils.cli import Config


class DST(Approach):
    """Dynamic sparse training of each task's sub-network (`sparselearning.Masking`)."""

    name = "dst"

    def __init__(self, model: nn.Module, frozen: Mask | None, config: Config, total_steps: int, seed: int,
                 carried: Any = None) -> None:
        super().__init__(model, frozen, config, total_steps, seed, carried)
        self.masking = Masking(
            self.optimizer, density=config.density, sparse_init=config.sparse_init, death=config.death,
            growth=config.growth, death_rate=config.death_rate, update_frequency=config.update_frequency,
            total_steps=total_steps, frozen=frozen, new_weights=config.new_weights,
            regrow_frozen=config.regrow_frozen, erk_power=erk_power(config), growth_later=config.growth_later,
            turnover_stop=config.turnover_stop, seed=seed,
        )
        self.masking.add_module(model)
        self.updated = False  # the last step ended with a topology update

    @property
    def topology_updates(self) -> int:
        return self.masking.topology_updates

    def step(self) -> None:
        updates = self.masking.topology_updates
        self.masking.step()  # the optimizer's step, restricted to the task's trainable weights
        self.updated = self.masking.topology_updates != updates  # the step ended with a topology update

    def step_macs(self) -> int:
        """3 f_S, f_S the task's mask (its per-layer counts are constant during a task), or 2 f_S + f_D
        where the step needed the dense weight gradient: every step of momentum growth (its running
        averages) while the topology may change, and the steps of gradient growth that end with a
        topology update. Static sparse training (`--update_frequency 0`) grows nothing: 3 f_S."""
        masking = self.masking
        sparse = self.network_macs(masking.counts)
        scored = masking.scored_growth  # the growth that ranks by scores, if any
        changing = masking.update_frequency > 0 and not masking.settled
        dense_gradient = (scored == "momentum" and changing) or (scored in ("momentum", "gradient") and self.updated)
        return 2 * sparse + (self.dense_macs if dense_gradient else sparse)

    def finish(self) -> tuple[Mask, dict[str, Any]]:
        record = capacity_record(self.masking)
        if self.masking.erk_power != 1:
            record["erk_power"] = self.masking.erk_power  # --erk_power auto: the power it chose
        return self.masking.consolidate(), record

    def state_dict(self) -> dict[str, Any]:
        return self.masking.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masking.load_state_dict(state)


def erk_power(config: Config) -> float:
    """The ERK power of the run's tasks: `--erk_power`, with `auto` resolved from `--density`."""
    return auto_erk_power(config.density) if config.erk_power == "auto" else config.erk_power


def capacity_record(masking: Masking) -> dict[str, Any]:
    """A sparse task's record entries: its density, the backbone's share used by any task so far,
    the share of its mask reused from earlier tasks, and what is still free."""
    capacity = masking.capacity()["total"]
    return {"density": capacity["task"], "capacity_used": capacity["used"], "capacity_reused": capacity["reused"],
            "capacity_free": capacity["free"]}


class Dense(Approach):
    """Dense fine-tuning (`--no-sparse`): every weight trains on every task; the tasks' network is the whole model."""

    name = "dense"
