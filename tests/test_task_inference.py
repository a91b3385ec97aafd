"""Task-agnostic testing (utils.task_inference): the task of a test batch is inferred, not given."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from data.split import Normalization, Split
from data import TensorLoader
from sparselearning import TaskMasks
from models import build_model
from utils import experiment, retest, run_dir
from utils.chance import found_note
from utils.entry import main
from utils.evaluation import evaluate_row
from utils.metrics import format_agnostic_report
from utils.task_inference import (CALIBRATED_METHODS, INFERENCE_METHODS, TaskInference,
                                  measure_calibration, superposition_gradient)
from tests.conftest import SHARED, SMALL_NET, finished_run, run_once

METHODS = [method for method in INFERENCE_METHODS[1:] if method not in CALIBRATED_METHODS]
PLAIN = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels / 255, nothing subtracted


class ColourNet(nn.Module):
    """Mean colour of the image -> bias-free linear layer over all classes."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def colour_tasks(tasks: int, k: int, per_class: int, batch_size: int) -> tuple[list[slice], list[TensorLoader]]:
    """Task t's images are one constant colour (channel t lit, brightness by class)."""
    classes, loaders = [], []
    for t in range(tasks):
        labels = torch.arange(t * k, (t + 1) * k).repeat_interleave(per_class)
        images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
        images[:, t] = (120 + 40 * (labels % k)).view(-1, 1, 1).to(torch.uint8)
        classes.append(slice(t * k, (t + 1) * k))
        loaders.append(TensorLoader(Split(images, labels, PLAIN), batch_size=batch_size, train=False))
    return classes, loaders


def colour_networks(tasks: int, k: int) -> tuple[ColourNet, TaskMasks]:
    """Task t's mask is its own classes' rows; its classes respond to colour t only, class c of the
    task the more the brighter (so that it predicts its classes partly right)."""
    model, store = ColourNet(tasks * k), TaskMasks()
    with torch.no_grad():
        model.fc.weight.zero_()
        for t in range(tasks):
            for c in range(k):
                model.fc.weight[t * k + c, t] = 4.0 + 3.0 * c
                model.fc.weight[t * k + c, (t + 1) % 3] = -1.0  # also used: not only zeros outside
            mask = torch.zeros(tasks * k, 3, dtype=torch.bool)
            mask[t * k:(t + 1) * k] = True
            store.add({"fc.weight": mask})
    return model, store


@pytest.mark.parametrize("method", METHODS)
def test_every_batch_of_recognisable_tasks_is_assigned_to_its_task(method):
    tasks, k = 3, 2
    classes, loaders = colour_tasks(tasks, k, per_class=8, batch_size=4)
    model, store = colour_networks(tasks, k)
    inference = TaskInference(method, "task")
    for i in range(tasks):
        row = inference.row(model, store, classes, loaders, i)
        aware = evaluate_row(model, store, classes, loaders, i, mode="task")
        assert row.task_id_accuracy == 100.0
        assert np.array_equal(row.accuracy[: i + 1], aware[: i + 1])  # found tasks: predicted as if given
        assert np.all(np.isnan(row.accuracy[i + 1:]))
        assert 0 < row.accuracy[0] < 100  # the networks are partly right within their task


def tiny_batchnorm_net(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes, bias=False))


def random_masks(model: nn.Module, tasks: int, density: float = 0.5, seed: int = 0) -> TaskMasks:
    generator, store = torch.Generator().manual_seed(seed), TaskMasks()
    for _ in range(tasks):
        store.add({name: torch.rand(p.shape, generator=generator) < density
                   for name, p in model.named_parameters() if p.dim() > 1})
    return store


def random_loaders(tasks: int, k: int, n: int = 20, batch_size: int = 8) -> tuple[list[slice], list[TensorLoader]]:
    generator = torch.Generator().manual_seed(1)
    classes, loaders = [], []
    for t in range(tasks):
        images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=generator)
        labels = torch.randint(t * k, (t + 1) * k, (n,), generator=generator)
        classes.append(slice(t * k, (t + 1) * k))
        loaders.append(TensorLoader(Split(images, labels, PLAIN), batch_size=batch_size, train=False))
    return classes, loaders


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["task", "all_logits"])
def test_with_one_task_the_task_agnostic_accuracy_is_the_task_aware_one(method, mode):
    model = tiny_batchnorm_net(3)
    store = random_masks(model, 1)
    classes, loaders = random_loaders(1, 3)
    row = TaskInference(method, mode).row(model, store, classes, loaders, 0)
    assert row.task_id_accuracy == 100.0
    assert row.accuracy[0] == evaluate_row(model, store, classes, loaders, 0, mode=mode)[0]


