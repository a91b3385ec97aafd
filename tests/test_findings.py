"""utils.findings: the paper's findings as comparisons with verdicts, on constructed results
(tests/test_report.py's fabricated results.json files) whose effects are planted."""

import json

import numpy as np
import pytest

from tests.test_report import fake_run
from utils import findings
from utils.findings import AGREES, DISAGREES, NOT_RESOLVED

GROWTHS = ("random", "unfired", "momentum", "gradient")
DENSITIES = (0.2, 0.1, 0.05)


def plant(root, effect, growth_effect=lambda init, density, growth: 0.0, noise=1.0, seeds=3, agnostic=False):
    """A grid of runs: ACC = 50 + effect(init, density) + growth_effect(...) + noise."""
    rng = np.random.default_rng(0)
    for init in ("ERK", "uniform"):
        for density in DENSITIES:
            for growth in GROWTHS:
                for seed in range(seeds):
                    acc = 50 + effect(init, density) + growth_effect(init, density, growth) + rng.normal(0, noise)
                    fake_run(root / f"{init}_{growth}_d{density}_s{seed}", float(acc), sparse_init=init,
                             growth=growth, density=density, seed=seed, agnostic=acc - 20 if agnostic else None,
                             task_inference="calibrated" if agnostic else "none")
    fake_run(root / "dense", 30.0, sparse=False)  # a baseline: not part of the comparisons


def only(result):
    (benchmark,) = result.values()
    return benchmark


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_tables(df, expected):
    assert findings.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_planted_init_effects_give_the_planted_verdicts(tmp_path):
    as_paper = {0.2: +5.0, 0.1: -5.0, 0.05: -5.0}  # ERK better at 80 %, uniform at 90 and 95 %
    plant(tmp_path / "a", lambda init, d: as_paper[d] / 2 * (1 if init == "ERK" else -1))
    result = only(findings.analyze(findings.find_runs(tmp_path / "a")))
    assert result["finding1"]["verdict"] == AGREES and result["finding2"]["verdict"] == AGREES
    assert result["erk_minus_uniform"]["80.0"]["mean"] == pytest.approx(5.0, abs=1.0)
    assert result["erk_minus_uniform"]["95.0"]["mean"] == pytest.approx(-5.0, abs=1.0)
    assert result["erk_minus_uniform"]["80.0"]["n"] == 12  # 4 growths x 3 seeds, paired
    reversed_effects = {0.2: -5.0, 0.1: +5.0, 0.05: +5.0}
    plant(tmp_path / "b", lambda init, d: reversed_effects[d] / 2 * (1 if init == "ERK" else -1))
    result = only(findings.analyze(findings.find_runs(tmp_path / "b")))
    assert result["finding1"]["verdict"] == DISAGREES and result["finding2"]["verdict"] == DISAGREES


def test_pure_noise_resolves_nothing(tmp_path):
    plant(tmp_path, lambda init, d: 0.0, noise=3.0)
    result = only(findings.analyze(findings.find_runs(tmp_path)))
    assert result["finding1"]["verdict"] == NOT_RESOLVED and result["finding2"]["verdict"] == NOT_RESOLVED
    assert result["finding3"]["verdict"] == NOT_RESOLVED


def test_growth_ranking_reversal_agrees_and_one_best_growth_everywhere_disagrees(tmp_path):
    def reversal(init, density, growth):  # gradient best for ERK, random best for uniform
        best = "gradient" if init == "ERK" else "random"
        return 6.0 if growth == best else 0.0

    plant(tmp_path / "a", lambda init, d: 0.0, reversal, noise=0.5)
    result = only(findings.analyze(findings.find_runs(tmp_path / "a")))
    assert result["finding3"]["verdict"] == AGREES
    assert {cell["ranking"][0][0] for cell in result["growth_cells"]} == {"gradient", "random"}
    plant(tmp_path / "b", lambda init, d: 0.0, lambda init, d, growth: 6.0 if growth == "momentum" else 0.0,
          noise=0.5)
    result = only(findings.analyze(findings.find_runs(tmp_path / "b")))
    assert result["finding3"]["verdict"] == DISAGREES and "momentum" in result["finding3"]["evidence"]


