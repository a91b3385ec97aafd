"""utils.report: tables, CSV and figures of a folder of runs.

The results.json files here are FABRICATED FIXTURES with made-up accuracies, written only to test
the report's bookkeeping (grouping, mean/std, baselines, failed and unfinished runs); they are
not results of any experiment. The report on real runs is tested in test_sweep.py.
"""

import csv
import io
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.suite_control import run_process
from utils import report

BASE_CONFIG = {"dataset": "cifar100", "num_tasks": 3, "num_classes": 30, "num_classes_per_task": 10,
               "sparse": True, "isolate": True, "sparse_init": "ERK", "growth": "random", "density": 0.2,
               "update_frequency": 400, "epochs": 25, "seed": 0, "lr": 0.001, "device": "cpu",
               "output_dir": "x", "max_batches": None}


def fake_run(directory: Path, acc: float, bwt: float = 0.0, complete: bool | None = None,
             agnostic: float | None = None, **settings) -> dict:
    """Write a fabricated results.json (fixture): final-row accuracies averaging `acc`, and
    capacity records of a run with the config's density that reuses 30 % of its mask."""
    config = {**BASE_CONFIG, **settings}
    tasks, density = config["num_tasks"], config["density"]
    matrix = [[acc if j <= i else None for j in range(tasks)] for i in range(tasks)]
    per_task, used = [], 0.0
    for t in range(tasks):
        record = {"task": t, "train_seconds": 1.0 + t, "test_acc": acc}
        if config["sparse"]:
            reused = min(used, 0.3 * density)
            used = used + density - reused
            record.update(density=density, capacity_used=used, capacity_reused=reused, capacity_free=1 - used)
        per_task.append(record)
    results = {"config": config, "acc_matrix": matrix, "acc": acc, "bwt": bwt, "fwt": 10.0, "forgetting": -bwt,
               "per_task": per_task, "environment": {}}
    if complete is not None:
        results["complete"] = complete
    if agnostic is not None:  # task inference: ACC with the task id hidden, its BWT, task found per row
        results.update(acc_agnostic=agnostic, bwt_agnostic=agnostic - acc, task_id_accuracy=[100.0] * (tasks - 1) + [75.0])
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(results))
    return results


