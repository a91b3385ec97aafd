"""The dynamic sparse training core: masks, density allocation, prune and grow, isolation.

Nothing here knows about datasets or the command line. The public API:

- `Masking`: one task's dynamic sparse training, earlier tasks' weights frozen.
- `TaskMasks`: the store of finished tasks' masks (frozen union, capacity, bit-packed files).
- `allocate_counts` / `layer_densities`: `uniform` and `ERK` allocations.
- `cosine_death_rate`: the prune-fraction schedule.
- `maskable_weights`: which parameters are masked (conv and linear weights).
- `derive_seed`: independent random streams from one seed.
"""

from sparselearning.density import SPARSE_INITS, allocate_counts, layer_densities
from sparselearning.masking import GROWTH_MODES, Masking, maskable_weights
from sparselearning.schedule import cosine_death_rate
from sparselearning.seeding import derive_seed
from sparselearning.selection import top_indices
from sparselearning.task_masks import TaskMasks

__all__ = [
    "GROWTH_MODES",
    "SPARSE_INITS",
    "Masking",
    "TaskMasks",
    "allocate_counts",
    "cosine_death_rate",
    "derive_seed",
    "layer_densities",
    "maskable_weights",
    "top_indices",
]
