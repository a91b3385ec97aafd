"""Every command of the README does what the text next to it says, as far as that can be checked
without running it for hours.

Each ```bash block of README.md is read in order (line continuations, `&&` and `;` chains, `for`
loops, shell variables such as `B="..."` carried from one block to the next), and:
- every run (`python cifar100.py ...`, `python miniImageNet100.py ...`, and each sweep's script
  with its flags and a grid point's) parses with the real command line;
- its topology updates come round: `--update_frequency` is at most the steps of a task, counted
  from the data it names (the bundled subsets with `--data_dir ../shared/data`, the full sets
  otherwise) with the loader's own batching;
- a miniImageNet run leaves every class images to train on;
- every path a later command reads (`utils.retest`, `utils.report`) is written by an earlier one.
"""

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data.loader import batch_bounds
from utils.cli import BENCHMARKS, Config, parse_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared" / "data"
SCRIPTS = {"cifar100.py": "cifar100", "miniImageNet100.py": "miniImageNet"}
FULL_TRAIN_PER_CLASS = {"cifar100": 500, "miniImageNet": 600}  # the full downloads (miniImageNet: train + test)
SWEEP_DEFAULTS = {"--densities": "0.2", "--inits": "ERK", "--growths": "random", "--seeds": "0"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def bundled_train_per_class(text: str) -> dict[str, int]:
    """The bundled subsets' images per class, as the README states them."""
    cifar = re.search(r"CIFAR-100\s+subset\s+with\s+(\d+)\s+training\s+images\s+per\s+class", text)
    mini = re.search(r"miniImageNet\s+subset\s+with\s+(\d+)\s+images\s+per\s+class", text)
    assert cifar and mini, "the README no longer says how large the bundled subsets are"
    return {"cifar100": int(cifar.group(1)), "miniImageNet": int(mini.group(1))}


def statements(block: str, variables: dict[str, str]) -> list[list[str]]:
    """The block's simple commands as argument lists: continuations joined, comments dropped,
    `&&`/`;` chains split, a `for x in a b; do ...; done` loop taken at its first value, and the
    block's `NAME="..."` assignments expanded (and kept in `variables` for later blocks)."""
    text = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in text.splitlines():
        line = " ".join(shlex.split(line, comments=True)) if line.strip() else ""
        loop = re.fullmatch(r"for (\w+) in (\S+).*?; do (.*); done", line)
        if loop:
            variables[loop.group(1)] = loop.group(2)
            line = loop.group(3)
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            assignment = re.fullmatch(r"(\w+)=(.*)", part)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
            elif part:
                expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), part)
                commands.append(shlex.split(expanded))
    return commands


@dataclass
class Run:
    """One run a README command starts: its benchmark, flags and where they came from."""

    benchmark: str
    argv: list[str]
    command: str


@dataclass
class ReadmeCommands:
    runs: list[Run] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)  # output folders, in the README's order
    reads: list[tuple[Path, int, str]] = field(default_factory=list)  # (path, runs written before it, command)


def sweep_run(args: list[str], command: str, commands: ReadmeCommands) -> None:
    """A sweep's script flags plus its first grid point's; its folder is written."""
    split = args.index("--")
    options, script, flags = args[:split], args[split + 1], args[split + 2:]
    value = {key: options[options.index(key) + 1] if key in options else default
             for key, default in SWEEP_DEFAULTS.items()}
    point = ["--density", value["--densities"].split(",")[0], "--sparse_init", value["--inits"].split(",")[0],
             "--growth", value["--growths"].split(",")[0], "--seed", value["--seeds"].split(",")[0]]
    commands.runs.append(Run(SCRIPTS[script], [*flags, *point], command))
    if "--out" in options:
        commands.written.append(Path(options[options.index("--out") + 1]))


def study_runs(args: list[str], command: str, commands: ReadmeCommands) -> None:
    """Every sweep of a study preset, as sweep.sh would run it; its folder is written."""
    from utils import study

    options = dict(zip(args[1::2], args[2::2]))
    out = Path(options.get("--out", f"runs/study-{args[0]}"))
    extra = ["--data_dir", options["--data_dir"]] if "--data_dir" in options else []
    for sweep in study.sweeps(study.PRESETS[args[0]], out, extra):
        sweep_run([*sweep.grid, "--out", str(sweep.out), "--", sweep.script, *sweep.flags], command, commands)
    commands.written.append(out)


