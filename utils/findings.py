"""The paper's three findings, tested on a study's runs.

    python -m utils.findings RUNS_DIR [--out DIR]      # findings.md and findings.json

The findings (Yildirim et al., CPAL 2024, abstract):

1. At low sparsity, ERK initialization learns the tasks better than uniform.
2. At high sparsity (unless extreme), uniform initialization is more reliable than ERK.
3. The best growth strategy depends on the initialization and on the sparsity level.

Each is stated as a comparison on the isolated dynamic-sparse runs of one benchmark (dataset x
tasks x classes per task) and given a verdict: "agrees", "disagrees" or "not resolved at this
scale", never rounded towards the paper.

- 1 and 2: ERK minus uniform final ACC at each density, paired by growth and seed: the mean and
  its 95 % t interval. Finding 1 is tested at 80 % sparsity, finding 2 at 90 % and 95 %. At a
  density the sign the paper states agrees (or disagrees) when the interval excludes 0, else it
  is not resolved; a finding agrees when every density tested agrees, disagrees when one
  disagrees, and is not resolved otherwise.
- 3: per init x density, each growth's final ACC (mean, std over seeds) ranked. A cell's best
  growth is clear when its mean beats the runner-up's by more than the larger of the two seed
  spreads (std). The finding agrees when two cells have different clear bests; it disagrees when
  every cell has the same clear best; otherwise (no clear best anywhere, or the same one where
  there is one) it is not resolved.

Beyond the paper: each cell's task-agnostic ACC and the accuracy of finding the task (runs made
with `--task_inference`), and the capacity figure behind finding 1: per task, the fraction of
the backbone's weights the task reuses from earlier tasks, adds new, and leaves free. And adaptive
DST's policies (`--erk_power`, `--growth_later`, `--turnover_stop`) against the best fixed init x
growth at each sparsity, paired by seed: "better", "worse" or "not resolved at this scale".
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from utils.cli import OneLineParser
from utils.errors import UserError
from utils.report import ADAPTIVE, GRID, Run, adaptive_label, find_runs, format_percent, sparsity_percent, table_row
from utils.run_dir import write_text

AGREES, DISAGREES, NOT_RESOLVED, NOT_TESTED = "agrees", "disagrees", "not resolved at this scale", "not tested"
BETTER, WORSE = "better", "worse"  # an adaptive policy against the best fixed setting
LOW_SPARSITY = (80.0,)  # finding 1: ERK better
HIGH_SPARSITY = (90.0, 95.0)  # finding 2: uniform better
CONFIDENCE = 0.95


# ---- statistics ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with `df` degrees of freedom, by
    bisection on its CDF (Simpson's rule on the density): exact to about 1e-6."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, steps: int = 2000) -> float:  # 0.5 + integral of the density from 0 to x
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + h / 3 * (density(0.0) + inner + density(x))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences with its two-sided t interval (None bounds: fewer than 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def sign(self) -> int:
        """+1 or -1 when the interval excludes 0, else 0."""
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def text(self) -> str:
        if self.low is None:
            return f"{self.mean:+.2f} (n={self.n}, no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n})"


def mean_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return Interval(mean, None, None, n)
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


# ---- the runs --------------------------------------------------------------------------------

def grid_runs(runs: Sequence[Run], kind: float = GRID) -> dict[tuple[str, int, int], list[Run]]:
    """The complete isolated dynamic-sparse runs of the paper's grid (or, with `kind` ADAPTIVE,
    of adaptive DST's policies), by benchmark."""
    found: dict[tuple[str, int, int], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "complete" and table_row(run.config)[0][0] == kind:
            found[run.benchmark].append(run)
    return dict(found)


def acc_by(runs: Sequence[Run], *keys: str) -> dict[tuple, dict[int, float]]:
    """Final ACC by (sparsity, *config keys) and then by seed."""
    table: dict[tuple, dict[int, float]] = defaultdict(dict)
    for run in runs:
        table[(sparsity_percent(run.config), *(run.config[key] for key in keys))][run.config["seed"]] = run.results["acc"]
    return table


def paired(a: dict[Any, float], b: dict[Any, float]) -> list[float]:
    """a - b over the keys both have, in key order."""
    return [a[key] - b[key] for key in sorted(set(a) & set(b))]


# ---- findings 1 and 2 ------------------------------------------------------------------------

def init_comparison(runs: Sequence[Run]) -> dict[float, Interval]:
    """ERK minus uniform final ACC per sparsity, paired by growth and seed."""
    by = acc_by(runs, "sparse_init", "growth")
    result = {}
    for sparsity in sorted({key[0] for key in by}):
        erk = {(g, s): acc for (sp, init, g), seeds in by.items() if sp == sparsity and init == "ERK"
               for s, acc in seeds.items()}
        uniform = {(g, s): acc for (sp, init, g), seeds in by.items() if sp == sparsity and init == "uniform"
                   for s, acc in seeds.items()}
        differences = paired(erk, uniform)
        if differences:
            result[sparsity] = mean_interval(differences)
    return result


def init_verdict(comparison: dict[float, Interval], sparsities: Sequence[float], expected_sign: int) -> str:
    signs = [comparison[s].sign for s in sparsities if s in comparison]
    if not signs:
        return NOT_TESTED
    if any(sign == -expected_sign for sign in signs):
        return DISAGREES
    return AGREES if all(sign == expected_sign for sign in signs) else NOT_RESOLVED


# ---- finding 3 -------------------------------------------------------------------------------

@dataclass(frozen=True)
class GrowthCell:
    """One init x sparsity: each growth's (name, mean, std, n) final ACC, best first."""

    init: str
    sparsity: float
    ranking: list[tuple[str, float, float | None, int]]

    @property
    def clear_best(self) -> str | None:
        """The best growth if its mean beats the runner-up's by more than the larger of their two
        seed spreads (sample std), else None (also with one growth, or a single seed)."""
        if len(self.ranking) < 2:
            return None
        (best, mean, std, _), (_, second_mean, second_std, _) = self.ranking[:2]
        if std is None or second_std is None:
            return None
        return best if mean - second_mean > max(std, second_std) else None


def growth_cells(runs: Sequence[Run]) -> list[GrowthCell]:
    """Every init x sparsity's growth ranking."""
    by = acc_by(runs, "sparse_init", "growth")
    cells = []
    for sparsity, init in sorted({(key[0], key[1]) for key in by}):
        seeds = [(g, list(v.values())) for (sp, i, g), v in by.items() if (sp, i) == (sparsity, init)]
        ranking = sorted(((g, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))
                          for g, v in seeds), key=lambda row: -row[1])
        cells.append(GrowthCell(init, sparsity, ranking))
    return cells


