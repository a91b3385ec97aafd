"""The death-rate schedule: cosine decay over the steps of one task."""

import math

from sparselearning.checks import check_int, check_real

FINAL_DEATH_RATE = 0.005


def cosine_death_rate(step: int, total_steps: int, initial: float, final: float = FINAL_DEATH_RATE) -> float:
    """Fraction of a layer's active weights to prune at `step`.

    Falls from `initial` at step 0 to `final` at `total_steps` along a half cosine (the
    values of torch's CosineAnnealingLR with eta_min=final, as in the authors' code) and
    stays at `final` afterwards. `step` >= 0 and `total_steps` >= 1 are ints; both rates are
    fractions in [0, 1].
    """
    check_int("step", step, minimum=0)
    check_int("total_steps", total_steps, minimum=1)
    check_real("initial", initial, 0, 1)
    check_real("final", final, 0, 1)
    progress = min(step, total_steps) / total_steps
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * progress))
