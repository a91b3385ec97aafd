"""One of K concurrent training processes of `benchmarks.concurrent` (not a benchmark itself).

    python -m benchmarks.worker --device cuda --steps 200 --batch 64

Trains ResNet-18 (100 classes) with a Masking at density 0.2 ERK and fused Adam on one fixed
batch already on the device: the masked training step of a run, without its data loading. After
its warm-up steps it prints "ready" and waits for a line "go" on stdin (so that K processes
start timing together; end of input aborts it), then times `--steps` steps and prints one JSON
line: {"samples": [[wall-clock seconds, images done], ...]}, a sample every `--sample_every`
steps, each taken after the device finished the queued work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks.timing import sync
from models import build_model
from sparselearning import Masking
from utils.acceleration import Acceleration

CLASSES = 100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before 'ready'")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample_every", type=int, default=10, help="steps between two samples")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    return parser.parse_args(argv)


def masked_step(device: torch.device, batch: int, total_steps: int):
    """One masked training step of a fresh ResNet-18 on one fixed random batch, ready to call."""
    accel = Acceleration.for_device(device)
    torch.manual_seed(0)
    model = accel.prepare(build_model("resnet18", CLASSES).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    masking = Masking(optimizer, density=0.2, sparse_init="ERK", update_frequency=0, total_steps=total_steps, seed=0)
    masking.add_module(model)
    memory_format = torch.channels_last if accel.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        masking.step()

    return step


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = masked_step(device, args.batch, args.warmup + args.steps)
    for _ in range(args.warmup):
        step()
    sync(device)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    samples = [(time.time(), 0)]
    for i in range(1, args.steps + 1):
        step()
        if i % args.sample_every == 0 or i == args.steps:
            sync(device)
            samples.append((time.time(), i * args.batch))
    print(json.dumps({"samples": samples}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
