"""`Masking`: dynamic sparse training of one task inside a shared, partly frozen network.

Usage, in the shape of Dettmers' sparse_learning::

    mask = Masking(optimizer, density=0.1, sparse_init="ERK", growth="momentum",
                   update_frequency=100, total_steps=epochs * len(loader), frozen=frozen)
    mask.add_module(model)          # choose the maskable weights, draw the task's mask
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        mask.step()                 # in place of optimizer.step()
    task_mask = mask.consolidate()  # write back earlier tasks' frozen weights

Vocabulary (per maskable layer, all bool tensors of the weight's shape):

- mask: the weights this task uses (its sub-network). Exactly `counts[name]` are True.
- frozen: weights owned by earlier tasks. A task may use them (they can be in its mask)
  but never changes them.
- trainable = mask & ~frozen: the weights this task's optimizer may move.
- fired: weights that have been in this task's mask at some point (for `unfired` growth).

During a task the model's parameters hold the task's effective weights: the trained value
on trainable entries, the stored earlier-task value on mask & frozen, zero elsewhere.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from sparselearning.density import SPARSE_INITS, allocate_counts
from sparselearning.schedule import FINAL_DEATH_RATE, cosine_death_rate
from sparselearning.seeding import derive_seed
from sparselearning.selection import random_free_indices, top_indices

log = logging.getLogger(__name__)

GROWTH_MODES = ("random", "unfired", "momentum", "gradient")
DEATH_MODES = ("magnitude",)
NEW_WEIGHTS = ("zero", "init")
MASKABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Optimizers whose update of an entry with zero gradient and zero state is exactly zero, except
# for weight decay, which moves only nonzero weights (the frozen ones in the mask).
_ELEMENTWISE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_MASK_STREAM = 0x6D61736B  # names Masking's random stream (see derive_seed)


def maskable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every conv and linear weight of `model`, by parameter name (never biases or norms)."""
    weights = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MASKABLE_TYPES):
            weights[f"{module_name}.weight" if module_name else "weight"] = module.weight
    return weights


