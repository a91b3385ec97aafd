"""Speed of the sparse core on the project's ResNet-18, measured side by side in one process.

    python benchmarks/bench_masking.py [--device cpu] [--steps 20] [--json out.json]

Prints, for this machine:
1. masked DST training step / dense training step (batch 64, 32x32, fused Adam as in the
   training loop), for a first task and for a later task with frozen weights, with and
   without weight decay (the exact restore path), and with torch's default (unfused) Adam;
   topology updates are excluded here and timed separately;
2. one full topology update (prune + grow on every layer) per growth mode, next to a
   sort-based update (full `torch.sort` per layer, as in the authors' code) as the baseline;
3. the size of one task's mask on disk, bit-packed vs float32.
Step timings alternate dense and masked steps and report medians, so a busy machine slows
both alike.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from sparselearning import GROWTH_MODES, Masking, TaskMasks  # noqa: E402
from utils.run_dir import device_name  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device_name(device)}, torch {torch.__version__}"
    return (f"{device_name(device)}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def make_masking(model, optimizer, *, growth="random", frozen=None, update_frequency=0, seed=0) -> Masking:
    masking = Masking(optimizer, density=0.1, sparse_init="ERK", growth=growth, update_frequency=update_frequency,
                      total_steps=10_000, frozen=frozen, seed=seed)
    masking.add_module(model)
    return masking


def first_task_masks(device: torch.device) -> dict[str, torch.Tensor]:
    """A finished first task's mask and consolidated weights, to freeze in a later task."""
    model = build_model("resnet18", 100).to(device)
    masking = make_masking(model, torch.optim.Adam(model.parameters()))
    return model, masking.consolidate()


def make_adam(model, weight_decay: float, fused: bool) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=weight_decay, fused=fused)


def time_steps(device, steps: int, weight_decay: float, frozen_task: bool, fused: bool) -> tuple[float, ...]:
    """Median seconds per training step, dense and masked, measured alternately, and of the
    bare optimizer step in each (Adam is slower over the zero state of masked-out weights)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (64,), device=device)
    if frozen_task:
        base, frozen = first_task_masks(device)
    else:
        base, frozen = build_model("resnet18", 100).to(device), None
    dense_model, sparse_model = copy.deepcopy(base), copy.deepcopy(base)
    dense_opt = make_adam(dense_model, weight_decay, fused)
    sparse_opt = make_adam(sparse_model, weight_decay, fused)
    masking = make_masking(sparse_model, sparse_opt, frozen=frozen, seed=1)

    def step(model, optimizer, masking=None) -> float:
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        (masking or optimizer).step()
        sync(device)
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: allocator, optimizer state
        step(dense_model, dense_opt)
        step(sparse_model, sparse_opt, masking)
    dense, sparse, dense_opt_step, sparse_opt_step = [], [], [], []
    for _ in range(steps):
        dense.append(step(dense_model, dense_opt))
        sparse.append(step(sparse_model, sparse_opt, masking))
        dense_opt_step.append(timed(dense_opt.step, device))  # the optimizer alone, on the
        sparse_opt_step.append(timed(sparse_opt.step, device))  # gradients it just used
    medians = [statistics.median(t) for t in (dense, sparse, dense_opt_step, sparse_opt_step)]
    return tuple(medians)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def sort_based_update(masking: Masking) -> None:
    """Baseline: magnitude death and gradient growth with a full sort per layer."""
    rate = masking.death_rate_at(masking.steps)
    with torch.no_grad():
        for name, p in masking.params.items():
            count = masking.counts[name]
            k = math.ceil(rate * count)
            if count == p.numel() or k == 0:
                continue
            mask = masking.masks[name].view(-1)
            magnitude = torch.where(mask, p.view(-1).abs(), math.inf)
            mask[torch.sort(magnitude).indices[:k]] = False
            scores = torch.where(mask, -math.inf, p.grad.view(-1).abs())
            mask[torch.sort(scores, descending=True).indices[:k]] = True


def time_updates(device, repeats: int) -> dict[str, float]:
    """Median seconds of one topology update per growth mode, and of the sort-based baseline."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (64,), device=device)
    results = {}
    for growth in (*GROWTH_MODES, "sort-based baseline"):
        model = build_model("resnet18", 100).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        masking = make_masking(model, optimizer, growth=growth if growth in GROWTH_MODES else "gradient")
        for _ in range(2):  # trained weights and running averages to rank
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            masking.step()
        optimizer.zero_grad()  # the dense gradient of a batch, as step() hands it to an update
        F.cross_entropy(model(x), y).backward()
        update = masking.update_topology if growth in GROWTH_MODES else (lambda m=masking: sort_based_update(m))
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            update()
            sync(device)
            times.append(time.perf_counter() - start)
        results[growth] = statistics.median(times)
    return results


def mask_file_sizes() -> tuple[int, int]:
    """Bytes of one ResNet-18 task mask on disk: bit-packed (ours) vs float32."""
    model = build_model("resnet18", 100)
    masking = make_masking(model, torch.optim.Adam(model.parameters()))
    store = TaskMasks()
    store.add(masking.consolidate())
    packed = io.BytesIO()
    torch.save(store.state_dict(), packed)
    float32 = io.BytesIO()
    torch.save({n: m.float() for n, m in store[0].items()}, float32)
    return packed.getbuffer().nbytes, float32.getbuffer().nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--repeats", type=int, default=5, help="timed topology updates per growth mode")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    report: dict = {"machine": machine(device)}
    print(f"machine: {report['machine']}")

    print("\ntraining step, ResNet-18 (11.2 M weights), batch 64, 32x32, fused Adam (as in training), density 0.1 ERK")
    report["step"] = {}
    settings = [("first task", 0.0, False, True), ("later task, frozen weights", 0.0, True, True),
                ("later task, weight decay 1e-4", 1e-4, True, True),
                ("first task, unfused Adam", 0.0, False, False)]
    for label, weight_decay, frozen_task, fused in settings:
        dense, sparse, dense_adam, sparse_adam = time_steps(device, args.steps, weight_decay, frozen_task, fused)
        report["step"][label] = {"dense_ms": dense * 1e3, "masked_ms": sparse * 1e3, "ratio": sparse / dense,
                                 "adam_dense_ms": dense_adam * 1e3, "adam_masked_ms": sparse_adam * 1e3}
        print(f"  {label:30s} dense {dense * 1e3:6.1f} ms  masked {sparse * 1e3:6.1f} ms  ratio {sparse / dense:.3f}"
              f"   (Adam.step alone: {dense_adam * 1e3:4.1f} vs {sparse_adam * 1e3:4.1f} ms)")

    print("\none topology update (prune + grow, all layers)")
    updates = time_updates(device, args.repeats)
    baseline = updates["sort-based baseline"]
    report["update_ms"] = {k: v * 1e3 for k, v in updates.items()}
    for growth, seconds in updates.items():
        print(f"  {growth:20s} {seconds * 1e3:8.1f} ms   {baseline / seconds:5.1f}x faster than sort-based")

    packed, float32 = mask_file_sizes()
    report["mask_bytes"] = {"bitpacked": packed, "float32": float32}
    print(f"\none task's mask on disk: {packed / 1e6:.2f} MB bit-packed vs {float32 / 1e6:.1f} MB float32 "
          f"({float32 / packed:.0f}x smaller)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
