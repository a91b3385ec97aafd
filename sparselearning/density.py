"""How many weights each layer may use: the `uniform` and `ERK` density allocations."""

import math
import numbers
from collections.abc import Mapping, Sequence

from sparselearning.checks import check_real

SPARSE_INITS = ("ERK", "uniform")


def _check_shapes(shapes: object) -> None:
    """`shapes` must map layer names to non-empty sequences of positive ints (a weight's shape)."""
    if not isinstance(shapes, Mapping):
        raise ValueError(f"shapes must be a dict of layer name -> weight shape, got {type(shapes).__name__}")
    for name, shape in shapes.items():
        if (not isinstance(shape, Sequence) or isinstance(shape, str) or not shape
                or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape)):
            raise ValueError(f"shapes[{name!r}] must be a weight's shape, a non-empty sequence of positive ints, "
                             f"got {shape!r}")


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float, sparse_init: str,
                    erk_power: float = 1.0) -> dict[str, float]:
    """Per-layer densities whose weighted mean is `density`.

    `uniform`: every layer gets `density`.
    `ERK` (Erdos-Renyi-Kernel, Evci et al. 2020): a layer's density is proportional to
    sum(shape) / prod(shape), so small layers (the stem, the classifier, 1x1 shortcuts)
    are denser. Layers whose density would exceed 1 are made dense, one at a time, largest
    score first, and the others are rescaled so the total stays `density`.
    `erk_power` (ERK only; RigL's "ERK power scale"): the density is proportional to the
    score to this power, between uniform (0, exactly `uniform`) and ERK (1, exactly `ERK`).
    """
    _check_shapes(shapes)
    density = check_real("density", density, 0, 1, low_open=True)
    erk_power = check_real("erk_power", erk_power, 0, math.inf, high_open=True)
    if sparse_init == "uniform":
        if erk_power != 1:
            raise ValueError(f"erk_power scales ERK's scores: it needs sparse_init='ERK', not uniform (got {erk_power})")
        return {name: density for name in shapes}
    if sparse_init != "ERK":
        raise ValueError(f"unknown sparse_init {sparse_init!r}; choose from {SPARSE_INITS}")
    if erk_power == 0:
        return {name: density for name in shapes}

    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    score = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    if erk_power != 1:
        score = {name: value ** erk_power for name, value in score.items()}
    target = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:  # density 1, or everything capped: the whole net is dense
            return {name: 1.0 for name in shapes}
        budget = target - sum(sizes[name] for name in dense)
        eps = budget / sum(score[name] * sizes[name] for name in sparse)
        largest = max(sparse, key=lambda name: score[name])
        if eps * score[largest] <= 1:
            break
        dense.add(largest)
    return {name: 1.0 if name in dense else eps * score[name] for name in shapes}


def allocate_counts(shapes: Mapping[str, Sequence[int]], density: float, sparse_init: str,
                    erk_power: float = 1.0) -> dict[str, int]:
    """Exact number of active weights per layer: round(d_l * n_l), at least 1, at most n_l."""
    densities = layer_densities(shapes, density, sparse_init, erk_power)
    counts = {}
    for name, shape in shapes.items():
        size = math.prod(shape)
        counts[name] = min(size, max(1, round(densities[name] * size)))
    return counts


# The paper's grid ends: ERK learns better at density 0.2 (its finding 1), uniform is more reliable
# at 0.05 (finding 2).
AUTO_POWER_DENSITIES = (0.05, 0.2)


def auto_erk_power(density: float) -> float:
    """The ERK power `--erk_power auto` uses at `density`: 1 (ERK) at density >= 0.2, 0 (uniform) at
    <= 0.05, and in between linear in log density (0.5 at 0.1), following the paper's findings that
    ERK wins at low sparsity and uniform at high."""
    density = check_real("density", density, 0, 1, low_open=True)
    low, high = AUTO_POWER_DENSITIES
    return min(1.0, max(0.0, math.log(density / low) / math.log(high / low)))
