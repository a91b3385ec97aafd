"""What `python cifar100.py` and `python miniImageNet100.py` do: parse, run, report."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from tqdm import tqdm

from data import DataError
from utils.cli import parse_config
from utils.errors import NonFiniteLoss, RunStopped, UserError
from utils.stopping import EXIT_STOPPED, StoppedAtOnce
from utils.metrics import format_report


class ConsoleHandler(logging.Handler):
    """INFO and up on stderr, written around the tqdm progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def interrupted(interrupt: KeyboardInterrupt) -> int:
    """Report a KeyboardInterrupt that reached `main` in one line; its exit code. It is Ctrl-C
    again while a stop was under way (`StoppedAtOnce`, anywhere in its context): 130; a host's
    own signal handler passing on the signal of a run that stopped and saved (RunStopped in its
    context; an in-process run): that run's message, EXIT_STOPPED; else Ctrl-C before training
    began: 130."""
    chain = []
    while interrupt is not None:
        chain.append(interrupt)
        interrupt = interrupt.__context__
    if any(isinstance(error, StoppedAtOnce) for error in chain):
        print("stopped at once (Ctrl-C while stopping); every file saved before is whole: continue with the "
              "same command and --resume", file=sys.stderr)
        return 130
    stopped = next((error for error in chain if isinstance(error, RunStopped)), None)
    if stopped is not None:
        print(stopped, file=sys.stderr)
        return EXIT_STOPPED
    print("interrupted before training began; nothing was trained (saved files, if any, are unchanged)",
          file=sys.stderr)
    return 130


def main(benchmark: str, argv: Sequence[str] | None = None) -> int:
    """Run one experiment; return the exit code: 0 done, 1 training diverged, 2 a mistake the user
    can fix (flags, output directory: UserError; data: the data package's DataError), 3 stopped by a
    signal after saving (continue with --resume), 130 Ctrl-C before training began or Ctrl-C again
    while stopping (`interrupted`); each reported as one line on stderr."""
    try:
        console = ConsoleHandler()
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[console])
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
    except KeyboardInterrupt as interrupt:  # while a run trains and tests, Ctrl-C stops it cleanly: RunStopped
        return interrupted(interrupt)
    print(format_report(results["acc_matrix"], config.num_classes_per_task))
    print(f"results written to {config.output_dir}")
    return 0
