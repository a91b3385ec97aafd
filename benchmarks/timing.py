"""Clocks for side-by-side measurements: every comparison in the package goes through
`alternating_medians`, which runs ours and the baseline in turn, round after round, and keeps
the median of each, so a busy shared machine slows both alike and a stray spike is ignored.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read after it has seen it finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternating_medians(
    fns: Sequence[Callable[[], object]], device: torch.device, *, repeats: int, warmup: int = 1
) -> list[float]:
    """Median seconds per call of each of `fns`, called in turn for `warmup` untimed rounds
    (allocator, optimizer state, worker processes) and then `repeats` timed rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, seconds):
            times.append(timed(fn, device))
    return [statistics.median(times) for times in seconds]
