"""The sweep scripts: every command grid.sh prints is a valid run, and run_local.sh reports failures."""

import shlex
import subprocess
from pathlib import Path

import pytest

from utils.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]


def grid(**env: str) -> list[str]:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "grid.sh"), "--resume"], env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("benchmark,tasks", [("cifar100", "5"), ("cifar100", "20"), ("miniImageNet", "10")])
def test_grid_commands_parse_to_the_intended_configs(benchmark, tasks):
    lines = grid(BENCHMARK=benchmark, TASKS=tasks)
    assert len(lines) == 3 * 2 * 4 * 2  # densities x inits x growths x update frequencies
    configs = []
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "cifar100.py" if benchmark == "cifar100" else "miniImageNet100.py"]
        configs.append(parse_config(argv[2:], benchmark))
    assert {c.num_tasks * c.num_classes_per_task for c in configs} == {100}
    assert {(c.density, c.sparse_init, c.growth, c.update_frequency) for c in configs} == {
        (d, i, g, f) for d in (0.2, 0.1, 0.05) for i in ("ERK", "uniform")
        for g in ("random", "unfired", "momentum", "gradient") for f in (100, 400)}
    assert len({c.output_dir for c in configs}) == len(configs) and all(c.resume for c in configs)


def test_grid_rejects_a_bad_benchmark():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "grid.sh")], env={"PATH": "/usr/bin:/bin", "BENCHMARK": "x"},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "BENCHMARK" in result.stderr


def test_run_local_runs_every_line_and_reports_failures(tmp_path):
    commands = tmp_path / "commands.txt"
    commands.write_text(f"echo one > {tmp_path}/1.out\n# a comment\n\nfalse\necho three > {tmp_path}/3.out\n")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_local.sh"), str(commands)],
                            env={"PATH": "/usr/bin:/bin", "JOBS": "2", "LOGS": str(tmp_path / "logs")},
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert (tmp_path / "1.out").read_text() == "one\n" and (tmp_path / "3.out").read_text() == "three\n"
    assert "FAILED 2" in result.stdout
    failed = (tmp_path / "logs" / "failed.txt").read_text()
    assert "false" in failed
