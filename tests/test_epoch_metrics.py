"""metrics.csv (always) and TensorBoard events (--tensorboard): one row per task x epoch, the same
figures as the log and results.json. (Across a kill and --resume: tests/test_reliability.py.)"""

import csv
from pathlib import Path

import pytest

from utils import cli, run_dir
from utils.entry import main
from utils.epoch_metrics import EPOCH_COLUMNS, epoch_row, mark_tested, metrics_csv
from utils.errors import UserError

from conftest import finished_run

# A small run: two tasks of two epochs, three batches each, a topology update every 2 batches,
# tested on 2 x 20 images a task.
SMALL = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "2",
         "--max_batches", "3", "--batch_size", "16", "--update_frequency", "2", "--test_per_class", "20",
         "--task_inference", "none"]


def read_rows(out: Path) -> list[dict]:
    with open(out / run_dir.METRICS_FILE, newline="") as f:
        return list(csv.DictReader(f))


def test_the_csv_has_a_header_and_an_empty_cell_for_an_untested_epoch():
    rows = [epoch_row(0, e, 1.5 - e, 40.0 + e, 1e-3, 2 * e, 3.0 + e) for e in range(2)]
    mark_tested(rows, kept_epoch=1, test_acc=55.5)
    lines = metrics_csv(rows).splitlines()
    assert lines[0] == ",".join(EPOCH_COLUMNS)
    assert lines[1] == "1,1,1.5,40.0,55.5,1,0.001,0,3.0"
    assert lines[2] == "1,2,0.5,41.0,,0,0.001,2,4.0"


@pytest.fixture(scope="module")
def run_with_metrics(cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("metrics") / "run"
    flags = [*SMALL, "--tensorboard"] if cli.tensorboard_available() else SMALL
    return out, finished_run("cifar100", cifar_dir, out, *flags)


def test_a_run_writes_a_row_per_task_and_epoch_matching_its_results(run_with_metrics):
    out, results = run_with_metrics
    rows = read_rows(out)
    assert [(int(r["task"]), int(r["epoch"])) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for record in results["per_task"]:
        task_rows = [r for r in rows if int(r["task"]) == record["task"]]
        kept = [r for r in task_rows if r["kept"] == "1"]
        assert len(kept) == 1 and int(kept[0]["epoch"]) == record["kept_epoch"]
        assert float(kept[0]["test_acc"]) == record["test_acc"]
        assert float(kept[0]["train_acc"]) == record["train_acc"]
        assert all(r["test_acc"] == "" for r in task_rows if r is not kept[0])
        updates = [int(r["topology_updates"]) for r in task_rows]
        assert updates == sorted(updates) and updates[-1] == record["topology_updates"] > 0
        seconds = [float(r["task_seconds"]) for r in task_rows]
        assert 0 < seconds[0] < seconds[1] <= record["train_seconds"]
    assert [float(r["lr"]) for r in rows[:2]] == pytest.approx([1e-3, 1e-5])  # x0.1 at 50 % and 75 %: epoch 2


def test_tensorboard_gets_the_same_scalars(run_with_metrics):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (requirements-figures.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = run_with_metrics
    events = EventAccumulator(str(out / run_dir.TENSORBOARD_DIR))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([float(r["loss"]) for r in read_rows(out)], rel=1e-6)
    last_row = [e.value for key in ("test/task_1", "test/task_2") for e in events.Scalars(key) if e.step == 4]
    assert last_row == pytest.approx(results["acc_matrix"][1], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setattr(cli, "tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="--tensorboard needs the optional tensorboard package"):
        cli.parse_config(["--tensorboard"], "cifar100")
    assert cli.parse_config([], "cifar100").tensorboard is False


def test_overwrite_removes_the_metrics_and_the_event_files(cifar_dir, tmp_path):
    out = tmp_path / "run"
    flags = [*SMALL, "--num_tasks", "1", "--num_classes", "2", "--epochs", "1"]
    finished_run("cifar100", cifar_dir, out, *flags)
    events = out / run_dir.TENSORBOARD_DIR
    events.mkdir()
    (events / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    (events / "my_notes.txt").write_text("mine")  # not the run's: kept
    assert main("cifar100", ["--data_dir", str(cifar_dir), "--no-download", "--device", "cpu", "--output_dir",
                             str(out), *flags, "--overwrite"]) == 0
    assert sorted(p.name for p in events.iterdir()) == ["my_notes.txt"]
    assert len(read_rows(out)) == 1
