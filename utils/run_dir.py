"""The run directory: its files, how they are written, and whether a run may use the directory.

Every file but the log is written whole or not at all (`sparselearning.write_atomically`: a
temporary name, flushed, fsynced and renamed), so a crash at any moment leaves the old file or
the new one, never half a file. The log is appended. A write that fails (a full disk, a quota)
is one line naming the file, and the file it would have replaced is intact.

The output-directory policy, decided under the directory's lock (`utils.run_lock`):
- a file at one of the run's names that is not this program's (`read_run_file`: a user's own
  config.json, another program's checkpoint.pt) is never overwritten or deleted: the run is
  refused, whatever the flags;
- a file of the run's that cannot be read back (cut short) is refused unless `--overwrite`; a
  damaged task_in_progress.pt alone makes `--resume` start that task again from checkpoint.pt;
- a directory holding a finished run is refused unless `--resume` (which returns its results)
  or `--overwrite`; one holding an unfinished run unless `--resume` (which continues it) or
  `--overwrite` (which deletes the run's own files, nothing else);
- `--resume` refuses a run made with other settings (`RESUME_MAY_CHANGE` aside) or on other
  data (`data_fingerprint`, recorded with the config as `RecordedConfig`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from sparselearning import write_atomically
from utils.cli import RESUME_MAY_CHANGE, Config
from utils.errors import UserError

if TYPE_CHECKING:
    from utils.train import Task

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.txt"
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoint.pt"  # the run after its last finished task
PROGRESS_FILE = "task_in_progress.pt"  # the task being trained (when: utils.train.TaskTraining.progress_save_due)
METRICS_FILE = "metrics.csv"  # a row per task x epoch (utils.epoch_metrics)
TENSORBOARD_DIR = "tensorboard"  # with --tensorboard: its event files (events.out.tfevents.*)
# In the order --overwrite removes them: config.json, the first file a run writes, last.
RUN_FILES = (RESULTS_FILE, REPORT_FILE, METRICS_FILE, PROGRESS_FILE, CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE)
PROJECT_LOGGERS = ("data", "models", "sparselearning", "utils")
FINGERPRINT = "data_fingerprint"  # the key of the data's fingerprint in a recorded config
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- files


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_run_file(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented, strict JSON (no NaN) to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` to `path` atomically."""

    def write(f: BinaryIO) -> None:
        recording = RecordingFile(f)
        try:
            torch.save(state, recording)
        except RuntimeError:
            if recording.error is None:
                raise
            raise recording.error from None

    write_run_file(path, write)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_run_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write_atomically`; a write the system refuses (a full disk, a quota, permissions) raises
    UserError naming the file. The temporary file is then gone and `path` untouched."""
    try:
        write_atomically(path, write)
    except OSError as error:
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        hint = (f"; the previous {path.name}, if any, is intact: free some space, then continue with --resume"
                if error.errno in DISK_FULL else "")
        raise UserError(f"cannot write {path}: {reason}{hint}") from None


class RecordingFile:
    """A binary file that keeps the OSError of a failed write, or the KeyboardInterrupt raised
    in one (a second Ctrl-C: `utils.stopping.StoppedAtOnce`): `torch.save` reports either as a
    RuntimeError (a full disk would read as an internal error, Ctrl-C as a traceback)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        return self.recorded(self.file.write, data)

    def flush(self) -> None:
        self.recorded(self.file.flush)

    def recorded(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except (OSError, KeyboardInterrupt) as error:
            self.error = error
            raise


class RunLogHandler(logging.FileHandler):
    """train.log. A record that cannot be written (a full disk) is dropped, with one warning on
    stderr the first time, instead of logging's traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
        elif not self.failed:
            self.failed = True
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({error}); its records are dropped\n")


STARTED = "run started"
"""The log's first line of every start of a run (new or continued with --resume): `utils.study`
reads a run's sittings from it."""


def attach_log_file(output_dir: Path) -> logging.Handler:
    """Append this process's log records to `<output_dir>/train.log`.

    The file gets the project's DEBUG records too (per-epoch lines); the console only INFO.
    """
    handler = RunLogHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    return handler


# ---------------------------------------------------------------------------- whose files


OWN_KEYS: dict[str, tuple[str, ...]] = {
    CONFIG_FILE: ("dataset", "num_tasks", "seed", "output_dir"),
    RESULTS_FILE: ("config", "acc_matrix", "per_task"),
    CHECKPOINT_FILE: ("config", "tasks_done"),
    PROGRESS_FILE: ("config", "task", "epochs_done"),
}
"""The run's record files and the keys every version of this program wrote into them: a JSON
object (config.json, results.json) or a dict loading with weights_only=True (the checkpoints)
holding them is this program's."""

# How this program's files begin, which a copy cut short still shows: the JSON files start with
# their first key (config.json: the first field of Config); a checkpoint is a zip archive.
OWN_START: dict[str, bytes] = {
    CONFIG_FILE: f'{{\n  "{dataclasses.fields(Config)[0].name}": '.encode(),
    RESULTS_FILE: b'{\n  "complete": ',
    CHECKPOINT_FILE: b"PK\x03\x04",
    PROGRESS_FILE: b"PK\x03\x04",
}


@dataclass(frozen=True)
class Damaged:
    """One of the run's files that cannot be read back (cut short, say), and why."""

    path: Path
    reason: str

    def error(self) -> UserError:
        return UserError(f"{self.path} is damaged ({self.reason}); pass --overwrite to start again")


def read_run_file(path: Path) -> dict[str, Any] | Damaged:
    """The content of one of the run's record files (`OWN_KEYS`), or Damaged when it cannot be
    read but is empty or begins as this program writes it. Anything else there is not this
    program's: UserError, whatever the flags (it is never overwritten or deleted)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(OWN_START[path.name]))
        content = load_checkpoint(path) if path.suffix == ".pt" else json.loads(path.read_bytes())
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except Exception as error:  # whatever the JSON or torch reader raises for a file it cannot parse
        if cut_short(path, head):
            first_line = (str(error).splitlines() or ["cut short"])[0][:120]
            return Damaged(path, f"{type(error).__name__}: {first_line}")
        raise not_ours(path, "it cannot be read as one of its files") from None
    if not (isinstance(content, dict) and all(key in content for key in OWN_KEYS[path.name])
            and (path.name == CONFIG_FILE or isinstance(content["config"], dict))):
        raise not_ours(path, f"it lacks the keys {', '.join(OWN_KEYS[path.name])} this program writes")
    return content


def cut_short(path: Path, head: bytes) -> bool:
    """Whether an unreadable file is one of this program's cut short: its first bytes (none, if
    empty) are those ours begin with (a checkpoint: a zip archive, but not a whole one, which
    would be another program's)."""
    return OWN_START[path.name].startswith(head) and not (path.suffix == ".pt" and zipfile.is_zipfile(path))


def not_ours(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not this program's ({why}); it is never overwritten: move it away "
                     "or use another --output_dir")


def read_run_files(output_dir: Path) -> dict[str, dict[str, Any] | Damaged]:
    """Every record file present in `output_dir` (see `read_run_file`). train.log, report.txt and
    metrics.csv are the run's only next to one of them (config.json is written first and removed last)."""
    files = {name: read_run_file(output_dir / name) for name in OWN_KEYS if (output_dir / name).exists()}
    for name in (LOG_FILE, REPORT_FILE, METRICS_FILE):
        if not files and (output_dir / name).exists():
            raise not_ours(output_dir / name, f"no {CONFIG_FILE} of a run next to it")
    return files


# ---------------------------------------------------------------------------- the policy


@dataclass
class Resumable:
    """What an output directory already holds: a finished run's results, the run after its last
    finished task, and the task in progress (each None when absent)."""

    finished: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None
    in_progress: dict[str, Any] | None = None


def inspect_output_dir(config: Config) -> Resumable:
    """Decide, without writing anything, whether the run may use `--output_dir` (which this process
    holds locked), and load what `--resume` continues from (the policy: the module's docstring)."""
    out = config.output_dir
    files = read_run_files(out)
    if config.overwrite:
        return Resumable()
    for name, content in files.items():
        if isinstance(content, Damaged) and name != PROGRESS_FILE:
            raise content.error()
    if not any(name in files for name in (RESULTS_FILE, CHECKPOINT_FILE, PROGRESS_FILE)):
        return Resumable()
    results = files.get(RESULTS_FILE)
    finished = results is not None and results.get("complete", True)
    if not config.resume:
        state = "a finished run" if finished else "an unfinished run"
        raise UserError(f"{out} holds {state}; pass --resume to "
                        f"{'print its results' if finished else 'continue it'} or --overwrite to start again")
    if finished:
        _check_same_config(config, results)
        return Resumable(finished=results)
    saved, in_progress = files.get(CHECKPOINT_FILE), files.get(PROGRESS_FILE)
    if isinstance(in_progress, Damaged):
        after = f"from {CHECKPOINT_FILE}, after task {saved['tasks_done']}" if saved else "from the first task"
        log.warning("%s is damaged (%s): resuming %s", in_progress.path, in_progress.reason, after)
        in_progress = None
    for state in (saved, in_progress):
        _check_same_config(config, state)
    return Resumable(saved=saved, in_progress=in_progress)


def _check_same_config(config: Config, state: dict[str, Any] | None) -> None:
    now = config.to_dict()
    changed = [k for k, v in (state or {}).get("config", {}).items()
               if k not in (*RESUME_MAY_CHANGE, FINGERPRINT) and now.get(k) != v]
    if changed:
        raise UserError(f"--resume: {config.output_dir} was run with other settings ({', '.join(changed)}); "
                        "use a new --output_dir")


def prepare_output_dir(config: Config) -> None:
    """Begin the run's files in its (locked, inspected) directory: with --overwrite, remove the files
    of the run it held (those only, in `RUN_FILES` order); then write config.json."""
    if config.overwrite:
        try:
            for path in sorted((config.output_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
                path.unlink()
            for name in RUN_FILES:
                (config.output_dir / name).unlink(missing_ok=True)
        except OSError as error:
            raise UserError(f"cannot remove {error.filename}: {error.strerror}") from None
    write_json(config.output_dir / CONFIG_FILE, config.to_dict())


# ---------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class RecordedConfig(Config):
    """A run's Config as the run records it (config.json, the "config" of its checkpoints and
    results): the settings plus the fingerprint of the data it was given (`data_fingerprint`)."""

    data_fingerprint: dict[str, str] | None = None


def with_data_fingerprint(config: Config, fingerprint: dict[str, str]) -> RecordedConfig:
    settings = {field.name: getattr(config, field.name) for field in dataclasses.fields(Config)}
    return RecordedConfig(**settings, data_fingerprint=fingerprint)


def data_fingerprint(tasks: Sequence[Task]) -> dict[str, str]:
    """Per split ("train", "test"), a BLAKE2b digest of the data the run's tasks hold: every task's
    image shape, labels and image bytes, in order. Deterministic; about 0.1 s for the 25,000-image
    CIFAR-100 subset."""
    digests = {split: hashlib.blake2b(digest_size=16) for split in ("train", "test")}
    for task in tasks:
        for split, digest in digests.items():
            images, labels = (tensor.detach().cpu().contiguous() for tensor in getattr(task, split)[:2])
            digest.update(repr(tuple(images.shape)).encode())
            digest.update(labels.to(torch.int64).numpy().tobytes())
            digest.update(images.numpy())
    return {split: digest.hexdigest() for split, digest in digests.items()}


def check_same_data(config: RecordedConfig, resumable: Resumable) -> None:
    """--resume continues a run only on the data it was run on (runs recorded before fingerprints
    were: on any)."""
    for state in (resumable.saved, resumable.in_progress):
        recorded = (state or {}).get("config", {}).get(FINGERPRINT)
        if recorded is not None and recorded != config.data_fingerprint:
            splits = [split for split in recorded if recorded[split] != (config.data_fingerprint or {}).get(split)]
            raise UserError(f"--resume: {config.output_dir} was run on other data (its {' and '.join(splits)} "
                            f"images or labels differ from those in --data_dir {config.data_dir}); "
                            "resume with the data it was run on, or use a new --output_dir")
