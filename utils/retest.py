"""Test a finished run again, from its checkpoint: other task-inference methods, other test batch sizes.

    python -m utils.retest RUN_DIR [--methods confidence entropy oneshot calibrated] [--test_batch_sizes 16 64 128]
                           [--device cpu] [--data_dir DIR] [--out FILE]

With isolation, task j's network never changes after task j: the final checkpoint (the shared
weights and every task's mask) holds every network the run tested, so both accuracy matrices
(task id given, and hidden: `utils.task_inference`) can be measured again without training, with
the same data, exactly as the run measured them. BatchNorm normalizes with each test batch's
statistics, so the test batch size changes both. `calibrated` measures each network on its task's
training images again (read from the run's data, as its test images are), in batches of each test
batch size, as a run does right after each task. Prints one table (method x test batch size) and
writes every matrix to --out (default: RUN_DIR/retest.json), atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from data import DataError, TensorLoader
from models import build_model
from sparselearning import TaskMasks
from utils import run_dir
from utils.acceleration import Acceleration, switches_restored
from utils.cli import Config, OneLineParser, parse_config
from utils.errors import UserError
from utils.evaluation import EvaluatedNetworks, evaluate_row
from utils.experiment import build_tasks
from utils.metrics import average_bwt, final_accuracy
from utils.task_inference import INFERENCE_METHODS, TaskInference
from utils.train import Task

log = logging.getLogger(__name__)


def saved_run(directory: Path, device: str | None, data_dir: Path | None) -> tuple[Config, dict[str, Any]]:
    """The config a run in `directory` was made with (its device and data folder replaced when
    given) and its final checkpoint; UserError if it cannot be tested again exactly."""
    path = directory / run_dir.CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {run_dir.CHECKPOINT_FILE} (not a run directory, or no task finished yet)")
    state = run_dir.read_run_file(path)
    if isinstance(state, run_dir.Damaged) or "config" not in state:
        raise UserError(f"{path}: not a checkpoint of this program, or cut short")
    saved = state["config"]
    if not (saved.get("sparse") and saved.get("isolate")):
        raise UserError(f"{directory}: only an isolated sparse run keeps every task's network in its last checkpoint")
    flags = ["--data_dir", str(data_dir or saved["data_dir"]), "--device", device or saved["device"]]
    base = parse_config(flags, saved["dataset"])
    fields = {field.name for field in dataclasses.fields(Config)} - {"data_dir", "device", "output_dir"}
    recorded = {key: Path(value) if key == "data_dir" else value for key, value in saved.items() if key in fields}
    return dataclasses.replace(base, **recorded, output_dir=directory), state


def matching_tasks(config: Config, recorded: dict[str, Any]) -> list[Task]:
    """The run's tasks, read again; UserError if the data differs from the run's."""
    tasks = build_tasks(config)
    expected = recorded.get(run_dir.FINGERPRINT)
    if expected is not None and run_dir.data_fingerprint(tasks) != expected:
        raise UserError(f"the data in {config.data_dir} is not the data this run was trained on (--data_dir)")
    return tasks


def retest(config: Config, state: dict[str, Any], tasks: list[Task], methods: Sequence[str],
           batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Both accuracy matrices of the tasks the checkpoint finished, per test batch size and method."""
    accel = Acceleration.for_device(config.device, amp=config.amp, channels_last=config.channels_last,
                                    deterministic=config.deterministic)  # as tested
    accel.apply()
    model = build_model(config.net_name, config.num_classes, config.net_width).to(accel.device)
    model.load_state_dict(state["model"])
    task_masks = TaskMasks.from_state_dict(state["task_masks"], accel.device)
    done, classes = len(task_masks), [task.classes for task in tasks]
    results = []
    for size in batch_sizes:
        loaders = [TensorLoader(task.test, batch_size=size, train=False, device=accel.device,
                                channels_last=accel.channels_last) for task in tasks]
        tested = EvaluatedNetworks()
        final_row = evaluate_row(model, task_masks, classes, loaders, done - 1, mode=config.eval,
                                 autocast=accel.autocast, tested=tested)[:done]
        calibration: dict[int, float] = {}  # measured once per test batch size, shared by the methods
        for method in methods:
            inference = TaskInference(method, config.eval, accel.autocast, tested)
            if inference.needs_training_images:
                if not calibration:
                    calibrate(inference, model, task_masks, tasks[:done], size, accel)
                    calibration.update(inference.calibration)
                inference.calibration = dict(calibration)
            rows = [inference.row(model, task_masks, classes, loaders, i) for i in range(done)]
            agnostic = np.array([row.accuracy[:done] for row in rows])
            results.append({
                "method": method, "test_batch_size": size, "tasks": done, "acc": float(final_row.mean()),
                "acc_final_row": final_row.tolist(), "acc_agnostic": final_accuracy(agnostic),
                "bwt_agnostic": average_bwt(agnostic), "task_id_accuracy": [row.task_id_accuracy for row in rows],
                "seconds": sum(row.seconds for row in rows),
                "forward_passes": sum(row.forward_passes for row in rows),
                "backward_passes": sum(row.backward_passes for row in rows),
                "acc_matrix_agnostic": [[None if np.isnan(v) else float(v) for v in row] for row in agnostic]})
            log.info("test batches of %d, %s: task-agnostic ACC %.2f %%", size, method, results[-1]["acc_agnostic"])
    return results


