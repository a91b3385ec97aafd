"""Supermasks: a mask chosen by learned scores, one score per weight (edge-popup; WSN and SupSup).

A layer's mask is the `count` weights with the largest |score| (of equal scores, the lowest
indices: `top_indices`), so its size is exact. In training the mask multiplies the weight and
the gradient reaches the scores straight through (the mask's gradient is passed to |score|
unchanged, as edge-popup, WSN and SupSup do): d loss / d score = g * w * sign(score), where g
is the gradient of the masked weight.

`SupermaskScores` holds the scores of a model's maskable weights; `masked_forward` runs the model
with every maskable weight replaced by weight * mask, without touching the model's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from sparselearning.checks import check_int
from sparselearning.selection import top_indices


class _TopCountMask(torch.autograd.Function):
    """The float 0/1 mask of the `count` largest `magnitudes` (|scores|); the gradient passes
    straight through to them (and from |score| to the score by autograd: the sign's factor)."""

    @staticmethod
    def forward(ctx: Any, magnitudes: torch.Tensor, count: int) -> torch.Tensor:
        mask = torch.zeros(magnitudes.numel(), dtype=magnitudes.dtype, device=magnitudes.device)
        mask[top_indices(magnitudes.detach().view(-1), count)] = 1.0
        return mask.view_as(magnitudes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def top_count_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The bool mask of the `count` entries of `scores` with the largest |score| (no gradient)."""
    count = check_int("count", count, minimum=0)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[top_indices(scores.detach().abs().view(-1), count)] = True
    return mask.view_as(scores)


def kaiming_scores(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scores drawn as nn.Conv2d / nn.Linear draw their weights (kaiming_uniform_, a=sqrt(5)): the
    score initialization of edge-popup, WSN and SupSup."""
    scores = torch.empty_like(param, requires_grad=False)
    nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
    return scores


class SupermaskScores:
    """Learned scores for the maskable weights `params` (name -> weight) and each layer's mask size.

    Args:
        params: the weights to mask, by name (e.g. `maskable_weights(model)`).
        counts: name -> how many weights the layer's mask holds (e.g. `allocate_counts`).
        generator: draws the initial scores (`kaiming_scores`).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], counts: Mapping[str, int],
                 generator: torch.Generator) -> None:
        if set(counts) != set(params):
            raise ValueError("counts must name exactly the masked weights")
        self.counts = {name: check_int(f"counts[{name!r}]", counts[name], minimum=0) for name in params}
        for name, p in params.items():
            if self.counts[name] > p.numel():
                raise ValueError(f"counts[{name!r}] {self.counts[name]} exceeds the weight's {p.numel()} entries")
        self.scores = {name: nn.Parameter(kaiming_scores(p.detach(), generator)) for name, p in params.items()}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.scores.values())

    def training_masks(self) -> dict[str, torch.Tensor]:
        """The masks as float multipliers whose gradient reaches the scores (straight through)."""
        return {name: _TopCountMask.apply(s.abs(), self.counts[name]) for name, s in self.scores.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks, bool, exactly `counts` entries each."""
        return {name: top_count_mask(s, self.counts[name]) for name, s in self.scores.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: s.detach().clone() for name, s in self.scores.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.scores):
            raise ValueError("the saved scores are of other layers")
        with torch.no_grad():
            for name, s in self.scores.items():
                s.copy_(state[name])


def masked_forward(model: nn.Module, x: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`model(x)` with the parameters named in `weights` replaced by those tensors (e.g. weight *
    mask); the model's own parameters are untouched."""
    return functional_call(model, dict(weights), (x,))
