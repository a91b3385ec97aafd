"""`scripts/gpu_check.sh --dry`: the GPU check's plumbing end to end on the CPU, with tiny sizes:
its sections, its real-data subset (built by --prepare; --dry without it makes a stand-in),
its time limits, gpu_check.json and gpu_check.md."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import learning_result, section_status, summarize
from benchmarks.workload import write_standin_cifar100
from tests.suite_control import run_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return run_process(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_writes_the_json_and_the_table(tmp_path):
    source, subset, out = tmp_path / "cifar", tmp_path / "subset", tmp_path / "out"
    write_standin_cifar100(source, train_per_class=20, test_per_class=10)
    prepared = check("--prepare", "--data_dir", str(source), "--check_data", str(subset))
    assert prepared.returncode == 0, prepared.stderr
    with open(subset / "cifar-100-python" / "train", "rb") as f:
        assert sorted(set(pickle.load(f)["fine_labels"])) == list(range(30))

    done = check("--dry", "--out", str(out), "--check_data", str(subset))
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


def test_dry_run_needs_no_preparation_and_a_timed_out_section_says_how_far_it_got(tmp_path):
    """From a fresh clone (no gpu_check_data/): --dry makes a stand-in itself. The learning run
    given 1 s is cut off; the report says so, and what it finished (nothing: no task)."""
    out = tmp_path / "out"
    done = check("--dry", "--out", str(out), "--check_data", str(tmp_path / "missing"), "--limit-learning", "1")
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
