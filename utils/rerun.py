"""Train a finished run again from its config.json, and say whether it gives the same numbers.

    python -m utils.rerun RUN_DIR [--out DIR] [--data_dir DIR] [--device DEV] [--threads N] [--dry-run]

A run's config.json holds every setting the run depended on (`utils.cli.Config`). This rebuilds
the command line that gives that Config (`command_of`: the entry script of its dataset and one
flag per setting), prints it, runs it into --out (default runs/rerun/<RUN_DIR's name>), and
compares what it measured with the run's results.json (`compare`): the accuracy matrices, task
given and hidden, the task-found shares and every per-task record, except times. Exit code 0 when
every compared number is the same to the last bit, 1 when one differs (each difference printed,
the first few) or the new run failed, 2 for a mistake (no such run, a setting this version does
not know).

The same numbers are expected on the same device type with the same torch version, data and
number of CPU threads: on a CPU the run is given the original's thread count (results.json's
`environment.cpu_threads`) unless --threads says otherwise. Settings added to the code after the
run was made take their defaults, which are the behaviour of the code the run was made with.
Where the data differ (config.json's `data_fingerprint`: other images under --data_dir), so do
the numbers, and the comparison says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from utils import run_dir
from utils.cli import SCRIPTS, Config, OneLineParser, build_parser
from utils.errors import UserError

NOT_FLAGS = ("output_dir", "resume", "overwrite")
"""Settings of a run that are not carried over: where the new run goes, and whether it continues one."""

MAX_SHOWN = 10
"""Differences printed at most (the count says how many there were)."""


def read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's config.json and results.json; UserError when either is missing or the run did not finish."""
    files = []
    for name in (run_dir.CONFIG_FILE, run_dir.RESULTS_FILE):
        try:
            files.append(json.loads((run / name).read_text()))
        except FileNotFoundError:
            raise UserError(f"{run} has no {name}: not a finished run") from None
        except (OSError, ValueError) as error:
            raise UserError(f"{run / name} cannot be read: {error}") from None
    config, results = files
    if not results.get("complete", True):
        raise UserError(f"{run} did not finish ({results.get('tasks_done')} tasks done): nothing to compare with")
    return config, results


def command_of(config: dict[str, Any], out: Path, data_dir: Path | None = None,
               device: str | None = None) -> list[str]:
    """The entry script and flags that give a run `config` (a config.json's contents) again, into `out`."""
    benchmark = config.get("dataset")
    if benchmark not in SCRIPTS:
        raise UserError(f"config.json names dataset {benchmark!r}; this version runs {', '.join(SCRIPTS)}")
    known = {field.name for field in dataclasses.fields(Config)}
    unknown = sorted(set(config) - known - {"data_fingerprint"})
    if unknown:
        raise UserError(f"config.json has settings this version does not know ({', '.join(unknown)}): "
                        "made by another version of the code; run that version")
    settings = {**config, "data_dir": config["data_dir"] if data_dir is None else str(data_dir),
                "device": config["device"] if device is None else device}
    argv = [SCRIPTS[benchmark]]
    for action in build_parser(benchmark)._actions:
        if action.dest not in settings or action.dest in NOT_FLAGS:
            continue
        value = settings[action.dest]
        if isinstance(action, argparse.BooleanOptionalAction):
            if value is not None:
                argv.append(action.option_strings[0 if value else 1])
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv + ["--output_dir", str(out)]


def _numbers(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every leaf of a results.json value with its path, e.g. ('acc_matrix[2][0]', 31.5)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{where}[{i}]")
    else:
        yield where, value


COMPARED = ("acc_matrix", "acc_matrix_agnostic", "task_id_accuracy", "per_task")
"""What `compare` compares: both accuracy matrices, the task-found shares, the per-task records
(ACC, BWT, FWT and the rest are functions of these)."""


def is_time(path: str) -> bool:
    return "seconds" in path


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], int]:
    """The differences between two results.json (`COMPARED`, times left out; a record only one of
    them has, e.g. FLOPs counted by a later version, left out too), and how many numbers agreed."""
    differences, same = [], 0
    for key in COMPARED:
        old = dict(_numbers(before.get(key), key))
        new = dict(_numbers(after.get(key), key))
        for path in old.keys() & new.keys():
            if is_time(path):
                continue
            a, b = old[path], new[path]
            if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
                same += 1
            else:
                differences.append(f"{path}: {a} before, {b} now")
    return sorted(differences), same


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m utils.rerun", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run's directory (its config.json and results.json)")
    parser.add_argument("--out", type=Path, help="the new run's directory (default: runs/rerun/<run's name>)")
    parser.add_argument("--data_dir", type=Path, help="where the data are (default: the run's own --data_dir)")
    parser.add_argument("--device", help="the device (default: the run's own; another device type is another "
                        "experiment)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: as many as the run had)")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, before = read_run(args.run)
        out = args.out or Path("runs") / "rerun" / args.run.resolve().name
        command = command_of(config, out, args.data_dir, args.device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("python " + shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    threads = args.threads or before.get("environment", {}).get("cpu_threads")
    if threads and not str(config["device"]).startswith("cuda"):
        torch.set_num_threads(threads)
    from utils.entry import main as run  # the training code only when there is a run to make

    code = run(config["dataset"], command[1:])
    if code != 0:
        print(f"the new run ended with exit code {code}: nothing to compare", file=sys.stderr)
        return 1 if code != 2 else 2
    after = json.loads((out / run_dir.RESULTS_FILE).read_text())
    new_config = json.loads((out / run_dir.CONFIG_FILE).read_text())
    differences, same = compare(before, after)
    if config.get("data_fingerprint") != new_config.get("data_fingerprint"):
        print("the data differ from the run's (config.json's data_fingerprint): other numbers are expected")
    if not differences:
        print(f"the same numbers, bit for bit: {same} compared (accuracy matrices, task found, per-task records; "
              f"times left out), in {out}")
        return 0
    print(f"{len(differences)} numbers differ, {same} agree ({out}):")
    for line in differences[:MAX_SHOWN]:
        print(f"  {line}")
    if len(differences) > MAX_SHOWN:
        print(f"  ... and {len(differences) - MAX_SHOWN} more")
    return 1


if __name__ == "__main__":
    sys.exit(main())
