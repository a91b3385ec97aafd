"""The approach interface (`utils.approaches`): the paper's commands compute exactly what they
computed before training moved behind it, and every approach is reachable by name."""

import json

import pytest

from tests.paper_commands import COMMANDS, GOLDEN, run_command, write_data
from utils.approaches import APPROACHES, approach_class
from utils.approaches.dst import DST, Dense
from utils.cli import parse_config


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("golden_data"))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_papers_commands_compute_what_they_computed_before_the_interface(name, golden_data, tmp_path):
    """Accuracy matrices, task records and every epoch's loss, to the last bit (the record:
    tests/paper_commands.py, written by the version before the interface)."""
    expected = json.loads(GOLDEN.read_text())["runs"][name]
    got = run_command(name, golden_data, tmp_path / "run")
    added = {"mask_bits", "train_flops", "train_flops_dense", "train_flops_fraction", "inference_flops",
             "inference_flops_fraction"}  # what this version adds to a task's record
    for record, old in zip(got["per_task"], expected["per_task"], strict=True):
        assert set(record) - set(old) <= added
        for key in added:
            record.pop(key, None)
    assert got == expected


def test_the_paper_flags_pick_the_approach():
    assert approach_class(parse_config([], "cifar100")) is DST
    assert approach_class(parse_config(["--update_frequency", "0"], "cifar100")) is DST  # static sparse
    assert approach_class(parse_config(["--no-isolate"], "cifar100")) is DST  # sparse fine-tuning
    assert approach_class(parse_config(["--no-sparse"], "cifar100")) is Dense
    for name, cls in APPROACHES.items():
        assert cls.name == name and approach_class(parse_config(["--approach", name], "cifar100")) is cls
