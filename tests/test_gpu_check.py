"""`scripts/gpu_check.sh --dry`: the GPU check's plumbing end to end on the CPU, with tiny sizes:
its sections, its real-data subset (built by --prepare; --dry without it makes a stand-in),
its time limits, gpu_check.json and gpu_check.md."""

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.gpu_check import learning_result, section_status, summarize
from benchmarks.workload import write_standin_cifar100
from tests.suite_control import run_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def check(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    return run_process(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The two dry runs the tests below read, at the same time (each is mostly one core's work:
    pytest collecting the suite, imports, a tiny run; one torch thread each, so that the two do not
    fight over the cores): "prepared" (after --prepare, whose result is "prepare") and "fresh" (no
    gpu_check_data/, the learning run given 1 s); each with its folder."""
    prepared_dir, fresh_dir = tmp_path_factory.mktemp("prepared"), tmp_path_factory.mktemp("fresh")
    with ThreadPoolExecutor(max_workers=1) as other:
        fresh = other.submit(check, "--dry", "--out", str(fresh_dir / "out"), "--check_data",
                             str(fresh_dir / "missing"), "--limit-learning", "1", OMP_NUM_THREADS="1")
        write_standin_cifar100(prepared_dir / "cifar", train_per_class=20, test_per_class=10)
        prepare = check("--prepare", "--data_dir", str(prepared_dir / "cifar"), "--check_data",
                        str(prepared_dir / "subset"))
        prepared = check("--dry", "--out", str(prepared_dir / "out"), "--check_data", str(prepared_dir / "subset"),
                         OMP_NUM_THREADS="1")
        return {"prepare": (prepared_dir, prepare), "prepared": (prepared_dir, prepared),
                "fresh": (fresh_dir, fresh.result())}


def test_dry_run_writes_the_json_and_the_table(dry_runs):
    tmp_path, prepared = dry_runs["prepare"]
    subset, out = tmp_path / "subset", tmp_path / "out"
    assert prepared.returncode == 0, prepared.stderr
    with open(subset / "cifar-100-python" / "train", "rb") as f:
        assert sorted(set(pickle.load(f)["fine_labels"])) == list(range(30))

    _, done = dry_runs["prepared"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for section in ("tests", "benchmarks", "learning"):
        assert f"== {section} (limit" in done.stdout  # progress per section
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry"] is True and report["passed"] is True and report["failed_sections"] == []
    assert set(report["sections"]) == {"tests", "benchmarks", "learning"}
    for name, section in report["sections"].items():
        assert section["status"] in ("passed", "no test selected"), name
        assert 0 < section["seconds"] < section["limit_seconds"]
    assert report["sections"]["learning"]["status"] == "passed"
    bench = report["benchmarks"]
    assert bench["target_kind"] == "cpu" and bench["quick"] is True
    assert bench["figures"]["syncs_per_step"] is None  # n/a on a CPU, not 0
    learning = report["learning"]
    assert learning["tasks_done"] == 2 and learning["bwt"] == 0 and learning["chance"] == 10
    assert not learning["judged"]
    assert report["sections"]["learning"]["finished"] == {"tasks": 2, "complete": True}
    assert report["sections"]["benchmarks"]["finished"] == {"families": ["syncs"], "complete": True}
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# GPU check (dry run on a CPU): passed")
    assert "| learning | passed |" in table and "| syncs_per_step | n/a |" in table


def test_dry_run_needs_no_preparation_and_a_timed_out_section_says_how_far_it_got(dry_runs):
    """From a fresh clone (no gpu_check_data/): --dry makes a stand-in itself. The learning run
    given 1 s is cut off; the report says so, and what it finished (nothing: no task)."""
    tmp_path, done = dry_runs["fresh"]
    out = tmp_path / "out"
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "a tiny stand-in" in done.stdout and (out / "standin-check-data" / "cifar-100-python" / "train").is_file()
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed_sections"] == ["learning"]
    learning = report["sections"]["learning"]
    assert learning["status"] == "timed out" and learning["limit_seconds"] == 1 and learning["finished"] is None
    assert report["sections"]["tests"]["limit_seconds"] == report["sections"]["benchmarks"]["limit_seconds"] == 300


def test_limits_are_checked_and_the_real_check_asks_for_its_data_first(tmp_path):
    bad = check("--dry", "--out", str(tmp_path / "out"), "--limit-tests", "soon")
    assert bad.returncode == 2 and bad.stderr == "error: --limit-tests needs a whole number of seconds > 0, not 'soon'\n"
    real = check("--out", str(tmp_path / "out"), "--check_data", str(tmp_path / "missing"))
    assert real.returncode == 2 and real.stderr.count("\n") == 1 and "--prepare first" in real.stderr
    assert not (tmp_path / "out").exists()  # not a second spent on a GPU
    usage = check("--help")
    assert usage.returncode == 0 and "--limit-tests S" in usage.stdout and "--dry needs no preparation" in usage.stdout


def test_statuses_say_what_happened():
    assert section_status("benchmarks", 124, dry=False) == "timed out"
    assert section_status("learning", 137, dry=False) == "timed out"
    assert section_status("tests", 5, dry=True) == "no test selected"
    assert section_status("tests", 5, dry=False).startswith("failed")
    assert section_status("learning", 2, dry=False) == "failed (exit code 2)"
    results = {"config": {"num_classes_per_task": 10, "epochs": 5}, "acc_matrix": [[60.0, None], [60.0, 9.0]],
               "tasks_done": 2, "acc": 34.5, "bwt": 0.0, "complete": True}
    assert learning_result(results, dry=False)["above_chance"] is False
    results["acc_matrix"][1][1] = 40.0
    assert learning_result(results, dry=False)["above_chance"] is True


def test_a_failed_or_timed_out_section_fails_the_check(tmp_path, capsys):
    """The summary of sections as the script records them (name, exit code, seconds, limit)."""
    (tmp_path / "sections.tsv").write_text("tests\t0\t3.2\t120\nbenchmarks\t124\t270.0\t270\n"
                                           "learning\t2\t1.5\t60\n")
    (tmp_path / "tests.log").write_text("tests/test_a.py::test_x[cuda] PASSED   [ 50%]\n"
                                        "tests/test_a.py::test_y[cuda] FAILED   [100%]\n")
    (tmp_path / "benchmarks.json").write_text(json.dumps({"complete": False, "families_done": ["data", "step"]}))
    assert summarize(tmp_path, dry=False) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed_sections"] == ["benchmarks", "learning"] and report["passed"] is False
    assert report["sections"]["benchmarks"]["status"] == "timed out"
    assert report["sections"]["tests"]["finished"] == {"passed": 1, "failed": 1}
    assert report["sections"]["benchmarks"]["finished"] == {"families": ["data", "step"], "complete": False}
    assert report["learning"] is None
    assert "FAILED: benchmarks, learning" in (tmp_path / "gpu_check.md").read_text()
