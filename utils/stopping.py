"""Stopping a run cleanly when it is asked to: SIGTERM (pre-emption, `kill`), SIGINT (Ctrl-C) or
SIGUSR1 (a cluster's warning before the time limit, e.g. SLURM's `--signal=USR1@120`).

While a run trains and tests, these signals only set a flag (`StopRequest`); the training loop
looks at it after every optimizer step, the tests (`utils.evaluation`, `utils.task_inference`)
before every test or calibration batch (`StopRequest.check`). The run then saves the task in
progress (a test under way is abandoned and done again on `--resume`: its partial counts are not
saved), writes results.json marked incomplete and resumable, and the process exits with
`EXIT_STOPPED`. What one stop waits for is bounded: one optimizer step or one test batch, then
the saves (scripts/sweep_slurm.sh's --signal-seconds allows for both).

A second SIGTERM or SIGUSR1 while that happens is ignored: the saves finish (a cluster sends
SIGTERM at the time limit, after its warning signal). A second SIGINT (Ctrl-C again) stops at
once: `StoppedAtOnce`, a KeyboardInterrupt, raised wherever the run is; a file being written is
abandoned whole (every file is written to a temporary name and renamed: the previous version
stays, intact) and the command line exits with 130.

When the block ends, the signal is passed on to the handler that was there before, if a host
installed one of its own (a test runner, an application running the experiment in-process): the
host learns of it once the run has saved. Python's defaults (a run started from the command
line) are not called, so the command line still exits with `EXIT_STOPPED`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STOPPED = 3  # the exit code of a run stopped by a signal, saved and resumable with --resume


class StopNow(Exception):
    """Raised by `StopRequest.check` where a stop abandons work to be done again on `--resume`
    (a test between two batches); whoever catches it saves the run and raises RunStopped."""


class StoppedAtOnce(KeyboardInterrupt):
    """Ctrl-C again while a stop was under way: the run ends at once, without saving further."""


class StopRequest:
    """Whether a stop signal arrived, and which (the first one counts)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.at_once = False  # Ctrl-C came again: StoppedAtOnce was raised (once; later signals change nothing)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "no signal"

    def check(self) -> None:
        """Raise StopNow if a stop was requested."""
        if self.signal is not None:
            raise StopNow(self.name)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signum
        elif signum == signal.SIGINT and not self.at_once:
            self.at_once = True
            raise StoppedAtOnce(f"SIGINT while stopping for {self.name}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Within the block, the stop signals set this request instead of ending the process
        (in the main thread only: Python delivers signals there; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.signal is not None and is_host_handler(previous[self.signal]):
                previous[self.signal](self.signal, None)


def is_host_handler(handler: object) -> bool:
    """Whether `handler` (as `signal.signal` returned it) is a Python function a host installed,
    not a default: SIG_DFL, SIG_IGN, Python's KeyboardInterrupt handler, or None (not set from Python)."""
    return callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)
