"""`pip install .` ships the DST core, `sparselearning`, and claims no generic top-level name."""

import shutil
import sys
from pathlib import Path

from tests.suite_control import run_process

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_ships_sparselearning_alone_and_it_imports_from_elsewhere(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info",
                                                                "build", ".pytest_cache"))
    target = tmp_path / "site"
    done = run_process([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    top_level = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top_level == {"sparselearning"}  # not data, models, utils or tests
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sparselearning; from sparselearning import Masking, TaskMasks, write_atomically; "
            "print(sparselearning.__file__)")
    imported = run_process([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                           env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert Path(imported.stdout.strip()).is_relative_to(target)
