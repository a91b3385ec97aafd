"""What `python cifar100.py` and `python miniImageNet100.py` do: parse, run, report."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from tqdm import tqdm

from data import DataError
from utils.cli import parse_config
from utils.errors import NonFiniteLoss, RunStopped, UserError
from utils.stopping import EXIT_STOPPED
from utils.metrics import format_report


class ConsoleHandler(logging.Handler):
    """INFO and up on stderr, written around the tqdm progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def main(benchmark: str, argv: Sequence[str] | None = None) -> int:
    """Run one experiment; return the exit code: 0 done, 1 training diverged, 2 a mistake the user
    can fix (flags, output directory: UserError; data: the data package's DataError), 3 stopped by a
    signal after saving (continue with --resume), 130 Ctrl-C before training began; each reported
    as one line on stderr."""
    console = ConsoleHandler()
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[console])
    try:
        config = parse_config(argv, benchmark)
        from utils.experiment import run  # after parsing, so --help and flag errors stay fast

        results = run(config)
    except (UserError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RunStopped as stopped:
        print(stopped, file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # Ctrl-C before training began (while training it stops the run cleanly)
        print("interrupted before training began; nothing was trained (saved files, if any, are unchanged)",
              file=sys.stderr)
        return 130
    print(format_report(results["acc_matrix"], config.num_classes_per_task))
    print(f"results written to {config.output_dir}")
    return 0
