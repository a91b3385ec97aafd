"""Memory per task: the mask store of a 20-task run, in the process and in the checkpoint.

`rss_growth_per_task_mb`: the store of a run is built as the training loop builds it (per task
a Masking at density 0.2 ERK over ResNet-18 with `TaskMasks.frozen_before(t)` frozen, then
`TaskMasks.add(masking.consolidate())`); after each task the garbage is collected and the
resident set size read (VmRSS of /proc/self/status, plus the CUDA allocator's bytes on a GPU).
Growth per task = (memory after the last task - after the first) / (tasks - 1), so one-time
allocations of the first task do not count.

`mask_bytes_per_task`: what one more task adds to the checkpoint: `torch.save` of the store's
`state_dict()` (bit-packed masks) with two tasks minus with one. Baseline: one task's mask
saved as float32 tensors, as the authors' code stores it.
"""

from __future__ import annotations

import ctypes
import gc
import io
import resource
from pathlib import Path

import torch

from benchmarks.report import Result, Row, mb
from benchmarks.workload import Workload
from sparselearning import TaskMasks

MB = 1e6


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's
    malloc_trim), so that the resident size counts live memory, not freed memory kept for reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the resident size may include freed memory


def resident_bytes(device: torch.device) -> int:
    """The process's resident memory now (peak where /proc is missing), plus CUDA tensors."""
    release_free_memory()
    cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 + cuda
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + cuda


def saved_bytes(state: object) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def store_of(masks: list[dict[str, torch.Tensor]]) -> TaskMasks:
    store = TaskMasks()
    for mask in masks:
        store.add(mask)
    return store


def run(work: Workload) -> Result:
    resident: list[int] = []
    store = work.mask_store(work.model(), work.repeats.rss_tasks,
                            after_each=lambda _: resident.append(resident_bytes(work.device)))
    growth = (resident[-1] - resident[0]) / (len(resident) - 1) / MB
    one, two = saved_bytes(store_of([store[0]]).state_dict()), saved_bytes(store_of([store[0], store[1]]).state_dict())
    per_task = two - one
    float32 = saved_bytes({name: mask.float() for name, mask in store[0].items()})
    weights = sum(mask.numel() for mask in store[0].values())
    rows = [Row("checkpoint bytes per task mask (bit-packed vs float32)", mb(per_task), mb(float32), per_task / float32,
                key="mask_bytes_per_task", checked=per_task),
            Row(f"resident memory growth per task ({len(resident)} tasks)", f"{growth:.2f} MB",
                key="rss_growth_per_task_mb", checked=growth)]
    figures = {"mask_bytes_per_task": per_task, "mask_bytes_float32_per_task": float32,
               "mask_state_dict_bytes_one_task": one, "maskable_weights": weights,
               "rss_growth_per_task_mb": growth, "rss_tasks": len(resident),
               "rss_mb_after_each_task": [r / MB for r in resident]}
    return Result(rows, figures)
