"""Exact top-k selection that is fast for the large k of a topology update.

`torch.topk` over a 2.4 M-entry layer takes about 40 ms on a 2-core CPU whatever k is.
A prune-and-grow cycle needs tens of thousands of winners per layer, so instead we read
a threshold off a strided sample, keep the entries at or above it (a few percent more than
k), and run `topk` on those. The answer is exact: when the threshold lets through
fewer than k entries we fall back to a full `topk`.

The answer is also the same on every device: `topk` leaves open which of several equal scores
at the k-th place it returns, and CPU and CUDA choose differently; here the lowest indices win,
and the indices come back in ascending order.
"""

import math

import torch

from sparselearning.checks import check_int

SAMPLE_SIZE = 8192


def sample_stride(n: int) -> int:
    """About n / SAMPLE_SIZE, but coprime to 2, 3 and 7, so that a strided sample of a flattened
    conv weight (channels in powers of two, 3x3 or 7x7 kernels) visits every kernel position
    and channel alike, instead of one kernel position of every 32nd input channel, whose values
    may not be typical of the layer (the threshold would then miss and fall back to a full topk)."""
    stride = max(1, n // SAMPLE_SIZE)
    while stride > 1 and math.gcd(stride, 42) != 1:
        stride -= 1
    return stride


def top_indices(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices, ascending, of the `k` largest entries of the 1-D tensor `scores` (of equal
    scores at the k-th place, the lowest indices), leaving out the entries where the bool tensor
    `exclude` is True (there must be k others)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got shape {tuple(getattr(scores, 'shape', ()))}")
    k = check_int("k", k, minimum=0)
    if k > scores.numel():
        raise ValueError(f"k {k} exceeds the {scores.numel()} scores")
    if exclude is not None and (exclude.dtype != torch.bool or exclude.shape != scores.shape):
        raise ValueError("exclude must be a bool tensor of the scores' shape")
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if n <= 4 * SAMPLE_SIZE:
        return _full_topk(scores, k, exclude)
    stride = sample_stride(n)
    sample = scores[::stride]
    eligible = n
    if exclude is not None:
        full = sample.numel()
        sample = sample[~exclude[::stride]]
        eligible = n * sample.numel() // full  # an estimate: it only sets how far to reach
    m = sample.numel()
    if k >= eligible or m == 0:
        return _full_topk(scores, k, exclude)
    # Ask for a few percent more than k so that sampling noise rarely forces the fallback.
    rank = math.ceil((1.05 * k + 4 * math.sqrt(k) + 16) * m / eligible)
    if rank >= m // 2:
        return _full_topk(scores, k, exclude)
    threshold = torch.kthvalue(sample, m - rank + 1).values
    above = scores >= threshold
    if exclude is not None:
        above &= ~exclude
    candidates = above.nonzero().squeeze(1)
    if candidates.numel() < k:
        return _full_topk(scores, k, exclude)
    return candidates.index_select(0, _top_lowest_first(scores.index_select(0, candidates), k))


def _full_topk(scores: torch.Tensor, k: int, exclude: torch.Tensor | None) -> torch.Tensor:
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return _top_lowest_first(scores, min(k, scores.numel()))


def _top_lowest_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices, ascending, of the k largest entries of `scores`, of equal ones at the k-th place
    the lowest. `topk` picks the k; only when an entry equal to the k-th value was left out (the
    pick among equals was topk's) are the equals replaced by the lowest-index ones."""
    values, indices = torch.topk(scores, k, sorted=False)
    chosen = torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, indices, True)
    tied = scores == values.min()
    if bool((tied & ~chosen).any()):
        chosen &= ~tied
        missing = k - int(chosen.sum())
        chosen.index_fill_(0, tied.nonzero().squeeze(1)[:missing], True)
    return chosen.nonzero().squeeze(1)


def random_free_indices(taken: torch.Tensor, k: int, free: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct flat indices drawn uniformly at random among the False entries of the 1-D
    bool tensor `taken`, of which there are `free`.

    Draws positions with replacement, drops the taken ones, and keeps the first k distinct in
    draw order: a uniformly random k-subset at O(k log k) cost instead of one random number per
    entry. Falls back to exact top-k of random scores when too few distinct ones were drawn.
    """
    n = taken.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=taken.device)
    draws = math.ceil((1.1 * k + 64) * n / free)
    if draws < n // 4:
        positions = torch.randint(n, (draws,), generator=generator, device=taken.device)
        positions = positions[~taken.index_select(0, positions)]
        distinct, inverse = torch.unique(positions, return_inverse=True)
        if distinct.numel() >= k:
            order = torch.arange(positions.numel(), device=taken.device)
            first = torch.full_like(distinct, positions.numel()).scatter_reduce_(0, inverse, order, "amin")
            return distinct[torch.argsort(first)[:k]]
    scores = torch.rand(n, generator=generator, device=taken.device).masked_fill_(taken, -1.0)
    return top_indices(scores, k)