def entropy_at(model: nn.Module, masks: list[dict], coefficients: torch.Tensor, x: torch.Tensor, columns: int) -> float:
    """H(a): the mean entropy over the first `columns` classes of W * sum_t a_t M_t (brute force)."""
    params = dict(model.named_parameters())
    weights = {name: params[name].detach() * sum(a * m[name] for a, m in zip(coefficients, masks)) for name in masks[0]}
    with torch.no_grad():
        log_p = torch.func.functional_call(model, weights, (x,))[:, :columns].log_softmax(1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


def test_the_one_shot_rule_picks_what_brute_force_over_the_coefficients_picks():
    model = tiny_batchnorm_net(8).double()
    tasks, step = 4, 1e-6
    store = random_masks(model, tasks, density=0.6, seed=3)
    masks = [store[t] for t in range(tasks)]
    classes = [slice(2 * t, 2 * t + 2) for t in range(tasks)]
    uniform = torch.full((tasks,), 1.0 / tasks, dtype=torch.float64)
    for seed in range(6):
        x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        gradient = superposition_gradient(model, masks, x, classes)
        # central differences of H in each coefficient: the gradient the rule ranks tasks by
        brute = torch.tensor([(entropy_at(model, masks, uniform + step * e, x, 8)
                               - entropy_at(model, masks, uniform - step * e, x, 8)) / (2 * step)
                              for e in torch.eye(tasks, dtype=torch.float64)], dtype=torch.float64)
        assert torch.allclose(gradient, brute, rtol=1e-5, atol=1e-9), (gradient, brute)
        # brute force: the task whose coefficient, raised a little, lowers the entropy the most
        lowest = min(range(tasks), key=lambda t: entropy_at(model, masks, uniform + 1e-4 * torch.eye(tasks)[t], x, 8))
        assert int(gradient.argmin()) == lowest
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters())


def test_unchanged_networks_are_not_run_again_and_changed_ones_are():
    """Row i runs task i's network on tasks 0..i and tasks 0..i-1's networks on task i: 2i + 1 test
    sets (confidence and entropy share them); a network whose weights changed runs again."""
    model = tiny_batchnorm_net(6)
    store = random_masks(model, 3)
    classes, loaders = random_loaders(3, 2, n=20, batch_size=8)  # 3 batches per test set (8, 8, 4)
    confidence = TaskInference("confidence", "task")
    entropy = TaskInference("entropy", "task", tested=confidence.tested)
    assert [confidence.row(model, store, classes, loaders, i).forward_passes for i in range(3)] == [3, 9, 15]
    assert entropy.row(model, store, classes, loaders, 2).forward_passes == 0
    only_first = store[0]["5.weight"] & ~store[1]["5.weight"] & ~store[2]["5.weight"]
    with torch.no_grad():
        model[-1].weight[only_first] += 1.0  # task 1's network changes, the others do not
    assert confidence.row(model, store, classes, loaders, 2).forward_passes == 9  # its 3 test sets
    oneshot = TaskInference("oneshot", "task", tested=confidence.tested)
    row = oneshot.row(model, store, classes, loaders, 2)
    assert (row.forward_passes, row.backward_passes) == (9, 9)  # one of each per batch; own networks kept


def test_dense_networks_serve_every_candidate_with_one_pass_and_oneshot_needs_masks():
    model = tiny_batchnorm_net(6)
    classes, loaders = random_loaders(3, 2)
    row = TaskInference("entropy", "task").row(model, TaskMasks(), classes, loaders, 2)
    assert row.forward_passes == 9 and 0 <= row.task_id_accuracy <= 100
    with pytest.raises(ValueError, match="mask per task"):
        TaskInference("oneshot", "task").row(model, TaskMasks(), classes, loaders, 2)
    with pytest.raises(ValueError, match="one of"):
        TaskInference("none", "task")


def test_a_batch_of_the_wrong_task_counts_all_its_images_wrong():
    """Networks that claim every batch for task 1: task 0's images all count as wrong."""
    tasks, k = 2, 2
    classes, loaders = colour_tasks(tasks, k, per_class=4, batch_size=4)
    model, store = colour_networks(tasks, k)
    with torch.no_grad():
        model.fc.weight[2:, :] = torch.tensor([[30.0, 30.0, 0.0], [0.0, 0.0, 0.0]])  # task 1: sure of all
    row = TaskInference("confidence", "task").row(model, store, classes, loaders, 1)
    aware = evaluate_row(model, store, classes, loaders, 1, mode="task")
    assert row.accuracy[0] == 0.0 and aware[0] > 0
    assert row.accuracy[1] == aware[1] and row.task_id_accuracy == 50.0


