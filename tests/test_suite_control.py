"""The suite stays under the user's control (`tests/suite_control.py`): real signals to a real
pytest process over tiny test files stop it, leave no subprocess behind, and its -q log says
which file is running. Each test starts one pytest of a few tests: seconds."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.suite_control import run_process, session_members, start_process
from utils.stopping import StopRequest

ROOT = Path(__file__).resolve().parents[1]

# A run in-process, as the tests call one: it takes the stop signals over while it "trains",
# saves, and returns 130 for a KeyboardInterrupt as the CLI's main does (it swallows it).
STOPPED_RUN = '''
import pathlib, time
from utils.stopping import StopRequest

HERE = pathlib.Path(__file__).parent


def run() -> int:
    try:
        with StopRequest().installed() as stop:
            (HERE / "training").write_text("")
            deadline = time.monotonic() + 60
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            (HERE / "saved").write_text(stop.name)
        return 3 if stop.requested else 0
    except KeyboardInterrupt:
        return 130


def test_a_run_that_is_stopped():
    assert run() == 3


def test_a_later_test():
    (HERE / "later_test_ran").write_text("")
'''

# A test whose subprocess makes a process group of its own (as `timeout` does) and waits.
STARTS_A_CHILD = '''
import pathlib, subprocess, time
from tests.suite_control import start_process

HERE = pathlib.Path(__file__).parent


def test_starts_a_child():
    child = start_process(["bash", "-c", "timeout 300 sleep 300 & echo $$ > session; wait"], cwd=HERE)
    deadline = time.monotonic() + 30
    while not (HERE / "session").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(60)
'''


def pytest_command(*files: Path) -> list[str]:
    """pytest -q over `files` with this repository's pytest.ini (its plugin included)."""
    return [sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini"), "-p", "no:cacheprovider", "-q",
            *map(str, files)]


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c_to_the_group", "sigterm_to_pytest"])
def test_one_stop_signal_during_an_in_process_run_ends_the_suite(tmp_path, sig):
    test_file = tmp_path / "test_stopped.py"
    test_file.write_text(STOPPED_RUN)
    suite = start_process(pytest_command(test_file), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wait_for(tmp_path / "training")
    if sig == signal.SIGINT:
        os.killpg(suite.pid, sig)  # what a terminal's Ctrl-C does: to the foreground process group
    else:
        os.kill(suite.pid, sig)  # `kill PID`, a CI job's timeout
    output, _ = suite.communicate(timeout=60)
    assert (tmp_path / "saved").read_text() == sig.name  # the run saved first
    assert suite.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output and f"{sig.name}" in output
    assert not (tmp_path / "later_test_ran").exists()


def test_no_subprocess_outlives_an_interrupted_suite(tmp_path):
    test_file = tmp_path / "test_child.py"
    test_file.write_text(STARTS_A_CHILD)
    suite = start_process(pytest_command(test_file), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wait_for(tmp_path / "session")
    session = int((tmp_path / "session").read_text())
    deadline = time.monotonic() + 30
    while len(session_members(session)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(session_members(session)) == 3  # bash, timeout (a group of its own) and sleep
    os.killpg(suite.pid, signal.SIGINT)
    output, _ = suite.communicate(timeout=60)
    assert suite.returncode == pytest.ExitCode.INTERRUPTED, output
    assert session_members(session) == []


def test_a_quiet_log_names_each_test_file_as_it_starts(tmp_path):
    (tmp_path / "test_first.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    (tmp_path / "test_second.py").write_text("def test_c():\n    pass\n")
    done = run_process(pytest_command(tmp_path / "test_first.py", tmp_path / "test_second.py"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # stdout is a pipe: not a tty
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    first = [line for line in lines if line.endswith("test_first.py: 2 tests")]
    second = [line for line in lines if line.endswith("test_second.py: 1 test")]
    assert len(first) == 1 and first[0].startswith("[0:0") and ", 0/3] " in first[0]
    assert len(second) == 1 and ", 2/3] " in second[0]
    assert lines.index(first[0]) < lines.index(second[0])
    assert "3 passed" in lines[-1]


def test_a_run_passes_its_stop_signal_on_to_a_host_handler_once_it_has_saved():
    """The handler installed before the run (here: a host's, for SIGUSR1) hears of the signal when
    the run's block ends, not before; Python's defaults (the command line's) are never called."""
    heard = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append(signum))
    try:
        with StopRequest().installed() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.signal == signal.SIGUSR1 and heard == []
        assert heard == [signal.SIGUSR1]
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        with StopRequest().installed() as stop:  # the command line's case: SIG_DFL would end the process
            os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and heard == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
