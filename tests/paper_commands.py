"""The paper's commands, small, on generated data: what they compute, to the last bit, recorded.

`tests/test_approaches.py` runs each command here and compares what it computed with the record
in `tests/golden/paper_commands.json`: the accuracy matrices, each task's record (capacity,
topology updates, the kept epoch and its training accuracy) and every epoch's mean training loss
and accuracy (a loss changes with any weight's last bit). The record was written by the version
before training moved behind the approach interface (`utils.approaches`), so the test holds the
approaches to computing exactly what the paper's commands computed before:

    python -m tests.paper_commands --write   # only when a change of results is intended and said
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.conftest import write_fake_cifar
from utils import run_dir
from utils.entry import main

GOLDEN = Path(__file__).resolve().parent / "golden" / "paper_commands.json"

# 3 tasks of 2 classes, 2 epochs of 2 batches each, a topology update every 2 batches; 2 x 10 test images a task.
SMALL = ["--num_tasks", "3", "--num_classes", "6", "--num_classes_per_task", "2", "--epochs", "2",
         "--max_batches", "2", "--batch_size", "16", "--update_frequency", "2", "--test_per_class", "10",
         "--test_batch_size", "20"]
COMMANDS = {
    "dst_erk_momentum": ["--sparse_init", "ERK", "--growth", "momentum", "--density", "0.2",
                         "--task_inference", "confidence"],
    "dst_uniform_gradient_last": ["--sparse_init", "uniform", "--growth", "gradient", "--density", "0.1",
                                  "--keep", "last"],
    "dst_uniform_unfired_sgd": ["--sparse_init", "uniform", "--growth", "unfired", "--density", "0.1",
                                "--optimizer", "sgd", "--lr", "0.01", "--l2", "0.0005", "--regrow_frozen"],
    "static_sparse": ["--sparse_init", "ERK", "--density", "0.2", "--update_frequency", "0"],
    "sparse_finetune": ["--sparse_init", "ERK", "--growth", "random", "--density", "0.2", "--no-isolate"],
    "dense_finetune": ["--no-sparse"],
}
TIMES = ("train_seconds", "seconds")  # measured, not computed: left out of the record


def write_data(root: Path) -> Path:
    """The generated CIFAR-100 layout the commands read (6 learnable classes, 32 + 10 images each)."""
    write_fake_cifar(root, {"train": 32, "test": 10}, classes=6)
    return root


def without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_times(item) for key, item in value.items() if key not in TIMES}
    if isinstance(value, list):
        return [without_times(item) for item in value]
    return value


def computed(out: Path) -> dict[str, Any]:
    """What a finished run computed: its results' matrices and task records, and metrics.csv's
    losses and training accuracies. (Entries a later version adds to the records are compared by
    the test only where the record has them.)"""
    results = json.loads((out / run_dir.RESULTS_FILE).read_text())
    with open(out / run_dir.METRICS_FILE, newline="") as f:
        epochs = [[row["task"], row["epoch"], row["loss"], row["train_acc"], row["test_acc"], row["topology_updates"]]
                  for row in csv.DictReader(f)]
    return {"acc_matrix": results["acc_matrix"], "acc_matrix_agnostic": results["acc_matrix_agnostic"],
            "per_task": without_times(results["per_task"]), "epochs": epochs}


def run_command(name: str, data_dir: Path, out: Path) -> dict[str, Any]:
    """Run the command `name` on one thread: a CPU's results are bit-identical for one number of
    threads (the reductions of a convolution's gradient are split by thread), so the record and
    the test both use one."""
    argv = ["--data_dir", str(data_dir), "--no-download", "--device", "cpu", "--output_dir", str(out),
            *SMALL, *COMMANDS[name]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main("cifar100", argv) == 0, name
    finally:
        torch.set_num_threads(threads)
    return computed(out)


def record() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data")
        runs = {name: run_command(name, data, Path(tmp) / name) for name in COMMANDS}
    return {"written_by": {"commit": commit, "torch": torch.__version__}, "runs": runs}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} (else print)")
    args = parser.parse_args()
    golden = record()
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        json.dump(golden, sys.stdout, indent=1)
