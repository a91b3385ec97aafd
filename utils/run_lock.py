"""One run per output directory at a time, on one machine or across the nodes of a shared file system.

Two locks, taken in this order from before the run's first file to its end:

- `<output_dir>/.lock.owner` (`OWNER_FILE`), the lock that holds across nodes: a file created
  exclusively (`O_EXCL`) naming its holder (host, pid, start time) and a heartbeat the run
  refreshes every 30 s (`sparselearning.file_lock`, which describes the file). The run removes
  it when it ends. A run killed with SIGKILL leaves it: the next run on the same host takes it over
  at once (the pid is gone); one on another host once the heartbeat is older than
  `--lock_stale_minutes` (10). A live heartbeat of another host is never broken.
- `flock(2)` on `<output_dir>/.lock` (`LOCK_FILE`), where it works: it dies with its process,
  however that ends, so it refuses a second run at once without trusting any heartbeat (a
  suspended job, say). The file stays; this program never deletes it (a run that removed it while
  another held it would let a third lock a new file of the same name). It names its holder too
  (`pid <pid> on <host>`). Where flock fails (ENOLCK and the like on some cluster mounts) or
  grants a second lock on the same file (a mount that only pretends), the run warns and relies on
  the owner file alone. Locks an NFS client keeps to its own node cannot be detected: the owner
  file is what keeps runs on two nodes apart.

When flock is held but the owner file names another host whose heartbeat is stale, the flock is a
lock of a dead node that the file server has not expired yet: the run takes the directory over.

A refused run is one line (UserError) naming the holder and how to break a lock left by a dead run.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparselearning.file_lock import DEFAULT_STALE_MINUTES, HEARTBEAT_SECONDS, LockFile, format_minutes
from utils.errors import UserError

try:
    import fcntl
except ImportError:  # not a POSIX system: no flock, the owner file alone
    fcntl = None

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what flock/NFS say when another holds it

log = logging.getLogger(__name__)


@contextmanager
def hold(output_dir: Path, stale_minutes: float = DEFAULT_STALE_MINUTES,
         heartbeat_seconds: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Create `output_dir` if needed and hold its locks until the block ends.

    Raises UserError (one line) when another live run holds it, when `output_dir` is a file or
    cannot be created. An owner file whose heartbeat is older than `stale_minutes` is taken over.
    """
    make_directory(output_dir)
    owner = LockFile(output_dir / OWNER_FILE, stale_after_s=stale_minutes * 60, heartbeat_s=heartbeat_seconds)
    fd = lock_with_flock(output_dir / LOCK_FILE, owner, stale_minutes)
    try:
        take_owner_file(owner, stale_minutes)
        try:
            yield
        finally:
            owner.release()
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock; the file stays


def output_dir_exists(output_dir: Path) -> bool:
    """Whether `output_dir` exists; a path the system cannot even look up (a name too long): UserError."""
    try:
        return output_dir.exists()
    except OSError as error:
        raise UserError(f"--output_dir {output_dir} cannot be used: {why(error)}") from None


def make_directory(output_dir: Path) -> None:
    """Create `output_dir` and its parents; a path that is a file or cannot be made: UserError."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--output_dir {output_dir} is a file, not a directory") from None
    except OSError as error:
        raise UserError(f"cannot create output directory {output_dir}: {why(error)}") from None


def why(error: OSError) -> str:
    """An OSError's reason for a reader, with what to do about a name too long."""
    if error.errno == errno.ENAMETOOLONG:
        name_max, path_max = name_limits(Path(error.filename or "/"))
        return (f"{error.strerror} (this file system allows {name_max} bytes per folder name and {path_max} "
                "per path); choose a shorter --output_dir")
    return error.strerror or str(error)


def name_limits(path: Path) -> tuple[int, int]:
    """The longest name and path the file system of `path` (or of its nearest existing parent) allows."""
    for folder in (path, *path.parents):
        try:
            return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
        except (OSError, ValueError):
            continue
    return 255, 4096


