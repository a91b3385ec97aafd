"""One run per output directory at a time: an OS lock on `<output_dir>/.lock`.

The lock is `flock(2)` on the file `.lock` in the output directory. It belongs to the process's
open file, so it dies with the process however that ends (`kill -9`, a node lost): a lock left
by a killed run never blocks the next one. The file itself stays and means nothing unless locked;
this program never deletes it (nor does `--overwrite`): a run that removed it while another held
it would let a third lock a new file of the same name and run alongside the holder. While a run
holds the lock, the file names it (`pid <pid> on <host>`) for the error a second run gets.

Where the file system does not support locks (some cluster mounts) or the directory cannot be
written, the run says so in one warning and goes on unprotected.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from utils.errors import UserError

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking
    fcntl = None

LOCK_FILE = ".lock"
HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what flock/NFS say when another holds it

log = logging.getLogger(__name__)


@contextmanager
def hold(output_dir: Path) -> Iterator[None]:
    """Create `output_dir` if needed and hold its lock until the block ends.

    Raises UserError (one line) when another live process holds it, when `output_dir` is a file
    or cannot be created.
    """
    make_directory(output_dir)
    fd = acquire(output_dir / LOCK_FILE)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays


def make_directory(output_dir: Path) -> None:
    """Create `output_dir` and its parents; a path that is a file or cannot be made: UserError."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--output_dir {output_dir} is a file, not a directory") from None
    except OSError as error:
        raise UserError(f"cannot create output directory {output_dir}: {error.strerror}") from None


def acquire(path: Path) -> int | None:
    """Lock `path` for this process; the open descriptor (None: could not lock, warned)."""
    if fcntl is None:
        return unprotected(path, "no file locks on this system")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        return unprotected(path, error.strerror)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = read_holder(fd)
        os.close(fd)
        if error.errno in HELD_ERRNOS:
            raise UserError(f"{path.parent} is in use by another run ({holder}); wait for it to end "
                            "or use another --output_dir") from None
        return unprotected(path, error.strerror)
    write_holder(fd)
    return fd


def unprotected(path: Path, why: str) -> None:
    """Warn that the run goes on without the lock."""
    log.warning("cannot lock %s (%s): nothing stops a second run from using %s at the same time",
                path, why, path.parent)


def read_holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it ('pid 123 on node7'), or 'unknown process'."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown process"


def write_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # only the message a second run gets depends on it
