"""Independent random streams derived from one seed."""

import numpy as np

from sparselearning.checks import check_int


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for the random stream named by `keys`, derived from `seed` (numpy SeedSequence).

    Seeding every generator with `seed` itself would give them all the stream that
    `torch.manual_seed(seed)` gives the weight initialization. For a mask that is fatal: its
    "random" draw would pick each layer's most positive weights, and such a network barely
    trains. Derived seeds keep the streams apart. `seed` and `keys` are non-negative ints.
    """
    check_int("seed", seed, minimum=0)
    for i, key in enumerate(keys):
        check_int(f"keys[{i}]", key, minimum=0)
    state = int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])  # a python int (numpy 1.x
    return state >> 1  # cannot shift a uint64 by a python int); 63 bits fit every generator
