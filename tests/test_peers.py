"""The peer approaches (WSN, PackNet, SupSup) in runs: each learns every task of a real-data run
on the ResNet-18 with zero forgetting and exact mask sizes, and a run stopped in the middle of a
task resumes to the uninterrupted run's results, bit for bit. Their own rules:
tests/test_supermasks.py (WSN, SupSup), tests/test_packnet.py."""

import csv
import json

import numpy as np
import pytest
import torch

from sparselearning import TaskMasks, allocate_counts
from tests.conftest import SMALL_NET, finished_run, stop_at_step, write_fake_cifar
from utils import run_dir
from utils.approaches import APPROACHES
from utils.entry import main

PEERS = ["wsn", "packnet", "supsup"]
# Enough to learn 5-class tasks clearly above chance; 250 test images a task (a standard error of about 3 points)
LEARNING = ["--epochs", "2", "--max_batches", "8", "--test_per_class", "50"]
# PackNet's tasks own their weights: at density 0.4 the third task finds 20 % of every layer free
# and keeps it all (its share capped); the others share, and get 0.2.
DENSITY = {"wsn": 0.2, "packnet": 0.4, "supsup": 0.2}


@pytest.mark.parametrize("approach", PEERS)
def test_every_peer_learns_every_task_on_resnet18_and_forgets_nothing(approach, cifar_dir, tmp_path):
    out, density = tmp_path / "run", DENSITY[approach]
    results = finished_run("cifar100", cifar_dir, out, "--approach", approach, "--num_tasks", "3", "--num_classes",
                           "15", "--num_classes_per_task", "5", "--density", str(density), "--sparse_init", "uniform",
                           "--task_inference", "none", *LEARNING)
    acc = np.array(results["acc_matrix"], dtype=float)
    for j in range(3):
        assert np.all(acc[j:, j] == acc[j, j]), acc  # BWT = 0, exactly
        assert acc[-1, j] > 20 + 8, acc  # every task above chance (5 classes: 20 %; 250 test images a task)
    assert results["bwt"] == 0.0
    store = TaskMasks.from_state_dict(run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["task_masks"])
    model_shapes = {name: mask.shape for name, mask in store[0].items()}
    shares = allocate_counts(model_shapes, density, "uniform")
    for t in range(3):
        counts = {name: int(mask.sum()) for name, mask in store[t].items()}
        if approach == "packnet":  # a task's network: every earlier task's weights plus its own share
            assert counts == {name: min((t + 1) * share, mask.numel())
                              for (name, share), mask in zip(shares.items(), store[t].values())}
            assert t == 0 or all(bool((store[t][n] | ~store[t - 1][n]).all()) for n in shares)  # nested
        else:
            assert counts == shares  # exactly the allocation, in every layer
    used = [record["capacity_used"] for record in results["per_task"]]
    if approach == "packnet":
        assert used == pytest.approx([0.4, 0.8, 1.0], abs=1e-5)
        assert "fewer free weights than the task's share" in (out / run_dir.LOG_FILE).read_text()
    else:
        assert used[0] == pytest.approx(density, abs=1e-5) and used[0] < used[1] < used[2]


# ---- stop and resume -----------------------------------------------------------------------------

STEPS = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "3",
         "--max_batches", "2", "--batch_size", "16", "--density", "0.2", "--test_per_class", "20",
         "--task_inference", "none", "--checkpoint_minutes", "1000", *SMALL_NET]
STOP_AT = 6 + 2 * 2 + 1  # the 11th step: task 2, epoch 3 (after PackNet's pruning), batch 1 of 2


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers_data")
    write_fake_cifar(root, {"train": 40, "test": 20}, classes=6)
    return root


def argv(data_dir, out, approach):
    return ["--data_dir", str(data_dir), "--no-download", "--device", "cpu", "--output_dir", str(out),
            "--approach", approach, *STEPS]


def computed(out):
    """What a run computed: results.json less timings and the environment, metrics.csv less the
    seconds, and the final weights."""
    results = json.loads((out / run_dir.RESULTS_FILE).read_text())
    kept = {k: v for k, v in results.items() if k not in ("environment", "config")}
    kept["per_task"] = [{k: v for k, v in task.items() if k != "train_seconds"} for task in results["per_task"]]
    with open(out / run_dir.METRICS_FILE, newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "task_seconds"} for row in csv.DictReader(f)]
    weights = run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["model"]
    return kept, rows, weights


@pytest.mark.parametrize("approach", PEERS)
def test_a_peer_run_stopped_mid_task_resumes_bit_identically(approach, small_data, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert main("cifar100", argv(small_data, reference, approach)) == 0
    cls = APPROACHES[approach]
    real_step = stop_at_step(monkeypatch, cls, STOP_AT)
    out = tmp_path / "run"
    assert main("cifar100", argv(small_data, out, approach)) == 3
    assert "stopped by SIGTERM in task 2, epoch 3, batch 1" in capsys.readouterr().err
    monkeypatch.setattr(cls, "step", real_step)
    assert main("cifar100", [*argv(small_data, out, approach), "--resume"]) == 0
    (expected, expected_rows, expected_weights), (got, rows, weights) = computed(reference), computed(out)
    assert got == expected and rows == expected_rows
    assert all(0 < task["train_flops_fraction"] < 1 for task in got["per_task"])  # counted across the stop too
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)


def test_every_peer_needs_sparse_isolated_tasks(capsys):
    for approach in PEERS:
        for flags in (["--no-sparse"], ["--no-isolate"]):
            assert main("cifar100", ["--approach", approach, *flags]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"--approach {approach}" in err[0] and "--isolate" in err[0]