def test_a_task_found_share_near_chance_is_called_so_and_explained():
    near = found_note(21.5, 5)
    assert near.startswith("task found for 21.5% of batches (chance: task found 1/5 of batches = 20.0%; near chance:")
    assert "not calibrated against each other" in near and "README 'Testing without the task id'" in near
    assert "near chance" not in found_note(46.0, 5) and "chance: task found 1/5 of batches = 20.0%" in found_note(46.0, 5)
    assert "near chance" not in found_note(100.0, 1) and "nothing to infer" in found_note(100.0, 1)
    matrix = np.array([[80.0, np.nan], [40.0, 0.0]])
    at_chance = format_agnostic_report(matrix, [100.0, 50.0], "confidence", 16)
    assert "CHANCE (1/(tasks so far), per row):\n 100.00   50.00" in at_chance
    assert "Last row near chance: the tasks' networks are not calibrated against each other" in at_chance
    assert "near chance" not in format_agnostic_report(matrix, [100.0, 75.0], "confidence", 16)


# ---- in runs -------------------------------------------------------------------------------------

# Runs of the machinery: 96 training images a task (calibration reads them all), 96 test images a
# task in two batches (64 + 32), the narrow backbone
TINY = ["--num_tasks", "3", "--num_classes", "6", "--num_classes_per_task", "2", "--epochs", "1",
        "--max_batches", "3", "--batch_size", "16", "--update_frequency", "2", "--test_batch_size", "64",
        "--train_per_class", "48", "--test_per_class", "48", *SMALL_NET]


def run(data_dir: Path, out: Path, *flags: str) -> dict:
    return finished_run("cifar100", data_dir, out, *TINY, *flags)


