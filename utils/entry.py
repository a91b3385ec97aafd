"""What `python cifar100.py` and `python miniImageNet100.py` do: parse, run, report."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from tqdm import tqdm

from data import DataError
from utils.cli import parse_config
from utils.errors import NonFiniteLoss, UserError
from utils.metrics import format_report


class ConsoleHandler(logging.Handler):
    """INFO and up on stderr, written around the tqdm progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def main(benchmark: str, argv: Sequence[str] | None = None) -> int:
    """Run one experiment; return the exit code: 0 done, 1 training diverged, 2 a mistake the user
    can fix (flags, output directory: UserError; data: the data package's DataError), each reported
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
    print(format_report(results["acc_matrix"]))
    print(f"results written to {config.output_dir}")
    return 0
