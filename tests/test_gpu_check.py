"""`scripts/gpu_check.sh --dry`: the GPU check's plumbing end to end on the CPU, with tiny sizes:
its sections, its real-data subset (built by --prepare), gpu_check.json and gpu_check.md."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import learning_result, section_status, summarize
from benchmarks.workload import write_standin_cifar100

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


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
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# GPU check (dry run on a CPU): passed")
    assert "| learning | passed |" in table and "| syncs_per_step | n/a |" in table


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
    assert summarize(tmp_path, dry=False) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed_sections"] == ["benchmarks", "learning"] and report["passed"] is False
    assert report["sections"]["benchmarks"]["status"] == "timed out"
    assert report["benchmarks"] is None and report["learning"] is None
    assert "FAILED: benchmarks, learning" in (tmp_path / "gpu_check.md").read_text()
