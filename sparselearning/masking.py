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

Each maskable weight's state lives in one `MaskedLayer` (`Masking.layers`); `masks`, `frozen`,
`fired`, `trainable`, `params` and `counts` read it as dicts by parameter name.

The optimizer must be one of `SUPPORTED_OPTIMIZERS` (SGD, Adam, AdamW, RMSprop, fused or
not): `step` zeroes the gradients of the non-trainable weights, which keeps them and their
optimizer state unchanged only for optimizers whose update of a weight with zero gradient and
zero state is zero and leaves that state zero. Other optimizers are refused.

A `Masking` serves one task, in this order: `add_module(model)` once, then `step()` (and
`update_topology()`, `load_state_dict()`) while training, then `consolidate()` once. A call out
of that order raises `RuntimeError`; after `consolidate()` only reads (`capacity()`,
`state_dict()`, the per-layer views) remain. Every argument is checked (`ValueError`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from sparselearning.checks import (
    check_bool,
    check_int,
    check_mask_dict,
    check_mask_names,
    check_mask_shapes,
    check_real,
    some,
)
from sparselearning.density import SPARSE_INITS, allocate_counts
from sparselearning.masked_layer import LAYER_STATE_KEYS, MaskedLayer
from sparselearning.schedule import FINAL_DEATH_RATE, cosine_death_rate
from sparselearning.seeding import derive_seed
from sparselearning.selection import top_indices

log = logging.getLogger(__name__)

GROWTH_MODES = ("random", "unfired", "momentum", "gradient")
SAMPLED_GROWTHS, SCORED_GROWTHS = GROWTH_MODES[:2], GROWTH_MODES[2:]  # draw at random / rank by scores
DEATH_MODES = ("magnitude",)
NEW_WEIGHTS = ("zero", "init")
MASKABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Optimizers whose update of an entry with zero gradient and zero state is exactly zero and
# leaves the state zero (weight decay aside: it moves only nonzero weights, the frozen ones in
# the mask, which `step` puts back). Exact types: a subclass may change the update.
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
_MASK_STREAM = 0x6D61736B  # names Masking's random stream (see derive_seed)
# The stages of a Masking's one task, in order (see `Masking._order_error`).
_NEW, _TRAINING, _CONSOLIDATED = "new", "training", "consolidated"
# What `state_dict()` records of the settings, so that `load_state_dict` refuses another schedule.
_SETTINGS = ("density", "sparse_init", "death", "growth", "death_rate", "update_frequency", "total_steps",
             "new_weights", "regrow_frozen", "erk_power", "growth_later", "turnover_stop")
_STATE_KEYS = ("steps", "counts", *LAYER_STATE_KEYS, "momentum", "generator")


def maskable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every conv and linear weight of `model`, by parameter name (never biases or norms).

    A tensor shared by several modules (tied weights: `b.weight = a.weight`) appears once, under
    its first name, the one `model.named_parameters()` gives it."""
    return _maskable_weights(model)[0]


def _maskable_weights(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """`maskable_weights(model)`, and its tied weights' further names -> their first name."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weights: dict[str, nn.Parameter] = {}
    first: dict[int, str] = {}  # id of a weight -> its name in `weights`
    aliases: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MASKABLE_TYPES):
            name, weight = f"{module_name}.weight" if module_name else "weight", module.weight
            if id(weight) in first:
                aliases[name] = first[id(weight)]
            else:
                first[id(weight)] = name
                weights[name] = weight
    return weights, aliases


def _per_layer(attr: str) -> Any:
    """A read-only property of `Masking`: attribute `attr` of every layer, by parameter name."""
    return property(lambda self: {name: getattr(layer, attr) for name, layer in self.layers.items()},
                    doc=f"`MaskedLayer.{attr}` of every maskable weight, by parameter name (read-only).")