def readme_commands() -> ReadmeCommands:
    commands, variables = ReadmeCommands(), {}
    for block in bash_blocks(README.read_text()):
        for args in statements(block, variables):
            command = " ".join(args)
            if args[0] in ("python", "python3") and len(args) > 1 and args[1] in SCRIPTS:
                commands.runs.append(Run(SCRIPTS[args[1]], args[2:], command))
            elif args[0] in ("scripts/sweep.sh", "scripts/sweep_slurm.sh") and "--" in args:
                sweep_run(args[1:], command, commands)
            elif args[:3] == ["python", "-m", "utils.study"]:
                study_runs(args[3:], command, commands)
            elif args[:3] in (["python", "-m", "utils.retest"], ["python", "-m", "utils.report"]):
                commands.reads.append((Path(args[3]), len(commands.runs), command))
    return commands


COMMANDS = readme_commands()


def config_of(run: Run) -> Config:
    return parse_config(run.argv, run.benchmark)


def test_the_readme_has_runs_sweeps_and_reads_to_check():
    assert len(COMMANDS.runs) >= 10 and len(COMMANDS.reads) >= 2
    assert {run.benchmark for run in COMMANDS.runs} == set(BENCHMARKS)


def test_the_bundled_subsets_are_as_large_as_the_readme_says():
    stated = bundled_train_per_class(README.read_text())
    if not (SHARED / "cifar-100-python" / "train").is_file():
        pytest.skip("no ../shared/data here to compare with")
    import pickle
    import zipfile

    with open(SHARED / "cifar-100-python" / "train", "rb") as f:
        labels = pickle.load(f, encoding="latin1")["fine_labels"]
    assert labels.count(0) == stated["cifar100"]
    with zipfile.ZipFile(SHARED / "miniImageNet.zip") as zf:
        first_class = sorted({name.split("/")[0] for name in zf.namelist() if name.endswith(".jpg")})[0]
        assert sum(name.startswith(first_class + "/") and name.endswith(".jpg")
                   for name in zf.namelist()) == stated["miniImageNet"]


@pytest.mark.parametrize("run", COMMANDS.runs, ids=lambda run: run.command[:90])
def test_every_run_parses_and_its_topology_updates_come_round(run):
    config = config_of(run)
    bundled = Path(config.data_dir).as_posix().rstrip("/").endswith("shared/data")
    per_class = (bundled_train_per_class(README.read_text()) if bundled else FULL_TRAIN_PER_CLASS)[config.dataset]
    if config.dataset == "miniImageNet":
        assert per_class - config.test_per_class >= 2, f"{run.command}: no images left to train on"
        per_class -= config.test_per_class
    if config.train_per_class is not None:
        per_class = min(per_class, config.train_per_class)
    batches = len(batch_bounds(config.num_classes_per_task * per_class, config.batch_size))
    if config.max_batches is not None:
        batches = min(batches, config.max_batches)
    steps = config.epochs * batches
    if config.sparse and config.update_frequency > 0:
        assert config.update_frequency <= steps, (
            f"{run.command}: --update_frequency {config.update_frequency} > the {steps} steps of a task: "
            "no topology update would happen")


@pytest.mark.parametrize("path,runs_before,command", COMMANDS.reads, ids=lambda value: str(value)[:60])
def test_every_path_a_command_reads_is_written_by_a_command_before_it(path, runs_before, command):
    written = {Path(config_of(run).output_dir) for run in COMMANDS.runs[:runs_before]} | set(COMMANDS.written)
    assert any(path == out or path in out.parents for out in written), (
        f"{command}: no README command before it writes {path}")


def test_the_checks_catch_what_they_are_for():
    """The checks, on commands made to fail them: a quick miniImageNet run whose update never comes
    round (2 batches a task), a retest of a folder nobody wrote."""
    variables: dict[str, str] = {}
    [args] = statements("python miniImageNet100.py --num_tasks 2 --num_classes 10 --num_classes_per_task 5 "
                        "--epochs 2 --update_frequency 5 --device cpu --data_dir ../shared/data "
                        "--test_per_class 20", variables)
    with pytest.raises(AssertionError, match="no topology update"):
        test_every_run_parses_and_its_topology_updates_come_round(Run("miniImageNet", args[2:], "bad"))
    with pytest.raises(AssertionError, match="no README command before it writes"):
        test_every_path_a_command_reads_is_written_by_a_command_before_it(Path("runs/nowhere"), 0, "bad")
    assert math.isclose(len(batch_bounds(201, 100)), 2)  # a last batch of one joins the one before
