"""`python -m benchmarks --quick` runs every benchmark and writes every measured figure as a finite
number; its derived figures (ratios, shares, the recommended K, pass/fail) are n/a: null, with the reason.

Timings on shared machines are noisy, so the targets themselves are not asserted here; the
table the benchmark prints says pass or FAIL for each.
"""

import contextlib
import io
import json
import math
import re

import pytest

RATIOS = ("data_speedup", "step_overhead", "epoch_overhead", "eval_overhead")
POSITIVE = ("topology_ms", "mask_bytes_per_task", "data_ours_batches_per_s", "data_baseline_batches_per_s",
            "step_dense_ms", "step_masked_ms", "topology_sort_baseline_ms", "epoch_seconds",
            "epoch_bare_steps_seconds", "eval_seconds", "eval_bare_forward_seconds", "mask_bytes_float32_per_task",
            "total_seconds")
TARGET_KEYS = RATIOS + ("topology_ms", "mask_bytes_per_task", "rss_growth_per_task_mb", "checkpoint_overhead")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m benchmarks --quick --device cpu --json PATH`, called in this process (what the
    command runs, without a process start): what it printed, and the figures it wrote."""
    from benchmarks.__main__ import main

    out = tmp_path_factory.mktemp("bench") / "figures.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--quick", "--device", "cpu", "--json", str(out)])
    assert code == 0, stderr.getvalue()[-3000:]
    return stdout.getvalue(), json.loads(out.read_text())


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_every_measured_figure_is_a_finite_number_in_a_sensible_range(quick_run):
    _, figures = quick_run
    for key in POSITIVE:
        assert is_number(figures[key]) and figures[key] > 0, key
    assert 0 < figures["checkpoint_save_seconds"] < figures["checkpoint_epoch_seconds"]
    assert figures["checkpoint_bytes"] > 4 * figures["maskable_weights"]  # at least the weights in float32
    assert is_number(figures["rss_growth_per_task_mb"])
    assert isinstance(figures["mask_bytes_per_task"], int)
    # one bit per weight: ResNet-18 has 11.2 M maskable weights, about 1.4 MB, plus torch.save's framing
    assert figures["maskable_weights"] / 8 <= figures["mask_bytes_per_task"] < figures["maskable_weights"] / 4
    by_growth = figures["topology_ms_by_growth"]
    assert set(by_growth) == {"random", "unfired", "momentum", "gradient"}
    assert figures["topology_ms"] == max(by_growth.values())


DERIVED = RATIOS + ("run_overhead", "checkpoint_overhead", "checkpoint_overhead_every_epoch",
                    "concurrent_recommended_k")


def test_quick_shows_no_derived_figure(quick_run):
    """Ratios, shares and the recommended K at smoke-test sizes mean nothing: n/a (quick) in the
    table, null in the JSON with the reason."""
    stdout, figures = quick_run
    for key in DERIVED:
        assert key in figures and figures[key] is None, key
    assert "--quick" in figures["quick_reason"] and "recommended K" in figures["quick_reason"]
    assert figures["complete"] is True and len(figures["families_done"]) == 10
    table = stdout[stdout.index("measurement"):stdout.index("\ntotal ")].splitlines()[2:]
    assert len(table) >= 15
    for line in table:
        assert not re.search(r"  \d+\.\d{3}(  |$)", line), line  # no ratio printed
    recommended = [line for line in table if line.startswith("recommended concurrent runs")]
    assert len(recommended) == 1 and "K =" not in recommended[0] and "n/a (quick)" in recommended[0]
    share = [line for line in table if line.startswith("checkpoint share of wall time")]
    assert len(share) == 1 and " %" not in share[0]


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


def test_gpu_only_figures_are_null_on_the_cpu_and_the_new_families_report(quick_run):
    stdout, figures = quick_run
    assert figures["target_kind"] == "cpu"
    for key in ("syncs_per_step", "syncs_per_topology_update", "step_by_layout"):
        assert figures[key] is None, key  # n/a, not 0
    assert stdout.count(" n/a (cpu)") >= 3
    assert figures["run_tasks"] == 2 and figures["run_epochs"] == 1
    for key in ("run_images_per_s", "run_bare_images_per_s", "run_train_seconds"):
        assert is_number(figures[key]) and figures[key] > 0, key
    assert figures["run_train_images"] == 2 * 3 * 64  # 2 tasks, 1 epoch of 3 batches of 64
    rates = figures["concurrent_images_per_s"]
    assert set(rates) == {"1", "2"} and all(is_number(r) and r > 0 for r in rates.values())


def test_sync_counting_counts_the_sync_warnings_and_restores_the_mode(monkeypatch):
    import warnings

    import torch

    from benchmarks.syncs import SYNC_WARNING, count_sync_warnings, syncs_during

    def fake_step():
        warnings.warn(SYNC_WARNING)
        warnings.warn(SYNC_WARNING)  # the same place twice: both count
        warnings.warn("something else")

    assert count_sync_warnings(fake_step) == 2
    assert syncs_during(lambda: pytest.fail("not called on a CPU"), torch.device("cpu")) is None
    modes = [2]  # "error", as get_sync_debug_mode reports it
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))
    seen = []
    assert syncs_during(lambda: (seen.append(modes[-1]), fake_step()), torch.device("cuda")) == 2
    assert seen == ["warn"] and modes[-1] == 2  # restored to the mode before
    with pytest.raises(RuntimeError):
        syncs_during(lambda: (_ for _ in ()).throw(RuntimeError("boom")), torch.device("cuda"))
    assert modes[-1] == 2


def test_concurrent_runs_are_measured_over_the_common_window():
    from benchmarks.concurrent import recommended, steady_rate

    # two runs at 100 images/s, the second starting 1 s later; samples every second
    first = [(float(t), 100 * t) for t in range(0, 11)]
    second = [(float(t), 100 * (t - 1)) for t in range(1, 12)]
    rate, window = steady_rate([first, second])
    assert window == pytest.approx(8.0) and rate == pytest.approx(200.0)  # from 2 s (2nd's 1st sample) to 10 s
    with pytest.raises(RuntimeError, match="did not overlap"):
        steady_rate([first, [(20.0, 0), (21.0, 100), (22.0, 200)]])
    assert recommended({1: 100.0, 2: 180.0, 4: 190.0, 8: 195.0}) == 4  # 190 >= 0.95 x 195
    assert recommended({1: 100.0, 2: 90.0}) == 1


def test_gpu_targets_differ_only_where_the_issue_sets_them():
    import torch

    from benchmarks.report import CUDA_TARGETS, TARGETS, Row, format_table, targets_for

    assert targets_for(torch.device("cpu")) is TARGETS and targets_for(torch.device("cuda", 0)) is CUDA_TARGETS
    assert {k for k in CUDA_TARGETS if CUDA_TARGETS[k] != TARGETS.get(k)} == {
        "step_overhead", "epoch_overhead", "run_overhead", "syncs_per_step"}
    rows = [Row("step", "1 ms", "1 ms", 1.05, key="step_overhead", checked=1.05),
            Row("syncs", "1", key="syncs_per_step", checked=1.0),
            Row("run", "1/s", "1/s", 1.2, key="run_overhead", checked=1.2)]
    assert [line.split()[-1] for line in format_table(rows, targets=CUDA_TARGETS).splitlines()[2:]] == [
        "pass", "FAIL", "FAIL"]
    assert format_table(rows).splitlines()[2].split()[-1] == "FAIL"  # the CPU's 1.03
    assert format_table(rows).splitlines()[4].rstrip().endswith("-")  # informative on a CPU
