"""A lock that holds across the nodes of a shared file system: a file created exclusively, with a heartbeat.

The lock is the existence of one file, created with `O_CREAT | O_EXCL` (atomic on local file
systems and on NFS v3 and later). Its content is one line of JSON naming the holder:

    {"host": "node7", "pid": 4242, "started": 1715000000.123, "heartbeat": 1715000030.456, "token": "9f..."}

`started` and `heartbeat` are the holder's wall clock (seconds since the epoch); a daemon thread
rewrites the line in place (`pwrite` on the holder's own descriptor, then fsync, so other nodes
see it) every `heartbeat_s` seconds while the lock is held. A reader judges the heartbeat written in
the file against its own clock, never the file's mtime: the mtime is set by the file server's
clock, which may be skewed, while cluster nodes keep theirs in step (NTP) to well under the stale
age. `token` tells one holding of the lock from the next.

A lock is stale, and the next process to try takes it over with a warning naming the old holder:
- when its heartbeat is older than `stale_after_s`, or
- at once when its holder ran on this host and its pid no longer exists (a killed run).
A live heartbeat of another host is never broken. Taking over is done under a second lock of the
same kind, `<name>.break`, so that of several processes finding the same stale lock at once only
one removes it and creates its own; the others then see the new holder. (A `.break` left by a
process that died while breaking is stale in its turn, by the same rules.)

Releasing removes the file only if it still holds this holding's token. A process killed with
SIGKILL leaves the file behind: the next process on the same host sees that the pid is gone; one on
another host waits until the heartbeat is stale.

Generic file machinery, like `atomic_file`: the run directory's lock (`utils.run_lock`) and the
data readers' download and cache locks (`data.cifar100`, `data.miniimagenet`) use it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STALE_MINUTES = 10.0
HEARTBEAT_SECONDS = 30.0
POLL_SECONDS = 2.0
"""How often a process waiting for a lock (`LockFile.wait_to_acquire`) looks again."""
TAKEOVER_ATTEMPTS = 20
"""How many times `try_acquire` looks again while another process is taking a stale lock over."""
TAKEOVER_PAUSE_SECONDS = 0.05
READ_ATTEMPTS = 3
"""A lock file read as incomplete (being created or rewritten this instant) is read again this often."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says. `pid` 0 and host '?' when the file is unreadable
    (then `heartbeat` and `started` are its mtime)."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    def describe(self, now: float | None = None) -> str:
        """'pid 4242 on node7 since 2024-05-06 12:00:03, last heartbeat 12 s ago'."""
        now = time.time() if now is None else now
        since = datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")
        who = "an unknown process (unreadable lock file)" if self.pid == 0 else f"pid {self.pid} on {self.host}"
        return f"{who} since {since}, last heartbeat {format_age(now - self.heartbeat)} ago"


def format_age(seconds: float) -> str:
    """A duration for a reader: '12 s', '3.5 min', '2.0 h' (negative, from a clock ahead: 0 s)."""
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_minutes(minutes: float) -> str:
    """'10 minutes', '0.5 minutes'."""
    return f"{minutes:g} minute{'s' if minutes != 1 else ''}"


def this_host() -> str:
    return socket.gethostname()


def pid_is_gone(pid: int) -> bool:
    """Whether no live process `pid` exists on this host: none, or a zombie (killed, not yet
    reaped by its parent; in a container whose first process does not reap, it may stay one).
    Another user's live process exists: not gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, it is someone else's
        return False
    return is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """Whether /proc says `pid` has exited (state Z or X); False where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