def test_findings_files_capacity_and_task_agnostic_tables(tmp_path, capsys):
    plant(tmp_path, lambda init, d: 0.0, agnostic=True)
    assert findings.main([str(tmp_path)]) == 0
    text = (tmp_path / "findings.md").read_text()
    assert "## cifar100, 3 tasks x 10 classes (72 grid runs)" in text
    assert "| ERK + random | 80 % | calibrated | 30." in text  # ACC 50 +- noise, minus 20 with the task hidden
    saved = json.loads((tmp_path / "findings.json").read_text())
    capacity = only(saved)["capacity"]
    erk80 = next(row for row in capacity if (row["init"], row["sparsity"]) == ("ERK", 80.0))
    # fake_run: each task uses density 0.2 of the backbone, reusing up to 30 % of it from earlier tasks
    assert erk80["reused"][0] == 0.0 and erk80["new"][0] == pytest.approx(20.0)
    assert erk80["reused"][1] == pytest.approx(6.0) and erk80["new"][1] == pytest.approx(14.0)
    assert erk80["free"][-1] == pytest.approx(100 - 20 - 14 - 14)


def test_no_grid_runs_is_one_line_and_exit_2(tmp_path, capsys):
    fake_run(tmp_path / "dense", 30.0, sparse=False)
    assert findings.main([str(tmp_path)]) == 2
    assert "no complete isolated dynamic-sparse runs" in capsys.readouterr().err


def plant_policy(root, name, flags, effect, noise=1.0, seeds=3):
    """Adaptive-DST runs beside `plant`'s grid: ACC = 50 + effect(density) + the same noise's scale."""
    rng = np.random.default_rng(1)
    for density in DENSITIES:
        for seed in range(seeds):
            fake_run(root / name / f"ERK_momentum_d{density}_s{seed}", float(50 + effect(density) + rng.normal(0, noise)),
                     sparse_init="ERK", growth="momentum", density=density, seed=seed, **flags)


def test_adaptive_policies_against_the_best_fixed_setting_give_the_planted_verdicts(tmp_path):
    # the grid: momentum 4 points above the others everywhere, so the best fixed cell is "ERK or uniform + momentum"
    plant(tmp_path, lambda init, d: 0.0, lambda init, d, growth: 4.0 if growth == "momentum" else 0.0, noise=0.3)
    plant_policy(tmp_path, "power", {"erk_power": "auto"}, lambda d: {0.2: 9.0, 0.1: 4.0, 0.05: -1.0}[d], noise=0.3)
    plant_policy(tmp_path, "stop", {"turnover_stop": 0.05}, lambda d: 4.0, noise=3.0)
    result = only(findings.analyze(findings.find_runs(tmp_path)))
    assert result["runs"] == 72  # the policies' runs stay out of the paper's findings
    verdicts = {(row["policy"], row["sparsity"]): row["verdict"] for row in result["policies"]}
    assert verdicts == {("ERK^auto + momentum", 80.0): "better", ("ERK^auto + momentum", 90.0): NOT_RESOLVED,
                        ("ERK^auto + momentum", 95.0): "worse", ("ERK + momentum, stop < 0.05", 80.0): NOT_RESOLVED,
                        ("ERK + momentum, stop < 0.05", 90.0): NOT_RESOLVED,
                        ("ERK + momentum, stop < 0.05", 95.0): NOT_RESOLVED}
    row = result["policies"][0]
    assert row["best_fixed"].endswith("+ momentum") and row["difference"]["n"] == 3
    assert findings.main([str(tmp_path)]) == 0
    assert "| ERK^auto + momentum | 80 % |" in (tmp_path / "findings.md").read_text()
