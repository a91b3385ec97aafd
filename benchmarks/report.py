"""Targets, the rows of the printed table and what each measurement family hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Target:
    """A bound on one figure: `value <= bound`, or `value >= bound` when `at_least`; shown
    divided by `scale`, followed by `unit`."""

    bound: float
    at_least: bool = False
    unit: str = ""
    scale: float = 1.0

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def __str__(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound / self.scale:g}{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {"op": ">=" if self.at_least else "<=", "value": self.bound}


# The JSON key of each headline figure and the target it must meet on a 2-core CPU.
TARGETS: dict[str, Target] = {
    "data_speedup": Target(10, at_least=True, unit="x"),
    "step_overhead": Target(1.03),
    "topology_ms": Target(100, unit=" ms"),
    "epoch_overhead": Target(1.10),
    "eval_overhead": Target(1.15),
    "mask_bytes_per_task": Target(1.5e6, unit=" MB", scale=1e6),
    "rss_growth_per_task_mb": Target(2, unit=" MB"),
    "checkpoint_overhead": Target(0.02),
}

# On CUDA: where a launch-bound step leaves relative overheads larger, the masked step and the
# epoch get more room, the whole run's training throughput is held against bare dense steps, and
# the training step must never wait for the GPU. (The whole run is informative on a CPU.)
CUDA_TARGETS: dict[str, Target] = {
    **TARGETS,
    "step_overhead": Target(1.10),
    "epoch_overhead": Target(1.15),
    "run_overhead": Target(1.15),
    "syncs_per_step": Target(0),
}


def targets_for(device: torch.device) -> dict[str, Target]:
    """The targets a run on `device` is held against: CUDA's on a GPU, the CPU's elsewhere."""
    return CUDA_TARGETS if device.type == "cuda" else TARGETS


@dataclass(frozen=True)
class Row:
    """One line of the table. `checked` is the number held against the target of `key`
    (the ratio for relative figures, ours for absolute ones); rows without a key only inform.
    `derived`: `ours` is computed from measurements (a share, a recommendation), not measured
    itself, so a --quick run shows it as n/a, like the ratio."""

    measurement: str
    ours: str
    baseline: str = "-"
    ratio: float | None = None
    key: str | None = None
    checked: float | None = None
    derived: bool = False

    def target(self, targets: dict[str, Target]) -> Target | None:
        return targets.get(self.key) if self.key else None

    def verdict(self, targets: dict[str, Target]) -> str:
        """pass or FAIL against the row's target in `targets`; "" without target or figure."""
        target = self.target(targets)
        if target is None or self.checked is None:
            return ""
        return "pass" if target.met(self.checked) else "FAIL"


@dataclass
class Result:
    """What one measurement family found: table rows and the figures for the JSON file."""

    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


QUICK_VERDICT = "n/a (quick)"  # a --quick run's small sizes make no figure: ratios, shares, K, pass/fail
NOT_ON_CPU = "n/a (cpu)"  # a figure that exists on CUDA only (JSON: null)
QUICK_REASON = ("--quick: smoke-test sizes (few repeats, tiny batches), so ratios, shares, the recommended K and "
                "pass/fail mean nothing: null here, measured by a run without --quick")
# The JSON figures derived from measurements (plus every nested "ratio"): null in a --quick run.
DERIVED = ("data_speedup", "step_overhead", "epoch_overhead", "eval_overhead", "run_overhead", "checkpoint_overhead",
           "checkpoint_overhead_every_epoch", "concurrent_recommended_k")


def without_derived(figures: dict[str, Any]) -> dict[str, Any]:
    """`figures` with every derived figure (DERIVED, and "ratio" at any depth) set to None."""
    def clear(value: Any, key: str | None = None) -> Any:
        if key == "ratio" or key in DERIVED:
            return None
        if isinstance(value, dict):
            return {k: clear(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clear(v) for v in value]
        return value
    return clear(figures)


def format_table(rows: list[Row], quick: bool = False, targets: dict[str, Target] = TARGETS) -> str:
    header = ("measurement", "ours", "baseline", "ratio", "target", "pass/fail")
    cells = [header] + [
        (r.measurement, QUICK_VERDICT if quick and r.derived else r.ours, r.baseline,
         "-" if r.ratio is None else QUICK_VERDICT if quick else f"{r.ratio:.3f}",
         str(r.target(targets)) if r.target(targets) else "-",
         QUICK_VERDICT if quick and r.verdict(targets) else r.verdict(targets))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdicts(rows: list[Row], quick: bool = False, targets: dict[str, Target] = TARGETS) -> dict[str, bool | None]:
    """Per target key: whether every row checked against it met it (None for a --quick run)."""
    passed: dict[str, bool | None] = {}
    for row in rows:
        if verdict := row.verdict(targets):
            passed[row.key] = None if quick else passed.get(row.key, True) and verdict == "pass"
    return passed


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"
