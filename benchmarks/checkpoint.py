"""What saving costs: one save of the task in progress, its bytes, and the share of a run's wall
time that the default checkpoint policy spends saving.

The task in progress is `utils.train.TaskTraining` after one real epoch of the first task (the
run's Config: ResNet-18, fused Adam with its moments, the Masking at density 0.2 ERK, random
growth), saved exactly as a run saves it (`utils.run_dir.save_checkpoint`: torch.save to a
temporary file, fsync, rename) into a temporary folder; median of three saves. `--keep
best_train` keeps the one epoch done, which is the current state, so it is not saved twice.

`checkpoint_overhead`: the default policy saves the task in progress when at least
`--checkpoint_every` epochs and `--checkpoint_minutes` minutes have passed, so in steady state
one save falls in every max(every x epoch, minutes) of training: overhead = save seconds /
(that interval + save seconds). `checkpoint_overhead_every_epoch` is the same with
`--checkpoint_minutes 0` (a save after every epoch, the old default), for comparison.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks.report import Result, Row, mb
from benchmarks.timing import timed
from benchmarks.workload import Workload
from utils import run_dir
from utils.train import TaskTraining, train_epoch


def run(work: Workload) -> Result:
    config, task = work.config, work.tasks[0]
    training = TaskTraining(work.model(config.seed), task, None, config, work.accel)
    epoch_seconds = timed(lambda: training.end_epoch(*train_epoch(training, 0)), work.device)
    state = {"config": config.to_dict(), **training.state_dict()}
    with tempfile.TemporaryDirectory(prefix="benchmark-checkpoint-") as folder:
        path = Path(folder) / run_dir.PROGRESS_FILE
        save_seconds = statistics.median(timed(lambda: run_dir.save_checkpoint(path, state), work.device)
                                         for _ in range(3))
        size = path.stat().st_size
    interval = max(config.checkpoint_every * epoch_seconds, 60 * config.checkpoint_minutes)
    overhead = save_seconds / (interval + save_seconds)
    every_epoch = save_seconds / (epoch_seconds + save_seconds)
    rows = [
        Row(f"checkpoint of the task in progress ({mb(size)})", f"{save_seconds:.2f} s",
            f"{epoch_seconds:.2f} s epoch", every_epoch, key=None),
        Row(f"checkpoint share of wall time, default policy (every {config.checkpoint_every} epoch(s) and "
            f"{config.checkpoint_minutes:g} min)", f"{100 * overhead:.2f} %", "-", overhead, key="checkpoint_overhead",
            checked=overhead, derived=True),
    ]
    figures = {"checkpoint_bytes": size, "checkpoint_save_seconds": save_seconds,
               "checkpoint_epoch_seconds": epoch_seconds, "checkpoint_overhead": overhead,
               "checkpoint_overhead_every_epoch": every_epoch}
    return Result(rows, figures)
