"""utils.study: a named study end to end (the tiny preset: seconds), and the dry runs of the
presets the README names."""

import json

import pytest

from utils import study
from utils.study import PRESETS, Costs


def test_the_tiny_study_runs_grid_baselines_report_figures_and_findings_then_skips_it_all(cifar_dir, tmp_path, capfd):
    out = tmp_path / "study"
    args = ["tiny", "--data_dir", str(cifar_dir), "--out", str(out), "--device", "cpu"]
    assert study.main(args) == 0
    first = capfd.readouterr().out
    report = (out / "report.md").read_text()
    for row in ("ERK + random", "uniform + random", "static sparse: ERK", "static sparse: uniform",
                "sparse fine-tuning: ERK + random", "dense fine-tuning", "WSN: uniform", "adaptive: ERK + random→momentum"):
        assert f"| {row} |" in report, row
    assert "8 runs found: 8 complete" in report
    assert "The backbone's weights used by any task after the last task" in report
    assert "one bit per maskable weight" in report
    assert (out / "figures" / "cifar100_2tasks_x2_acc_vs_sparsity.png").is_file() or "No figures" in report
    findings = (out / "findings.md").read_text()
    assert "## cifar100, 2 tasks x 2 classes (2 grid runs)" in findings and "Task id hidden" in findings
    record = json.loads((out / "study.json").read_text())
    assert record["preset"] == "tiny" and record["complete"] and len(record["sweeps"]) == 6
    assert record["torch"] and record["machine"] and record["commit"]
    for run in (out / "cifar100_2tasks").glob("*/*_s0"):
        config = json.loads((run / "config.json").read_text())
        assert config["train_per_class"] == 8 and config["device"] == "cpu"
    assert first.count("[1/") >= 4  # every sweep started its runs

    assert study.main(args) == 0  # again: everything complete is skipped
    second = capfd.readouterr().out
    assert "start" not in second and second.count("skipped (already complete)") == 6
    assert "0 succeeded, 0 failed, 2 skipped" in second
    assert json.loads((out / "study.json").read_text())["wall_seconds"] >= record["wall_seconds"]


@pytest.mark.parametrize("preset,runs", [("cpu", 72 + 18 + 9 + 3 + 27 + 27), ("paper", 4 * (72 + 18 + 18 + 3 + 27 + 27))])
def test_dry_run_lists_every_run_and_estimates_from_measured_costs(preset, runs, tmp_path, capfd, monkeypatch):
    measured = []

    def fake_costs(device, image_size, batch_size, **kw):  # the real one times ResNet-18 steps: seconds
        measured.append((image_size, batch_size))
        return Costs(train=0.01, test=0.002, device=device)

    monkeypatch.setattr(study, "measure_costs", fake_costs)
    assert study.main([preset, "--dry-run", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    out = capfd.readouterr().out
    assert out.count("] new ") == runs  # sweep.sh --dry-run: one line per point, none run
    assert f"{runs} runs, about" in out
    assert not (tmp_path / "s").exists()
    benchmarks = PRESETS[preset].benchmarks
    sizes = {(84 if b.script == "miniImageNet100.py" else 32, int(b.flag("--batch_size", "128" if b.script ==
                                                                         "miniImageNet100.py" else "64")))
             for b in benchmarks}
    assert set(measured) == sizes  # once per image and batch size


def test_run_estimate_counts_training_testing_and_task_inference():
    costs = Costs(train=0.01, test=0.001, device="cpu")
    plain = study.Sweep("grid", None, (), "cifar100.py", ("--num_tasks", "2", "--num_classes_per_task", "5",
                                                           "--epochs", "3", "--train_per_class", "10",
                                                           "--test_per_class", "4"))
    # train 3 epochs x 2 tasks x 50 images; each isolated network tested once on its 20 images
    training = 3 * 100 * 0.01 + study.STARTUP_SECONDS + 2 * study.TASK_SECONDS
    assert study.run_seconds(plain, costs) == pytest.approx(training + 2 * 20 * 0.001)
    shared = study.Sweep("finetune", None, (), "cifar100.py", (*plain.flags, "--no-isolate"))
    assert study.run_seconds(shared, costs) == pytest.approx(training + (1 + 2) * 20 * 0.001)  # rows 1 and 2
    inferred = study.Sweep("grid", None, (), "cifar100.py", (*plain.flags, "--task_inference", "calibrated"))
    # every network on every test set, and the calibration on the training images
    assert study.run_seconds(inferred, costs) == pytest.approx(training + (4 * 20 + 100) * 0.001)


def test_a_bad_preset_is_one_line_and_exit_2(capsys):
    assert study.main(["laptop"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_the_wall_time_is_the_union_of_the_runs_sittings_read_from_their_logs(tmp_path):
    """Two runs at once, one of them stopped and continued an hour later: the hour between the
    sittings is not counted, the overlap of the two runs is counted once. A third run's sittings
    begin at its start lines, and (logs of earlier versions) after an hour without a line."""
    def log(run: str, *lines: str) -> None:
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "train.log").write_text("\n".join(lines) + "\n")

    log("grid/a", "2026-12-06 10:00:00,000 INFO sparselearning.masking: masking 21 layers",
        "a message's second line", "2026-12-06 10:05:00,500 INFO utils.train: task 1 epoch 1: loss 2.3",
        "2026-12-06 11:05:00,000 INFO utils.experiment: resuming grid/a after task 1 of 10",
        "2026-12-06 11:06:00,000 INFO utils.experiment: finished 10 tasks")
    log("grid/b", "2026-12-06 10:03:00,000 INFO sparselearning.masking: masking 21 layers",
        "2026-12-06 10:07:00,000 INFO utils.experiment: finished 10 tasks")
    log("grid/c", "2026-12-07 09:00:00,000 INFO utils.experiment: run started (process 7 on vm)",
        "2026-12-07 09:00:30,000 INFO utils.train: task 1 epoch 1: loss 2.3",
        "2026-12-07 09:50:00,000 INFO utils.experiment: run started (process 8 on vm)",
        "2026-12-07 09:51:00,000 INFO utils.train: task 1 epoch 1: loss 2.3",
        "2026-12-08 09:51:00,000 INFO sparselearning.masking: masking 21 layers",  # a day later, no mark
        "2026-12-08 09:51:30,000 INFO utils.train: task 1 epoch 1: loss 2.3")
    assert study.working_intervals(tmp_path / "grid/a" / "train.log")[1][1] - \
        study.working_intervals(tmp_path / "grid/a" / "train.log")[1][0] == 60
    assert [end - start for start, end in study.working_intervals(tmp_path / "grid/c" / "train.log")] == [30, 60, 30]
    assert study.logged_wall_seconds(tmp_path) == 7 * 60 + 60 + 120  # 10:00-10:07, 11:05-11:06 and grid/c
    assert study.logged_wall_seconds(tmp_path / "nothing") == 0
