"""`python -m utils.rerun`: a finished run trained again from its config.json alone gives the same
numbers, and the comparison notices when they are not."""

import json
from pathlib import Path

import pytest

from tests.conftest import SMALL_NET, finished_run
from utils import run_dir
from utils.cli import parse_config
from utils.rerun import command_of, compare, main

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ("--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "1",
         "--train_per_class", "8", "--test_per_class", "4", "--batch_size", "8", "--update_frequency", "1",
         "--task_inference", "calibrated", "--sparse_init", "uniform", "--growth", "momentum", "--seed", "3",
         *SMALL_NET)


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rerun") / "original"
    finished_run("cifar100", cifar_dir, out, *FLAGS)
    return out


def test_the_command_gives_the_run_config_again_but_its_directory(run, tmp_path):
    config = json.loads((run / run_dir.CONFIG_FILE).read_text())
    command = command_of(config, tmp_path / "again")
    assert command[0] == "cifar100.py"
    again = parse_config(command[1:], "cifar100").to_dict()
    assert {**config, "output_dir": str(tmp_path / "again")} == {**again, "data_fingerprint": config["data_fingerprint"]}


def test_a_config_of_an_older_version_takes_the_defaults_of_the_settings_added_since(run, tmp_path):
    config = json.loads((run / run_dir.CONFIG_FILE).read_text())
    for added in ("net_width", "erk_power", "growth_later", "turnover_stop", "approach"):
        config.pop(added)
    command = command_of(config, tmp_path / "again")
    assert parse_config(command[1:], "cifar100").net_width == 64


def test_a_rerun_gives_the_same_numbers_bit_for_bit(run, cifar_dir, tmp_path, capsys):
    assert main([str(run), "--out", str(tmp_path / "again"), "--data_dir", str(cifar_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("python cifar100.py --dataset cifar100 ")
    assert "the same numbers, bit for bit" in out
    assert "data differ" not in out


def test_a_changed_number_is_found_and_times_are_not_compared(run):
    before = json.loads((run / run_dir.RESULTS_FILE).read_text())
    assert compare(before, before)[0] == []
    after = json.loads(json.dumps(before))
    after["acc_matrix"][1][0] += 0.5
    after["per_task"][0]["train_seconds"] += 1.0
    after["per_task"][1]["topology_updates"] += 1
    differences, same = compare(before, after)
    assert [d.split(":")[0] for d in differences] == ["acc_matrix[1][0]", "per_task[1].topology_updates"]
    assert same > 10


def test_a_different_result_exits_1_and_names_it(run, cifar_dir, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / run_dir.CONFIG_FILE).write_text((run / run_dir.CONFIG_FILE).read_text())
    results = json.loads((run / run_dir.RESULTS_FILE).read_text())
    results["acc_matrix"][0][0] += 1.0
    (tampered / run_dir.RESULTS_FILE).write_text(json.dumps(results))
    assert main([str(tampered), "--out", str(tmp_path / "again"), "--data_dir", str(cifar_dir)]) == 1
    assert "1 numbers differ" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "unknown setting", "unfinished"])
def test_a_run_that_cannot_be_rerun_is_one_line_and_exit_2(run, tmp_path, capsys, problem):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((run / run_dir.CONFIG_FILE).read_text())
    results = json.loads((run / run_dir.RESULTS_FILE).read_text())
    if problem == "unknown setting":
        config["a_setting_from_the_future"] = 1
    if problem == "unfinished":
        results["complete"] = False
    if problem != "missing":
        (broken / run_dir.CONFIG_FILE).write_text(json.dumps(config))
        (broken / run_dir.RESULTS_FILE).write_text(json.dumps(results))
    assert main([str(broken), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