def growth_verdict(cells: Sequence[GrowthCell]) -> tuple[str, str]:
    """The verdict on finding 3 and the evidence for it, in words."""
    if len(cells) < 2:
        return NOT_TESTED, "fewer than two init x sparsity cells"
    clear = [(cell, cell.clear_best) for cell in cells if cell.clear_best is not None]
    where = "; ".join(f"{cell.init}, {format_percent(cell.sparsity)}: {best}" for cell, best in clear) or "none"
    if len({best for _, best in clear}) > 1:
        return AGREES, f"the best growth, where it beats the runner-up beyond the seed spread, differs ({where})"
    if len(clear) == len(cells):
        return DISAGREES, f"{clear[0][1]} is the best growth in every cell, beyond the seed spread"
    return NOT_RESOLVED, (f"the best growth beats the runner-up beyond the seed spread in {len(clear)} of "
                          f"{len(cells)} cells ({where}), always the same")


# ---- beyond the paper ------------------------------------------------------------------------

def agnostic_cells(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per init x growth x sparsity with task inference: task-agnostic ACC and the accuracy of
    finding the task in the last row (mean, std, n)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.results.get("acc_agnostic") is not None:
            groups[(run.config["sparse_init"], run.config["growth"], sparsity_percent(run.config))].append(run)
    rows = []
    for (init, growth, sparsity), members in sorted(groups.items()):
        agnostic = [run.results["acc_agnostic"] for run in members]
        found = [run.results["task_id_accuracy"][-1] for run in members if run.results.get("task_id_accuracy")]
        rows.append({"init": init, "growth": growth, "sparsity": sparsity, "method": members[0].config.get("task_inference", "?"),
                     "acc_agnostic": summary(agnostic), "task_found_last_row": summary(found) if found else None})
    return rows


def capacity_cells(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per init x sparsity, per task (mean over growths and seeds): percent of the backbone's
    weights reused by the task from earlier tasks, new in it, and still free after it."""
    groups: dict[tuple, list[list[dict[str, Any]]]] = defaultdict(list)
    for run in runs:
        per_task = run.results.get("per_task", [])
        if per_task and all("capacity_used" in task for task in per_task):
            groups[(run.config["sparse_init"], sparsity_percent(run.config))].append(per_task)
    rows = []
    for (init, sparsity), members in sorted(groups.items()):
        tasks = min(len(per_task) for per_task in members)
        reused, new, free = [], [], []
        for t in range(tasks):
            before = [per_task[t - 1]["capacity_used"] if t else 0.0 for per_task in members]
            reused.append(100 * statistics.fmean(p[t]["capacity_reused"] for p in members))
            new.append(100 * statistics.fmean(p[t]["capacity_used"] - b for p, b in zip(members, before)))
            free.append(100 * statistics.fmean(p[t]["capacity_free"] for p in members))
        rows.append({"init": init, "sparsity": sparsity, "runs": len(members), "reused": reused, "new": new,
                     "free": free})
    return rows


def policy_comparison(grid: Sequence[Run], adaptive: Sequence[Run]) -> list[dict[str, Any]]:
    """Per adaptive policy (a report row) and sparsity: its final ACC minus that of the best fixed
    init x growth at that sparsity (the grid cell with the highest mean), paired by seed, with a
    95 % t interval and a verdict: better or worse when the interval excludes 0, else not resolved.
    The best cell is picked on the same seeds, which favours it a little (its mean is the largest
    of eight noisy means)."""
    fixed = acc_by(grid, "sparse_init", "growth")
    policies: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    for run in adaptive:
        policies[(adaptive_label(run.config), sparsity_percent(run.config))][run.config["seed"]] = run.results["acc"]
    rows = []
    for (label, sparsity), seeds in sorted(policies.items(), key=lambda item: (item[0][1], item[0][0])):
        cells = {(init, growth): v for (sp, init, growth), v in fixed.items() if sp == sparsity}
        if not cells:
            continue
        best = max(cells, key=lambda cell: statistics.fmean(cells[cell].values()))
        differences = paired(seeds, cells[best])
        if not differences:
            continue
        interval = mean_interval(differences)
        verdict = {1: BETTER, -1: WORSE, 0: NOT_RESOLVED}[interval.sign]
        rows.append({"policy": label, "sparsity": sparsity, "acc": summary(list(seeds.values())),
                     "best_fixed": " + ".join(best), "best_fixed_acc": summary(list(cells[best].values())),
                     "difference": asdict(interval), "verdict": verdict})
    return rows


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


# ---- all of it -------------------------------------------------------------------------------

def analyze_benchmark(runs: Sequence[Run], adaptive: Sequence[Run] = ()) -> dict[str, Any]:
    """The three findings' comparisons and verdicts, and the figures beyond the paper, for the
    grid runs of one benchmark; adaptive DST's runs against the best fixed settings."""
    inits = init_comparison(runs)
    cells = growth_cells(runs)
    verdict3, evidence3 = growth_verdict(cells)
    return {
        "finding1": {"verdict": init_verdict(inits, LOW_SPARSITY, +1), "sparsities": list(LOW_SPARSITY)},
        "finding2": {"verdict": init_verdict(inits, HIGH_SPARSITY, -1), "sparsities": list(HIGH_SPARSITY)},
        "erk_minus_uniform": {str(s): asdict(interval) for s, interval in inits.items()},
        "finding3": {"verdict": verdict3, "evidence": evidence3},
        "growth_cells": [{**asdict(cell), "clear_best": cell.clear_best} for cell in cells],
        "agnostic": agnostic_cells(runs),
        "capacity": capacity_cells(runs),
        "policies": policy_comparison(runs, adaptive),
        "runs": len(runs),
    }


def analyze(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """`analyze_benchmark` for every benchmark with grid runs, keyed by its title."""
    adaptive = grid_runs(runs, ADAPTIVE)
    return {benchmark_title_of(benchmark): analyze_benchmark(members, adaptive.get(benchmark, []))
            for benchmark, members in sorted(grid_runs(runs).items())}


def benchmark_title_of(benchmark: tuple[str, int, int]) -> str:
    dataset, tasks, per_task = benchmark
    return f"{dataset}, {tasks} tasks x {per_task} classes"


def format_markdown(findings: dict[str, dict[str, Any]]) -> str:
    """findings.md: per benchmark, the three verdicts with their numbers, then the tables."""
    parts = ["# Findings of the paper, tested", "",
             f"Intervals: 95 % t intervals of paired differences (ACC points). Verdicts: {AGREES}, {DISAGREES}, "
             f"{NOT_RESOLVED} (see utils/findings.py for the rules). A growth's best is clear when it beats the "
             "runner-up by more than their seed spread (std)."]
    for title, f in findings.items():
        parts += ["", f"## {title} ({f['runs']} grid runs)", ""]
        differences = f["erk_minus_uniform"]
        parts.append("| sparsity | ERK - uniform final ACC |")
        parts.append("|---:|---:|")
        for sparsity, interval in differences.items():
            parts.append(f"| {format_percent(float(sparsity))} | {Interval(**interval).text()} |")
        parts += ["",
                  f"1. ERK better at low sparsity ({', '.join(format_percent(s) for s in LOW_SPARSITY)}): "
                  f"**{f['finding1']['verdict']}**",
                  f"2. uniform better at high sparsity ({', '.join(format_percent(s) for s in HIGH_SPARSITY)}): "
                  f"**{f['finding2']['verdict']}**",
                  f"3. the best growth depends on init and sparsity: **{f['finding3']['verdict']}** "
                  f"({f['finding3']['evidence']})", "",
                  "| init | sparsity | growths, best first: mean ± std (n) | clear best |", "|---|---:|---|---|"]
        for cell in f["growth_cells"]:
            ranked = ", ".join(f"{g} {m:.2f}" + (f" ± {s:.2f}" if s is not None else "") + f" ({n})"
                               for g, m, s, n in cell["ranking"])
            parts.append(f"| {cell['init']} | {format_percent(cell['sparsity'])} | {ranked} | {cell['clear_best'] or '-'} |")
        if f["agnostic"]:
            parts += ["", "Task id hidden (beyond the paper):", "",
                      "| init + growth | sparsity | method | task-agnostic ACC | task found, last row (%) |",
                      "|---|---:|---|---:|---:|"]
            for row in f["agnostic"]:
                found = row["task_found_last_row"]
                parts.append(f"| {row['init']} + {row['growth']} | {format_percent(row['sparsity'])} | {row['method']} | "
                             f"{format_summary(row['acc_agnostic'])} | {format_summary(found) if found else 'n/a'} |")
        if f.get("policies"):
            parts += ["", "Adaptive DST (beyond the paper) against the best fixed init + growth at each sparsity, "
                      "paired by seed:", "",
                      "| policy | sparsity | ACC | best fixed | its ACC | difference | verdict |",
                      "|---|---:|---:|---|---:|---:|---|"]
            for row in f["policies"]:
                parts.append(f"| {row['policy']} | {format_percent(row['sparsity'])} | {format_summary(row['acc'])} | "
                             f"{row['best_fixed']} | {format_summary(row['best_fixed_acc'])} | "
                             f"{Interval(**row['difference']).text()} | **{row['verdict']}** |")
        if f["capacity"]:
            parts += ["", "Backbone capacity per task, % of weights, mean over growths and seeds "
                      "(reused from earlier tasks / new / free after the task):", ""]
            for row in f["capacity"]:
                per_task = "; ".join(f"{r:.1f}/{n:.1f}/{fr:.1f}" for r, n, fr in zip(row["reused"], row["new"], row["free"]))
                parts.append(f"- {row['init']}, {format_percent(row['sparsity'])} sparse ({row['runs']} runs): {per_task}")
    return "\n".join(parts) + "\n"


def format_summary(s: dict[str, Any]) -> str:
    return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "") + f" (n={s['n']})"


def write_findings(root: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Analyze the runs below `root`; write findings.md and findings.json into `out`."""
    findings = analyze(find_runs(root))
    if not findings:
        raise UserError(f"no complete isolated dynamic-sparse runs below {root}: nothing to test the findings on")
    write_text(out / "findings.md", format_markdown(findings))
    write_text(out / "findings.json", json.dumps(findings, indent=1) + "\n")
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m utils.findings",
                           description="The paper's three findings tested on the runs below RUNS_DIR.")
    parser.add_argument("root", metavar="RUNS_DIR", type=Path)
    parser.add_argument("--out", type=Path, help="where to write findings.md and findings.json (default: RUNS_DIR)")
    try:
        args = parser.parse_args(argv)
        if not args.root.is_dir():
            raise UserError(f"{args.root} is not a folder")
        out = args.out or args.root
        findings = write_findings(args.root, out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_markdown(findings))
    print(f"wrote {out / 'findings.md'} and {out / 'findings.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
