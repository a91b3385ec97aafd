"""Adaptive DST in runs: all three policies at once (`--erk_power auto`, `--growth_later`,
`--turnover_stop`) learn every task of a real-data ResNet-18 run above chance with zero
forgetting and exact mask sizes, and a run stopped in the middle of a task resumes to the
uninterrupted run's results, bit for bit. The policies' rules: tests/test_adaptive.py."""

import numpy as np
import pytest
import torch

from sparselearning import TaskMasks, allocate_counts
from tests.conftest import SMALL_NET, finished_run, stop_at_step, write_fake_cifar
from tests.test_peers import computed
from utils import run_dir
from utils.approaches.dst import DST
from utils.entry import main

# All three policies at once: density 0.1 gives --erk_power auto the power 0.5.
POLICIES = ["--sparse_init", "ERK", "--erk_power", "auto", "--growth", "unfired", "--growth_later", "momentum",
            "--turnover_stop", "0.05", "--update_frequency", "2"]


def test_the_adaptive_policies_learn_every_task_on_resnet18_and_forget_nothing(cifar_dir, tmp_path):
    out = tmp_path / "run"
    results = finished_run("cifar100", cifar_dir, out, *POLICIES, "--density", "0.1", "--num_tasks", "3",
                           "--num_classes", "15", "--num_classes_per_task", "5", "--task_inference", "none",
                           "--epochs", "2", "--max_batches", "8", "--test_per_class", "50")
    acc = np.array(results["acc_matrix"], dtype=float)
    for j in range(3):
        assert np.all(acc[j:, j] == acc[j, j]), acc  # BWT = 0, exactly
        assert acc[-1, j] > 20 + 8, acc  # above chance (5 classes: 20 %)
    store = TaskMasks.from_state_dict(run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["task_masks"])
    shapes = {name: mask.shape for name, mask in store[0].items()}
    expected = allocate_counts(shapes, 0.1, "ERK", 0.5)
    assert expected != allocate_counts(shapes, 0.1, "ERK")
    for t in range(3):
        assert {name: int(mask.sum()) for name, mask in store[t].items()} == expected
    updates = [record["topology_updates"] for record in results["per_task"]]
    assert all(record["erk_power"] == pytest.approx(0.5) for record in results["per_task"])
    assert all(1 <= u < 8 for u in updates), updates  # 8 were due in each task; each stopped early
    assert "topology settled after" in (out / run_dir.LOG_FILE).read_text()


STOP_AT = 6 + 2 * 2 + 1  # task 2, epoch 3, batch 1 of 2 (6 steps a task)
# An update every step, and a threshold that ends the updates before the stop (at the 3rd or 4th of 6).
RESUMED = [*POLICIES[:-3], "0.2", "--update_frequency", "1"]


def test_an_adaptive_run_stopped_mid_task_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    small_data = tmp_path / "data"
    write_fake_cifar(small_data, {"train": 40, "test": 20}, classes=6)
    def argv(out):
        return ["--data_dir", str(small_data), "--no-download", "--device", "cpu", "--output_dir", str(out),
                "--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "3",
                "--max_batches", "2", "--batch_size", "16", "--density", "0.1", "--test_per_class", "20",
                "--task_inference", "none", "--checkpoint_minutes", "1000", *SMALL_NET, *RESUMED]

    reference = tmp_path / "reference"
    assert main("cifar100", argv(reference)) == 0
    real_step = stop_at_step(monkeypatch, DST, STOP_AT)
    out = tmp_path / "run"
    assert main("cifar100", argv(out)) == 3
    assert "stopped by SIGTERM in task 2, epoch 3, batch 1" in capsys.readouterr().err
    monkeypatch.setattr(DST, "step", real_step)
    assert main("cifar100", [*argv(out), "--resume"]) == 0
    (expected, expected_rows, expected_weights), (got, rows, weights) = computed(reference), computed(out)
    assert got == expected and rows == expected_rows
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)
    assert [r["topology_updates"] for r in got["per_task"]] != [6, 6]  # the stop took effect before the resume


@pytest.mark.parametrize("flags, words", [
    (["--erk_power", "0.5", "--sparse_init", "uniform"], "--sparse_init ERK"),
    (["--erk_power", "-1", "--sparse_init", "ERK"], "--erk_power must be >= 0"),
    (["--growth", "gradient", "--growth_later", "momentum"], "--growth must be random or unfired"),
    (["--turnover_stop", "1"], "--turnover_stop must be in [0, 1)"),
    (["--approach", "wsn", "--turnover_stop", "0.1"], "--approach dst"),
    (["--no-sparse", "--growth_later", "momentum"], "--sparse"),
    (["--update_frequency", "0", "--turnover_stop", "0.1"], "--update_frequency > 0"),
])
def test_misused_adaptive_flags_are_one_clear_line(flags, words, capsys):
    assert main("cifar100", flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
