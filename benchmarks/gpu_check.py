"""The two Python halves of `scripts/gpu_check.sh`: building its real-data subset beforehand,
and summing up its sections afterwards.

    python -m benchmarks.gpu_check prepare --data_dir ../shared/data --into gpu_check_data
    python -m benchmarks.gpu_check standin --into DIR        (--dry without gpu_check_data/)
    python -m benchmarks.gpu_check summarize --out DIR [--dry]

`prepare` copies the first `--classes` CIFAR-100 classes (at most `--train_per_class` training
and `--test_per_class` test images each) from `<data_dir>/cifar-100-python/` into
`<into>/cifar-100-python/` in the official pickle layout, so that the check's learning run reads
real images through the project's own reader (30 classes of 200 + 100 images: about 28 MB).

`standin` writes random images in the same layout (20 + 10 a class): enough for --dry,
which checks the plumbing, not the learning.

`summarize` reads what the sections left in `--out` (sections.tsv: name, exit code, seconds,
limit; tests.log; benchmarks.json, written after every family; learning/results.json, written
after every task) and writes gpu_check.json and gpu_check.md there, with what each section
finished (so a timed-out one still reports its part); it exits 1 when a section failed or timed
out (or, on a GPU, the learning run stayed at chance).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.workload import write_standin_cifar100
from data.cifar100 import FOLDER
from utils.environment import device_name
from utils.run_dir import write_json, write_text

TIMED_OUT = (124, 137)  # timeout's exit code, and a process killed after its grace period
NO_TESTS = 5  # pytest: no test was selected
HEADLINE = ("step_overhead", "epoch_overhead", "run_overhead", "syncs_per_step", "syncs_per_topology_update",
            "run_images_per_s", "run_bare_images_per_s", "concurrent_images_per_s", "concurrent_recommended_k",
            "step_by_layout", "topology_ms", "eval_overhead", "data_speedup", "checkpoint_overhead")


# ---- prepare ---------------------------------------------------------------------------------

def subset(entry: dict, classes: int, per_class: int) -> dict:
    """The first `per_class` images of each of the classes 0..classes-1 of one pickle's entry."""
    labels = np.asarray(entry["fine_labels"])
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(classes)])
    keep.sort()
    return {"data": np.asarray(entry["data"])[keep], "fine_labels": labels[keep].tolist(),
            "batch_label": entry.get("batch_label", "subset")}


def prepare(data_dir: Path, into: Path, classes: int, train_per_class: int, test_per_class: int) -> None:
    source, target = data_dir / FOLDER, into / FOLDER
    if not (source / "train").is_file() or not (source / "test").is_file():
        raise FileNotFoundError(f"no CIFAR-100 at {source} (its train and test pickles); pass --data_dir")
    target.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        with open(source / split, "rb") as f:
            part = subset(pickle.load(f, encoding="latin1"), classes, per_class)
        with open(target / f"{split}.tmp", "wb") as f:
            pickle.dump(part, f, protocol=4)
        (target / f"{split}.tmp").replace(target / split)
        print(f"{target / split}: {len(part['fine_labels'])} images of {classes} classes")


# ---- summarize -------------------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def section_status(name: str, code: int, dry: bool) -> str:
    if code in TIMED_OUT:
        return "timed out"
    if name == "tests" and code == NO_TESTS:
        return "no test selected" if dry else "failed (no CUDA test selected)"
    return "passed" if code == 0 else f"failed (exit code {code})"


TEST_OUTCOME = re.compile(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")  # pytest -v's lines


def tests_finished(log: Path) -> dict[str, int]:
    """How many tests ended with each outcome, from pytest -v's log (complete or cut off)."""
    counts: dict[str, int] = {}
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if match := TEST_OUTCOME.match(line):
                counts[match[1].lower()] = counts.get(match[1].lower(), 0) + 1
    return counts


def finished_part(name: str, out: Path) -> dict[str, Any] | None:
    """What a section got done, from what it wrote as it went: tests by outcome, the benchmark
    families measured, the learning run's tasks."""
    if name == "tests":
        return tests_finished(out / "tests.log")
    if name == "benchmarks":
        report = read_json(out / "benchmarks.json")
        return None if report is None else {"families": report.get("families_done", []),
                                             "complete": report.get("complete", False)}
    if name == "learning":
        results = read_json(out / "learning" / "results.json")
        return None if results is None else {"tasks": results.get("tasks_done"), "complete": results.get("complete")}
    return None


def read_sections(out: Path, dry: bool) -> dict[str, dict[str, Any]]:
    sections = {}
    for line in (out / "sections.tsv").read_text().splitlines():
        name, code, seconds, limit = line.split("\t")
        log = out / f"{name}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        sections[name] = {"status": section_status(name, int(code), dry), "exit_code": int(code),
                          "seconds": round(float(seconds), 1), "limit_seconds": int(limit),
                          "log": log.name, "last_line": tail[0] if tail else "",
                          "finished": finished_part(name, out)}
    return sections


