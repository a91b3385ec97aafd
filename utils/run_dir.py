"""The run directory: config, log, results and checkpoint, each written whole or not at all.

Every file goes to a hidden temporary name in the same directory first, is flushed and fsynced,
and is then renamed over the target (`os.replace` is atomic on POSIX), so a crash at any moment
leaves the old file or the new one, never half a file. (The log is the exception: it is appended.)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.txt"
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoint.pt"  # the run after its last finished task
PROGRESS_FILE = "task_in_progress.pt"  # the task being trained, every --checkpoint_every epochs
RUN_FILES = (CONFIG_FILE, RESULTS_FILE, REPORT_FILE, LOG_FILE, CHECKPOINT_FILE, PROGRESS_FILE)


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a hidden temporary file next to `path`, make it durable (flush, fsync),
    rename it over `path`, and fsync the directory so that the rename survives a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    _write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented, strict JSON (no NaN) to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` to `path` atomically."""
    _write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


PROJECT_LOGGERS = ("data", "models", "sparselearning", "utils")


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


def git_commit() -> str | None:
    """The project's current git commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What a result depends on besides the config: versions, device and code revision."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_cores": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
