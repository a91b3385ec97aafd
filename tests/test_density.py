"""Per-layer density allocation (`allocate_counts`): uniform and ERK.

The ERK reference below is written from the definition (DESIGN.md section 1), not from any
implementation: raw score = sum(shape) / prod(shape); find eps so that
sum_l min(1, eps * raw_l) * n_l = d * N, capping layers at density 1 and rescaling the rest.
"""

import math

import pytest
import torch

from sparselearning import allocate_counts
from tests.shapes import resnet18_shapes

DENSITIES = (0.05, 0.1, 0.2, 0.5)


# --------------------------------------------------------------------------- helpers


def small_shapes() -> dict[str, torch.Size]:
    return {
        "conv1.weight": torch.Size([8, 3, 3, 3]),
        "conv2.weight": torch.Size([16, 8, 3, 3]),
        "conv3.weight": torch.Size([32, 16, 3, 3]),
        "fc.weight": torch.Size([10, 32]),
    }


def numel(shape) -> int:
    return math.prod(shape)


def raw_score(shape) -> float:
    return sum(shape) / math.prod(shape)


def erk_reference(shapes, d):
    """Exact (float64) ERK densities and the set of capped layers."""
    n = {k: numel(s) for k, s in shapes.items()}
    raw = {k: raw_score(s) for k, s in shapes.items()}
    total = sum(n.values())
    dense: set[str] = set()
    while True:
        rest = [k for k in shapes if k not in dense]
        if not rest:
            return {k: 1.0 for k in shapes}, dense
        eps = (d * total - sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in rest)
        over = {k for k in rest if eps * raw[k] > 1.0}
        if not over:
            return {k: (1.0 if k in dense else eps * raw[k]) for k in shapes}, dense
        dense |= over


def assert_rounded(count, target, n, what):
    """count must be target (= d_l * n_l) rounded, clamped to [1, n]."""
    assert isinstance(count, int) and not isinstance(count, bool), f"{what}: {type(count)} is not int"
    assert 1 <= count <= n, f"{what}: count {count} outside [1, {n}]"
    if target < 1.0:
        assert count == 1, f"{what}: target {target} < 1 must give 1, got {count}"
    else:
        assert abs(count - target) <= 0.5 + 1e-6, f"{what}: count {count} is not round({target})"


# --------------------------------------------------------------------------- tests


def test_resnet18_shape_helper_is_the_authors_net():
    shapes = resnet18_shapes()
    assert len(shapes) == 21
    assert sum(numel(s) for s in shapes.values()) == 11_218_112


@pytest.mark.parametrize("net", ["small", "resnet18"])
@pytest.mark.parametrize("d", DENSITIES)
def test_uniform_counts_exact(net, d):
    shapes = small_shapes() if net == "small" else resnet18_shapes()
    counts = allocate_counts(shapes, d, "uniform")
    assert set(counts) == set(shapes)
    for k, s in shapes.items():
        assert_rounded(counts[k], d * numel(s), numel(s), k)
    total_n = sum(numel(s) for s in shapes.values())
    assert abs(sum(counts.values()) - d * total_n) <= len(shapes)


def test_uniform_tiny_layer_gets_at_least_one():
    shapes = {"tiny.weight": torch.Size([2, 2]), "big.weight": torch.Size([100, 100])}
    counts = allocate_counts(shapes, 0.05, "uniform")
    assert counts["tiny.weight"] == 1  # round(0.2) would be 0
    assert counts["big.weight"] == 500


@pytest.mark.parametrize("net", ["small", "resnet18"])
@pytest.mark.parametrize("d", DENSITIES)
def test_erk_counts_exact(net, d):
    shapes = small_shapes() if net == "small" else resnet18_shapes()
    counts = allocate_counts(shapes, d, "ERK")
    ref, dense = erk_reference(shapes, d)
    assert set(counts) == set(shapes)
    for k, s in shapes.items():
        assert_rounded(counts[k], ref[k] * numel(s), numel(s), f"{k} at d={d}")
        if k in dense:
            assert counts[k] == numel(s), f"{k} should be dense at d={d}"
    total_n = sum(numel(s) for s in shapes.values())
    assert abs(sum(counts.values()) - d * total_n) <= len(shapes)