def calibrate(inference: TaskInference, model: nn.Module, task_masks: TaskMasks, tasks: Sequence[Task],
              batch_size: int, accel: Acceleration) -> None:
    """Calibrate each finished task's network on its task's training images, as the run did right
    after training it: with isolation its network has not changed since."""
    for task in tasks:
        train = TensorLoader(task.train, batch_size=batch_size, train=False, device=accel.device,
                             channels_last=accel.channels_last)
        inference.calibrate(model, task_masks, task.index, task.classes, train)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per method and test batch size."""
    lines = ["| method | test batch | ACC (task id given) | ACC (task id inferred) | BWT (inferred) | "
             "task found, last row | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['test_batch_size']} | {r['acc']:.2f} | {r['acc_agnostic']:.2f} | "
                     f"{r['bwt_agnostic']:.2f} | {r['task_id_accuracy'][-1]:.1f} % | {r['seconds']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m utils.retest", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's output directory (holding checkpoint.pt)")
    parser.add_argument("--methods", nargs="+", choices=INFERENCE_METHODS[1:], default=list(INFERENCE_METHODS[1:]))
    parser.add_argument("--test_batch_sizes", nargs="+", type=int, default=[16, 64, 128])
    parser.add_argument("--device", help="where to test (default: the run's device)")
    parser.add_argument("--data_dir", type=Path, help="where the run's dataset is (default: the run's --data_dir)")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: RUN_DIR/retest.json)")
    return parser.parse_args(argv)


def is_retest_file(data: Any) -> bool:
    """Whether `data` (a parsed JSON file) is what this program writes."""
    return isinstance(data, dict) and set(data) == {"run", "config", "results"} and isinstance(data["results"], list)


def check_out(out: Path) -> None:
    """UserError unless `out` may be written: absent, or a retest file this program wrote."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name (e.g. {out / 'retest.json'})")
    if out.exists():
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError):
            data = None
        if not is_retest_file(data):
            raise UserError(f"{out} exists and was not written by utils.retest: not replaced; move it or give --out FILE")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        if min(args.test_batch_sizes) < 2:
            raise UserError("--test_batch_sizes: a batch needs at least 2 images (BatchNorm uses batch statistics)")
        out = args.out or args.run_dir / "retest.json"
        check_out(out)
        config, state = saved_run(args.run_dir, args.device, args.data_dir)
        tasks = matching_tasks(config, state["config"])
        with switches_restored():  # the GPU's determinism switches, for the retest only
            results = retest(config, state, tasks, args.methods, args.test_batch_sizes)
        check_out(out)  # again: the retest may have taken hours
        run_dir.write_json(out, {"run": str(args.run_dir), "config": config.to_dict(), "results": results})
    except (UserError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