@pytest.fixture(scope="module")
def plain_run(cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A TINY run with the default: the paper's protocol, task id given only (read, never written)."""
    out = tmp_path_factory.mktemp("plain") / "none"
    return out, run(cifar_dir, out)


@pytest.fixture(scope="module")
def calibrated_run(cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The same run with `--task_inference calibrated` (read, never written)."""
    out = tmp_path_factory.mktemp("calibrated") / "calibrated"
    return out, run(cifar_dir, out, "--task_inference", "calibrated")


def test_task_inference_changes_nothing_the_task_aware_test_or_training_computes(cifar_dir, tmp_path, plain_run):
    """One-shot inference, the one with backward passes, against none (confidence and entropy only
    run forward passes under no_grad; the retest test below checks a confidence run's figures,
    whose task-aware ones share its passes, against passes of their own)."""
    plain_dir, plain = plain_run  # the default: the paper's protocol, task id given only
    assert plain["acc_matrix_agnostic"] is None and plain["task_inference"] == {"method": "none"}
    assert "task id given only (--task_inference none)" in (plain_dir / run_dir.LOG_FILE).read_text()
    weights = run_dir.load_checkpoint(plain_dir / run_dir.CHECKPOINT_FILE)["model"]
    for method in ("oneshot",):
        results = run(cifar_dir, tmp_path / method, "--task_inference", method)
        assert results["acc_matrix"] == plain["acc_matrix"]  # bit for bit (JSON keeps every float digit)
        after = run_dir.load_checkpoint(tmp_path / method / run_dir.CHECKPOINT_FILE)["model"]
        assert all(torch.equal(weights[name], after[name]) for name in weights)
        agnostic = np.array(results["acc_matrix_agnostic"], dtype=float)
        assert agnostic[0, 0] == results["acc_matrix"][0][0]  # one candidate: the task-aware figure
        assert np.all(np.isnan(agnostic[np.triu_indices(3, 1)])) and np.all(np.isfinite(agnostic[np.tril_indices(3)]))
        assert results["acc_agnostic"] == pytest.approx(agnostic[-1].mean())
        assert len(results["task_id_accuracy"]) == 3 and results["task_id_accuracy"][0] == 100.0
        cost = results["task_inference"]
        assert cost["method"] == method and cost["test_batch_size"] == 64 and cost["seconds"] > 0
        assert (cost["backward_passes"] > 0) == (method == "oneshot")
        report = (tmp_path / method / run_dir.REPORT_FILE).read_text()
        assert "TASK-AGNOSTIC ACCURACY MATRIX" in report and "CHANCE (1/(tasks so far), per row)" in report
        log = (tmp_path / method / run_dir.LOG_FILE).read_text()
        for tasks in (2, 3):  # each row's line, then the last line, says what chance is
            assert log.count(f"(chance: task found 1/{tasks} of batches = {100 / tasks:.1f}%") == 1 + (tasks == 3)


# A real-data run whose tasks the default method tells apart: 3 tasks of 2 classes, 2 full epochs,
# ERK, gradient growth, a topology update every 10 batches, test batches of 16 (task found in 88.5 /
# 61.5 % of the batches of rows 2 / 3 on the CIFAR-100 subset, chance 50 / 33.3). Measured (README):
# with ERK, `confidence` finds most batches' tasks; with uniform init at density 0.2 the first
# task's network is the most confident on every test set and task identification is near chance.
RECOGNISABLE = ["--num_tasks", "3", "--num_classes", "6", "--num_classes_per_task", "2", "--epochs", "2",
                "--density", "0.2", "--sparse_init", "ERK", "--growth", "gradient", "--update_frequency", "10",
                "--test_batch_size", "16", "--task_inference", "confidence"]


@pytest.fixture(scope="module")
def recognisable(cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    return run_once(tmp_path_factory, "recognisable", cifar_dir, *RECOGNISABLE)


def test_a_real_data_run_finds_the_tasks_of_test_batches_above_chance(cifar_dir, recognisable):
    _, results = recognisable
    found = results["task_id_accuracy"]
    assert found[0] == 100.0  # one candidate
    if cifar_dir == SHARED:  # real CIFAR-100 images (the stand-in's images tell nothing about real tasks)
        for i in (1, 2):
            assert found[i] > 100.0 / (i + 1), found  # chance: 1 / (tasks so far)
    aware, agnostic = (np.array(results[key], dtype=float) for key in ("acc_matrix", "acc_matrix_agnostic"))
    lower = np.tril_indices(3)
    assert agnostic[0, 0] == aware[0, 0] and np.all(agnostic[lower] <= aware[lower])  # a wrong task: 0 for its batch
    assert results["acc_agnostic"] == pytest.approx(agnostic[-1].mean()) and results["acc_agnostic"] < results["acc"]
    assert results["task_inference"]["method"] == "confidence" and results["task_inference"]["test_batch_size"] == 16


def test_retest_measures_again_exactly_what_the_run_measured(recognisable, tmp_path, capsys):
    run_folder, results = recognisable
    out = tmp_path / "retest.json"
    assert retest.main([str(run_folder), "--methods", "entropy", "confidence", "--test_batch_sizes", "16", "50",
                        "--out", str(out)]) == 0
    found = {(r["method"], r["test_batch_size"]): r for r in json.loads(out.read_text())["results"]}
    same = found[("confidence", 16)]
    assert same["acc_matrix_agnostic"] == [row[:3] for row in results["acc_matrix_agnostic"]]
    assert same["acc_final_row"] == results["acc_matrix"][-1] and same["acc"] == pytest.approx(results["acc"])
    assert found[("entropy", 16)]["forward_passes"] == 9 * 13  # rows 1, 2, 3: 1, 3 and 5 test sets of 13 batches
    assert found[("confidence", 16)]["forward_passes"] == 0  # the same networks' outputs, kept
    assert found[("entropy", 50)]["forward_passes"] == 9 * 4  # other batches: 1 + 3 + 5 test sets of 4 batches
    assert found[("confidence", 50)]["forward_passes"] == 0
    assert "| entropy | 16 |" in capsys.readouterr().out


def test_retest_refuses_what_it_cannot_measure_exactly(cifar_dir, tmp_path, capsys):
    assert retest.main([str(tmp_path)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    run(cifar_dir, tmp_path / "noiso", "--no-isolate", "--task_inference", "none", "--num_tasks", "1",
        "--num_classes", "2")
    assert retest.main([str(tmp_path / "noiso")]) == 2
    assert "isolated sparse run" in capsys.readouterr().err


def test_retest_answers_a_bad_flag_in_one_line_and_keeps_files_it_did_not_write(recognisable, tmp_path, capsys):
    run_folder, _ = recognisable
    assert retest.main([str(run_folder), "--methods", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--methods" in err and "usage" not in err
    foreign = tmp_path / "retest.json"
    foreign.write_text('{"mine": true}')
    assert retest.main([str(run_folder), "--methods", "confidence", "--test_batch_sizes", "16",
                        "--out", str(foreign)]) == 2
    assert "was not written by utils.retest" in capsys.readouterr().err
    assert foreign.read_text() == '{"mine": true}'
    assert retest.main([str(run_folder), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_oneshot_needs_masks(capsys):
    assert main("cifar100", ["--no-sparse", "--task_inference", "oneshot", "--device", "cpu"]) == 2
    assert "needs --sparse" in capsys.readouterr().err


# ---- calibrated claims ---------------------------------------------------------------------------

def test_calibrated_methods_find_recognisable_tasks_once_each_network_is_calibrated():
    tasks, k = 3, 2
    classes, loaders = colour_tasks(tasks, k, per_class=8, batch_size=4)
    _, training = colour_tasks(tasks, k, per_class=12, batch_size=4)  # other images of the same tasks
    model, store = colour_networks(tasks, k)
    for method in CALIBRATED_METHODS:
        inference = TaskInference(method, "task")
        with pytest.raises(ValueError, match="calibration"):
            inference.row(model, store, classes, loaders, 0)
        for t in range(tasks):
            inference.calibrate(model, store, t, classes[t], training[t])
        row = inference.row(model, store, classes, loaders, 2)
        assert row.task_id_accuracy == 100.0, method
        assert np.array_equal(row.accuracy, evaluate_row(model, store, classes, loaders, 2, mode="task"))


def test_a_calibrated_run_changes_nothing_else_and_calibrates_on_training_images_only(plain_run, calibrated_run,
                                                                                       tmp_path):
    """The task-aware matrix and the weights are those of a run without inference, bit for bit;
    each task's calibration is that of its network on its task's training images (not its test
    images), and `utils.retest` measures the run's task-agnostic matrix again exactly."""
    (plain_dir, plain), (calibrated_dir, results) = plain_run, calibrated_run
    assert results["acc_matrix"] == plain["acc_matrix"] and results["task_inference"]["method"] == "calibrated"
    before, checkpoint = (run_dir.load_checkpoint(folder / run_dir.CHECKPOINT_FILE)
                          for folder in (plain_dir, calibrated_dir))
    assert all(torch.equal(before["model"][name], checkpoint["model"][name]) for name in before["model"])
    config, state = retest.saved_run(calibrated_dir, None, None)
    tasks = retest.matching_tasks(config, state["config"])
    model = build_model(config.net_name, config.num_classes, config.net_width)
    model.load_state_dict(checkpoint["model"])
    store = TaskMasks.from_state_dict(checkpoint["task_masks"])
    measured = checkpoint["calibration"]
    for task in tasks:
        train, test = (TensorLoader(split, batch_size=64, train=False) for split in (task.train, task.test))
        assert measure_calibration(model, store, task.index, task.classes, train) == measured[task.index]
        assert measure_calibration(model, store, task.index, task.classes, test) != measured[task.index]
    out = tmp_path / "retest.json"
    assert retest.main([str(calibrated_dir), "--methods", "calibrated", "--test_batch_sizes", "64",
                        "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["acc_matrix_agnostic"] == results["acc_matrix_agnostic"]


class Killed(BaseException):
    """The process dies here (as under SIGKILL: nothing in the program handles it)."""


def test_a_resumed_calibrated_run_ends_as_an_uninterrupted_one(cifar_dir, tmp_path, monkeypatch, calibrated_run):
    """The calibrations of finished tasks come back from the checkpoint (a resumed run does not
    train them again, and the rows after it need them)."""
    _, reference = calibrated_run
    real_train_task, calls = experiment.train_task, []

    def dies_in_the_third_task(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real_train_task(*args, **kwargs)

    monkeypatch.setattr(experiment, "train_task", dies_in_the_third_task)
    with pytest.raises(Killed):
        run(cifar_dir, tmp_path / "cut", "--task_inference", "calibrated")
    monkeypatch.setattr(experiment, "train_task", real_train_task)
    resumed = run(cifar_dir, tmp_path / "cut", "--task_inference", "calibrated", "--resume")
    assert resumed["acc_matrix_agnostic"] == reference["acc_matrix_agnostic"]
    assert resumed["task_id_accuracy"] == reference["task_id_accuracy"]


def test_calibrated_methods_need_isolated_sparse_networks(capsys):
    for flags in (["--no-sparse"], ["--no-isolate"]):
        assert main("cifar100", [*flags, "--task_inference", "calibrated", "--device", "cpu"]) == 2
        assert "needs --sparse and --isolate" in capsys.readouterr().err
