"""A pytest plugin (pytest.ini: `-p tests.suite_control`) that keeps the suite under the user's
control, and the one way tests start subprocesses.

- Stop signals: SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt wherever the suite is, so
  pytest stops as on any Ctrl-C (its interrupted summary, exit code 2, no later test runs). A
  run a test calls in-process takes these signals over while it trains (`utils.stopping`), saves,
  then passes the signal on here; code that swallows KeyboardInterrupt (the CLI's `main` turns it
  into exit code 130) cannot keep the suite going either: a stop signal received during a test
  raises KeyboardInterrupt again once that test is over. A test that signals its own process on
  purpose says so with `send_to_this_process`.
- Subprocesses: `start_process` / `run_process` start each command in its own session, and every
  process of that session is killed when the command ends, when the test ends or when the suite is
  interrupted (a session, not only a process group: `timeout` and shells' jobs make groups of
  their own inside it).
- Progress: under `-q` (the README's and CI's command) one line per test file as it starts:
  the file, its number of tests and the suite's elapsed time, so a log shows what is running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ---- subprocesses ------------------------------------------------------------------------------

_started: list[subprocess.Popen] = []


def session_members(session_id: int) -> list[int]:
    """The pids of the live processes in session `session_id` (Linux: read from /proc; elsewhere
    only the session's leader, whose process group is then killed)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return [session_id]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command) ": state, ppid, pgrp, session
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def signal_session(session_id: int, signum: int) -> int:
    """Send `signum` to every process of the session; how many there were."""
    members = session_members(session_id)
    for pid in members:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
    return len(members)


def kill_session(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End every process of the session `process` leads (started by `start_process`): SIGTERM
    first, so that a pytest in it can end its own subprocesses, SIGKILL to what is left after
    `grace` seconds; then reap `process`."""
    if signal_session(process.pid, signal.SIGTERM):
        deadline = time.monotonic() + grace
        while session_members(process.pid) and time.monotonic() < deadline:
            process.poll()  # reap the leader, so it is no zombie member
            time.sleep(0.02)
        for _ in range(3):  # a process may fork while its siblings are being killed
            if not signal_session(process.pid, signal.SIGKILL):
                break
    process.wait()


def start_process(command: Sequence[str], **popen_args: Any) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen_args)` in a session of its own, whose processes are all
    killed when the test that started it ends or the suite is interrupted."""
    process = subprocess.Popen(command, start_new_session=True, **popen_args)
    _started.append(process)
    return process


def run_process(command: Sequence[str], *, timeout: float | None = None, capture_output: bool = False,
                input: str | bytes | None = None, **popen_args: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` in a session of its own: when the command ends, times out (TimeoutExpired,
    as subprocess.run) or the test is interrupted, every process it left in its session is killed."""
    if capture_output:
        popen_args.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        popen_args["stdin"] = subprocess.PIPE
    process = start_process(command, **popen_args)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    finally:
        kill_session(process)
        _started.remove(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_started_processes() -> None:
    while _started:
        kill_session(_started.pop())


# ---- stop signals ------------------------------------------------------------------------------

class StopSignals:
    """The suite's SIGINT and SIGTERM handler: raises KeyboardInterrupt, and remembers the signal
    so that a test that swallowed it still ends the suite."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.expected: list[int] = []  # signals a test sends its own process on purpose
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum in self.expected:
            self.expected.remove(signum)
            return
        self.received.append(signum)
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}: the test suite stops")

    def raise_if_received_since(self, count: int, where: str) -> None:
        """KeyboardInterrupt if a stop signal came after the first `count` (that is, was swallowed)."""
        if len(self.received) > count:
            name = signal.Signals(self.received[-1]).name
            raise KeyboardInterrupt(f"{name} during {where}: the test suite stops")


STOPS = StopSignals()


def send_to_this_process(signum: int) -> None:
    """Send `signum` to this process on purpose (a test of a run's stop handling): the suite does
    not stop for it."""
    STOPS.expected.append(signum)
    os.kill(os.getpid(), signum)


# ---- progress ----------------------------------------------------------------------------------

class FileProgress:
    """One line per test file as it starts, under -q: `[m:ss, done/total] tests/test_x.py: N tests`
    (the suite's elapsed time, the tests started before this file and the suite's total)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config, self.start = config, time.monotonic()
        self.per_file: dict[str, int] = {}
        self.current: str | None = None
        self.started = 0

    def count(self, items: list[pytest.Item]) -> None:
        self.per_file = {}
        for item in items:
            path = item.location[0]
            self.per_file[path] = self.per_file.get(path, 0) + 1

    def starting(self, path: str) -> None:
        """A test of the file at `path` (relative to the rootdir, as in an item's location) starts."""
        self.started += 1
        if path == self.current:
            return
        self.current = path
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        elapsed = int(time.monotonic() - self.start)
        n, total = self.per_file.get(path, 0), sum(self.per_file.values())
        if reporter._tw.width_of_current_line:  # after the previous file's dots
            reporter.write("\n")
        reporter.write_line(f"[{elapsed // 60}:{elapsed % 60:02d}, {self.started - 1}/{total}] {path}: "
                            f"{n} test{'s' if n != 1 else ''}")


# ---- hooks -------------------------------------------------------------------------------------

_progress: FileProgress | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _progress
    STOPS.install()
    _progress = FileProgress(config) if config.get_verbosity() < 0 else None


def pytest_unconfigure(config: pytest.Config) -> None:
    kill_started_processes()
    STOPS.uninstall()


def pytest_collection_finish(session: pytest.Session) -> None:
    if _progress is not None:
        _progress.count(session.items)


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    if _progress is not None:
        _progress.starting(location[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Around each test (setup, call, teardown): its subprocesses killed at its end, and the suite
    stopped if a stop signal arrived during it, even if the test swallowed the KeyboardInterrupt."""
    received = len(STOPS.received)
    try:
        result = yield
    finally:
        kill_started_processes()
        STOPS.expected.clear()
    STOPS.raise_if_received_since(received, item.nodeid)
    return result
