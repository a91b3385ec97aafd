"""The results of a sweep as tables and figures.

    python -m utils.report RUNS_DIR [--out DIR] [--no-figures]

    python -m utils.report runs/sweep-cifar100-10tasks      # report.md, report.csv, figures/
    python -m utils.report runs --out reports/all           # every run below runs/, one table per benchmark

Reads every ``results.json`` below RUNS_DIR and writes into --out (default: RUNS_DIR):

``report.md``
    One table per benchmark (dataset x number of tasks x classes per task: runs of different
    splits never share a table). Rows: sparse_init x growth of the isolated dynamic-sparse runs,
    then a row per other approach and init (``--approach``: WSN, PackNet, SupSup), then a row
    per baseline found: static sparse (update_frequency 0, per init), sparse
    fine-tuning (isolate false, per init and growth) and dense fine-tuning (sparse false; its
    column is 0 % sparsity). Columns: sparsity = 1 - density (0.2, 0.1, 0.05 ->
    80 %, 90 %, 95 %). Cells: the final ACC (%), mean ± std over the runs (seeds) with their number
    n; std is the sample standard deviation (n - 1) and is left out when n = 1. The BWT column is
    mean ± std over all of the row's runs. A second table of the same layout: the backbone's
    weights the row's runs use after the last task (%, any task's), which is what a sparse
    approach spends; every sparse run also stores one mask bit per maskable weight and task
    (said below the table). Runs that count FLOPs (every run of this version) get a table of the
    same layout: the training FLOPs and the inference FLOPs per image, both in % of dense (mean over
    the row's runs; per run: all tasks' training FLOPs over dense training's, and the mean over
    tasks of each task's network). Below each table: the settings its runs share, and a
    warning when they differ in a setting the table does not show (the cells would mix them).
    Runs that also tested with the task id hidden (``--task_inference``) get a second table of the
    same layout: the task-agnostic final ACC and the BWT of the task-agnostic matrix.
    Then every run that is not in a table: failed (its results.json says ``"complete": false``),
    unfinished (started: config.json or a checkpoint, but no results.json; maybe still running,
    maybe crashed) and unreadable (a results.json that cannot be read or parsed, or is not a run's
    results: damaged, or written by another program), each with its folder.
``report.csv``
    One row per run, failed and unfinished ones included (column ``status``): the settings, the
    table row and sparsity it belongs to, the metrics, and its directory. A table cell is the set
    of ``complete`` rows sharing dataset, num_tasks, num_classes_per_task, row and sparsity_percent.
    ``fwt`` is the authors' FWT: an accuracy (their probe on tasks not yet trained), to be read
    against chance, 100 / num_classes_per_task; ``fwt_above_chance`` is GEM's forward transfer
    with chance for an untrained network's accuracy (both defined in utils/metrics.py).
``figures/`` (needs matplotlib: ``pip install -r requirements-figures.txt``; skipped otherwise)
    ``acc_matrix/<run>.png``: each run's accuracy matrix (percent; row i = after task i).
    ``<benchmark>_acc_vs_sparsity.png``, ``<benchmark>`` = ``<dataset>_<T>tasks_x<classes per task>``
    (e.g. ``cifar100_10tasks_x10``): ACC against sparsity, one line per table row (± std);
    ``<benchmark>_acc_agnostic_vs_sparsity.png``: the same for the task-agnostic ACC (if measured).
    ``<benchmark>_capacity.png``: the backbone after each task, stacked: weights reused by the
    task from earlier tasks / new in the task / used only by earlier tasks / still free; one panel
    per init x sparsity, mean over growths and seeds (isolated dynamic-sparse runs).
    ``<benchmark>_acc_vs_train_flops.png``: ACC against the training FLOPs (fraction of dense
    training, log scale), a line per table row through its sparsities (runs that count FLOPs).

Every file is written atomically (a temporary name in the same folder, then renamed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparselearning import write_atomically
from utils.cli import RESULT_NEUTRAL_SETTINGS, OneLineParser
from utils.errors import UserError
from utils.metrics import fwt_above_chance
from utils.run_dir import CHECKPOINT_FILE, CONFIG_FILE, FINGERPRINT, PROGRESS_FILE, RESULTS_FILE, write_text

FIGURES_HINT = "pip install -r requirements-figures.txt"
INIT_ORDER = ("ERK", "uniform")
GROWTH_ORDER = ("random", "unfired", "momentum", "gradient")
APPROACH_LABELS = {"wsn": "WSN", "packnet": "PackNet", "supsup": "SupSup"}  # rows of the other approaches, in order
SHOWN_SETTINGS = ("epochs", "update_frequency", "max_batches", "task_inference", "test_batch_size")
# Settings that may differ between the runs of one table: the table's own axes, settings that
# do not change results (those --resume accepts changed), and the data's fingerprint (recorded
# with the config; it changes with the seed: miniImageNet's test split, a random class order).
ADAPTIVE_SETTINGS = ("erk_power", "growth_later", "turnover_stop")  # adaptive DST's flags (a row of their own)
TABLE_AXES = ("dataset", "num_tasks", "num_classes_per_task", "num_classes", "sparse", "isolate", "sparse_init",
              "growth", "density", "seed", "approach", *ADAPTIVE_SETTINGS, *RESULT_NEUTRAL_SETTINGS, FINGERPRINT)
CSV_SETTINGS = ("dataset", "num_tasks", "num_classes_per_task", "approach", "sparse", "isolate", "sparse_init",
                "growth", "density", "update_frequency", "epochs", "seed", *ADAPTIVE_SETTINGS)
GRID, ADAPTIVE = 0, 0.5  # the sort keys' first entries of the paper's grid rows and of adaptive DST's
CSV_METRICS = ("acc", "bwt", "fwt", "fwt_above_chance", "forgetting", "acc_agnostic", "bwt_agnostic")


# ---- runs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One run directory: ``status`` is "complete", "failed" (stopped early), "unfinished" or
    "unreadable" (its results.json is damaged or not a run's; ``problem`` says which)."""

    directory: Path
    status: str
    config: dict[str, Any]
    results: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def benchmark(self) -> tuple[str, int, int]:
        """(dataset, number of tasks, classes per task): the runs of one table."""
        config = self.config
        return config.get("dataset", "?"), config.get("num_tasks", 0), config.get("num_classes_per_task", 0)


