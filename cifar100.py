"""Task-incremental cifar100 with dynamic sparse training (Yildirim et al., CPAL 2024).

    python cifar100.py --help

All flags and the training loop are shared with the other benchmark's script
(utils/cli.py, utils/experiment.py); this file only names the benchmark.
"""

import signal
import sys
from types import FrameType


def interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while Python imports torch and the rest (seconds): one line and exit 130, no traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first Ctrl-C only: a further one cannot interrupt this
    print("interrupted while starting; nothing was run", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)
    from utils.entry import main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # main() takes Ctrl-C from here
    sys.exit(main("cifar100"))
