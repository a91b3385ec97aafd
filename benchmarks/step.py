"""Training step: masked DST step / dense step of the same ResNet-18 (batch 64, 32x32, fused
Adam from the training loop's `make_optimizer`, Masking at density 0.2 ERK).

The headline (`step_overhead`) is a later task: the first task's mask is frozen, as for tasks
2..T of a run. Also shown, without target: a first task, a later task with weight decay (the
path that puts frozen weights back after the step) and torch's default unfused Adam. Dense and
masked steps alternate, each on its own copy of the model, on one fixed batch; no topology
update happens here (see `topology`). After each step the optimizer step alone is timed again
on the gradients it just used, to show where a difference comes from. On CUDA the headline is
measured again for each layout setting (`layouts`: channels_last input batches on/off x
cudnn.benchmark on/off), the figures that decide the defaults of those two flags.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from benchmarks.report import NOT_ON_CPU, Result, Row
from benchmarks.timing import alternating_medians
from benchmarks.workload import Workload


@dataclass(frozen=True)
class Setting:
    label: str
    later_task: bool
    weight_decay: float = 0.0
    fused: bool = True


HEADLINE = Setting("later task, frozen weights", later_task=True)
OTHERS = (Setting("first task", later_task=False),
          Setting("later task, weight decay 1e-4", later_task=True, weight_decay=1e-4),
          Setting("first task, unfused Adam", later_task=False, fused=False))


def first_task(work: Workload) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model after a finished first task, and that task's mask (to freeze in the next)."""
    model = work.model()
    masking = work.masking(model, work.optimizer(model))
    return model, masking.consolidate()


def step_times(work: Workload, setting: Setting, rounds: int,
               first: tuple[nn.Module, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Median milliseconds of the dense and the masked step, and of their optimizer steps alone;
    a later task freezes the mask of `first` (the model after the first task, and its mask)."""
    base, frozen = first if setting.later_task else (work.model(), None)
    dense, sparse = copy.deepcopy(base), copy.deepcopy(base)

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        if setting.fused:
            return work.optimizer(model, l2=setting.weight_decay)
        return torch.optim.Adam(model.parameters(), lr=work.config.lr, weight_decay=setting.weight_decay)

    dense_opt, sparse_opt = optimizer(dense), optimizer(sparse)
    masking = work.masking(sparse, sparse_opt, frozen=frozen, seed=1)
    batch = work.fixed_batch()
    fns: list[Callable[[], object]] = [work.training_step(dense, dense_opt, batch), dense_opt.step,
                                       work.training_step(sparse, sparse_opt, batch, masking), sparse_opt.step]
    seconds = alternating_medians(fns, work.device, repeats=rounds)
    names = ("dense_ms", "adam_dense_ms", "masked_ms", "adam_masked_ms")
    return {name: s * 1e3 for name, s in zip(names, seconds)}


def run(work: Workload) -> Result:
    result, first = Result(), first_task(work)
    by_setting = {}
    for setting in (HEADLINE, *OTHERS) if work.repeats.step_other_settings else (HEADLINE,):
        rounds = work.repeats.step_rounds if setting is HEADLINE else max(2, work.repeats.step_rounds // 3)
        times = step_times(work, setting, rounds, first)
        ratio = times["masked_ms"] / times["dense_ms"]
        by_setting[setting.label] = {**times, "ratio": ratio, "rounds": rounds}
        result.rows.append(Row(f"step, {setting.label} (masked vs dense)", f"{times['masked_ms']:.1f} ms",
                               f"{times['dense_ms']:.1f} ms", ratio,
                               key="step_overhead" if setting is HEADLINE else None, checked=ratio))
    headline = by_setting[HEADLINE.label]
    layout_rows, by_layout = layouts(work, first)
    result.rows += layout_rows
    result.figures = {"step_overhead": headline["ratio"], "step_dense_ms": headline["dense_ms"],
                      "step_masked_ms": headline["masked_ms"], "step_by_setting": by_setting,
                      "step_by_layout": by_layout}
    return result


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """`torch.backends.cudnn.benchmark` set to `on` inside, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def layouts(work: Workload, first: tuple[nn.Module, dict[str, torch.Tensor]]) -> tuple[list[Row], dict | None]:
    """The headline step (dense and masked) with input batches channels_last or not, and cuDNN
    autotuning (`cudnn.benchmark`) on or off: the figures that decide the CUDA defaults of
    `--channels_last` and `--cudnn_benchmark`. CUDA only (None and an "n/a (cpu)" row elsewhere)."""
    if work.device.type != "cuda":
        return [Row("step by layout (channels_last, cudnn.benchmark)", NOT_ON_CPU)], None
    rows, figures = [], {}
    for channels_last, autotune in itertools.product((True, False), (False, True)):
        accel = dataclasses.replace(work.accel, channels_last=channels_last, cudnn_benchmark=autotune)
        label = f"channels_last {'on' if channels_last else 'off'}, cudnn.benchmark {'on' if autotune else 'off'}"
        with cudnn_benchmark(autotune):
            times = step_times(dataclasses.replace(work, accel=accel), HEADLINE, work.repeats.step_rounds, first)
        ratio = times["masked_ms"] / times["dense_ms"]
        figures[label] = {**times, "ratio": ratio, "channels_last": channels_last, "cudnn_benchmark": autotune}
        rows.append(Row(f"step, {label} (masked vs dense)", f"{times['masked_ms']:.1f} ms",
                        f"{times['dense_ms']:.1f} ms", ratio))
    return rows, figures