class LockFile:
    """An exclusive lock on `path` (the file's existence), with a heartbeat while held.

    `try_acquire` takes it (over a stale holder, with a warning) or says who holds it;
    `wait_to_acquire` waits for it; `release` gives it back. `heartbeat_s=None`: no heartbeat
    thread (a lock held for an instant, such as the `.break` guard).
    """

    def __init__(self, path: str | os.PathLike, *, stale_after_s: float = DEFAULT_STALE_MINUTES * 60,
                 heartbeat_s: float | None = HEARTBEAT_SECONDS) -> None:
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.host = this_host()
        self._fd: int | None = None
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    # ---- taking and giving back ------------------------------------------------------------

    def try_acquire(self) -> Holder | None:
        """Take the lock: None when this process holds it now, else the live holder.

        A stale holder is taken over (with a warning naming it). OSError when the lock file cannot
        be created for another reason than its existence (a read-only folder, say).
        """
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this LockFile")
        holder = None
        for _ in range(TAKEOVER_ATTEMPTS):
            if self._create():
                return None
            holder = self.read()
            if holder is None:
                continue  # released meanwhile: try again
            reason = self.stale_reason(holder)
            if reason is None:
                return holder
            if self._take_over(holder, reason):
                return None
            time.sleep(TAKEOVER_PAUSE_SECONDS)  # another process is taking it over: see who won
        return holder if holder is not None else self.read()

    def wait_to_acquire(self, doing: str, poll_s: float | None = None) -> bool:
        """Take the lock, waiting while a live holder has it (logging one line, 'waiting for
        <holder> to finish <doing>'); whether it waited. OSError as `try_acquire`."""
        waited = False
        while (holder := self.try_acquire()) is not None:
            if not waited:
                log.info("waiting for %s to finish %s (lock file %s)", holder.describe(), doing, self.path)
                waited = True
            time.sleep(POLL_SECONDS if poll_s is None else poll_s)
        return waited

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this holding's."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
        try:
            current = self.read()
            if current is not None and current.token == self._holder.token:
                self.path.unlink(missing_ok=True)
            elif current is not None:
                log.warning("not removing %s: it was taken over by %s", self.path, current.describe())
        finally:
            os.close(self._fd)
            self._fd, self._holder = None, None

    # ---- the file --------------------------------------------------------------------------

    def read(self) -> Holder | None:
        """The holder the lock file names, None when there is no lock file."""
        for attempt in range(READ_ATTEMPTS):
            try:
                text = self.path.read_bytes()
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            holder = parse_holder(text)
            if holder is not None:
                return holder
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(TAKEOVER_PAUSE_SECONDS)  # being created or rewritten this instant
        return Holder(host="?", pid=0, started=mtime, heartbeat=mtime, token="")

    def stale_reason(self, holder: Holder, now: float | None = None) -> str | None:
        """Why `holder`'s lock may be taken over, or None when it is live."""
        now = time.time() if now is None else now
        if holder.host == self.host and pid_is_gone(holder.pid):
            return f"its process (pid {holder.pid}) no longer exists on this host"
        if now - holder.heartbeat > self.stale_after_s:
            return (f"its last heartbeat is {format_age(now - holder.heartbeat)} old, more than "
                    f"{format_minutes(self.stale_after_s / 60)}")
        return None

    def _create(self) -> bool:
        """Create the lock file exclusively and start the heartbeat; False when it exists."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        now = time.time()
        self._holder = Holder(self.host, os.getpid(), now, now, secrets.token_hex(8))
        self._fd = fd
        try:
            self._write(now)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            self._fd, self._holder = None, None
            raise
        if self.heartbeat_s is not None:
            self._stop.clear()
            self._beating = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
            self._beating.start()
        return True

    def _write(self, heartbeat: float) -> None:
        """Write the holder's line with `heartbeat` in place, durable (visible to other nodes)."""
        holder = self._holder
        line = json.dumps({"host": holder.host, "pid": holder.pid, "started": round(holder.started, 3),
                           "heartbeat": round(heartbeat, 3), "token": holder.token}) + "\n"
        data = line.encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def _beat(self) -> None:
        """The heartbeat thread: refresh the heartbeat until released; warn once if the lock was lost."""
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write(time.time())
            except OSError as error:
                if not warned:
                    log.warning("cannot refresh the heartbeat of %s (%s): another process may take the lock "
                                "over once it is stale", self.path, error.strerror)
                    warned = True
                continue
            if not warned and not self._still_ours():
                log.warning("the lock %s was taken over by another process: this one no longer holds it", self.path)
                warned = True

    def _still_ours(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except OSError:
            return False

    def _take_over(self, stale: Holder, reason: str) -> bool:
        """Remove `stale`'s lock file and create this one's, under the `.break` guard so that only one
        of several processes doing the same at once wins; whether this one holds the lock now."""
        guard = LockFile(self.path.with_name(self.path.name + ".break"), stale_after_s=self.stale_after_s,
                         heartbeat_s=None)
        if guard.try_acquire() is not None:
            return False
        try:
            if self.read() != stale:  # taken over or released meanwhile
                return False
            log.warning("taking over the lock %s from %s: %s", self.path, stale.describe(), reason)
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            guard.release()


def parse_holder(text: bytes) -> Holder | None:
    """The holder a lock file's content names, None when it is incomplete or not a lock file's."""
    try:
        fields = json.loads(text)
        return Holder(host=str(fields["host"]), pid=int(fields["pid"]), started=float(fields["started"]),
                      heartbeat=float(fields["heartbeat"]), token=str(fields["token"]))
    except (ValueError, KeyError, TypeError):
        return None


@contextmanager
def wait_and_hold(path: str | os.PathLike, doing: str, **lock_args: float | None) -> Iterator[bool]:
    """Hold the lock file `path` for the block, waiting first while another live process holds it;
    yields whether it waited (the other process may have done the work meanwhile)."""
    lock = LockFile(path, **lock_args)
    waited = lock.wait_to_acquire(doing)
    try:
        yield waited
    finally:
        lock.release()

