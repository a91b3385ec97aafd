"""Task-incremental cifar100 with dynamic sparse training (Yildirim et al., CPAL 2024).

    python cifar100.py --help

All flags and the training loop are shared with the other benchmark's script
(utils/cli.py, utils/experiment.py); this file only names the benchmark.
"""

import sys

from utils.entry import main

if __name__ == "__main__":
    sys.exit(main("cifar100"))