def read_json(path: Path) -> Any:
    """The parsed file, or None if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run_results(results: Any) -> bool:
    return isinstance(results, dict) and isinstance(results.get("config"), dict) and "acc_matrix" in results


def results_problem(path: Path) -> str | None:
    """Why the results.json at ``path`` is not a run's results (None: it is)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot be read ({getattr(error, 'strerror', None) or error})"
    try:
        results = json.loads(text)
    except ValueError:
        return "damaged (not valid JSON; cut short?)"
    return None if is_run_results(results) else "not a run's results (no config and acc_matrix; another program's?)"


def find_runs(root: Path) -> list[Run]:
    """Every run below ``root`` (``root`` itself included), sorted by directory; a results.json
    that is not a run's results is listed as "unreadable", never dropped."""
    runs = []
    for path in root.rglob(RESULTS_FILE):
        problem = results_problem(path)
        if problem is not None:
            config = read_json(path.parent / CONFIG_FILE)
            runs.append(Run(path.parent, "unreadable", config if isinstance(config, dict) else {}, problem=problem))
            continue
        results = read_json(path)
        status = "complete" if results.get("complete", True) else "failed"
        if results.get("resumable"):  # stopped by a signal, saved: --resume continues it
            status = "unfinished"
        runs.append(Run(path.parent, status, results["config"], results))
    started = {p.parent for name in (CONFIG_FILE, CHECKPOINT_FILE, PROGRESS_FILE) for p in root.rglob(name)}
    for directory in started:
        if not (directory / RESULTS_FILE).exists():
            config = read_json(directory / CONFIG_FILE)
            runs.append(Run(directory, "unfinished", config if isinstance(config, dict) else {}))
    return sorted(runs, key=lambda run: str(run.directory))


# ---- rows, columns and cells -----------------------------------------------------------------

def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), str(value))


def adaptive_label(config: dict[str, Any]) -> str | None:
    """The words adaptive DST's flags add to a row's label (e.g. "ERK^auto", "unfired→momentum",
    "stop < 0.05"), or None for a run without them."""
    power, later, stop = (config.get(key) for key in ADAPTIVE_SETTINGS)  # absent from earlier versions' configs
    if power in (None, 1, 1.0) and not later and not stop:
        return None
    init = config.get("sparse_init", "?") + ("" if power in (None, 1, 1.0) else f"^{power}")
    growth = config.get("growth", "?") + (f"→{later}" if later else "")
    return f"{init} + {growth}" + (f", stop < {stop:g}" if stop else "")


