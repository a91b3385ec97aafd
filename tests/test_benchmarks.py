"""`python -m benchmarks --quick` runs every benchmark and writes every figure as a finite number.

Timings on shared machines are noisy, so the targets themselves are not asserted here; the
table the benchmark prints says pass or FAIL for each.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RATIOS = ("data_speedup", "step_overhead", "epoch_overhead", "eval_overhead")
POSITIVE = ("topology_ms", "mask_bytes_per_task", "data_ours_batches_per_s", "data_baseline_batches_per_s",
            "step_dense_ms", "step_masked_ms", "topology_sort_baseline_ms", "epoch_seconds",
            "epoch_bare_steps_seconds", "eval_seconds", "eval_bare_forward_seconds", "mask_bytes_float32_per_task",
            "total_seconds")
TARGET_KEYS = RATIOS + ("topology_ms", "mask_bytes_per_task", "rss_growth_per_task_mb", "checkpoint_overhead")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "figures.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_every_figure_is_a_finite_number_in_a_sensible_range(quick_run):
    _, figures = quick_run
    for key in RATIOS + POSITIVE:
        assert is_number(figures[key]) and figures[key] > 0, key
    assert 0.1 < figures["step_overhead"] < 10 and 0.1 < figures["epoch_overhead"] < 10
    assert 0.1 < figures["eval_overhead"] < 10
    assert 0 < figures["checkpoint_overhead"] < figures["checkpoint_overhead_every_epoch"] < 1
    assert figures["checkpoint_bytes"] > 4 * figures["maskable_weights"]  # at least the weights in float32
    assert is_number(figures["rss_growth_per_task_mb"])
    assert isinstance(figures["mask_bytes_per_task"], int)
    # one bit per weight: ResNet-18 has 11.2 M maskable weights, about 1.4 MB, plus torch.save's framing
    assert figures["maskable_weights"] / 8 <= figures["mask_bytes_per_task"] < figures["maskable_weights"] / 4
    by_growth = figures["topology_ms_by_growth"]
    assert set(by_growth) == {"random", "unfired", "momentum", "gradient"}
    assert figures["topology_ms"] == max(by_growth.values())


def test_targets_verdicts_and_machine_are_recorded(quick_run):
    stdout, figures = quick_run
    assert set(figures["targets"]) == set(TARGET_KEYS) == set(figures["passed"])
    for target in figures["targets"].values():
        assert target["op"] in ("<=", ">=") and is_number(target["value"])
    assert all(ok is None for ok in figures["passed"].values())  # --quick: not held against the targets
    machine = figures["machine"]
    for field in ("device_name", "cpu_cores", "torch", "device"):
        assert machine[field], field
    assert machine["device"] == "cpu"
    verdict_rows = [line for line in stdout.splitlines() if line.endswith(" n/a (quick)")]
    assert "pass/fail" in stdout and len(verdict_rows) >= len(TARGET_KEYS)
    assert not any(line.endswith((" pass", " FAIL")) for line in stdout.splitlines())


def test_full_size_runs_say_pass_or_fail():
    from benchmarks.report import Row, format_table, verdicts

    rows = [Row("step", "1 ms", "1 ms", 1.01, key="step_overhead", checked=1.01),
            Row("epoch", "2 s", "1 s", 2.0, key="epoch_overhead", checked=2.0)]
    assert [line.split()[-1] for line in format_table(rows).splitlines()[2:]] == ["pass", "FAIL"]
    assert verdicts(rows) == {"step_overhead": True, "epoch_overhead": False}