def benchmark_figures(report: dict | None) -> dict[str, Any] | None:
    """Each target's figure, bound and verdict, and the headline figures, from benchmarks.json."""
    if report is None:
        return None
    targets = {key: {"value": report.get(key), "target": f"{t['op']} {t['value']:g}",
                     "passed": report.get("passed", {}).get(key)} for key, t in report.get("targets", {}).items()}
    return {"target_kind": report.get("target_kind"), "quick": report.get("quick"), "targets": targets,
            "figures": {key: report[key] for key in HEADLINE if key in report},
            "total_seconds": report.get("total_seconds")}


def learning_result(results: dict | None, dry: bool) -> dict[str, Any] | None:
    """ACC, BWT and whether every task's final accuracy beats chance, from results.json."""
    if results is None:
        return None
    config, matrix = results["config"], results["acc_matrix"]
    chance = 100 / config["num_classes_per_task"]
    final = matrix[results["tasks_done"] - 1][:results["tasks_done"]] if results["tasks_done"] else []
    above = bool(final) and all(a is not None and a > chance for a in final)
    return {"acc": results.get("acc"), "bwt": results.get("bwt"), "final_row": final, "chance": chance,
            "above_chance": above, "tasks_done": results["tasks_done"], "epochs": config["epochs"],
            "complete": results.get("complete"), "judged": not dry,
            "task_inference": results.get("task_inference"), "acc_agnostic": results.get("acc_agnostic"),
            "task_id_accuracy": results.get("task_id_accuracy")}


def versions() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"gpu": device_name(torch.device("cuda")) if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "python": platform.python_version()}


def summarize(out: Path, dry: bool) -> int:
    sections = read_sections(out, dry)
    learning = learning_result(read_json(out / "learning" / "results.json"), dry)
    if learning is not None and not dry and not learning["above_chance"] and "learning" in sections:
        sections["learning"]["status"] = "failed (accuracy at chance)"
    failed = [name for name, s in sections.items() if s["status"] not in ("passed", "no test selected")]
    report = {"dry": dry, "passed": not failed, "failed_sections": failed, **versions(), "sections": sections,
              "benchmarks": benchmark_figures(read_json(out / "benchmarks.json")), "learning": learning}
    write_json(out / "gpu_check.json", report)
    write_text(out / "gpu_check.md", markdown(report))
    print(markdown(report))
    return 1 if failed else 0


def cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check{' (dry run on a CPU)' if report['dry'] else ''}: "
             f"{'passed' if report['passed'] else 'FAILED: ' + ', '.join(report['failed_sections'])}", "",
             f"{report['gpu'] or 'no GPU'}; torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}, "
             f"Python {report['python']}", "", "| section | status | seconds | limit | finished |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} | {s['limit_seconds']} | {cell(s['finished'])} |"
              for name, s in report["sections"].items()]
    bench = report["benchmarks"]
    if bench:
        lines += ["", f"| figure ({bench['target_kind']} targets{', --quick' if bench['quick'] else ''}) "
                  "| value | target | pass/fail |", "|---|---|---|---|"]
        lines += [f"| {key} | {cell(t['value'])} | {t['target']} | "
                  f"{'n/a' if t['passed'] is None else 'pass' if t['passed'] else 'FAIL'} |"
                  for key, t in bench["targets"].items()]
        lines += [f"| {key} | {cell(value)} | | |" for key, value in bench["figures"].items()
                  if key not in bench["targets"]]
    learning = report["learning"]
    if learning:
        lines += ["", f"Learning run ({learning['tasks_done']} tasks, {learning['epochs']} epochs each): "
                  f"ACC {cell(learning['acc'])} %, BWT {cell(learning['bwt'])}, final accuracies "
                  f"{cell(learning['final_row'])} (chance {learning['chance']:g} %): "
                  f"{'above chance' if learning['above_chance'] else 'NOT above chance'}"
                  f"{'' if learning['judged'] else ' (dry run: not judged)'}; task id hidden "
                  f"({(learning['task_inference'] or {}).get('method')}): ACC {cell(learning['acc_agnostic'])} %, "
                  f"task found for {cell(learning['task_id_accuracy'])} % of the test batches per row"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build the real-data subset")
    prep.add_argument("--data_dir", type=Path, required=True)
    prep.add_argument("--into", type=Path, required=True)
    prep.add_argument("--classes", type=int, default=30)
    prep.add_argument("--train_per_class", type=int, default=200)
    prep.add_argument("--test_per_class", type=int, default=100)
    standin = commands.add_parser("standin", help="random images in the subset's layout, for --dry")
    standin.add_argument("--into", type=Path, required=True)
    summary = commands.add_parser("summarize", help="write gpu_check.json and gpu_check.md")
    summary.add_argument("--out", type=Path, required=True)
    summary.add_argument("--dry", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            prepare(args.data_dir, args.into, args.classes, args.train_per_class, args.test_per_class)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "standin":
        write_standin_cifar100(args.into, train_per_class=20, test_per_class=10)
        return 0
    return summarize(args.out, args.dry)


if __name__ == "__main__":
    sys.exit(main())