def table_row(config: dict[str, Any]) -> tuple[tuple, str]:
    """(sort key, label) of the table row a run belongs to: its init x growth, adaptive DST's
    policies, its approach and init, or its baseline."""
    init, growth = config.get("sparse_init", "?"), config.get("growth", "?")
    static = config.get("update_frequency") == 0
    approach = config.get("approach", "dst")  # absent from the configs of earlier versions: DST's
    if not config.get("sparse", True):
        return (4,), "dense fine-tuning"
    if approach != "dst":
        label = APPROACH_LABELS.get(approach, approach)
        return (1, _order(approach, tuple(APPROACH_LABELS)), _order(init, INIT_ORDER)), f"{label}: {init}"
    if not config.get("isolate", True):
        how = "static" if static else growth
        return (3, _order(init, INIT_ORDER), _order(how, GROWTH_ORDER)), f"sparse fine-tuning: {init} + {how}"
    if static:
        return (2, _order(init, INIT_ORDER)), f"static sparse: {init}"
    if (adaptive := adaptive_label(config)) is not None:
        return (ADAPTIVE, adaptive), f"adaptive: {adaptive}"
    return (GRID, _order(init, INIT_ORDER), _order(growth, GROWTH_ORDER)), f"{init} + {growth}"


def sparsity_percent(config: dict[str, Any]) -> float:
    """100 x (1 - density), rounded to 4 decimals; 0 for a dense run."""
    if not config.get("sparse", True):
        return 0.0
    return round(100 * (1 - config["density"]), 4)


def format_percent(value: float) -> str:
    return f"{value:g} %"


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float | None  # sample standard deviation; None for a single value
    n: int