class Masking:
    """Dynamic sparse training of one task, with earlier tasks' weights frozen.

    Args:
        optimizer: the task's optimizer over the model's parameters, one of
            `SUPPORTED_OPTIMIZERS` (checked by `add_module`).
        density: fraction of the maskable weights a task uses.
        sparse_init: per-layer density allocation, "ERK" or "uniform".
        death: pruning criterion; "magnitude" (smallest |w| among active weights).
        growth: "random", "unfired", "momentum" or "gradient" (see `update_topology`).
        death_rate: initial prune fraction, cosine-decayed to 0.005 over `total_steps`.
        update_frequency: steps between topology updates; 0 keeps the initial mask.
        total_steps: optimizer steps in this task (epochs x batches).
        frozen: parameter name -> bool tensor of the weights owned by earlier tasks (e.g.
            `TaskMasks.frozen_before(t)`), or None. Each name must be a maskable weight of the
            model (a weight missing from it has nothing frozen) and each tensor bool, of its
            weight's shape; one on another device is copied to the weight's (bool values copy
            exactly).
        new_weights: where never-used weights entering a later task's initial mask start:
            "zero" (the authors') or "init" (a fresh draw of the layer's default init).
        regrow_frozen: whether momentum and gradient growth rank earlier tasks' frozen weights by
            their real scores. False (the default, the authors' behaviour: their code zeroes frozen
            weights' gradients before ranking) ranks them last, so these growths pick a frozen
            weight only when fewer than k others are inactive; reuse then comes from the initial
            mask and random/unfired growth. True lets a new task regrow any frozen weight its
            gradients favour.
        erk_power: ERK's scores to this power (`layer_densities`): 0 uniform, 1 ERK (the default).
        growth_later: None (the default: every update grows by `growth`), or "momentum" or
            "gradient" to mix two growths in each update: of the k weights grown, a share that
            falls with the task along the death rate's cosine (all at its start, none at its end)
            is grown by `growth` (which must be "random" or "unfired": exploration), the rest by
            `growth_later` (exploitation), first.
        turnover_stop: stop the task's topology updates after the first update that changes less
            than this fraction of the task's mask (weights grown that were not just pruned, over
            the mask's size); 0 (the default) never stops. Turnover falls as the death rate
            decays and as growth starts to regrow what it pruned: the updates left would
            change little and cost a dense-gradient step each.
        seed: seeds every random draw of this object (initial mask, random growth) through
            `derive_seed`, so it may equal the seed of the weight initialization. None (the
            default) draws one from torch's global generator: reproducible after
            `torch.manual_seed`, and different for every task. (A fixed seed shared by all
            tasks would give every task the same initial mask, all of it frozen after task 0.)
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
        frozen: Mapping[str, torch.Tensor] | None = None,
        new_weights: str = "zero",
        regrow_frozen: bool = False,
        erk_power: float = 1.0,
        growth_later: str | None = None,
        turnover_stop: float = 0.0,
        seed: int | None = None,
    ) -> None:
        _check_choice("sparse_init", sparse_init, SPARSE_INITS)
        _check_choice("death mode", death, DEATH_MODES)
        _check_choice("growth mode", growth, GROWTH_MODES)
        _check_choice("new_weights", new_weights, NEW_WEIGHTS)
        density = check_real("density", density, 0, 1, low_open=True)
        death_rate = check_real("death_rate", death_rate, 0, 1, high_open=True)
        update_frequency = check_int("update_frequency", update_frequency, minimum=0)
        total_steps = check_int("total_steps", total_steps, minimum=1)
        check_bool("regrow_frozen", regrow_frozen)
        erk_power = check_real("erk_power", erk_power, 0, math.inf, high_open=True)
        if erk_power != 1 and sparse_init != "ERK":
            raise ValueError(f"erk_power scales ERK's scores: it needs sparse_init='ERK', not {sparse_init!r}")
        if growth_later is not None:
            _check_choice("growth_later", growth_later, SCORED_GROWTHS)
            if growth not in SAMPLED_GROWTHS:
                raise ValueError(f"growth_later mixes an exploring growth ({' or '.join(SAMPLED_GROWTHS)}) with "
                                 f"{growth_later}: growth must be one of them, not {growth!r}")
        turnover_stop = check_real("turnover_stop", turnover_stop, 0, 1, high_open=True)
        if seed is not None:
            seed = check_int("seed", seed, minimum=0)
        if frozen is not None:
            frozen = check_mask_dict("frozen", frozen)
        self.optimizer = optimizer
        self.density = density
        self.sparse_init = sparse_init
        self.death = death
        self.growth = growth
        self.death_rate = death_rate
        self.update_frequency = update_frequency
        self.total_steps = total_steps
        self.new_weights = new_weights
        self.regrow_frozen = regrow_frozen
        self.erk_power = erk_power
        self.growth_later = growth_later
        self.turnover_stop = turnover_stop
        self.scored_growth = growth_later or (growth if growth in SCORED_GROWTHS else None)  # ranks by scores
        self.settled = False  # turnover_stop: an update changed too little, no more in this task
        self.last_turnover: float | None = None  # with turnover_stop: the last update's
        self.seed = int(torch.randint(2**62, ())) if seed is None else seed
        self._frozen_arg = frozen
        self.steps = 0
        self.topology_updates = 0  # prune-and-grow cycles done in this task
        self.layers: dict[str, MaskedLayer] = {}
        self.generator: torch.Generator | None = None
        self._decays_weights = False  # some param group has weight decay: restore reused weights
        self._stage = _NEW  # then _TRAINING (add_module), then _CONSOLIDATED (consolidate)
        self._training = False  # self._stage == _TRAINING: the one check on the hot path (step)

    # Read-only views of the layers, as dicts by parameter name (the live tensors).
    params: dict[str, nn.Parameter] = _per_layer("param")
    counts: dict[str, int] = _per_layer("count")
    masks: dict[str, torch.Tensor] = _per_layer("mask")
    frozen: dict[str, torch.Tensor] = _per_layer("frozen")
    fired: dict[str, torch.Tensor] = _per_layer("fired")
    trainable: dict[str, torch.Tensor] = _per_layer("trainable")

    # ------------------------------------------------------------------ set-up

    def add_module(self, model: nn.Module) -> None:
        """Take the maskable weights of `model` and draw this task's initial mask. Once per
        Masking; a tied weight (one tensor reached from several modules) is masked once, under
        its first name."""
        if self._stage != _NEW:
            raise self._order_error("add_module()")
        params, aliases = _maskable_weights(model)
        if not params:
            raise ValueError("the model has no conv or linear weights to mask")
        self._check_weights(params, aliases)
        self._check_optimizer(params)
        frozen = self._frozen_arg or {}
        check_mask_names("frozen", frozen, params, aliases)
        check_mask_shapes("frozen", frozen, {name: p.shape for name, p in params.items()})
        _warn_if_not_isolated(model, params)
        if self.update_frequency > self.total_steps:
            log.warning("no topology update in this task: update_frequency %d > its %d steps, so the mask stays "
                        "the initial one (static sparse training); lower the update frequency",
                        self.update_frequency, self.total_steps)
        device = next(iter(params.values())).device
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(self.seed, _MASK_STREAM))
        counts = allocate_counts({n: p.shape for n, p in params.items()}, self.density, self.sparse_init,
                                 self.erk_power)

        first_task = not any(bool(f.any()) for f in frozen.values())
        self.layers = {}
        with torch.no_grad():
            for name, p in params.items():
                layer = MaskedLayer(p, counts[name], frozen.get(name), track_reused=self._decays_weights)
                indices = self._random_indices(p.numel(), layer.count)
                # a later task's model holds consolidated weights: pick the new ones' start
                layer.start(indices, None if first_task else self._new_weight_values(p), self.optimizer)
                self.layers[name] = layer
            if self.scored_growth == "momentum":
                averages = 2 if "betas" in self.optimizer.param_groups[0] else 1
                for layer in self.layers.values():
                    layer.momentum = [torch.zeros_like(layer.param) for _ in range(averages)]
        self._stage, self._training = _TRAINING, True
        log.info("masking %d layers, %d of %d weights active (%s, density %.4g)",
                 len(params), sum(counts.values()), sum(p.numel() for p in params.values()),
                 self.sparse_init, self.density)
        if not any(bool(layer.trainable.any()) for layer in self.layers.values()):
            log.warning("this task has NO trainable weights: its whole initial mask lies on weights frozen by "
                        "earlier tasks, so it cannot learn (did every task get the same seed=?)")

    @staticmethod
    def _check_weights(params: dict[str, nn.Parameter], aliases: dict[str, str]) -> None:
        """Refuse weights a mask cannot be drawn on; say which tied weights are masked once."""
        lazy = [n for n, p in params.items() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(f"the lazy modules' weights {some(lazy)} are not initialized yet: run a forward pass "
                             "through the model before add_module(model)")
        devices = {p.device for p in params.values()}
        if len(devices) > 1:
            where = "; ".join(f"{d}: {some([n for n, p in params.items() if p.device == d], 2)}" for d in devices)
            raise ValueError(f"the maskable weights must all be on one device, not on {len(devices)} ({where})")
        if aliases:
            log.info("tied weights: %s; each shared tensor is masked once, under its first name, so the densities "
                     "count it once", ", ".join(f"{a} is {n}" for a, n in aliases.items()))

    def _order_error(self, call: str) -> RuntimeError:
        """The error for `call` made out of order: before add_module, add_module again, or a
        change after consolidate."""
        if self._stage == _NEW:
            return RuntimeError(f"{call} before add_module(): call add_module(model) first")
        if self._stage == _TRAINING:  # only add_module comes here in this stage
            return RuntimeError(f"{call} called twice: a Masking masks one model once; to start the task again, "
                                "make a new Masking (with a fresh optimizer)")
        if call == "consolidate()":
            call = "consolidate() called twice (the first call returned the task's mask)"
        else:
            call += " after consolidate()"
        return RuntimeError(f"{call}: a Masking serves one task and is done once consolidated; make a new Masking "
                            "for the next task (with frozen=TaskMasks.frozen_before(t))")

    def _check_optimizer(self, params: dict[str, nn.Parameter]) -> None:
        if type(self.optimizer) not in SUPPORTED_OPTIMIZERS:
            supported = ", ".join(cls.__name__ for cls in SUPPORTED_OPTIMIZERS)
            raise ValueError(
                f"Masking supports the optimizers {supported} (fused or not), not "
                f"{type(self.optimizer).__name__}: it zeroes the gradients of the weights a task may not "
                "train, which keeps them frozen only if a zero gradient with zero state gives a zero "
                "update and leaves the state zero")
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in params.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"the optimizer lacks the maskable weights {some(missing, 8)}: build it over "
                             "model.parameters()")
        groups = self.optimizer.param_groups
        self._decays_weights = any(g.get("weight_decay", 0) != 0 for g in groups)
        if self.scored_growth == "momentum":
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

    # ------------------------------------------------------------------ training

    def step(self) -> None:
        """One optimizer step restricted to the trainable weights; topology update when due.

        The gradients of non-trainable entries are zeroed: with a supported optimizer their
        state stays zero and their update is exactly zero, except that weight decay moves the
        frozen weights in the mask (the only nonzero non-trainable ones), which are then put
        back to their stored values with zero state.
        """
        if not self._training:
            raise self._order_error("step()")
        due = self.update_frequency > 0 and (self.steps + 1) % self.update_frequency == 0 and not self.settled
        layers = [layer for layer in self.layers.values() if layer.param.grad is not None]
        if self.scored_growth == "momentum" and not self.settled:  # a settled task grows nothing more
            self._track_momentum(layers)
        if due and self.scored_growth == "gradient":
            for layer in layers:
                layer.dense_grad = layer.param.grad.abs()
        if layers:  # one fused multiply over all layers on CUDA (see MaskedLayer.grad_mask)
            torch._foreach_mul_([layer.param.grad for layer in layers], [layer.grad_mask for layer in layers])
        self.optimizer.step()
        if self._decays_weights:
            for layer in self.layers.values():
                layer.restore_reused(self.optimizer)
        self.steps += 1
        if due:
            self.update_topology()

    def _track_momentum(self, layers: list[MaskedLayer]) -> None:
        """Update the dense gradient averages that `momentum` growth ranks weights by, with the
        optimizer's betas (Adam-like) or momentum (SGD-like)."""
        group = self.optimizer.param_groups[0]
        first = [layer.momentum[0] for layer in layers]
        grads = [layer.param.grad for layer in layers]
        if "betas" in group:
            beta1, beta2 = group["betas"]
            second = [layer.momentum[1] for layer in layers]
            torch._foreach_lerp_(first, grads, 1 - beta1)
            torch._foreach_mul_(second, beta2)
            torch._foreach_addcmul_(second, grads, grads, 1 - beta2)
        else:
            torch._foreach_mul_(first, group["momentum"])
            torch._foreach_add_(first, grads)

    def death_rate_at(self, step: int) -> float:
        """The cosine-decayed prune fraction at `step` of this task."""
        return cosine_death_rate(step, self.total_steps, self.death_rate, FINAL_DEATH_RATE)

    def update_topology(self) -> None:
        """One prune-and-grow cycle on every sparse layer, now.

        Per layer, k = ceil(rate * active): the k active weights with the smallest |w| leave
        the mask and exactly k inactive ones enter it, chosen by the growth mode:

        - random: uniformly among the inactive weights;
        - unfired: uniformly among the weights never in this task's mask, and when fewer than
          k are left, all of them and the rest uniformly among the inactive ones;
        - momentum, gradient: the largest `growth_scores` among the inactive weights; frozen
          weights rank below all others unless `regrow_frozen`.

        With `growth_later`, k - e of them by `growth_later` first and then e by `growth`, where
        e = round(s * k) and s = `exploration_share` falls from 1 to 0 over the task. With
        `turnover_stop`, the task's last update is the first that changes less than that share of
        its mask.

        Dense layers (ERK can make small layers dense) have nothing to exchange.
        """
        if not self._training:
            raise self._order_error("update_topology()")
        rate = self.death_rate_at(self.steps)
        share = self.exploration_share(self.steps)
        changed = []
        with torch.no_grad():
            for name, layer in self.layers.items():
                k = math.ceil(rate * layer.count)
                if layer.count == layer.param.numel() or k == 0:
                    continue
                slots, pruned = layer.prune(k)
                if self.growth_later is None:
                    grown = self._grown(self.growth, name, k)
                    layer.grow(slots, pruned, grown, self.optimizer)
                else:
                    explore = round(share * k)
                    late = self._grown(self.growth_later, name, k - explore)
                    layer.grow(slots[explore:], pruned, late, self.optimizer)
                    layer.fired_count = int(layer.fired.sum())  # scored growth may fire never-fired weights
                    early = self._grown(self.growth, name, explore)
                    layer.grow(slots[:explore], pruned[:0], early, self.optimizer)
                    grown = torch.cat([late, early])
                if self.turnover_stop:
                    changed.append(k - torch.isin(grown, pruned).sum())
        for layer in self.layers.values():
            layer.dense_grad = None
        self.topology_updates += 1
        if changed:
            self.last_turnover = float(sum(changed)) / sum(layer.count for layer in self.layers.values())
            if self.last_turnover < self.turnover_stop:
                self.settled = True
                log.info("topology settled after %d updates (turnover %.4f < %g): no more updates in this task",
                         self.topology_updates, self.last_turnover, self.turnover_stop)

    def _grown(self, growth: str, name: str, k: int) -> torch.Tensor:
        """k flat indices of layer `name`'s inactive weights chosen by `growth`."""
        layer = self.layers[name]
        if growth == "random":
            return layer.random_inactive(k, self.generator)
        if growth == "unfired":
            return layer.unfired_first(k, self.generator)
        return layer.top_inactive(self.growth_scores(name), k, frozen_last=not self.regrow_frozen)

    def exploration_share(self, step: int) -> float:
        """With `growth_later`: the share of an update's growth done by `growth` at `step`, the
        death rate's cosine from 1 at the task's start to 0 at its end; 1 without it."""
        if self.growth_later is None:
            return 1.0
        return cosine_death_rate(step, self.total_steps, 1.0, 0.0)

    def growth_scores(self, name: str) -> torch.Tensor:
        """Scores for growing weights into layer `name` (momentum and gradient growth only):

        - momentum: |m / (sqrt(v) + 1e-8)| of dense running gradient averages with the
          optimizer's betas (Adam), or |momentum buffer| of the dense gradient (SGD);
        - gradient: |dense gradient| of the current batch.

        Random and unfired growth sample the inactive weights directly and have no scores.
        """
        if self._stage == _NEW:
            raise self._order_error("growth_scores()")
        if name not in self.layers:
            raise ValueError(f"growth_scores: no masked layer {name!r}; the layers are {some(self.layers)}")
        if self.scored_growth == "momentum":
            return self.layers[name].momentum_scores()
        if self.scored_growth == "gradient":
            return self.layers[name].gradient_scores()
        raise ValueError(f"{self.growth} growth samples weights directly: it has no growth scores")

    def restrict(self, keep: Mapping[str, torch.Tensor]) -> None:
        """Shrink this task's mask to `keep` for the rest of the task: one-shot pruning to a mask
        chosen outside (PackNet's, after its dense phase). `keep` holds a bool tensor for every
        masked layer, a subset of its current mask; the layer's count becomes its size, the
        weights leaving the mask become zero with zero optimizer state, and no topology update
        ever brings them back unless one is scheduled. A state saved afterwards loads into a
        Masking given the same `keep` first (the counts must agree)."""
        if not self._training:
            raise self._order_error("restrict()")
        keep = check_mask_dict("keep", keep)
        check_mask_names("keep", keep, self.layers, complete=True, known_as="the masked layers")
        check_mask_shapes("keep", keep, {name: layer.param.shape for name, layer in self.layers.items()})
        outside = [name for name, layer in self.layers.items()
                   if bool((keep[name].to(layer.mask.device) & ~layer.mask).any())]
        if outside:
            raise ValueError(f"keep must be a subset of the current mask; it adds weights in {some(outside, 8)}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.restrict(keep[name], self.optimizer)

    # ------------------------------------------------------------------ end of task

    def consolidate(self) -> dict[str, torch.Tensor]:
        """Write the consolidated weights into the model; return this task's final mask.

        Consolidated = earlier tasks' frozen values where frozen, this task's trained values
        on its trainable weights, zero elsewhere. Any task's network is its mask applied to
        these weights. Once, at the end of the task: the Masking is done afterwards (make a new one
        for the next task); its reads (`capacity()`, `state_dict()`, the per-layer views) remain.
        """
        if not self._training:
            raise self._order_error("consolidate()")
        self._stage, self._training = _CONSOLIDATED, False
        return {name: layer.consolidate() for name, layer in self.layers.items()}

    def capacity(self) -> dict[str, Any]:
        """Fractions of weights used by any task, by this task, reused from earlier ones, free."""
        if self._stage == _NEW:
            raise self._order_error("capacity()")
        layers, totals = {}, {"used": 0, "task": 0, "reused": 0, "numel": 0}
        for name, layer in self.layers.items():
            counts = layer.capacity_counts()
            layers[name] = _fractions(counts)
            for key in totals:
                totals[key] += counts[key]
        return {"layers": layers, "total": _fractions(totals)}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this task identically (copies, not references): the
        step, the counts, per layer (a dict by parameter name for each) the mask, the active
        indices in their order (it decides which of equal magnitudes are pruned), fired,
        frozen and stored; momentum growth's averages; the generator's state; and the settings
        (`load_state_dict` refuses a state of other settings)."""
        if self._stage == _NEW:
            raise self._order_error("state_dict()")
        parts = {name: layer.state_dict() for name, layer in self.layers.items()}
        return {
            "steps": self.steps,
            "topology_updates": self.topology_updates,
            "counts": self.counts,
            **{key: {name: part[key] for name, part in parts.items()} for key in LAYER_STATE_KEYS},
            "momentum": {name: part["momentum"] for name, part in parts.items() if part["momentum"]},
            "generator": self.generator.get_state(),
            "settled": self.settled,
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _SETTINGS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. To resume: build model, optimizer and Masking afresh (with the
        same settings), call `add_module(model)`, then load the three states (model, optimizer,
        this). A state of another model or of other settings is refused (`ValueError`)."""
        if not self._training:
            raise self._order_error("load_state_dict()")
        self._check_state(state)
        self.steps = state["steps"]
        # absent from checkpoints of earlier versions, which only updated on schedule
        on_schedule = self.steps // self.update_frequency if self.update_frequency else 0
        self.topology_updates = state.get("topology_updates", on_schedule)
        for name, layer in self.layers.items():
            part = {key: state[key][name] for key in LAYER_STATE_KEYS}
            layer.load_state_dict({**part, "momentum": state["momentum"].get(name, [])}, self.optimizer)
        self._restore_generator(state["generator"])
        self.settled = state.get("settled", False)  # absent from checkpoints of earlier versions

    def _check_state(self, state: Any) -> None:
        """Refuse (ValueError) a state that is not this Masking's: not a `state_dict()`, of
        another model (names or shapes), another allocation, or other settings."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a Masking.state_dict(), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state is not a Masking.state_dict(): it lacks {some(missing, 8)}")
        names = set(self.layers)
        for key in ("counts", *LAYER_STATE_KEYS):
            if set(state[key]) != names:
                only_state, only_here = sorted(set(state[key]) - names), sorted(names - set(state[key]))
                raise ValueError(f"state is of another model: its {key!r} has the layers {some(only_state, 8)} "
                                 f"that this Masking's model lacks and lacks its layers {some(only_here, 8)}")
        shapes = [f"{n!r} is {tuple(state['masks'][n].shape)}, not {tuple(layer.param.shape)}"
                  for n, layer in self.layers.items() if state["masks"][n].shape != layer.param.shape]
        if shapes:
            raise ValueError(f"state is of another model: its masks have other shapes ({'; '.join(shapes[:4])})")
        counts = [n for n, layer in self.layers.items() if state["counts"][n] != layer.count]
        if counts:
            raise ValueError(f"state belongs to a Masking with another allocation (density, sparse_init): the "
                             f"active counts differ in {some(counts, 8)}")
        saved = state.get("settings")  # absent from checkpoints of earlier versions
        if saved is not None:
            differ = [f"{key} {saved[key]!r} there, {value!r} here" for key, value in self._settings().items()
                      if key in saved and saved[key] != value]
            if differ:
                raise ValueError(f"state was saved by a Masking with other settings: {'; '.join(differ)}; build "
                                 "this one with the settings of the run it continues")
        elif state["steps"] > self.total_steps:
            raise ValueError(f"state has taken {state['steps']} steps, more than this Masking's total_steps "
                             f"{self.total_steps}: build it with the total_steps of the run it continues")

    def _restore_generator(self, saved: torch.Tensor) -> None:
        """Continue the saved random stream; from a generator of another kind (a state saved on a
        GPU resumed on a CPU, or the other way round), a new stream seeded from the saved state:
        deterministic, but not the stream the other device would have drawn."""
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved)
            return
        digest = hashlib.sha256(saved.cpu().numpy().tobytes()).digest()
        self.generator.manual_seed(derive_seed(self.seed, _MASK_STREAM, int.from_bytes(digest[:8], "little")))
        log.warning("the mask generator's state comes from another kind of device: its stream continues "
                    "from a seed derived from that state (the run goes on deterministically, but it is not "
                    "the run the other device would have made)")


def _warn_if_not_isolated(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """One warning when `model` computes with state that the masks do not isolate."""
    unmasked = [n for n, p in model.named_parameters() if p.requires_grad and n not in params]
    buffers = [n for n, b in model.named_buffers() if b.is_floating_point()]
    if unmasked or buffers:
        log.warning("not isolated: parameters outside the masks (%s) and buffers such as BatchNorm running "
                    "statistics (%s) are shared and changed by every task, so earlier tasks can be forgotten; "
                    "for exact isolation use a backbone without biases, BatchNorm affine parameters or running "
                    "statistics (like models/resnet.py)",
                    some(unmasked), some(buffers))


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {choices}")


def _fractions(counts: dict[str, int]) -> dict[str, float]:
    numel = counts["numel"]
    used = counts["used"] / numel
    return {"used": used, "task": counts["task"] / numel, "reused": counts["reused"] / numel, "free": 1 - used}