def test_erk_is_not_uniform_on_resnet18():
    # at d=0.1 the reference caps conv1 and fc; the 3x3x512 convs get far less than 0.1
    shapes = resnet18_shapes()
    counts = allocate_counts(shapes, 0.1, "ERK")
    assert counts["conv1.weight"] == numel(shapes["conv1.weight"])
    assert counts["fc.weight"] == numel(shapes["fc.weight"])
    big = "layer4.1.conv2.weight"
    assert counts[big] / numel(shapes[big]) < 0.06


@pytest.mark.parametrize("d", [0.1, 0.2, 0.4])
def test_erk_capping_single_layer(d):
    # the 3x3 layer has raw score 6/9; eps * raw exceeds 1 at every d here
    shapes = {
        "tiny.weight": torch.Size([3, 3]),
        "a.weight": torch.Size([200, 300]),
        "b.weight": torch.Size([64, 32, 3, 3]),
    }
    counts = allocate_counts(shapes, d, "ERK")
    assert counts["tiny.weight"] == 9
    total_n = sum(numel(s) for s in shapes.values())
    assert abs(sum(counts.values()) - d * total_n) <= len(shapes)
    for k in ("a.weight", "b.weight"):
        assert counts[k] < numel(shapes[k])


def test_erk_capping_cascades():
    """"mid" only exceeds density 1 after "tiny" has been capped and the rest rescaled.

    A one-pass allocation (cap, rescale once, clamp) would leave the total ~18 weights short.
    """
    shapes = {
        "tiny.weight": torch.Size([4, 4]),
        "mid.weight": torch.Size([46, 46]),
        "big.weight": torch.Size([200, 300]),
        "conv.weight": torch.Size([64, 32, 3, 3]),
    }
    d = 0.2
    total_n = sum(numel(s) for s in shapes.values())
    # self-check of the construction: the first eps caps only "tiny"
    eps0 = d * total_n / sum(sum(s) for s in shapes.values())
    assert eps0 * raw_score(shapes["tiny.weight"]) > 1 > eps0 * raw_score(shapes["mid.weight"])
    counts = allocate_counts(shapes, d, "ERK")
    assert counts["tiny.weight"] == 16
    assert counts["mid.weight"] == 46 * 46
    assert abs(sum(counts.values()) - d * total_n) <= len(shapes)
    ref, _ = erk_reference(shapes, d)
    for k in ("big.weight", "conv.weight"):
        assert_rounded(counts[k], ref[k] * numel(shapes[k]), numel(shapes[k]), k)


@pytest.mark.parametrize("net", ["small", "resnet18"])
@pytest.mark.parametrize("d", DENSITIES)
def test_erk_density_ordered_by_raw_score(net, d):
    shapes = small_shapes() if net == "small" else resnet18_shapes()
    counts = allocate_counts(shapes, d, "ERK")
    dens = {k: counts[k] / numel(s) for k, s in shapes.items()}
    tol = {k: 0.5 / numel(s) for k, s in shapes.items()}  # rounding slack
    keys = list(shapes)
    for i in keys:
        for j in keys:
            ri, rj = raw_score(shapes[i]), raw_score(shapes[j])
            if ri > rj:
                assert dens[i] >= dens[j] - tol[i] - tol[j], (i, j, dens[i], dens[j])
            if ri == rj:
                assert abs(dens[i] - dens[j]) <= tol[i] + tol[j], (i, j)
    # among non-capped layers the density is proportional to the raw score
    free = [k for k in keys if counts[k] < numel(shapes[k])]
    assert len(free) >= 2
    lo = min(free, key=lambda k: raw_score(shapes[k]))
    hi = max(free, key=lambda k: raw_score(shapes[k]))
    if raw_score(shapes[hi]) > raw_score(shapes[lo]):
        ratio = dens[hi] / dens[lo]
        want = raw_score(shapes[hi]) / raw_score(shapes[lo])
        assert ratio == pytest.approx(want, rel=0.05), (hi, lo)


@pytest.mark.parametrize("init", ["uniform", "ERK"])
def test_density_one_is_dense(init):
    for shapes in (small_shapes(), resnet18_shapes()):
        counts = allocate_counts(shapes, 1.0, init)
        for k, s in shapes.items():
            assert counts[k] == numel(s), k