# ---- the owner file ------------------------------------------------------------------------------

def take_owner_file(owner: LockFile, stale_minutes: float) -> None:
    """Create the owner file (or take a stale one over); UserError when a live run holds it."""
    try:
        holder = owner.try_acquire()
    except OSError as error:
        log.warning("cannot create the lock file %s (%s): nothing stops a second run from using %s at the "
                    "same time", owner.path, why(error), owner.path.parent)
        return
    if holder is not None:
        raise UserError(refusal(owner, holder.describe(), stale_minutes))


def refusal(owner: LockFile, holder: str, stale_minutes: float, *, owner_file: bool = True) -> str:
    """The one line a refused run prints: who holds the directory, and how to break a dead run's
    lock (when the holder has an owner file; a flock alone goes with its process)."""
    line = f"{owner.path.parent} is in use by another run ({holder}); wait for it to end or use another --output_dir"
    if owner_file:
        line += (f"; if that run is dead, delete {owner.path} or wait until its heartbeat is "
                 f"{format_minutes(stale_minutes)} old")
    return line


# ---- flock -----------------------------------------------------------------------------------------

def lock_with_flock(path: Path, owner: LockFile, stale_minutes: float) -> int | None:
    """flock `path` for this process: the open descriptor, or None where flock does not work here
    (warned) or holds a dead node's lock (warned). UserError when a live run holds it."""
    if fcntl is None:
        return flock_unavailable(path, owner, "no file locks on this system", stale_minutes)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        return flock_unavailable(path, owner, why(error), stale_minutes)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        named = read_flock_holder(fd)
        os.close(fd)
        if error.errno in HELD_ERRNOS:
            return held_by_flock(owner, named, stale_minutes)
        return flock_unavailable(path, owner, error.strerror, stale_minutes)
    if not flock_excludes(path):
        os.close(fd)
        return flock_unavailable(path, owner, "it grants a second lock on a locked file", stale_minutes)
    write_flock_holder(fd)
    return fd


def flock_excludes(path: Path) -> bool:
    """Whether a second flock on `path`, through another open file, is refused while this process
    holds one (it is where flock works; a mount that pretends grants it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return True  # cannot tell: trust it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the second lock if it was granted
    return False


def held_by_flock(owner: LockFile, named: str, stale_minutes: float) -> None:
    """Another process holds the flock: UserError, unless the owner file names another host whose
    heartbeat is stale (a dead node's lock the file server keeps): then None, warned."""
    holder = owner.read()
    if holder is not None and holder.pid != 0 and holder.host != owner.host:
        reason = owner.stale_reason(holder)
        if reason is not None:
            log.warning("%s is locked (flock) but its lock file %s names %s: %s; a lock of a dead node that the "
                        "file server keeps: taking the directory over", owner.path.parent.joinpath(LOCK_FILE),
                        owner.path, holder.describe(), reason)
            return None
    if holder is None:
        raise UserError(refusal(owner, f"{named}, holding {owner.path.parent / LOCK_FILE}", stale_minutes,
                                owner_file=False))
    raise UserError(refusal(owner, holder.describe(), stale_minutes))


def flock_unavailable(path: Path, owner: LockFile, reason: str, stale_minutes: float) -> None:
    """Warn that flock does not protect this run: the owner file alone does."""
    log.warning("cannot lock %s with flock (%s): only the lock file %s keeps a second run out, and nothing "
                "stops a second run from taking it over if this run stops refreshing its heartbeat for %s "
                "(a suspended job, say)", path, reason, owner.path, format_minutes(stale_minutes))


def read_flock_holder(fd: int) -> str:
    """Who holds the flock, as its holder wrote it ('pid 123 on node7'), or 'unknown process'."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown process"


def write_flock_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # only the message a second run gets when the owner file is missing depends on it
