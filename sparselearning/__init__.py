"""The dynamic sparse training core: masks, density allocation, prune and grow, isolation.

Nothing here knows about datasets or the command line. The public API:

- `Masking`: one task's dynamic sparse training, earlier tasks' weights frozen; each maskable
  weight's state in one `MaskedLayer`.
- `TaskMasks`: the store of finished tasks' masks (frozen union, capacity, bit-packed files).
- `allocate_counts` / `layer_densities`: `uniform` and `ERK` allocations (and ERK to a power,
  `auto_erk_power`).
- `cosine_death_rate`: the prune-fraction schedule.
- `maskable_weights`: which parameters are masked (conv and linear weights).
- `derive_seed`: independent random streams from one seed.
- `write_atomically`: the one way the project writes a file (whole or not at all).
- The choices, one source of truth for the command line: `SPARSE_INITS`, `GROWTH_MODES`,
  `DEATH_MODES`, `NEW_WEIGHTS`; and `SUPPORTED_OPTIMIZERS`, the optimizer types `Masking` takes.
"""

from sparselearning.atomic_file import write_atomically
from sparselearning.density import SPARSE_INITS, allocate_counts, auto_erk_power, layer_densities
from sparselearning.masked_layer import MaskedLayer
from sparselearning.masking import (
    DEATH_MODES,
    GROWTH_MODES,
    NEW_WEIGHTS,
    SUPPORTED_OPTIMIZERS,
    Masking,
    maskable_weights,
)
from sparselearning.schedule import cosine_death_rate
from sparselearning.seeding import derive_seed
from sparselearning.selection import top_indices
from sparselearning.task_masks import TaskMasks

__all__ = [
    "DEATH_MODES",
    "GROWTH_MODES",
    "NEW_WEIGHTS",
    "SPARSE_INITS",
    "SUPPORTED_OPTIMIZERS",
    "MaskedLayer",
    "Masking",
    "TaskMasks",
    "allocate_counts",
    "auto_erk_power",
    "cosine_death_rate",
    "derive_seed",
    "layer_densities",
    "maskable_weights",
    "top_indices",
    "write_atomically",
]