class Masking:
    """Dynamic sparse training of one task, with earlier tasks' weights frozen.

    Args:
        optimizer: the task's optimizer over the model's parameters.
        density: fraction of the maskable weights a task uses.
        sparse_init: per-layer density allocation, "ERK" or "uniform".
        death: pruning criterion; "magnitude" (smallest |w| among active weights).
        growth: "random", "unfired", "momentum" or "gradient" (see `growth_scores`).
        death_rate: initial prune fraction, cosine-decayed to 0.005 over `total_steps`.
        update_frequency: steps between topology updates; 0 keeps the initial mask.
        total_steps: optimizer steps in this task (epochs x batches).
        frozen: parameter name -> bool tensor of weights owned by earlier tasks, or None.
        new_weights: where never-used weights entering a later task's initial mask start:
            "zero" (the authors') or "init" (a fresh draw of the layer's default init).
        seed: seeds every random draw of this object (initial mask, random growth) through
            `derive_seed`, so it may equal the seed of the weight initialization.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        sparse_init: str = "ERK",
        death: str = "magnitude",
        growth: str = "random",
        death_rate: float = 0.5,
        update_frequency: int = 100,
        total_steps: int,
        frozen: dict[str, torch.Tensor] | None = None,
        new_weights: str = "zero",
        seed: int = 0,
    ) -> None:
        if sparse_init not in SPARSE_INITS:
            raise ValueError(f"unknown sparse_init {sparse_init!r}; choose from {SPARSE_INITS}")
        if death not in DEATH_MODES:
            raise ValueError(f"unknown death mode {death!r}; choose from {DEATH_MODES}")
        if growth not in GROWTH_MODES:
            raise ValueError(f"unknown growth mode {growth!r}; choose from {GROWTH_MODES}")
        if new_weights not in NEW_WEIGHTS:
            raise ValueError(f"unknown new_weights {new_weights!r}; choose from {NEW_WEIGHTS}")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if not 0 <= death_rate < 1:
            raise ValueError(f"death_rate must be in [0, 1), got {death_rate}")
        if update_frequency < 0 or total_steps < 1:
            raise ValueError("update_frequency must be >= 0 and total_steps >= 1")
        self.optimizer = optimizer
        self.density = density
        self.sparse_init = sparse_init
        self.death = death
        self.growth = growth
        self.death_rate = death_rate
        self.update_frequency = update_frequency
        self.total_steps = total_steps
        self.new_weights = new_weights
        self.seed = seed
        self._frozen_arg = frozen
        self.steps = 0

        self.params: dict[str, nn.Parameter] = {}
        self.counts: dict[str, int] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        self.fired: dict[str, torch.Tensor] = {}
        self.trainable: dict[str, torch.Tensor] = {}
        self._stored: dict[str, torch.Tensor] = {}  # earlier tasks' values where frozen, else 0
        self._fixed: dict[str, torch.Tensor] = {}  # what non-trainable entries must hold (kept for
        # optimizers that are restored after every step; the others compute it when needed)
        self._active: dict[str, torch.Tensor] = {}  # flat indices of each mask's entries
        self._fired_count: dict[str, int] = {}  # entries of `fired`, counted on the host (unfired growth)
        self._momentum: dict[str, list[torch.Tensor]] = {}  # dense gradient averages (growth)
        self._dense_grad: dict[str, torch.Tensor] = {}  # |grad| captured for gradient growth
        self.generator: torch.Generator | None = None
        self._masks_gradients = False  # else: restore every non-trainable weight after the step
        self._decays_weights = False
        self._reused: dict[str, torch.Tensor] = {}  # flat indices of mask & frozen, with weight decay only

    # ------------------------------------------------------------------ set-up

    def add_module(self, model: nn.Module) -> None:
        """Take the maskable weights of `model` and draw this task's initial mask."""
        self.params = maskable_weights(model)
        if not self.params:
            raise ValueError("the model has no conv or linear weights to mask")
        self._check_optimizer()
        unmasked = [n for n, p in model.named_parameters() if p.requires_grad and n not in self.params]
        if unmasked:
            log.warning("parameters outside the masks are shared and trained by every task: %s", unmasked)
        device = next(iter(self.params.values())).device
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(self.seed, _MASK_STREAM))
        self.counts = allocate_counts({n: p.shape for n, p in self.params.items()}, self.density, self.sparse_init)

        frozen = self._frozen_arg or {}
        first_task = not any(bool(f.any()) for f in frozen.values())
        with torch.no_grad():
            for name, p in self.params.items():
                f = frozen.get(name)
                self.frozen[name] = torch.zeros_like(p, dtype=torch.bool) if f is None else f.to(device, torch.bool)
                self._stored[name] = torch.where(self.frozen[name], p, 0.0)
                mask = torch.zeros(p.numel(), dtype=torch.bool, device=device)
                mask[self._random_indices(p.numel(), self.counts[name])] = True
                self.masks[name] = mask.view_as(p)
                if not first_task:  # the model holds consolidated weights: pick the new ones' start
                    p.copy_(torch.where(self.frozen[name], self._stored[name], self._new_weight_values(p)))
                self.fired[name] = self.masks[name].clone()
                self._refresh(name)
            self._momentum = self._new_momentum() if self.growth == "momentum" else {}
        log.info("masking %d layers, %d of %d weights active (%s, density %.4g)",
                 len(self.params), sum(self.counts.values()),
                 sum(p.numel() for p in self.params.values()), self.sparse_init, self.density)

    def _check_optimizer(self) -> None:
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.params.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"maskable weights missing from the optimizer: {missing}")
        groups = self.optimizer.param_groups
        self._masks_gradients = type(self.optimizer) in _ELEMENTWISE_OPTIMIZERS
        self._decays_weights = any(g.get("weight_decay", 0) != 0 for g in groups)
        if self.growth == "momentum":
            kinds = {(tuple(g["betas"]) if "betas" in g else g.get("momentum", 0)) for g in groups}
            if len(kinds) != 1 or kinds == {0}:
                raise ValueError("momentum growth needs one Adam betas or one nonzero SGD momentum for all groups")

    def _random_indices(self, n: int, k: int) -> torch.Tensor:
        """k distinct indices in [0, n), uniformly at random."""
        scores = torch.rand(n, generator=self.generator, device=self.generator.device)
        return top_indices(scores, k)

    def _new_weight_values(self, p: torch.Tensor) -> torch.Tensor:
        """Start values for never-used weights entering a later task's initial mask."""
        if self.new_weights == "zero":
            return torch.zeros_like(p)
        fresh = torch.empty_like(p)
        # nn.Conv*/nn.Linear.reset_parameters() draws weights this way
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=self.generator)
        return fresh

    def _refresh(self, name: str) -> None:
        """Recompute the derived per-layer tensors from mask and frozen, and apply them."""
        mask, frozen = self.masks[name], self.frozen[name]
        self.trainable[name] = mask & ~frozen
        if not self._masks_gradients:
            self._fixed[name] = self._fixed_values(name)
        self._active[name] = mask.view(-1).nonzero_static(size=self.counts[name]).squeeze(1)
        self._fired_count[name] = int(self.fired[name].sum())
        self._update_reused(name)
        self._enforce(name)

    def _update_reused(self, name: str) -> None:
        """Flat indices of the frozen weights in the mask, which weight decay would move."""
        if self._decays_weights:
            self._reused[name] = (self.masks[name] & self.frozen[name]).view(-1).nonzero().squeeze(1)

    def _fixed_values(self, name: str) -> torch.Tensor:
        """What the non-trainable entries hold: the stored value where frozen and in the mask, else 0."""
        return torch.where(self.masks[name] & self.frozen[name], self._stored[name], 0.0)

    def _enforce(self, name: str) -> None:
        """Non-trainable entries: fixed weight values and zero optimizer state."""
        p, trainable = self.params[name], self.trainable[name]
        fixed = self._fixed[name] if name in self._fixed else self._fixed_values(name)
        with torch.no_grad():
            torch.where(trainable, p, fixed, out=p)
        for value in self._weight_states(p):
            value.mul_(trainable.view(torch.uint8))  # uint8 multiplies twice as fast as bool

    def _restore_reused(self, name: str) -> None:
        """Put back the stored values of the frozen weights in the mask, with zero state."""
        p, reused = self.params[name].detach().view(-1), self._reused[name]
        p.index_copy_(0, reused, self._stored[name].view(-1).index_select(0, reused))
        for value in self._weight_states(self.params[name]):
            value.view(-1).index_fill_(0, reused, 0.0)

    def _weight_states(self, p: torch.Tensor) -> list[torch.Tensor]:
        """The optimizer's per-weight state tensors of `p` (momentum, Adam moments)."""
        return [v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]

    def _exchange(self, name: str, pruned: torch.Tensor, grown: torch.Tensor) -> None:
        """Update the derived tensors and the weights at the flat indices that left or entered
        the mask: what `_refresh` would do, at O(k) instead of O(layer) cost.

        Pruned weights and all their state become zero; grown ones start with zero state at
        zero, or at their stored value when an earlier task owns them. A weight pruned and
        regrown in the same update starts afresh too.
        """
        p, trainable = self.params[name].view(-1), self.trainable[name].view(-1)
        fixed = self._fixed[name].view(-1) if name in self._fixed else None
        trainable.index_fill_(0, pruned, False)
        p.index_fill_(0, pruned, 0.0)
        for value in self._weight_states(self.params[name]):
            value.view(-1).index_fill_(0, pruned, 0.0)  # grown entries' state is zero already
        grown_frozen = self.frozen[name].view(-1).index_select(0, grown)
        values = torch.where(grown_frozen, self._stored[name].view(-1).index_select(0, grown), 0.0)
        trainable.index_copy_(0, grown, ~grown_frozen)
        p.index_copy_(0, grown, values)
        if fixed is not None:
            fixed.index_fill_(0, pruned, 0.0)
            fixed.index_copy_(0, grown, values)
        self._update_reused(name)

    # ------------------------------------------------------------------ training

    def step(self) -> None:
        """One optimizer step restricted to the trainable weights; topology update when due.

        SGD, Adam and AdamW get the gradients of non-trainable entries zeroed: their state
        stays zero and their update is exactly zero, except that weight decay moves the
        frozen weights in the mask, which are then restored (with zero state). With any other
        optimizer every non-trainable weight is restored and its state zeroed after the step.
        """
        due = self.update_frequency > 0 and (self.steps + 1) % self.update_frequency == 0
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        if self.growth == "momentum":
            self._track_momentum(grads)
        if due and self.growth == "gradient":
            self._dense_grad = {n: g.abs() for n, g in grads.items()}
        if self._masks_gradients:
            for name, grad in grads.items():
                grad.mul_(self.trainable[name].view(torch.uint8))  # uint8 multiplies twice as fast as bool
        self.optimizer.step()
        if not self._masks_gradients:
            for name in self.params:
                self._enforce(name)
        elif self._decays_weights:
            for name in self.params:
                self._restore_reused(name)
        self.steps += 1
        if due:
            self.update_topology()

    def death_rate_at(self, step: int) -> float:
        """The cosine-decayed prune fraction at `step` of this task."""
        return cosine_death_rate(step, self.total_steps, self.death_rate, FINAL_DEATH_RATE)

    def update_topology(self) -> None:
        """One prune-and-grow cycle on every sparse layer, now.

        Per layer, k = ceil(rate * active): the k active weights with the smallest |w|
        leave the mask and exactly k inactive ones enter it, chosen by the growth mode.
        Dense layers (ERK can make small layers dense) have nothing to exchange.
        """
        rate = self.death_rate_at(self.steps)
        with torch.no_grad():
            for name, p in self.params.items():
                count = self.counts[name]
                k = math.ceil(rate * count)
                if count == p.numel() or k == 0:
                    continue
                mask, active = self.masks[name].view(-1), self._active[name]
                slots = top_indices(-p.view(-1).index_select(0, active).abs(), k)  # positions in `active`
                pruned = active.index_select(0, slots)
                mask.index_fill_(0, pruned, False)
                grown = self._grow(name, mask, k)
                mask.index_fill_(0, grown, True)
                active.index_copy_(0, slots, grown)
                self.fired[name].view(-1).index_fill_(0, grown, True)
                self._exchange(name, pruned, grown)
        self._dense_grad = {}

    def _grow(self, name: str, mask: torch.Tensor, k: int) -> torch.Tensor:
        """Flat indices of the k weights entering layer `name`'s (flat, pruned) mask."""
        if self.growth == "random":  # uniform among the inactive: sampled, no score per weight
            free = mask.numel() - self.counts[name] + k
            return random_free_indices(mask, k, free, self.generator)
        if self.growth == "unfired":  # never-fired weights first (all inactive), uniformly
            fired = self.fired[name].view(-1)
            unfired = mask.numel() - self._fired_count[name]
            self._fired_count[name] += min(k, unfired)
            if unfired >= k:
                return random_free_indices(fired, k, unfired, self.generator)
            # all of them, and the rest uniformly among the inactive weights that have fired
            taken = mask | ~fired
            inactive_fired = mask.numel() - (self.counts[name] - k) - unfired
            rest = random_free_indices(taken, k - unfired, inactive_fired, self.generator)
            return torch.cat([(~fired).nonzero().squeeze(1), rest])
        return top_indices(self.growth_scores(name).view(-1), k, exclude=mask)

    def growth_scores(self, name: str) -> torch.Tensor:
        """Scores for growing weights into layer `name`; the largest inactive ones grow.

        - random: uniform noise (an update samples the inactive weights directly instead:
          the same distribution without a score per weight);
        - unfired: uniform noise, minus 2 on weights that have been in this task's mask (so
          the never-fired ones all come first; an update samples the same way directly:
          k of the never-fired, or all of them and the rest among the inactive fired ones);
        - momentum: |m / (sqrt(v) + 1e-8)| of dense running gradient averages with the
          optimizer's betas (Adam), or |momentum buffer| of the dense gradient (SGD);
        - gradient: |dense gradient| of the current batch.
        """
        p = self.params[name]
        if self.growth in ("random", "unfired"):
            scores = torch.rand(p.shape, generator=self.generator, device=p.device)
            if self.growth == "unfired":  # fired weights drop below every unfired one
                scores.sub_(self.fired[name].view(torch.uint8), alpha=2)
            return scores
        if self.growth == "gradient":
            if name in self._dense_grad:
                return self._dense_grad[name]
            return p.grad.abs() if p.grad is not None else torch.zeros_like(p)
        averages = self._momentum[name]
        if len(averages) == 2:  # |m| / (sqrt(v) + 1e-8), in two buffers instead of four
            return averages[0].abs().div_(averages[1].sqrt().add_(1e-8))
        return averages[0].abs()

    def _new_momentum(self) -> dict[str, list[torch.Tensor]]:
        adam = "betas" in self.optimizer.param_groups[0]
        return {n: [torch.zeros_like(p) for _ in range(2 if adam else 1)] for n, p in self.params.items()}

    def _track_momentum(self, grads: dict[str, torch.Tensor]) -> None:
        """Update the dense gradient averages that `momentum` growth ranks weights by."""
        group = self.optimizer.param_groups[0]
        names = list(grads)
        first = [self._momentum[n][0] for n in names]
        grad_list = [grads[n] for n in names]
        if "betas" in group:
            beta1, beta2 = group["betas"]
            second = [self._momentum[n][1] for n in names]
            torch._foreach_lerp_(first, grad_list, 1 - beta1)
            torch._foreach_mul_(second, beta2)
            torch._foreach_addcmul_(second, grad_list, grad_list, 1 - beta2)
        else:
            torch._foreach_mul_(first, group["momentum"])
            torch._foreach_add_(first, grad_list)

    # ------------------------------------------------------------------ end of task

    def consolidate(self) -> dict[str, torch.Tensor]:
        """Write the consolidated weights into the model; return this task's final mask.

        Consolidated = earlier tasks' frozen values where frozen, this task's trained values
        on its trainable weights, zero elsewhere. Any task's network is its mask applied to
        these weights.
        """
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.where(self.frozen[name], self._stored[name], p))
        return {name: mask.clone() for name, mask in self.masks.items()}

    def capacity(self) -> dict[str, Any]:
        """Fractions of weights used by any task, by this task, reused from earlier ones, free."""
        layers, totals = {}, {"used": 0, "task": 0, "reused": 0, "numel": 0}
        for name, mask in self.masks.items():
            frozen = self.frozen[name]
            counts = {
                "used": int((mask | frozen).sum()),
                "task": int(mask.sum()),
                "reused": int((mask & frozen).sum()),
                "numel": mask.numel(),
            }
            layers[name] = _fractions(counts)
            for key in totals:
                totals[key] += counts[key]
        return {"layers": layers, "total": _fractions(totals)}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this task identically (copies, not references)."""
        return {
            "steps": self.steps,
            "counts": dict(self.counts),
            "masks": {n: t.clone() for n, t in self.masks.items()},
            # the order of the active indices decides which of equal magnitudes are pruned
            "active": {n: t.clone() for n, t in self._active.items()},
            "fired": {n: t.clone() for n, t in self.fired.items()},
            "frozen": {n: t.clone() for n, t in self.frozen.items()},
            "stored": {n: t.clone() for n, t in self._stored.items()},
            "momentum": {n: [t.clone() for t in ts] for n, ts in self._momentum.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`. To resume: build model, optimizer and Masking afresh, call
        `add_module(model)`, then load the three states (model, optimizer, this)."""
        if state["counts"] != self.counts:
            raise ValueError("this state belongs to a Masking with another allocation")
        self.steps = state["steps"]
        for name, p in self.params.items():  # copies: later updates must not write into `state`
            self.masks[name] = state["masks"][name].to(p.device, copy=True)
            self.fired[name] = state["fired"][name].to(p.device, copy=True)
            self.frozen[name] = state["frozen"][name].to(p.device, copy=True)
            self._stored[name] = state["stored"][name].to(p.device, copy=True)
        self._momentum = {n: [t.to(self.params[n].device, copy=True) for t in ts]
                          for n, ts in state["momentum"].items()}
        self.generator.set_state(state["generator"])
        for name, p in self.params.items():
            self._refresh(name)
            self._active[name] = state["active"][name].to(p.device, copy=True)


def _fractions(counts: dict[str, int]) -> dict[str, float]:
    numel = counts["numel"]
    used = counts["used"] / numel
    return {"used": used, "task": counts["task"] / numel, "reused": counts["reused"] / numel, "free": 1 - used}
