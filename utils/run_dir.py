"""The run directory: its files, how they are written, and whether a run may use the directory.

Every file but the log is written whole or not at all (`sparselearning.write_atomically`: a
temporary name, flushed, fsynced and renamed), so a crash at any moment leaves the old file or
the new one, never half a file. The log is appended.

The output-directory policy: a directory holding a finished run is refused unless `--resume`
(which returns its results) or `--overwrite`; one holding an unfinished run unless `--resume`
(which continues it) or `--overwrite` (which deletes the run's own files, nothing else).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparselearning import write_atomically
from utils.cli import RESUME_MAY_CHANGE, Config
from utils.errors import UserError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.txt"
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoint.pt"  # the run after its last finished task
PROGRESS_FILE = "task_in_progress.pt"  # the task being trained, every --checkpoint_every epochs
RUN_FILES = (CONFIG_FILE, RESULTS_FILE, REPORT_FILE, LOG_FILE, CHECKPOINT_FILE, PROGRESS_FILE)
PROJECT_LOGGERS = ("data", "models", "sparselearning", "utils")


# ---------------------------------------------------------------------------- files


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented, strict JSON (no NaN) to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` to `path` atomically."""
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def attach_log_file(output_dir: Path) -> logging.Handler:
    """Append this process's log records to `<output_dir>/train.log`.

    The file gets the project's DEBUG records too (per-epoch lines); the console only INFO.
    """
    handler = logging.FileHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    return handler


# ---------------------------------------------------------------------------- the policy


@dataclass
class Resumable:
    """What an output directory already holds: a finished run's results, the run after its last
    finished task, and the task in progress (each None when absent)."""

    finished: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None
    in_progress: dict[str, Any] | None = None


def inspect_output_dir(config: Config) -> Resumable:
    """Decide, without writing anything, whether the run may use `--output_dir`, and load what
    `--resume` continues from (see the module's docstring for the policy)."""
    out = config.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a directory")
    paths = {name: out / name for name in (RESULTS_FILE, CHECKPOINT_FILE, PROGRESS_FILE)}
    present = [name for name, path in paths.items() if path.exists()]
    if not present or config.overwrite:
        return Resumable()
    results = _read_results(paths[RESULTS_FILE])
    finished = results is not None and results.get("complete", True)
    if not config.resume:
        state = "a finished run" if finished else "an unfinished run"
        raise UserError(f"{out} holds {state}; pass --resume to "
                        f"{'print its results' if finished else 'continue it'} or --overwrite to start again")
    if finished:
        _check_same_config(config, results)
        return Resumable(finished=results)
    saved, in_progress = (load_checkpoint(paths[name]) if paths[name].exists() else None
                          for name in (CHECKPOINT_FILE, PROGRESS_FILE))
    for state in (saved, in_progress):
        _check_same_config(config, state)
    return Resumable(saved=saved, in_progress=in_progress)


def _read_results(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path} ({error}); pass --overwrite to start again") from None


def _check_same_config(config: Config, state: dict[str, Any] | None) -> None:
    now = config.to_dict()
    changed = [k for k, v in (state or {}).get("config", {}).items()
               if k not in RESUME_MAY_CHANGE and now.get(k) != v]
    if changed:
        raise UserError(f"--resume: {config.output_dir} was run with other settings ({', '.join(changed)}); "
                        "use a new --output_dir")


def create_output_dir(config: Config) -> None:
    """Make the run directory; with --overwrite, remove the files of the run it held."""
    out = config.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {out}: {error.strerror}") from None