def stats(values: Sequence[float]) -> Stats:
    return Stats(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def format_stats(s: Stats, with_n: bool = True) -> str:
    text = f"{s.mean:.2f}" if s.std is None else f"{s.mean:.2f} ± {s.std:.2f}"
    return f"{text} (n={s.n})" if with_n else text


@dataclass
class Table:
    """The complete runs of one benchmark, by row label and sparsity."""

    benchmark: tuple[str, int, int]
    runs: list[Run]

    def rows(self) -> list[str]:
        keyed = {table_row(run.config) for run in self.runs}
        return [label for _, label in sorted(keyed)]

    def columns(self) -> list[float]:
        return sorted({sparsity_percent(run.config) for run in self.runs})

    def runs_in(self, row: str, column: float | None = None) -> list[Run]:
        return [run for run in self.runs if table_row(run.config)[1] == row
                and (column is None or sparsity_percent(run.config) == column)]

    def cell(self, row: str, column: float, metric: str = "acc") -> Stats | None:
        values = [value for run in self.runs_in(row, column) if (value := run_metric(run, metric)) is not None]
        return stats(values) if values else None

    def row_stats(self, row: str, metric: str = "bwt") -> Stats | None:
        """`metric` over all runs of the row (any sparsity)."""
        values = [value for run in self.runs_in(row) if (value := run_metric(run, metric)) is not None]
        return stats(values) if values else None

    def has(self, metric: str) -> bool:
        return any(run_metric(run, metric) is not None for run in self.runs)


CAPACITY = "capacity_used_percent"
"""The metric of the capacity table: the backbone's weights any task uses after the last task (%)."""


TRAIN_FLOPS, INFERENCE_FLOPS = "train_flops_percent", "inference_flops_percent"
"""The metrics of the FLOPs table (% of dense): the run's training FLOPs, all tasks, over dense
training's on the same images; the mean over tasks of a task's network's inference FLOPs."""


def flops_fractions(per_task: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(training FLOPs, all tasks, over dense training's; mean inference fraction over the tasks),
    each None where a task's record lacks it (runs of earlier versions)."""
    pairs = [(task.get("train_flops"), task.get("train_flops_dense")) for task in per_task]
    train = (None if not pairs or any(flops is None or dense is None for flops, dense in pairs)
             else sum(flops for flops, _ in pairs) / sum(dense for _, dense in pairs))
    inference = [task.get("inference_flops_fraction") for task in per_task]
    return train, None if not inference or None in inference else statistics.fmean(inference)


def run_metric(run: Run, metric: str) -> float | None:
    """A run's `metric`: a key of its results.json, `CAPACITY` (None for a dense run), `TRAIN_FLOPS`
    or `INFERENCE_FLOPS`."""
    if metric in (TRAIN_FLOPS, INFERENCE_FLOPS):
        fraction = flops_fractions(run.results.get("per_task") or [])[metric == INFERENCE_FLOPS]
        return None if fraction is None else 100 * fraction
    if metric == CAPACITY:
        per_task = run.results.get("per_task") or []
        used = per_task[-1].get("capacity_used") if per_task else None
        return None if used is None else 100 * used
    return run.results.get(metric)


def mask_bits_note(table: Table) -> str | None:
    """How many mask bits a sparse task stores (one a maskable weight), from the runs' records."""
    bits = sorted({record["mask_bits"] for run in table.runs for record in run.results.get("per_task") or []
                   if "mask_bits" in record})
    if not bits:
        return None
    per_task = " / ".join(f"{b / 8e6:.2f} MB ({b / 1e6:.2f} Mbit)" for b in bits)
    return (f"Every sparse task stores its mask: {per_task} a task, one bit per maskable weight, whatever its "
            "approach and density (dense fine-tuning stores none).")


def build_tables(runs: Sequence[Run]) -> list[Table]:
    """One table per benchmark (dataset, number of tasks, classes per task) of the complete runs,
    in that order."""
    by_benchmark: dict[tuple[str, int, int], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "complete":
            by_benchmark[run.benchmark].append(run)
    return [Table(benchmark, by_benchmark[benchmark]) for benchmark in sorted(by_benchmark)]


def benchmark_title(table: Table) -> str:
    dataset, tasks, classes = table.benchmark
    return f"{dataset}, {tasks} tasks x {classes} classes"


def benchmark_slug(table: Table) -> str:
    """The table's name in file names, e.g. cifar100_10tasks_x10."""
    dataset, tasks, classes = table.benchmark
    return f"{dataset}_{tasks}tasks_x{classes}"


# ---- settings the runs of a table share ------------------------------------------------------

def setting_values(table: Table) -> dict[str, list[Any]]:
    """Every setting outside the table's axes -> its distinct values, sorted (update_frequency 0
    of the static baseline left out: it is a row of its own)."""
    values: dict[str, dict[str, Any]] = defaultdict(dict)
    for run in table.runs:
        for key, value in run.config.items():
            if key not in TABLE_AXES and not (key == "update_frequency" and value == 0):
                values[key][json.dumps(value)] = value
    return {key: sorted(found.values(), key=_numbers_first) for key, found in values.items()}


def _numbers_first(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def settings_lines(table: Table) -> list[str]:
    """'Settings: epochs 100, ...' and one warning per setting that differs between the runs."""
    values = setting_values(table)
    shared = [f"{key} {values[key][0]}" for key in SHOWN_SETTINGS
              if len(values.get(key, ())) == 1 and values[key][0] is not None]
    lines = [f"Settings: {', '.join(shared)}."] if shared else []
    for key, found in sorted(values.items()):
        if len(found) > 1:
            lines.append(f"**Warning:** the runs differ in {key} ({', '.join(map(str, found))}); "
                         "the cells mix them.")
    return lines


def duplicate_warnings(table: Table) -> list[str]:
    """One warning per set of runs in the same cell with the same seed (counted twice in n)."""
    seen: dict[tuple, list[Run]] = defaultdict(list)
    for run in table.runs:
        seen[(table_row(run.config)[1], sparsity_percent(run.config), run.config.get("seed"))].append(run)
    return [f"**Warning:** runs with the same settings and seed, all counted: "
            f"{', '.join(str(run.directory) for run in same)}." for same in seen.values() if len(same) > 1]


# ---- report.md -------------------------------------------------------------------------------

def markdown_table(table: Table, metric: str = "acc", bwt_metric: str | None = "bwt") -> str:
    """Rows x sparsity of `metric`, and a BWT column of `bwt_metric` (None: none); a row without any
    value of `metric` is left out."""
    columns = table.columns()
    header = ["init + growth", *map(format_percent, columns), *(["BWT"] if bwt_metric else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows():
        cells = [table.cell(row, column, metric) for column in columns]
        if all(cell is None for cell in cells):
            continue
        texts = ["" if cell is None else format_stats(cell) for cell in cells]
        if bwt_metric:
            bwt = table.row_stats(row, bwt_metric)
            texts.append("" if bwt is None else format_stats(bwt, with_n=False))
        lines.append("| " + " | ".join([row, *texts]) + " |")
    return "\n".join(lines)


def flops_table(table: Table) -> str:
    """Rows x sparsity of the training and inference FLOPs (% of dense), "train / inference", means
    over the cell's runs that counted them ("(n=k of m)" where runs of earlier versions did not); a
    row without FLOPs is left out."""
    columns = table.columns()
    header = ["init + growth", *map(format_percent, columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows():
        cells = [(table.cell(row, column, TRAIN_FLOPS), table.cell(row, column, INFERENCE_FLOPS),
                  len(table.runs_in(row, column))) for column in columns]
        if all(train is None for train, _, _ in cells):
            continue
        texts = ["" if train is None or inference is None else
                 f"{train.mean:.1f} / {inference.mean:.1f}" + (f" (n={train.n} of {runs})" if train.n < runs else "")
                 for train, inference, runs in cells]
        lines.append("| " + " | ".join([row, *texts]) + " |")
    return "\n".join(lines)


def table_section(table: Table, figures: list[Path]) -> str:
    parts = [f"## {benchmark_title(table)}",
             "Final ACC (%) after the last task: mean ± std over seeds (n runs); sparsity = 1 - density. "
             "BWT (%): mean ± std over all runs of the row.",
             markdown_table(table)]
    if table.has("acc_agnostic"):
        methods = sorted({run.config.get("task_inference") for run in table.runs if run.results.get("acc_agnostic")
                          is not None}, key=str)
        parts += [f"Task id hidden at test time and inferred (`--task_inference {' / '.join(map(str, methods))}`): "
                  "final task-agnostic ACC (%), mean ± std over seeds (n runs with task inference); BWT (%) of the "
                  "task-agnostic matrix (tasks compete for the batches: not zero under isolation).",
                  markdown_table(table, "acc_agnostic", "bwt_agnostic")]
    if table.has(CAPACITY):
        parts += ["The backbone's weights used by any task after the last task (%; the capacity an approach spends, "
                  "mean ± std over seeds): PackNet's tasks own their weights, DST, WSN and SupSup tasks may share "
                  "theirs.", markdown_table(table, CAPACITY, None)]
        if (note := mask_bits_note(table)) is not None:
            parts.append(note)
    if table.has(TRAIN_FLOPS):
        parts += ["Training FLOPs / inference FLOPs per image, % of dense (mean over the runs that counted them): "
                  "all tasks' training over dense training on the same images, and the mean over tasks of each task's "
                  "network; counted from the masks as RigL counts them (conv and linear layers only).",
                  flops_table(table)]
    notes = settings_lines(table) + duplicate_warnings(table)
    if notes:
        parts.append("\n".join(notes))
    parts += [f"![{figure.stem}]({figure.as_posix()})" for figure in figures]
    return "\n\n".join(parts)


def left_out_section(runs: Sequence[Run]) -> str:
    failed = [run for run in runs if run.status == "failed"]
    unfinished = [run for run in runs if run.status == "unfinished"]
    unreadable = [run for run in runs if run.status == "unreadable"]
    if not failed and not unfinished and not unreadable:
        return "## Runs not in the tables\n\nNone: every run found is complete."
    lines = ["## Runs not in the tables", ""]
    lines += [f"- failed (stopped early, results.json has \"complete\": false): `{run.directory}`" for run in failed]
    lines += [f"- unfinished (no results.json: still running, or stopped): `{run.directory}`" if run.results is None
              else f"- unfinished (stopped by a signal, saved: --resume continues it): `{run.directory}`"
              for run in unfinished]
    lines += [f"- unreadable (its results.json is {run.problem}): `{run.directory}`" for run in unreadable]
    return "\n".join(lines)


def markdown_report(root: Path, runs: Sequence[Run], tables: Sequence[Table],
                    figures: dict[tuple[str, int, int], list[Path]], figures_note: str) -> str:
    counts = {status: sum(run.status == status for run in runs)
              for status in ("complete", "failed", "unfinished", "unreadable")}
    unreadable = f", {counts['unreadable']} unreadable" if counts["unreadable"] else ""
    intro = (f"# Report of {root}\n\n{len(runs)} runs found: {counts['complete']} complete, "
             f"{counts['failed']} failed, {counts['unfinished']} unfinished{unreadable}. {figures_note}")
    sections = [intro, *(table_section(table, figures.get(table.benchmark, [])) for table in tables),
                left_out_section(runs)]
    return "\n\n".join(sections) + "\n"


# ---- report.csv ------------------------------------------------------------------------------

def csv_row(run: Run) -> dict[str, Any]:
    """One run's settings, table position, metrics, capacity used at the end, mean seconds per task."""
    config, results = run.config, run.results or {}
    row: dict[str, Any] = {"status": run.status}
    row.update({key: config.get(key, "") for key in CSV_SETTINGS})
    row["table_row"] = table_row(config)[1] if config else ""
    row["sparsity_percent"] = sparsity_percent(config) if "density" in config else ""
    row.update({key: "" if results.get(key) is None else results[key] for key in CSV_METRICS})
    if results and results.get("fwt_above_chance") is None:  # results.json from before the key existed
        row["fwt_above_chance"] = computed_fwt_above_chance(results)
    row["task_inference"] = config.get("task_inference", "")
    row["task_found"] = (results.get("task_id_accuracy") or [""])[-1]
    per_task = results.get("per_task") or []
    row["capacity_used"] = per_task[-1].get("capacity_used", "") if per_task else ""
    train, inference = flops_fractions(per_task)
    row["train_flops_fraction"], row["inference_flops_fraction"] = ("" if train is None else train,
                                                                     "" if inference is None else inference)
    seconds = [task["train_seconds"] for task in per_task if "train_seconds" in task]
    row["task_seconds"] = sum(seconds) / len(seconds) if seconds else ""
    row["run"] = str(run.directory)
    return row


def computed_fwt_above_chance(results: dict[str, Any]) -> float | str:
    """`utils.metrics.fwt_above_chance` of the tasks done, from the matrix and the split; "" when
    it cannot be computed (no task done, no next-task probe measured)."""
    done = results.get("tasks_done", len(results["acc_matrix"]))
    per_task = results["config"].get("num_classes_per_task")
    if not done or not per_task:
        return ""
    matrix = [[math.nan if v is None else v for v in row[:done]] for row in results["acc_matrix"][:done]]
    value = fwt_above_chance(matrix, per_task)
    return "" if math.isnan(value) else value


def to_csv(runs: Sequence[Run]) -> str:
    fields = ["status", *CSV_SETTINGS, "table_row", "sparsity_percent", *CSV_METRICS, "task_inference", "task_found",
              "capacity_used", "train_flops_fraction", "inference_flops_fraction",
              "task_seconds", "run"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(run) for run in runs)
    return out.getvalue()


# ---- figures (matplotlib, optional) ------------------------------------------------------------

def load_pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path: Path) -> None:
    """Save as PNG to ``path``, atomically, and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(figure)


def run_slug(root: Path, run: Run) -> str:
    relative = run.directory.relative_to(root)
    return "__".join(relative.parts) if relative.parts else run.directory.resolve().name


def plot_accuracy_matrix(plt, run: Run, title: str, path: Path) -> None:
    matrix = [[math.nan if v is None else v for v in row] for row in run.results["acc_matrix"]]
    tasks = len(matrix)
    size = max(3.5, 0.45 * tasks + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    if tasks <= 10:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    axes.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                              color="white" if value < 60 else "black")
    axes.set(xlabel="task evaluated (above the diagonal: forward-transfer probe)",
             ylabel="after training task", title=title)
    axes.set_xticks(range(tasks), [str(t + 1) for t in range(tasks)])
    axes.set_yticks(range(tasks), [str(t + 1) for t in range(tasks)])
    save_figure(plt, figure, path)


GROWTH_COLOURS = {"random": "C0", "unfired": "C1", "momentum": "C2", "gradient": "C3"}
OTHER_COLOURS = ("C4", "C5", "C6", "C8", "C9", "black", "olive", "navy", "teal", "C7")


def line_styles(rows: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A style per table row, the same in every figure: DST's grid coloured by growth, solid for
    ERK and dashed for uniform (circles); adaptive DST solid with squares; the other approaches
    dash-dotted with triangles; the baselines dotted with crosses (dense fine-tuning grey); each
    row that is not a grid cell its own colour, in table order."""
    styles, others = {}, iter(OTHER_COLOURS * (1 + len(rows) // len(OTHER_COLOURS)))
    for row in rows:
        init, _, growth = row.partition(" + ")
        if init in ("ERK", "uniform") and growth in GROWTH_COLOURS:
            styles[row] = {"linestyle": "-" if init == "ERK" else "--", "color": GROWTH_COLOURS[growth], "marker": "o"}
        elif row.startswith("dense"):
            styles[row] = {"linestyle": ":", "color": "grey"}
        elif row.startswith(("static", "sparse fine")):
            styles[row] = {"linestyle": ":", "color": next(others), "marker": "x"}
        elif row.startswith("adaptive"):
            styles[row] = {"linestyle": "-", "color": next(others), "marker": "s"}
        else:
            styles[row] = {"linestyle": "-.", "color": next(others), "marker": "^"}
    return styles


MIN_ACC_SPAN = 20.0  # percentage points: the least height of the ACC axis


def plot_acc_vs_sparsity(plt, table: Table, path: Path, metric: str = "acc") -> None:
    """`metric` (the final ACC, or the task-agnostic one) against sparsity, a line per table row."""
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    columns = [c for c in table.columns() if c > 0]
    styles = line_styles(table.rows())
    for row in table.rows():
        points = [(column, table.cell(row, column, metric)) for column in table.columns()]
        points = [(column, cell) for column, cell in points if cell is not None]
        if row == "dense fine-tuning" and points:
            axes.axhline(points[0][1].mean, label=row, **styles[row])
            continue
        axes.errorbar([c for c, _ in points], [cell.mean for _, cell in points],
                      yerr=[cell.std or 0.0 for _, cell in points], capsize=3, label=row, **styles[row])
    axes.set_xticks(columns, [format_percent(c) for c in columns])
    low, high = axes.get_ylim()
    if high - low < MIN_ACC_SPAN:  # a one-point gap must not fill the whole height
        middle = (low + high) / 2
        axes.set_ylim(max(0.0, middle - MIN_ACC_SPAN / 2), max(0.0, middle - MIN_ACC_SPAN / 2) + MIN_ACC_SPAN)
    ylabel = "final ACC, task id inferred (%)" if metric == "acc_agnostic" else "final ACC (%)"
    axes.set(xlabel="sparsity (1 - density)", ylabel=ylabel, title=benchmark_title(table))
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    axes.grid(alpha=0.3)
    save_figure(plt, figure, path)


CAPACITY_PARTS = ("reused by the task", "new in the task", "earlier tasks only", "free")


def capacity_stack(per_task: Sequence[dict[str, Any]]) -> list[tuple[float, float, float, float]] | None:
    """Per task, the backbone's weights split into CAPACITY_PARTS (fractions summing to 1), or
    None when the run did not record its capacity (dense runs)."""
    if not per_task or any("capacity_used" not in task for task in per_task):
        return None
    stack, used_before = [], 0.0
    for task in per_task:
        reused, used = task["capacity_reused"], task["capacity_used"]
        stack.append((reused, used - used_before, used_before - reused, task["capacity_free"]))
        used_before = used
    return stack


def mean_stack(stacks: Sequence[list[tuple[float, ...]]]) -> list[list[float]]:
    """Element-wise mean of equally long stacks, as one list per part."""
    tasks = min(len(stack) for stack in stacks)
    return [[statistics.fmean(stack[t][part] for stack in stacks) for t in range(tasks)]
            for part in range(len(CAPACITY_PARTS))]


def plot_capacity(plt, table: Table, path: Path) -> bool:
    """Stacked bars per init x sparsity; False (nothing written) without isolated sparse runs."""
    runs = [run for run in table.runs if table_row(run.config)[0][0] == GRID]
    stacks: dict[tuple[str, float], list] = defaultdict(list)
    for run in runs:
        stack = capacity_stack(run.results.get("per_task", []))
        if stack is not None:
            stacks[(run.config["sparse_init"], sparsity_percent(run.config))].append(stack)
    if not stacks:
        return False
    inits = sorted({init for init, _ in stacks}, key=lambda i: _order(i, INIT_ORDER))
    columns = sorted({column for _, column in stacks})
    figure, grid = plt.subplots(len(inits), len(columns), figsize=(3.2 * len(columns) + 1.5, 2.8 * len(inits)),
                                squeeze=False, sharey=True, layout="constrained")
    colors = ("tab:orange", "tab:blue", "tab:grey", "#e8e8e8")
    for r, init in enumerate(inits):
        for c, column in enumerate(columns):
            axes = grid[r][c]
            axes.set_title(f"{init}, {format_percent(column)} sparse", fontsize=9)
            if (init, column) not in stacks:
                axes.set_axis_off()
                continue
            parts = mean_stack(stacks[(init, column)])
            tasks = list(range(1, len(parts[0]) + 1))
            bottom = [0.0] * len(tasks)
            for part, values, color in zip(CAPACITY_PARTS, parts, colors):
                axes.bar(tasks, [100 * v for v in values], bottom=bottom, color=color, label=part)
                bottom = [b + 100 * v for b, v in zip(bottom, values)]
            axes.set_xticks(tasks)
            axes.set_xlabel("after task")
            if c == 0:
                axes.set_ylabel("backbone weights (%)")
    handles, labels = next(axes.get_legend_handles_labels() for axes in grid.flat if axes.axison)
    # top to bottom as the bars stack: the legend's first entry is the bars' top part
    figure.legend(handles[::-1], labels[::-1], loc="outside right center", fontsize=8)
    figure.suptitle(f"{benchmark_title(table)}: backbone capacity (mean over growths and seeds)")
    save_figure(plt, figure, path)
    return True


def plot_acc_vs_train_flops(plt, table: Table, path: Path) -> bool:
    """The final ACC against the training FLOPs (fraction of dense training, log scale), a line per
    table row through its sparsities (± std of the ACC); False (nothing written) without FLOPs."""
    if not table.has(TRAIN_FLOPS):
        return False
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    styles = line_styles(table.rows())
    for row in table.rows():
        points = [(flops.mean / 100, acc) for column in table.columns()
                  if (flops := table.cell(row, column, TRAIN_FLOPS)) is not None
                  and (acc := table.cell(row, column, "acc")) is not None]
        if points:
            points.sort(key=lambda point: point[0])
            axes.errorbar([x for x, _ in points], [acc.mean for _, acc in points],
                          yerr=[acc.std or 0.0 for _, acc in points], capsize=3, label=row, **styles[row])
    axes.set_xscale("log")
    axes.set(xlabel="training FLOPs (fraction of dense training, all tasks)", ylabel="final ACC (%)",
             title=f"{benchmark_title(table)}: ACC vs training FLOPs")
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    axes.grid(alpha=0.3, which="both")
    save_figure(plt, figure, path)
    return True


def write_figures(plt, root: Path, out: Path, runs: Sequence[Run], tables: Sequence[Table]) -> dict:
    """All figures; returns benchmark -> its figures' paths relative to ``out``."""
    figures_dir = out / "figures"
    for run in runs:
        if run.results is not None:
            slug = run_slug(root, run)
            acc = run.results.get("acc")
            title = f"{slug}: ACC {'-' if acc is None else f'{acc:.2f}'} %"
            plot_accuracy_matrix(plt, run, title, figures_dir / "acc_matrix" / f"{slug}.png")
    made: dict[tuple[str, int, int], list[Path]] = {}
    for table in tables:
        slug = benchmark_slug(table)
        paths = [figures_dir / f"{slug}_acc_vs_sparsity.png"]
        plot_acc_vs_sparsity(plt, table, paths[0])
        if table.has("acc_agnostic"):
            paths.append(figures_dir / f"{slug}_acc_agnostic_vs_sparsity.png")
            plot_acc_vs_sparsity(plt, table, paths[-1], "acc_agnostic")
        if plot_capacity(plt, table, figures_dir / f"{slug}_capacity.png"):
            paths.append(figures_dir / f"{slug}_capacity.png")
        if plot_acc_vs_train_flops(plt, table, figures_dir / f"{slug}_acc_vs_train_flops.png"):
            paths.append(figures_dir / f"{slug}_acc_vs_train_flops.png")
        made[table.benchmark] = [path.relative_to(out) for path in paths]
    return made


# ---- command line ----------------------------------------------------------------------------

def report(root: Path, out: Path, runs: Sequence[Run], figures: bool = True) -> list[str]:
    """Write report.md, report.csv and (with matplotlib) the figures of ``runs`` (found below
    ``root``) into ``out``; return what to tell the user."""
    tables = build_tables(runs)
    plt = load_pyplot() if figures else None
    messages = []
    if plt is not None:
        made = write_figures(plt, root, out, runs, tables)
        figures_note = "Figures in figures/."
    else:
        made = {}
        figures_note = ("No figures (--no-figures)." if not figures else
                        f"No figures: matplotlib is not installed (`{FIGURES_HINT}`).")
        if figures:
            messages.append(f"figures skipped: matplotlib is not installed; to get them: {FIGURES_HINT}")
    text = markdown_report(root, runs, tables, made, figures_note)
    write_text(out / "report.md", text)
    write_text(out / "report.csv", to_csv(runs))
    messages.insert(0, text)
    messages.append(f"wrote {out / 'report.md'} and {out / 'report.csv'}"
                    + (f" and figures in {out / 'figures'}" if plt is not None else ""))
    return messages


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m utils.report",
                                     description="Tables (report.md, report.csv) and figures of the runs "
                                                 "below RUNS_DIR.")
    parser.add_argument("root", metavar="RUNS_DIR", type=Path, help="folder holding the runs (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: RUNS_DIR)")
    parser.add_argument("--no-figures", action="store_true", help="only the tables, even with matplotlib")
    try:
        args = parser.parse_args(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    runs = find_runs(args.root)
    if not runs:
        print(f"error: no runs (no {RESULTS_FILE} or {CONFIG_FILE}) below {args.root}", file=sys.stderr)
        return 2
    out = args.out or args.root
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: cannot create {out}: {error.strerror}", file=sys.stderr)
        return 2
    for message in report(args.root, out, runs, figures=not args.no_figures):
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
