"""K concurrent runs on one device: the aggregate training throughput of K = 1, 2, 4, 8
processes training at once (a sweep's `--per-gpu K`), and the K to recommend.

Each K starts K `benchmarks.worker` processes together (each: its warm-up steps, then "ready";
when all are ready, all get "go"), each timing `concurrent_steps` masked ResNet-18 steps at
batch 64 and reporting (wall-clock time, images done) samples. The steady window is the time
all K were past their first sample and none had finished; each process's images/s over that
window (read off its samples by linear interpolation) add up to the aggregate.
`concurrent_recommended_k` is the smallest K within 5 % of the best aggregate. Each process
gets cores / K torch threads. On a CPU (and with --quick): K = 1, 2 and tiny sizes only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import Result, Row
from benchmarks.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.05  # the recommended K: the smallest within 5 % of the best aggregate
Samples = list[tuple[float, int]]


def worker_command(work: Workload, k: int) -> list[str]:
    repeats = work.repeats
    return [sys.executable, "-m", "benchmarks.worker", "--device", str(work.device),
            "--steps", str(repeats.concurrent_steps), "--warmup", str(max(1, repeats.concurrent_steps // 20)),
            "--batch", str(repeats.concurrent_batch), "--sample_every", str(max(1, repeats.concurrent_steps // 20)),
            "--threads", str(max(1, (os.cpu_count() or 1) // k))]


def launch_together(command: list[str], k: int) -> list[Samples]:
    """Start `k` workers, let them go at once when all are ready, return their samples."""
    with tempfile.TemporaryDirectory(prefix="benchmark-workers-") as folder:
        logs = [Path(folder) / f"{i}.err" for i in range(k)]
        procs = []
        try:
            for log in logs:
                with open(log, "w") as err:
                    procs.append(subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                  stderr=err, text=True))
            if any(proc.stdout.readline().strip() != "ready" for proc in procs):
                raise RuntimeError("a benchmark worker failed to start")
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            lines = [proc.stdout.readline() for proc in procs]
            if any(proc.wait() != 0 for proc in procs) or not all(lines):
                raise RuntimeError("a benchmark worker failed")
            return [[tuple(s) for s in json.loads(line)["samples"]] for line in lines]
        except RuntimeError as error:
            tails = [log.read_text().strip()[-500:] for log in logs]
            raise RuntimeError(f"{error}: {' | '.join(t for t in tails if t)}") from None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


def steady_rate(runs: list[Samples]) -> tuple[float, float]:
    """Aggregate images/s of `runs` over the window all were running (past their first sample,
    none finished), and the window's seconds."""
    start = max(samples[1][0] for samples in runs)
    end = min(samples[-1][0] for samples in runs)
    if end <= start:
        raise RuntimeError("the concurrent runs did not overlap: no steady window to measure")
    rate = 0.0
    for samples in runs:
        times, images = np.array([s[0] for s in samples]), np.array([s[1] for s in samples], dtype=float)
        rate += (np.interp(end, times, images) - np.interp(start, times, images)) / (end - start)
    return rate, end - start


def recommended(aggregate: dict[int, float]) -> int:
    """The smallest K whose aggregate is within WITHIN of the best."""
    best = max(aggregate.values())
    return min(k for k, rate in aggregate.items() if rate >= (1 - WITHIN) * best)


def run(work: Workload) -> Result:
    aggregate, windows = {}, {}
    for k in work.repeats.concurrent_runs:
        aggregate[k], windows[k] = steady_rate(launch_together(worker_command(work, k), k))
    best_k = recommended(aggregate)
    rows = [Row(f"{k} concurrent training run(s) on one {work.device.type} device, aggregate images/s",
                f"{rate:.0f}/s", f"{aggregate[1]:.0f}/s (K=1)" if 1 in aggregate else "-",
                rate / aggregate[1] if 1 in aggregate else None) for k, rate in aggregate.items()]
    rows.append(Row("recommended concurrent runs per device (smallest K within 5 % of the best)", f"K = {best_k}",
                    derived=True))
    figures = {"concurrent_images_per_s": {str(k): rate for k, rate in aggregate.items()},
               "concurrent_window_seconds": {str(k): s for k, s in windows.items()},
               "concurrent_recommended_k": best_k, "concurrent_steps": work.repeats.concurrent_steps,
               "concurrent_batch": work.repeats.concurrent_batch}
    return Result(rows, figures)
