"""Run every benchmark in one process, print the table and optionally write the figures as JSON.

    python -m benchmarks [--quick] [--json PATH] [--device cpu] [--data_dir ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import checkpoint, concurrent, data_pipeline, loop, memory, step, syncs, topology, whole_run
from benchmarks.report import QUICK_REASON, Result, format_table, targets_for, verdicts, without_derived
from benchmarks.workload import DEFAULT, QUICK, SHARED_DATA, has_cifar100, load_workload, write_standin_cifar100
from data import DataError
from utils.environment import environment
from utils.errors import UserError
from utils.run_dir import write_json

FAMILIES: dict[str, Callable[..., Result]] = {
    "data": data_pipeline.run,
    "step": step.run,
    "topology": topology.run,
    "epoch": loop.run_epoch,
    "eval": loop.run_eval,
    "memory": memory.run,
    "checkpoint": checkpoint.run,
    "syncs": syncs.run,
    "run": whole_run.run,
    "concurrent": concurrent.run,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    import benchmarks

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats and small sizes: a smoke test, not figures")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (atomically)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--data_dir", type=Path, default=SHARED_DATA,
                        help="folder holding cifar-100-python/; without it, random stand-in images are generated")
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                        help="run only these benchmarks")
    return parser.parse_args(argv)


def cifar100_folder(data_dir: Path, scratch: Path) -> tuple[Path, str]:
    """Where to read CIFAR-100 from, and a description of it; a stand-in in `scratch` when
    `data_dir` has none."""
    if has_cifar100(data_dir):
        return data_dir, f"CIFAR-100 from {data_dir}"
    write_standin_cifar100(scratch)
    return scratch, f"no CIFAR-100 in {data_dir}: random stand-in images in its format (same sizes)"


def run_all(args: argparse.Namespace, scratch: Path) -> dict:
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    data_dir, source = cifar100_folder(args.data_dir, scratch)
    work = load_workload(data_dir, args.device, QUICK if args.quick else DEFAULT)
    machine = environment(work.device)
    print(f"machine: {machine['device_name']}, {machine['cpu_cores']} cores, {machine['cpu_threads']} torch threads, "
          f"torch {machine['torch']}, device {machine['device']}; load average {load_before:.2f}")
    print(f"data: {source}" + ("; --quick: a smoke test, not figures" if args.quick else ""), flush=True)
    rows, figures, done = [], {}, []
    targets = targets_for(work.device)
    header = {"targets": {key: target.to_dict() for key, target in targets.items()},
              "target_kind": "cuda" if work.device.type == "cuda" else "cpu", "machine": machine,
              "data_source": source, "quick": args.quick, **({"quick_reason": QUICK_REASON} if args.quick else {})}
    shown = without_derived if args.quick else (lambda figures: figures)
    for i, name in enumerate(args.only, start=1):
        print(f"[{i}/{len(args.only)}] {name} ...", flush=True)
        began = time.perf_counter()
        result = FAMILIES[name](work)
        rows += result.rows
        figures.update(result.figures)
        done.append(name)
        print(f"[{i}/{len(args.only)}] {name}: {time.perf_counter() - began:.1f} s", flush=True)
        if args.json:  # what is done so far, in case the run is cut off (a time limit)
            write_json(args.json, {**shown(figures), **header, "complete": False, "families_done": done})
    total = time.perf_counter() - start
    print()
    print(format_table(rows, quick=args.quick, targets=targets))
    print(f"\ntotal {total:.1f} s; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return {**shown(figures), **header, "passed": verdicts(rows, quick=args.quick, targets=targets),
            "complete": True, "families_done": done,
            "total_seconds": total, "load_average": {"before": load_before, "after": os.getloadavg()[0]}}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json and not args.json.resolve().parent.is_dir():
        print(f"error: --json {args.json}: its folder does not exist", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="benchmark-data-") as scratch:
            report = run_all(args, Path(scratch))
    except (UserError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, report)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
