"""Collect the results of many runs (a sweep) into one table.

    python -m utils.report runs/grid                 # print the table
    python -m utils.report runs/grid --csv grid.csv  # and write it as CSV

Every `results.json` below the given folder becomes one row: the settings a sweep varies and the
run's metrics. Unfinished runs (no results.json yet) are listed as missing, not silently skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.run_dir import CHECKPOINT_FILE, RESULTS_FILE, write_text

SETTINGS = ("dataset", "num_tasks", "sparse", "isolate", "sparse_init", "growth", "density",
            "update_frequency", "epochs", "seed")
METRICS = ("acc", "bwt", "fwt", "forgetting")


def collect(root: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Rows (settings, metrics, mean training seconds per task, run folder) sorted by settings,
    and the folders of runs that started but have no results yet. Files named results.json
    that are not a run's results are skipped."""
    rows = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            results = json.loads(path.read_text())
            row = {key: results["config"][key] for key in SETTINGS}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        row.update({key: results[key] for key in METRICS})
        seconds = [task["train_seconds"] for task in results["per_task"]]
        row["task_seconds"] = sum(seconds) / len(seconds)
        row["run"] = str(path.parent)
        rows.append(row)
    unfinished = sorted(p.parent for p in root.rglob(CHECKPOINT_FILE) if not (p.parent / RESULTS_FILE).exists())
    rows.sort(key=lambda row: tuple(str(row[key]) for key in SETTINGS))
    return rows, unfinished


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*SETTINGS, *METRICS, "task_seconds", "run"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows: settings as given, metrics with 2 decimals."""
    columns = [*SETTINGS, *METRICS]
    cells = [[str(row[c]) for c in SETTINGS] + ["-" if row[m] is None else f"{row[m]:.2f}" for m in METRICS]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder holding the runs (searched recursively)")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    rows, unfinished = collect(args.root)
    if not rows:
        print(f"error: no {RESULTS_FILE} below {args.root}", file=sys.stderr)
        return 2
    print(format_table(rows))
    for folder in unfinished:
        print(f"unfinished: {folder}")
    if args.csv:
        write_text(args.csv, to_csv(rows))
        print(f"written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