# Made-up ACC values of the fixture grid: (init, growth, density) -> one value per seed.
GRID_ACCS = {
    ("ERK", "random", 0.2): [60.0, 62.0, 65.0],
    ("ERK", "random", 0.1): [55.0, 56.5, 52.25],
    ("ERK", "gradient", 0.2): [61.0, 61.5, 70.0],
    ("ERK", "gradient", 0.1): [50.0, 51.0, 52.0],
    ("uniform", "random", 0.2): [58.0, 57.0, 59.0],
    ("uniform", "random", 0.1): [54.0, 53.0, 57.5],
    ("uniform", "gradient", 0.2): [59.5, 60.5, 61.5],
    ("uniform", "gradient", 0.1): [49.0, 44.0, 47.0],
}


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """A fixture sweep: the grid above with 3 seeds, baselines, one failed and two unfinished runs,
    and a second benchmark with a single run."""
    root = tmp_path / "runs"
    for (init, growth, density), accs in GRID_ACCS.items():
        for seed, acc in enumerate(accs):
            fake_run(root / "grid" / f"{init}_{growth}_d{density}_s{seed}", acc,
                     sparse_init=init, growth=growth, density=density, seed=seed)
    for seed, (acc, bwt) in enumerate([(30.0, -40.0), (34.0, -38.0)]):
        fake_run(root / "baselines" / f"dense_s{seed}", acc, bwt, sparse=False, isolate=False, seed=seed)
    fake_run(root / "baselines" / "finetune", 40.0, -20.0, isolate=False)
    for init, accs in (("ERK", [48.0, 46.0]), ("uniform", [45.0, 44.0])):
        for density, acc in zip((0.2, 0.1), accs):
            fake_run(root / "baselines" / f"static_{init}_{density}", acc, sparse_init=init, density=density,
                     update_frequency=0)
    fake_run(root / "grid" / "ERK_momentum_d0.2_s0", 99.0, complete=False, growth="momentum")
    (root / "grid" / "uniform_momentum_d0.2_s0").mkdir()
    (root / "grid" / "uniform_momentum_d0.2_s0" / "config.json").write_text(json.dumps(BASE_CONFIG))
    (root / "grid" / "ERK_unfired_d0.2_s0").mkdir()
    (root / "grid" / "ERK_unfired_d0.2_s0" / "checkpoint.pt").write_bytes(b"")
    fake_run(root / "five_tasks" / "run", 70.0, agnostic=41.5, num_tasks=5, num_classes=50, task_inference="entropy")
    return root


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Section title -> the rows of the first table under it (header first), cells stripped."""
    tables, title, done = {}, None, set()
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|"):
            if not line.startswith("|---") and title not in done:
                tables.setdefault(title, []).append([cell.strip() for cell in line.strip("|").split("|")])
        elif title in tables:
            done.add(title)  # the first table ended
    return tables


def expected_cell(values: list[float]) -> str:
    """The cell text, computed independently of the report."""
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def run_report(root: Path, *args: str) -> str:
    assert report.main([str(root), *args]) == 0
    return (root / "report.md").read_text() if "--out" not in args else ""


def test_table_rows_columns_and_cells_match_the_results(runs_dir, capsys):
    tables = markdown_tables(run_report(runs_dir, "--no-figures"))
    table = tables["cifar100, 3 tasks x 10 classes"]
    header, rows = table[0], {row[0]: row[1:] for row in table[1:]}
    assert header == ["init + growth", "0 %", "80 %", "90 %", "BWT"]
    assert list(rows) == ["ERK + random", "ERK + gradient", "uniform + random", "uniform + gradient",
                          "static sparse: ERK", "static sparse: uniform", "sparse fine-tuning: ERK + random",
                          "dense fine-tuning"]
    for (init, growth, density), accs in GRID_ACCS.items():
        column = header.index("80 %" if density == 0.2 else "90 %") - 1
        assert rows[f"{init} + {growth}"][column] == expected_cell(accs)
        assert rows[f"{init} + {growth}"][0] == ""  # no dense column for sparse runs
    assert rows["ERK + random"][-1] == "0.00 ± 0.00"
    assert rows["dense fine-tuning"] == [expected_cell([30.0, 34.0]), "", "",
                                         f"{statistics.mean([-40, -38]):.2f} ± {statistics.stdev([-40, -38]):.2f}"]
    assert rows["static sparse: uniform"][1:3] == ["45.00 (n=1)", "44.00 (n=1)"]
    assert rows["sparse fine-tuning: ERK + random"][1:] == ["40.00 (n=1)", "", "-20.00"]
    # the failed run (99 %) is not averaged in, the other benchmark has its own table
    assert tables["cifar100, 5 tasks x 10 classes"][1] == ["ERK + random", "70.00 (n=1)", "0.00"]


def test_task_agnostic_figures_get_a_table_of_their_own_and_csv_columns(runs_dir):
    text = run_report(runs_dir, "--no-figures")
    three, five = (text.split("## cifar100, 5 tasks")[k] for k in (0, 1))
    assert "Task id hidden" not in three  # no run there inferred tasks
    assert "`--task_inference entropy`" in five and "task_inference entropy" in five  # settings line too
    agnostic_table = markdown_tables(five.split("Task id hidden", 1)[1].replace("##", "#"))[None]
    assert agnostic_table[1] == ["ERK + random", "41.50 (n=1)", f"{41.5 - 70.0:.2f}"]
    rows = list(csv.DictReader(io.StringIO((runs_dir / "report.csv").read_text())))
    five_tasks = [row for row in rows if row["num_tasks"] == "5"][0]
    assert (five_tasks["acc_agnostic"], five_tasks["task_inference"], five_tasks["task_found"]) == ("41.5", "entropy", "75.0")
    assert [row for row in rows if row["num_tasks"] == "3"][0]["acc_agnostic"] == ""


def test_failed_and_unfinished_runs_are_listed_not_dropped(runs_dir):
    text = run_report(runs_dir, "--no-figures")
    left_out = text.split("## Runs not in the tables", 1)[1]
    assert "failed" in left_out and str(runs_dir / "grid" / "ERK_momentum_d0.2_s0") in left_out
    for name in ("uniform_momentum_d0.2_s0", "ERK_unfired_d0.2_s0"):
        assert f"unfinished (no results.json: still running, or stopped): `{runs_dir / 'grid' / name}`" in left_out
    assert "35 runs found: 32 complete, 1 failed, 2 unfinished" in text


def test_damaged_and_foreign_results_are_listed_not_dropped(tmp_path):
    fake_run(tmp_path / "good", 60.0)
    cut = tmp_path / "cut"
    fake_run(cut, 50.0)
    (cut / "results.json").write_text((cut / "results.json").read_text()[:40])  # cut short
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"loss": 0.1}')  # another program's
    text = run_report(tmp_path, "--no-figures")
    assert "3 runs found: 1 complete, 0 failed, 0 unfinished, 2 unreadable" in text
    left_out = text.split("## Runs not in the tables", 1)[1]
    assert f"- unreadable (its results.json is damaged (not valid JSON; cut short?)): `{cut}`" in left_out
    assert f"not a run's results (no config and acc_matrix; another program's?)): `{tmp_path / 'other'}`" in left_out
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert sorted(row["status"] for row in rows) == ["complete", "unreadable", "unreadable"]


def test_csv_has_one_row_per_run_with_its_status_settings_and_metrics(runs_dir):
    run_report(runs_dir, "--no-figures")
    rows = list(csv.DictReader(io.StringIO((runs_dir / "report.csv").read_text())))
    assert len(rows) == 35
    by_run = {Path(row["run"]).relative_to(runs_dir).as_posix(): row for row in rows}
    row = by_run["grid/uniform_random_d0.1_s2"]
    assert (row["status"], row["sparse_init"], row["growth"], row["seed"]) == ("complete", "uniform", "random", "2")
    assert float(row["density"]) == 0.1 and float(row["sparsity_percent"]) == 90.0
    assert float(row["acc"]) == 57.5 and float(row["task_seconds"]) == 2.0
    assert row["table_row"] == "uniform + random"
    assert float(row["capacity_used"]) == pytest.approx(0.1 + 0.07 + 0.07)
    assert by_run["grid/ERK_momentum_d0.2_s0"]["status"] == "failed"
    assert by_run["grid/uniform_momentum_d0.2_s0"]["status"] == "unfinished"
    assert by_run["grid/uniform_momentum_d0.2_s0"]["acc"] == ""
    assert by_run["baselines/dense_s1"]["sparsity_percent"] == "0.0"


def test_a_table_mixing_settings_says_so(tmp_path):
    fake_run(tmp_path / "a", 50.0, epochs=25)
    fake_run(tmp_path / "b", 52.0, epochs=100, seed=1)
    text = run_report(tmp_path, "--no-figures")
    assert "the runs differ in epochs (25, 100)" in text
    assert "| ERK + random | 51.00 ± 1.41 (n=2) | 0.00 ± 0.00 |" in text


def two_splits(root: Path) -> None:
    """Fixture runs of 2 tasks: two seeds with 2 classes a task, one with 5."""
    for seed, acc in enumerate((70.0, 74.0)):
        fake_run(root / f"x2_s{seed}", acc, num_tasks=2, num_classes=4, num_classes_per_task=2, seed=seed)
    fake_run(root / "x5_s0", 40.0, num_tasks=2, num_classes=10, num_classes_per_task=5)


def test_runs_of_different_splits_get_tables_of_their_own(tmp_path):
    two_splits(tmp_path)
    text = run_report(tmp_path, "--no-figures")
    tables = markdown_tables(text)
    assert tables["cifar100, 2 tasks x 2 classes"][1] == ["ERK + random", expected_cell([70.0, 74.0]), "0.00 ± 0.00"]
    assert tables["cifar100, 2 tasks x 5 classes"][1] == ["ERK + random", "40.00 (n=1)", "0.00"]
    assert len(tables) == 2
    assert "Warning" not in text  # the split is the tables' own, not a setting the cells mix
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert sorted(row["num_classes_per_task"] for row in rows) == ["2", "2", "5"]


def test_figures_of_different_splits_have_different_names(tmp_path):
    pytest.importorskip("matplotlib")
    two_splits(tmp_path / "runs")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    names = sorted(path.name for path in (tmp_path / "out" / "figures").glob("*.png"))
    assert names == ["cifar100_2tasks_x2_acc_vs_sparsity.png", "cifar100_2tasks_x2_capacity.png",
                     "cifar100_2tasks_x5_acc_vs_sparsity.png", "cifar100_2tasks_x5_capacity.png"]


def test_csv_has_fwt_above_chance_from_the_results_or_computed_from_the_matrix(tmp_path):
    """Fixture runs with forward-transfer probes: one whose results.json has the key, one from
    before it existed (computed: probe 30 % on the next task - chance 20 % with 5 classes a task)."""
    for name, stored in (("stored", {"fwt_above_chance": 12.5}), ("computed", {})):
        results = fake_run(tmp_path / name, 50.0, num_tasks=2, num_classes=10, num_classes_per_task=5)
        results["acc_matrix"][0][1] = 30.0
        (tmp_path / name / "results.json").write_text(json.dumps({**results, **stored}))
    run_report(tmp_path, "--no-figures")
    rows = {Path(row["run"]).name: row for row in csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text()))}
    assert (rows["stored"]["fwt"], rows["stored"]["fwt_above_chance"]) == ("10.0", "12.5")
    assert float(rows["computed"]["fwt_above_chance"]) == pytest.approx(10.0)


def test_the_readmes_report_folder_is_not_committed():
    """README: `python -m utils.report runs --out reports`; the folder is git-ignored."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("reports/report.md", "reports/figures/acc_matrix/run.png"):
        assert run_process(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0, f"{path} is not ignored"


def test_capacity_stack_splits_the_backbone_into_parts_summing_to_one():
    records = [{"capacity_used": 0.2, "capacity_reused": 0.0, "capacity_free": 0.8},
               {"capacity_used": 0.35, "capacity_reused": 0.05, "capacity_free": 0.65}]
    reused, new, earlier, free = report.capacity_stack(records)[1]
    assert (reused, new, earlier, free) == pytest.approx((0.05, 0.15, 0.15, 0.65))
    assert sum(report.capacity_stack(records)[0]) == pytest.approx(1.0)
    assert report.capacity_stack([{"task": 0, "train_seconds": 1.0}]) is None  # dense run


def test_figures_are_png_images(runs_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert report.main([str(runs_dir), "--out", str(out)]) == 0
    figures = out / "figures"
    heatmaps = sorted((figures / "acc_matrix").glob("*.png"))
    assert len(heatmaps) == 33  # every run with a results.json, the failed one included
    assert (figures / "acc_matrix" / "grid__ERK_random_d0.2_s0.png") in heatmaps
    expected = [figures / f"cifar100_{name}.png" for name in (
        "3tasks_x10_acc_vs_sparsity", "3tasks_x10_capacity", "5tasks_x10_acc_vs_sparsity",
        "5tasks_x10_acc_agnostic_vs_sparsity", "5tasks_x10_capacity")]
    for path in [heatmaps[0], *expected]:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 250 and image.height >= 200, path
    assert not list(out.rglob(".*tmp*"))  # no temporary files left
    text = (out / "report.md").read_text()
    assert "![cifar100_3tasks_x10_capacity](figures/cifar100_3tasks_x10_capacity.png)" in text
    assert not (runs_dir / "report.md").exists()  # --out, not the runs folder


def test_without_matplotlib_it_writes_the_tables_and_says_how_to_get_figures(runs_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert report.main([str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "pip install -r requirements-figures.txt" in out
    assert (runs_dir / "report.md").is_file() and (runs_dir / "report.csv").is_file()
    assert not (runs_dir / "figures").exists()
    assert "pip install -r requirements-figures.txt" in (runs_dir / "report.md").read_text()


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_no_runs_is_a_one_line_error(tmp_path, capsys, make):
    assert report.main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_bad_flag_is_one_line_and_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path), "--figures-please"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--figures-please" in err and "usage" not in err


def test_adaptive_dst_runs_get_rows_of_their_own_between_the_grid_and_the_baselines(runs_dir):
    fake_run(runs_dir / "power" / "a", 61.0, growth="momentum", erk_power="auto")
    fake_run(runs_dir / "mix" / "a", 62.0, growth="unfired", growth_later="momentum")
    fake_run(runs_dir / "stop" / "a", 63.0, growth="momentum", turnover_stop=0.05, erk_power=0.5)
    fake_run(runs_dir / "plain" / "a", 64.0, growth="momentum", erk_power=1.0, growth_later=None, turnover_stop=0.0)
    rows = [row[0] for row in markdown_tables(run_report(runs_dir, "--no-figures"))["cifar100, 3 tasks x 10 classes"][1:]]
    assert rows == ["ERK + random", "ERK + momentum", "ERK + gradient", "uniform + random", "uniform + gradient",
                    "adaptive: ERK + unfired→momentum", "adaptive: ERK^0.5 + momentum, stop < 0.05",
                    "adaptive: ERK^auto + momentum", "static sparse: ERK", "static sparse: uniform",
                    "sparse fine-tuning: ERK + random", "dense fine-tuning"]
    with open(runs_dir / "report.csv", newline="") as f:
        settings = {Path(row["run"]).relative_to(runs_dir).as_posix(): (row["erk_power"], row["growth_later"],
                                                                        row["turnover_stop"]) for row in csv.DictReader(f)}
    assert settings["power/a"] == ("auto", "", "") and settings["mix/a"] == ("", "momentum", "")


def test_every_row_of_a_figure_has_a_style_of_its_own():
    from utils.report import line_styles

    rows = [f"{init} + {growth}" for init in ("ERK", "uniform") for growth in ("random", "unfired", "momentum", "gradient")]
    rows += ["adaptive: ERK + momentum, stop < 0.1", "adaptive: ERK + unfired→momentum", "adaptive: ERK^auto + momentum",
             "WSN: uniform", "PackNet: uniform", "SupSup: uniform", "static sparse: ERK", "static sparse: uniform",
             "sparse fine-tuning: ERK + random", "dense fine-tuning"]
    styles = line_styles(rows)
    looks = {tuple(sorted(styles[row].items())) for row in rows}
    assert len(looks) == len(rows)
    assert styles["ERK + momentum"]["color"] == styles["uniform + momentum"]["color"]  # colour = growth
    assert styles["ERK + momentum"]["linestyle"] != styles["uniform + momentum"]["linestyle"]  # line = init
    assert line_styles(rows[::-1])["ERK + random"] == styles["ERK + random"]
