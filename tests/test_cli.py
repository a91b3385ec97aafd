"""The command line: the paper's README commands, aliases, booleans, validation, --help."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from data import class_order
from sparselearning import derive_seed
from utils.cli import MAX_SEED, Config, build_parser, parse_config
from utils.entry import main
from utils.errors import UserError

# Every flag and the value it has when not given (device: checked separately, it depends
# on the machine; output_dir: derived from the other fields).
DEFAULTS: dict[str, object] = {
    "num_tasks": 10,
    "num_classes": 100,
    "num_classes_per_task": 10,
    "net_name": "resnet18",
    "net_width": 64,
    "optimizer": "adam",
    "lr": 1e-3,
    "momentum": 0.9,
    "l2": 0.0,
    "epochs": 20,
    "test_batch_size": 128,
    "sparse": True,
    "density": 0.2,
    "sparse_init": "uniform",
    "death": "magnitude",
    "growth": "random",
    "death_rate": 0.5,
    "update_frequency": 400,
    "isolate": True,
    "new_weights": "zero",
    "seed": 0,
    "data_dir": Path("data"),
    "image_size": 32,
    "test_per_class": 100,
    "class_order": "fixed",
    "keep": "best_train",
    "eval": "task",
    "task_inference": "none",
    "download": True,
    "resume": False,
    "overwrite": False,
    "checkpoint_every": 1,
    "checkpoint_minutes": 10.0,
    "max_batches": None,
    "amp": False,
    "compile": False,
    "channels_last": None,
    "cudnn_benchmark": False,
    "tensorboard": False,
    "deterministic": True,
    "regrow_frozen": False,
    "lock_stale_minutes": 10.0,
    "approach": "dst",
    "prune_after": None,
    "erk_power": 1.0,
    "growth_later": None,
    "turnover_stop": 0.0,
    "train_per_class": None,
}

FIELDS = [field.name for field in dataclasses.fields(Config)]


def expected(benchmark: str, **changes: object) -> dict[str, object]:
    """The full expected config (except device and output_dir) with ``changes`` applied."""
    values = dict(DEFAULTS, dataset=benchmark, batch_size=64 if benchmark == "cifar100" else 128)
    values.update(changes)
    return values


def assert_config(config: Config, values: dict[str, object]) -> None:
    for name, value in values.items():
        assert getattr(config, name) == value, name
        assert type(getattr(config, name)) is type(value), name


def test_config_has_exactly_the_agreed_fields() -> None:
    assert set(FIELDS) == set(DEFAULTS) | {"dataset", "batch_size", "output_dir", "device"}


@pytest.mark.parametrize(
    ("benchmark", "argv", "changes"),
    [
        (
            "cifar100",
            "--dataset cifar100 --num_tasks 5 --num_classes 100 --num_classes_per_task 20 "
            "--sparse_init uniform --growth momentum --density 0.1 --epochs 100 "
            "--update_frequency 100",
            dict(num_tasks=5, num_classes_per_task=20, sparse_init="uniform",
                 growth="momentum", density=0.1, epochs=100, update_frequency=100),
        ),
        (
            "cifar100",
            "--dataset cifar100 --num_tasks 10 --num_classes 100 --num_classes_per_task 10 "
            "--sparse_init ERK --growth random --density 0.2 --epochs 100 "
            "--update_frequency 400",
            dict(num_tasks=10, num_classes_per_task=10, sparse_init="ERK", growth="random",
                 density=0.2, epochs=100, update_frequency=400),
        ),
        (
            "cifar100",
            "--dataset cifar100 --num_tasks 20 --num_classes 100 --num_classes_per_task 5 "
            "--sparse_init uniform --growth unfired --density 0.05 --epochs 25 "
            "--update_frequency 100",
            dict(num_tasks=20, num_classes_per_task=5, sparse_init="uniform", growth="unfired",
                 density=0.05, epochs=25, update_frequency=100),
        ),
        (
            "miniImageNet",
            "--dataset miniImageNet --num_tasks 10 --num_classes 100 --num_classes_per_task 10 "
            "--sparse_init ERK --growth gradient --density 0.2 --epochs 100 "
            "--update_frequency 400",
            dict(num_tasks=10, num_classes_per_task=10, sparse_init="ERK", growth="gradient",
                 density=0.2, epochs=100, update_frequency=400),
        ),
    ],
    ids=["cifar100-5x20-uniform-momentum", "cifar100-10x10-ERK-random",
         "cifar100-20x5-uniform-unfired", "miniImageNet-10x10-ERK-gradient"],
)
def test_readme_commands_parse_to_the_intended_config(
    benchmark: str, argv: str, changes: dict[str, object]
) -> None:
    config = parse_config(argv.split(), benchmark)
    values = expected(benchmark, **changes)
    assert_config(config, values)
    init, growth, density = changes["sparse_init"], changes["growth"], changes["density"]
    name = f"{benchmark}_{changes['num_tasks']}tasks_{init}_{growth}_d{density}_s0"
    assert config.output_dir == Path("runs") / name


@pytest.mark.parametrize(("benchmark", "batch_size"), [("cifar100", 64), ("miniImageNet", 128)])
def test_defaults_depend_only_on_the_benchmark(benchmark: str, batch_size: int) -> None:
    config = parse_config([], benchmark)
    assert_config(config, expected(benchmark))
    assert config.batch_size == batch_size
    assert config.output_dir == Path(f"runs/{benchmark}_10tasks_uniform_random_d0.2_s0")
    assert config.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_config_is_frozen_and_serializes_to_json() -> None:
    config = parse_config(["--output_dir", "somewhere/run1"], "cifar100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1  # type: ignore[misc]
    data = config.to_dict()
    assert list(data) == FIELDS
    assert data["output_dir"] == str(Path("somewhere/run1"))
    assert data["data_dir"] == "data"
    assert json.loads(json.dumps(data)) == data


# ---------------------------------------------------------------- aliases


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--init", "ERK"], "sparse_init", "ERK"),
        (["--init", "uniform"], "sparse_init", "uniform"),
        (["--sparse_init", "erk"], "sparse_init", "ERK"),
        (["--growth", "random_unfired"], "growth", "unfired"),
        (["--dataset", "CIFAR100"], "dataset", "cifar100"),
    ],
)
def test_aliases_on_cifar100(argv: list[str], field: str, value: str) -> None:
    assert getattr(parse_config(argv, "cifar100"), field) == value


@pytest.mark.parametrize("spelling", ["miniImagenet100", "miniimagenet", "miniImageNet"])
def test_miniimagenet_spellings(spelling: str) -> None:
    config = parse_config(["--dataset", spelling], "miniImageNet")
    assert config.dataset == "miniImageNet"
    assert config.output_dir == Path("runs/miniImageNet_10tasks_uniform_random_d0.2_s0")


# ---------------------------------------------------------------- booleans


def test_no_sparse_is_the_dense_baseline_without_isolation() -> None:
    config = parse_config(["--no-sparse"], "cifar100")
    assert config.sparse is False
    assert config.isolate is False
    assert config.output_dir == Path("runs/cifar100_10tasks_dense_s0")


def test_no_sparse_with_no_isolate_is_allowed() -> None:
    config = parse_config(["--no-sparse", "--no-isolate"], "cifar100")
    assert (config.sparse, config.isolate) == (False, False)


def test_no_isolate_keeps_masks_but_not_isolation() -> None:
    config = parse_config(["--no-isolate", "--seed", "3"], "cifar100")
    assert (config.sparse, config.isolate) == (True, False)
    assert config.output_dir == Path("runs/cifar100_10tasks_uniform_random_d0.2_s3_noiso")


def test_booleans_turn_off_and_on_again() -> None:
    off = parse_config(["--no-sparse", "--no-download", "--resume"], "cifar100")
    assert (off.sparse, off.download, off.resume) == (False, False, True)
    on = parse_config(
        ["--no-sparse", "--sparse", "--no-download", "--download", "--isolate", "--no-resume"],
        "cifar100",
    )
    assert (on.sparse, on.isolate, on.download, on.resume) == (True, True, True, False)


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("argv", "benchmark", "message"),
    [
        (["--num_tasks", "5"], "cifar100", "--num_classes 100 != --num_tasks 5"),
        (["--num_classes_per_task", "20"], "cifar100", "--num_classes_per_task 20"),
        (["--num_tasks", "20", "--num_classes", "200"], "cifar100", "only 100 classes"),
        (["--no-sparse", "--isolate"], "cifar100",
         "--isolate needs --sparse: the dense baseline has no masks to isolate"),
        (["--density", "0"], "cifar100", "--density must be in (0, 1]"),
        (["--density", "1.5"], "cifar100", "--density must be in (0, 1]"),
        (["--dataset", "miniImageNet"], "cifar100",
         "cifar100.py runs --dataset cifar100; use miniImageNet100.py for miniImageNet"),
        (["--dataset", "miniImagenet100"], "cifar100", "use miniImageNet100.py"),
        (["--dataset", "cifar100"], "miniImageNet",
         "miniImageNet100.py runs --dataset miniImageNet; use cifar100.py for cifar100"),
        (["--update_frequency", "-1"], "cifar100", "--update_frequency must be >= 0"),
        (["--death_rate", "1"], "cifar100", "--death_rate must be in [0, 1)"),
        (["--death_rate", "-0.1"], "cifar100", "--death_rate must be in [0, 1)"),
        (["--resume", "--overwrite"], "cifar100", "--resume and --overwrite exclude each other"),
        (["--lr", "0"], "cifar100", "--lr must be > 0"),
        (["--l2", "-0.1"], "cifar100", "--l2 must be >= 0"),
        (["--epochs", "0"], "cifar100", "--epochs must be >= 1"),
        (["--batch_size", "0"], "cifar100", "--batch_size must be >= 1"),
        (["--test_batch_size", "0"], "miniImageNet", "--test_batch_size must be >= 1"),
        (["--num_tasks", "0", "--num_classes", "0"], "cifar100", "--num_tasks must be >= 1"),
        (["--image_size", "4"], "cifar100", "--image_size must be >= 8"),
        (["--max_batches", "0"], "cifar100", "--max_batches must be >= 1"),
        (["--seed", "-1"], "cifar100", "--seed must be in [0, 2**64 - 1]"),
        (["--seed", str(2**64)], "cifar100", "--seed must be in [0, 2**64 - 1]"),
        (["--batch_size", "1"], "cifar100", "--batch_size 1: a batch needs at least 2 images"),
        (["--test_batch_size", "1"], "miniImageNet", "--test_batch_size 1: a batch needs at least 2 images"),
        (["--num_tasks", "100", "--num_classes_per_task", "1", "--test_per_class", "1"], "miniImageNet",
         "tests each task on one image"),
        pytest.param(["--device", "meta"], "cifar100", "a run trains on cpu or cuda[:N], not on meta",
                     id="device-meta"),  # an id without "cuda": `pytest -k cuda` selects the GPU cases only
        (["--device", "mps"], "cifar100", "--device mps: not supported: "),
        (["--device", "cpu", "--cudnn_benchmark"], "cifar100", "add --no-deterministic to autotune"),
        (["--device", "xpu"], "cifar100", "not on xpu"),
        (["--momentum", "1"], "cifar100", "--momentum must be in [0, 1)"),
        (["--device", "gpu7"], "cifar100", "not a torch device"),
        (["--optimizer", "sgd", "--momentum", "0", "--growth", "momentum"], "cifar100",
         "it needs --momentum > 0"),
        (["--checkpoint_every", "-1"], "cifar100", "--checkpoint_every must be >= 0"),
    ],
)
def test_semantic_errors_are_one_line_user_errors(
    argv: list[str], benchmark: str, message: str
) -> None:
    with pytest.raises(UserError) as info:
        parse_config(argv, benchmark)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"], ids=["no_index", "index_0", "index_1"])
def test_a_gpu_device_without_a_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        parse_config(["--device", device], "cifar100")


def test_device_defaults_to_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_config([], "cifar100").device == "cpu"
    assert parse_config(["--device", "cpu"], "miniImageNet").device == "cpu"


def test_device_defaults_to_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_config([], "cifar100").device == "cuda"


@pytest.mark.parametrize(
    "argv",
    [
        ["--growth", "magnitude"],
        ["--sparse_init", "normal"],
        ["--dataset", "cifar10"],
        ["--optimizer", "rmsprop"],
        ["--epochs", "ten"],
        ["--not_a_flag"],
        ["--dens", "0.1"],  # no abbreviations: a typo must not silently pick a flag
    ],
)
def test_malformed_flags_are_one_line_user_errors(argv: list[str]) -> None:
    with pytest.raises(UserError) as info:
        parse_config(argv, "cifar100")
    text = str(info.value)
    assert "\n" not in text and text.endswith("(see cifar100.py --help)")
    assert argv[0].split("=")[0] in text or "invalid" in text


FLOAT_FLAGS = ["--lr", "--momentum", "--l2", "--density", "--death_rate", "--checkpoint_minutes",
               "--lock_stale_minutes", "--erk_power", "--turnover_stop"]


def test_every_float_flag_is_checked_for_finiteness() -> None:
    floats = [a.option_strings[0] for a in build_parser("cifar100")._actions
              if isinstance(a.default, float) and a.type is not None]
    assert sorted(floats) == sorted(FLOAT_FLAGS)
    assert all(a.type is not float for a in build_parser("cifar100")._actions)  # float() takes inf and nan


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_floats_are_one_line_user_errors(flag: str, value: str) -> None:
    with pytest.raises(UserError) as info:
        parse_config([f"{flag}={value}"], "cifar100")  # = : argparse takes a bare -inf for an option
    text = str(info.value)
    assert "\n" not in text and f"argument {flag}: must be a finite number, got '{value}'" in text


@pytest.mark.parametrize("flag", ["--output_dir", "--data_dir"])
def test_an_empty_path_is_a_user_error(flag: str) -> None:
    with pytest.raises(UserError, match=f"argument {flag}: an empty path"):
        parse_config([flag, ""], "cifar100")
    assert parse_config([flag, "."], "cifar100").to_dict()[flag[2:]] == "."  # the way to say "here"


def test_the_largest_seed_is_the_largest_torch_takes() -> None:
    config = parse_config(["--seed", str(MAX_SEED)], "cifar100")
    assert config.seed == 2**64 - 1 and json.loads(json.dumps(config.to_dict()))["seed"] == MAX_SEED
    torch.manual_seed(MAX_SEED)  # every generator a run seeds from --seed takes it
    torch.Generator().manual_seed(derive_seed(MAX_SEED, 1, 2))
    class_order(100, "random", MAX_SEED)
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(MAX_SEED + 1)  # the bound is torch's own
    torch.manual_seed(0)


@pytest.mark.parametrize(("benchmark", "argv"), [
    ("cifar100", ["--seed", str(2**64)]),
    ("cifar100", ["--lr", "inf"]),
    ("cifar100", ["--l2", "nan"]),
    ("cifar100", ["--momentum", "nan"]),
    ("cifar100", ["--density", "nan"]),
    ("cifar100", ["--death_rate", "nan"]),
    ("cifar100", ["--device", "meta"]),
    ("cifar100", ["--output_dir", ""]),
    ("cifar100", ["--batch_size", "1"]),
    ("miniImageNet", ["--test_batch_size", "1"]),
])
def test_each_user_error_exits_2_with_one_line_and_writes_nothing(
    benchmark: str, argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default output directory, runs/..., would land here
    assert main(benchmark, ["--device", "cpu", "--data_dir", str(tmp_path / "none"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_image_size_that_cannot_fit_in_memory_exits_2_before_decoding(
    mini_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(mini_dir.iterdir())
    argv = ["--device", "cpu", "--data_dir", str(mini_dir), "--output_dir", str(tmp_path / "out"),
            "--image_size", "30000", "--test_per_class", "10"]  # >= 1680 images x 3 x 30000^2 bytes: terabytes
    assert main("miniImageNet", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "at --image_size 30000 need " in err and " TiB of memory once decoded" in err and " available" in err
    assert sorted(mini_dir.iterdir()) == before and not (tmp_path / "out").exists()


def test_unknown_benchmark_is_a_bug_not_a_user_error() -> None:
    with pytest.raises(ValueError):
        build_parser("cifar10")


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize(("benchmark", "batch_size"), [("cifar100", 64), ("miniImageNet", 128)])
def test_help_lists_every_flag_with_default_and_choices(
    benchmark: str, batch_size: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--help"], benchmark)
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    text = text.replace("- ", "-")  # argparse may break a line after a hyphen

    for name in FIELDS:
        assert f"--{name}" in text, name
    for flag in ("--no-sparse", "--no-isolate", "--no-download", "--no-resume", "--init"):
        assert flag in text, flag
    for choices in ("{cifar100,miniImageNet}", "{resnet18}", "{adam,sgd}", "{ERK,uniform}",
                    "{magnitude}", "{random,unfired,momentum,gradient}", "{zero,init}",
                    "{fixed,random}", "{best_train,last}", "{task,all_logits}"):
        assert choices in text, choices
    for alias in ("miniImagenet100", "random_unfired"):
        assert alias in text, alias
    assert "BatchNorm uses batch statistics" in text

    # one "(default: ...)" per option (every flag but --help), in the order of the flags
    defaults = re.findall(r"\(default: ([^)]*)\)", text)
    option_count = len(build_parser(benchmark)._actions) - 1
    assert len(defaults) == option_count
    for value in (f"{benchmark}", "0.001", "0.9", "0.2", "uniform", "random", "400", "zero",
                  "best_train", "True", "False", "None", str(batch_size)):
        assert value in defaults or any(d.startswith(value) for d in defaults), value
    assert "--batch_size BATCH_SIZE training batch size" in text
    assert re.search(rf"cifar100 64, miniImageNet 128\) \(default: {batch_size}\)", text)
    assert "--isolate, --no-isolate" in text and "(default: True; False with --no-sparse)" in text
