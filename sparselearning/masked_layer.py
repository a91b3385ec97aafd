"""`MaskedLayer`: one maskable weight and everything a task keeps about it.

`Masking` holds one `MaskedLayer` per conv or linear weight and orchestrates them (random
draws, the optimizer step, the update schedule); the per-layer operations live here. The
vocabulary (mask, frozen, trainable, fired) is the one of `sparselearning.masking`.

Every tensor operation here is an in-place or O(k) index operation where it can be: a
topology update touches only the entries that leave or enter the mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparselearning.checks import check_int, check_mask_dict, check_mask_shapes
from sparselearning.selection import random_free_indices, top_indices

# The per-layer entries of `Masking.state_dict()` (each a dict by parameter name), besides
# "momentum", which only momentum growth fills.
LAYER_STATE_KEYS = ("masks", "active", "fired", "frozen", "stored")


def float_grad_mask(device: torch.device) -> bool:
    """Whether `MaskedLayer.grad_mask` is a float copy (CUDA: one fused multiply for all layers)
    or the uint8 view of `trainable` (elsewhere, where torch loops over the layers anyway)."""
    return device.type == "cuda"


class MaskedLayer:
    """One maskable weight of one task, with all its task-local state.

    Attributes:
        param: the weight (the model's parameter, changed in place).
        count: how many entries the mask holds; fixed for the task.
        mask, frozen, fired, trainable: bool tensors of the weight's shape; trainable is
            mask & ~frozen, and `trainable_uint8` is the same memory viewed as uint8.
        grad_mask: trainable as the multiplier of the gradient in `Masking.step`: on CUDA a
            copy in the weight's dtype (4 bytes a weight for float32), so that one
            `torch._foreach_mul_` over all layers takes the fused same-dtype path; elsewhere
            `trainable_uint8` itself (no memory). x * 1.0 == x * 1 and x * 0.0 == x * 0 (the
            same signed zero, NaN stays NaN), so both give bit-identical gradients.
        stored: earlier tasks' values where frozen, else 0.
        active: flat indices of the mask's entries, in the order updates leave them (it
            decides which of equal magnitudes are pruned, so checkpoints keep it).
        fired_count: how many entries of `fired` are True, counted on the host.
        reused: flat indices of mask & frozen, the weights weight decay would move; kept only
            when `track_reused` (the optimizer decays weights), else None.
        momentum: dense gradient averages for momentum growth ([m, v] for Adam-like
            optimizers, [buffer] for SGD-like ones); empty for the other growth modes.
        dense_grad: |gradient| of the batch whose step triggers an update (gradient growth).
    """

    __slots__ = ("param", "count", "frozen", "stored", "track_reused", "mask", "fired", "trainable",
                 "trainable_uint8", "grad_mask", "active", "fired_count", "frozen_count", "reused", "momentum", "dense_grad")

    def __init__(self, param: nn.Parameter, count: int, frozen: torch.Tensor | None, track_reused: bool) -> None:
        """`frozen`: bool tensor of `param`'s shape (on any device: copied to `param`'s), or None."""
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"param must be a tensor (the weight), got {type(param).__name__}")
        count = check_int("count", count, minimum=0)
        if count > param.numel():
            raise ValueError(f"count {count} exceeds the weight's {param.numel()} entries")
        if frozen is not None:
            check_mask_shapes("frozen", check_mask_dict("frozen", {"weight": frozen}), {"weight": param.shape})
        self.param = param
        self.count = count
        device = param.device
        self.frozen = torch.zeros_like(param, dtype=torch.bool) if frozen is None else frozen.to(device, torch.bool)
        self.stored = torch.where(self.frozen, param, 0.0)
        self.frozen_count = int(self.frozen.sum())
        self.track_reused = track_reused
        self.momentum: list[torch.Tensor] = []
        self.dense_grad: torch.Tensor | None = None
        self.reused: torch.Tensor | None = None

    # ------------------------------------------------------------------ mask and derived tensors

    def start(self, indices: torch.Tensor, new_values: torch.Tensor | None, optimizer: torch.optim.Optimizer) -> None:
        """Make the flat `indices` the initial mask. With `new_values` (a later task, whose
        model holds consolidated weights) the weights become the stored values where frozen
        and `new_values` elsewhere."""
        p = self.param
        if indices.dim() != 1 or indices.numel() != self.count:
            raise ValueError(f"indices must be {self.count} flat indices (the layer's count), "
                             f"got a tensor of shape {tuple(indices.shape)}")
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        mask[indices] = True
        self.mask = mask.view_as(p)
        if new_values is not None:
            p.copy_(torch.where(self.frozen, self.stored, new_values))
        self.fired = self.mask.clone()
        self.refresh(optimizer)

    def restrict(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Make `mask` (a subset of the current one) the mask; the count follows (see `Masking.restrict`)."""
        self.mask = mask.to(self.param.device, torch.bool, copy=True)
        self.count = int(self.mask.sum())
        self.refresh(optimizer)

    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """Recompute the derived tensors from mask, frozen and fired, and enforce them."""
        self.trainable = self.mask & ~self.frozen
        self.trainable_uint8 = self.trainable.view(torch.uint8)  # uint8 multiplies twice as fast as bool
        self.grad_mask = (self.trainable.to(self.param.dtype) if float_grad_mask(self.param.device)
                          else self.trainable_uint8)
        self.active = self.mask.view(-1).nonzero_static(size=self.count).squeeze(1)
        self.fired_count = int(self.fired.sum())
        self._update_reused()
        self.enforce(optimizer)

    def _update_reused(self) -> None:
        if self.track_reused:
            self.reused = (self.mask & self.frozen).view(-1).nonzero().squeeze(1)

    def optimizer_states(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The optimizer's per-weight state tensors of this weight (momentum, moments, ...)."""
        p = self.param
        return [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]

    def enforce(self, optimizer: torch.optim.Optimizer) -> None:
        """Non-trainable entries: the stored value in mask & frozen, else 0; zero optimizer state."""
        p = self.param
        with torch.no_grad():
            torch.where(self.trainable, p, torch.where(self.mask & self.frozen, self.stored, 0.0), out=p)
        for value in self.optimizer_states(optimizer):
            value.mul_(self.trainable_uint8)

    def restore_reused(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the stored values of the frozen weights in the mask, with zero state (after
        a step with weight decay, which moves them although their gradient is zero)."""
        p, reused = self.param.detach().view(-1), self.reused
        p.index_copy_(0, reused, self.stored.view(-1).index_select(0, reused))
        for value in self.optimizer_states(optimizer):
            value.view(-1).index_fill_(0, reused, 0.0)

    # ------------------------------------------------------------------ prune and grow

    def prune(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the k active weights with the smallest |w| out of the mask; return their
        positions in `active` and their flat indices."""
        slots = top_indices(-self.param.view(-1).index_select(0, self.active).abs(), k)
        pruned = self.active.index_select(0, slots)
        self.mask.view(-1).index_fill_(0, pruned, False)
        return slots, pruned

    def random_inactive(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k flat indices uniformly among the inactive weights (`random` growth)."""
        mask = self.mask.view(-1)
        return random_free_indices(mask, k, mask.numel() - self.count + k, generator)

    def unfired_first(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k flat indices for `unfired` growth: uniformly among the never-fired weights (all
        inactive); when fewer than k are left, all of them and the rest uniformly among the
        inactive weights that have fired."""
        mask, fired = self.mask.view(-1), self.fired.view(-1)
        unfired = mask.numel() - self.fired_count
        self.fired_count += min(k, unfired)
        if unfired >= k:
            return random_free_indices(fired, k, unfired, generator)
        inactive_fired = mask.numel() - (self.count - k) - unfired
        rest = random_free_indices(mask | ~fired, k - unfired, inactive_fired, generator)
        return torch.cat([(~fired).nonzero().squeeze(1), rest])

    def top_inactive(self, scores: torch.Tensor, k: int, frozen_last: bool) -> torch.Tensor:
        """Flat indices of the k inactive weights with the largest `scores` (which are >= 0); with
        `frozen_last`, frozen weights rank below every other inactive weight (as if their score
        were -1), so they are chosen only when fewer than k others are inactive."""
        scores = scores.view(-1)
        if frozen_last and self.frozen_count:
            scores = scores.masked_fill(self.frozen.view(-1), -1.0)
        return top_indices(scores, k, exclude=self.mask.view(-1))

    def momentum_scores(self) -> torch.Tensor:
        """|m / (sqrt(v) + 1e-8)| of the dense averages (Adam-like), or |buffer| (SGD-like)."""
        if len(self.momentum) == 2:  # in two buffers instead of four
            return self.momentum[0].abs().div_(self.momentum[1].sqrt().add_(1e-8))
        return self.momentum[0].abs()

    def gradient_scores(self) -> torch.Tensor:
        """|dense gradient|: the one captured for the update, else the current one, else 0."""
        if self.dense_grad is not None:
            return self.dense_grad
        grad = self.param.grad
        return grad.abs() if grad is not None else torch.zeros_like(self.param)

    def grow(self, slots: torch.Tensor, pruned: torch.Tensor, grown: torch.Tensor,
             optimizer: torch.optim.Optimizer) -> None:
        """Put the flat indices `grown` into the mask, in the `slots` of `active` that `prune`
        emptied, and update weights, state and derived tensors where the mask changed: what
        `refresh` would do, at O(k) instead of O(layer) cost.

        Pruned weights and all their state become zero; grown ones start with zero state at
        zero, or at their stored value when an earlier task owns them. A weight pruned and
        regrown in the same update starts afresh too.
        """
        self.mask.view(-1).index_fill_(0, grown, True)
        self.active.index_copy_(0, slots, grown)
        self.fired.view(-1).index_fill_(0, grown, True)
        p, trainable = self.param.view(-1), self.trainable.view(-1)
        trainable.index_fill_(0, pruned, False)
        p.index_fill_(0, pruned, 0.0)
        for value in self.optimizer_states(optimizer):
            value.view(-1).index_fill_(0, pruned, 0.0)  # grown entries' state is zero already
        grown_frozen = self.frozen.view(-1).index_select(0, grown)
        trainable.index_copy_(0, grown, ~grown_frozen)
        if self.grad_mask is not self.trainable_uint8:  # a separate copy: the same two changes
            self.grad_mask.view(-1).index_fill_(0, pruned, 0).index_copy_(0, grown, (~grown_frozen).to(p.dtype))
        p.index_copy_(0, grown, torch.where(grown_frozen, self.stored.view(-1).index_select(0, grown), 0.0))
        self._update_reused()

    # ------------------------------------------------------------------ end of task, checkpoints

    def consolidate(self) -> torch.Tensor:
        """Write the stored values back where frozen; return a copy of the mask."""
        with torch.no_grad():
            self.param.copy_(torch.where(self.frozen, self.stored, self.param))
        return self.mask.clone()

    def capacity_counts(self) -> dict[str, int]:
        """Weights used by any task, by this task, reused from earlier ones; and all weights."""
        mask, frozen = self.mask, self.frozen
        return {"used": int((mask | frozen).sum()), "task": int(mask.sum()),
                "reused": int((mask & frozen).sum()), "numel": mask.numel()}

    def state_dict(self) -> dict[str, Any]:
        """This layer's part of `Masking.state_dict()` (copies), by the checkpoint's keys."""
        tensors = (self.mask, self.active, self.fired, self.frozen, self.stored)
        state: dict[str, Any] = {key: t.clone() for key, t in zip(LAYER_STATE_KEYS, tensors)}
        state["momentum"] = [t.clone() for t in self.momentum]
        return state

    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Restore `state_dict()` (copies: later updates must not write into `state`)."""
        device = self.param.device
        self.mask, active, self.fired, self.frozen, self.stored = (
            state[key].to(device, copy=True) for key in LAYER_STATE_KEYS)
        self.frozen_count = int(self.frozen.sum())
        self.momentum = [t.to(device, copy=True) for t in state["momentum"]]
        self.refresh(optimizer)
        self.active = active
