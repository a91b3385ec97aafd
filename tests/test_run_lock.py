"""The run directory's lock on a shared file system (utils/run_lock.py, sparselearning/file_lock.py):
the owner file created exclusively with a heartbeat, flock beside it where it works, stale locks
taken over, foreign live ones never, and a refusal that says who holds the directory and how to
break a dead run's lock.

Holders in other processes are small Python drivers (no training); "another host" is a lock file
written by hand with another host name.
"""

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sparselearning import file_lock
from sparselearning.file_lock import LockFile
from tests.suite_control import start_process
from utils import run_lock
from utils.entry import main
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
FOREIGN_HOST = "node-elsewhere"

# Holds `hold(<dir>)` until killed.
HOLDER = """
import sys, time
from pathlib import Path
from utils import run_lock
with run_lock.hold(Path(sys.argv[1])):
    time.sleep(600)
"""

# Holds a plain flock on <file> until killed (a lock the file server keeps for a dead node).
FLOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def owner_of(out: Path) -> dict | None:
    try:
        return json.loads((out / run_lock.OWNER_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_holder(out: Path) -> subprocess.Popen:
    """A process holding `out`'s lock, once its owner file names it."""
    process = start_process([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT)
    wait_until(lambda: process.poll() is not None or (owner_of(out) or {}).get("pid") == process.pid,
               "the holder to take the lock")
    assert process.poll() is None, "the holder ended"
    return process


def write_owner(out: Path, host: str, pid: int, heartbeat_age_s: float) -> dict:
    """A lock file as another holder would have written it."""
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    fields = {"host": host, "pid": pid, "started": now - 3600, "heartbeat": now - heartbeat_age_s, "token": "theirs"}
    (out / run_lock.OWNER_FILE).write_text(json.dumps(fields) + "\n")
    return fields


def refusal_of(out: Path, **hold_args) -> str:
    with pytest.raises(UserError) as refused:
        with run_lock.hold(out, **hold_args):
            pass
    message = str(refused.value)
    assert "\n" not in message
    return message


def takeover_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "taking over" in r.getMessage()]


# ----------------------------------------------------------------------------- a live holder


def test_a_second_run_is_refused_in_one_line_naming_the_holder_and_the_way_out(tmp_path, capsys):
    out = tmp_path / "run"
    holder = start_holder(out)
    message = refusal_of(out)
    assert message.startswith(f"{out} is in use by another run (pid {holder.pid} on {HOST} since ")
    assert "last heartbeat" in message and "wait for it to end or use another --output_dir" in message
    assert f"if that run is dead, delete {out / run_lock.OWNER_FILE} or wait until its heartbeat is 10 minutes old" \
        in message

    # Through the entry point: exit code 2, the same one line (the directory exists: no data is read first).
    argv = ["--output_dir", str(out), "--data_dir", str(tmp_path / "no-data"), "--no-download", "--device", "cpu"]
    assert main("cifar100", argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {out} is in use by another run (pid {holder.pid} ")
    assert (owner_of(out) or {}).get("pid") == holder.pid  # the holder's file untouched


def test_a_holder_killed_with_sigkill_is_taken_over_at_once_on_the_same_host(tmp_path, caplog):
    out = tmp_path / "run"
    holder = start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert owner_of(out)["pid"] == holder.pid  # a killed run leaves its lock file

    with run_lock.hold(out):
        assert owner_of(out)["pid"] == os.getpid() and owner_of(out)["host"] == HOST
    warnings = takeover_warnings(caplog)
    assert len(warnings) == 1 and f"from pid {holder.pid} on {HOST}" in warnings[0]
    assert f"its process (pid {holder.pid}) no longer exists" in warnings[0]
    assert not (out / run_lock.OWNER_FILE).exists()  # released
    assert (out / run_lock.LOCK_FILE).exists()  # the flock file stays


# ----------------------------------------------------------------------------- another host


def test_a_live_heartbeat_of_another_host_is_never_broken(tmp_path, capsys):
    out = tmp_path / "run"
    theirs = write_owner(out, FOREIGN_HOST, 4242, heartbeat_age_s=5)
    message = refusal_of(out)
    assert f"(pid 4242 on {FOREIGN_HOST} since " in message and re.search(r"last heartbeat \d+ s ago\)", message)
    assert f"delete {out / run_lock.OWNER_FILE} or wait until its heartbeat is 10 minutes old" in message
    assert owner_of(out) == theirs

    argv = ["--output_dir", str(out), "--data_dir", str(tmp_path / "no-data"), "--no-download", "--device", "cpu"]
    assert main("cifar100", argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"in use by another run (pid 4242 on {FOREIGN_HOST}" in err
    assert owner_of(out) == theirs


def test_a_stale_heartbeat_of_another_host_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    write_owner(out, FOREIGN_HOST, 4242, heartbeat_age_s=11 * 60)
    with run_lock.hold(out):
        assert owner_of(out)["pid"] == os.getpid()
    warnings = takeover_warnings(caplog)
    assert len(warnings) == 1 and f"from pid 4242 on {FOREIGN_HOST}" in warnings[0]
    assert "last heartbeat 11.0 min ago" in warnings[0] and "more than 10 minutes" in warnings[0]
    assert not (out / run_lock.OWNER_FILE).exists()


def test_lock_stale_minutes_reaches_the_lock(tmp_path, capsys, caplog):
    """--lock_stale_minutes 0.05 (3 s): a foreign heartbeat 5 s old is stale for this run."""
    out = tmp_path / "run"
    write_owner(out, FOREIGN_HOST, 4242, heartbeat_age_s=5)
    argv = ["--output_dir", str(out), "--data_dir", str(tmp_path / "no-data"), "--no-download", "--device", "cpu",
            "--lock_stale_minutes", "0.05"]
    assert main("cifar100", argv) == 2  # taken over, then refused for the missing data
    err = capsys.readouterr().err
    assert "in use by another run" not in err and "CIFAR-100 not found" in err
    warnings = takeover_warnings(caplog)
    assert len(warnings) == 1
    assert f"taking over the lock {out / run_lock.OWNER_FILE} from pid 4242 on {FOREIGN_HOST}" in warnings[0]
    assert not (out / run_lock.OWNER_FILE).exists()


def test_a_flock_the_file_server_keeps_for_a_dead_node_does_not_block_forever(tmp_path, caplog):
    """flock held (a lock the server has not expired) but the owner file names another host whose
    heartbeat is stale: the run takes over; with a live foreign heartbeat it is refused."""
    out = tmp_path / "run"
    out.mkdir()
    locker = start_process([sys.executable, "-c", FLOCK_HOLDER, str(out / run_lock.LOCK_FILE)], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    message = refusal_of(out)  # a flock and no owner file (a run of an earlier version, say): nothing to break
    assert f"(unknown process, holding {out / run_lock.LOCK_FILE})" in message and "delete" not in message

    write_owner(out, FOREIGN_HOST, 4242, heartbeat_age_s=5)
    assert f"(pid 4242 on {FOREIGN_HOST} since " in refusal_of(out)

    write_owner(out, FOREIGN_HOST, 4242, heartbeat_age_s=11 * 60)
    with run_lock.hold(out):
        assert owner_of(out)["pid"] == os.getpid()
    said = caplog.text
    assert "a lock of a dead node that the file server keeps" in said and f"pid 4242 on {FOREIGN_HOST}" in said


# ----------------------------------------------------------------------------- flock that does not work


def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def pretended_locks(fd, operation):
    return None  # "succeeds" every time, as an NFS mount without working locks may


@pytest.mark.parametrize("flock", [no_locks, pretended_locks], ids=["flock-fails", "flock-pretends"])
def test_where_flock_does_not_work_the_lock_file_still_refuses_a_second_holder(tmp_path, monkeypatch, caplog, flock):
    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    out = tmp_path / "run"
    with run_lock.hold(out):
        assert "cannot lock" in caplog.text and "only the lock file" in caplog.text
        message = refusal_of(out)
        assert f"(pid {os.getpid()} on {HOST} since " in message
    assert not (out / run_lock.OWNER_FILE).exists()
    with run_lock.hold(out):  # released: the next run goes ahead
        pass


# ----------------------------------------------------------------------------- the heartbeat and release


def test_the_heartbeat_is_refreshed_while_the_lock_is_held(tmp_path):
    out = tmp_path / "run"
    with run_lock.hold(out, heartbeat_seconds=0.05):
        first = owner_of(out)
        assert first["host"] == HOST and first["pid"] == os.getpid()
        assert abs(first["heartbeat"] - time.time()) < 5 and first["started"] == first["heartbeat"]
        wait_until(lambda: (owner_of(out) or first)["heartbeat"] > first["heartbeat"], "a new heartbeat", timeout=10)
        later = owner_of(out)
        assert {k: later[k] for k in ("host", "pid", "started", "token")} == \
            {k: first[k] for k in ("host", "pid", "started", "token")}


def test_release_removes_only_a_lock_file_that_is_still_ours(tmp_path, caplog):
    out = tmp_path / "run"
    with run_lock.hold(out):
        theirs = write_owner(out, FOREIGN_HOST, 4242, heartbeat_age_s=0)  # taken over meanwhile
    assert owner_of(out) == theirs
    assert "not removing" in caplog.text and f"pid 4242 on {FOREIGN_HOST}" in caplog.text


# ----------------------------------------------------------------------------- taking over, at once


def test_of_two_processes_taking_over_a_stale_lock_at_once_only_one_wins(tmp_path, monkeypatch, caplog):
    """Both judge the same stale lock at the same moment (a barrier right after judging); the
    `.break` guard lets one remove it and create its own, the other then sees the winner."""
    path = tmp_path / "x.lock"
    write_stale = {"host": FOREIGN_HOST, "pid": 4242, "started": 0.0, "heartbeat": 0.0, "token": "stale"}
    path.write_text(json.dumps(write_stale))
    barrier, judged = threading.Barrier(2), set()
    real = LockFile.stale_reason

    def judge_together(self, holder, now=None):
        reason = real(self, holder, now)
        if holder.token == "stale" and threading.get_ident() not in judged:
            judged.add(threading.get_ident())
            barrier.wait(timeout=10)
        return reason

    monkeypatch.setattr(LockFile, "stale_reason", judge_together)
    locks = [LockFile(path, heartbeat_s=None) for _ in range(2)]
    results: list = [None, None]

    def take(i: int) -> None:
        results[i] = locks[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [i for i in range(2) if results[i] is None]
    assert len(winners) == 1, results
    loser = 1 - winners[0]
    assert results[loser].token == json.loads(path.read_text())["token"] != "stale"  # it names the winner
    assert len(takeover_warnings(caplog)) == 1
    locks[winners[0]].release()
    assert sorted(os.listdir(tmp_path)) == []  # no lock, no .break guard left


def test_a_takeover_left_half_done_by_a_dead_process_is_finished(tmp_path, caplog):
    """A `.break` guard whose holder died is stale too: it does not block taking over for ever."""
    path = tmp_path / "x.lock"
    dead = start_process([sys.executable, "-c", "pass"])
    dead.wait()
    for name, token in ((path.name, "stale"), (path.name + ".break", "breaker")):
        (tmp_path / name).write_text(json.dumps({"host": HOST, "pid": dead.pid, "started": time.time(),
                                                 "heartbeat": time.time(), "token": token}))
    lock = LockFile(path, heartbeat_s=None)
    assert lock.try_acquire() is None
    lock.release()
    assert sorted(os.listdir(tmp_path)) == []
    assert len(takeover_warnings(caplog)) == 2  # the guard, then the lock


# ----------------------------------------------------------------------------- the directory itself


def test_an_output_dir_name_longer_than_the_file_system_allows_is_one_line(tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    argv = ["--output_dir", str(out), "--data_dir", str(tmp_path / "no-data"), "--no-download", "--device", "cpu"]
    assert main("cifar100", argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "File name too long" in err and "choose a shorter --output_dir" in err
    with pytest.raises(UserError, match="cannot create output directory .*File name too long"):
        run_lock.make_directory(out / "run")


def test_file_lock_ages_read_well():
    assert [file_lock.format_age(s) for s in (-3, 12.4, 150, 3 * 3600)] == ["0 s", "12 s", "2.5 min", "3.0 h"]


def test_a_killed_holder_not_yet_reaped_counts_as_gone():
    """A run killed with -9 whose parent has not reaped it (a zombie; in a container whose first
    process does not reap, it may stay one) holds nothing: its lock is taken over at once."""
    import subprocess
    import time as clock

    from sparselearning.file_lock import pid_is_gone

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not pid_is_gone(child.pid)
        child.kill()
        deadline = clock.monotonic() + 10
        while not pid_is_gone(child.pid) and clock.monotonic() < deadline:
            clock.sleep(0.01)
        assert pid_is_gone(child.pid)
    finally:
        child.kill()
        child.wait()
