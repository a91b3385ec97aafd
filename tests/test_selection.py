"""The selection primitives of a topology update: exact top-k and uniform sampling of free entries,
on every `device` (tests/conftest.py). Scores and taken entries are drawn on the CPU, so a device
sees the same ones; the draws of `random_free_indices` come from a generator on the device."""

import pytest
import torch

from sparselearning.selection import SAMPLE_SIZE, random_free_indices, top_indices


@pytest.mark.parametrize("n,k", [(50, 7), (4 * SAMPLE_SIZE + 1, 1), (200_000, 3_000), (200_000, 100_000),
                                 (200_000, 150_000), (500_000, 499_990), (470_000, 235_000)])
def test_top_indices_is_exact_topk(n, k, device):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(n, generator=g)
    scores[torch.randperm(n, generator=g)[: n // 3]] = float("-inf")  # excluded entries, as in growth
    scores = scores.to(device)
    got = top_indices(scores, k)
    assert got.numel() == k and torch.unique(got).numel() == k
    assert torch.equal(torch.sort(scores[got]).values, torch.sort(torch.topk(scores, k).values).values)


@pytest.mark.parametrize("k", [1000, 150_000, 299_000])
def test_top_indices_with_ties_at_the_threshold_is_still_exact(k, device):
    """Many equal values around the k-th: the bracket's edges fall on ties."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 20, (300_000,), generator=g).float().to(device)
    got = top_indices(scores, k)
    assert got.numel() == k and torch.unique(got).numel() == k
    assert torch.equal(torch.sort(scores[got]).values, torch.sort(torch.topk(scores, k).values).values)


def test_top_indices_with_massive_ties_is_still_exact(device):
    scores = torch.zeros(300_000, device=device)
    scores[:10] = 1.0
    got = top_indices(scores, 1000)
    assert got.numel() == 1000 and torch.unique(got).numel() == 1000
    assert set(range(10)) <= set(got.tolist())


@pytest.mark.parametrize("n,taken_fraction,k", [(100_000, 0.1, 5_000), (100_000, 0.9, 2_000), (100, 0.5, 50)])
def test_random_free_indices_are_distinct_free_and_exactly_k(n, taken_fraction, k, device):
    taken = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < taken_fraction).to(device)
    got = random_free_indices(taken, k, int((~taken).sum()), torch.Generator(device=device).manual_seed(1))
    assert got.numel() == k and torch.unique(got).numel() == k
    assert not taken[got].any()


def test_random_free_indices_are_uniform_over_the_free_entries(device):
    n, k, rounds = 20_000, 2_000, 50
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[: n // 2] = True  # the first half is taken: never chosen; the rest equally often
    g = torch.Generator(device=device).manual_seed(1)
    counts = torch.zeros(n, device=device)
    for _ in range(rounds):
        counts[random_free_indices(taken, k, n // 2, g)] += 1
    assert counts[: n // 2].sum() == 0
    free = counts[n // 2:]
    expected = rounds * k / (n // 2)  # 10 per entry
    # per entry: binomial(50, 0.2), sd 2.8; block means of 1,000 entries: sd 0.09
    blocks = free.view(10, -1).mean(1)
    assert torch.all((blocks - expected).abs() < 0.5), blocks
    assert abs(free.var().item() - rounds * 0.2 * 0.8) < 1.5  # binomial spread: no duplicates, no bias


@pytest.mark.parametrize("n,k", [(50, 7), (300_000, 1000), (300_000, 150_000)])
def test_top_indices_ties_go_to_the_lowest_indices_in_ascending_order(n, k, device):
    """topk leaves open which of equal scores at the k-th place it returns (CPU and CUDA differ);
    the answer here is fixed: all above the k-th value, then the lowest-index ties, ascending."""
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, 5, (n,), generator=g).float()
    got = top_indices(scores.to(device), k).cpu()
    assert torch.equal(got, torch.sort(got).values)
    kth = torch.sort(scores, descending=True).values[k - 1]
    ties = (scores == kth).nonzero().squeeze(1)
    expected = torch.cat([(scores > kth).nonzero().squeeze(1), ties[: k - int((scores > kth).sum())]])
    assert torch.equal(got, torch.sort(expected).values)
