"""End-to-end runs of the two entry points on real images, plus determinism and resume.

The runs read ../shared/data when it is present (real CIFAR-100 and miniImageNet subsets) and
otherwise small generated files in the same layouts (tests/conftest.py: cifar_dir, mini_dir); the
real loading code runs either way.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparselearning import TaskMasks
from utils import experiment, run_dir, train
from utils.entry import main
from tests.conftest import SMALL_NET, finished_run as run, run_once

CHECKPOINT, RESULTS = run_dir.CHECKPOINT_FILE, run_dir.RESULTS_FILE


class Killed(BaseException):
    """The process dies here (as under SIGKILL: nothing in the program handles it)."""


def check_isolated_run(results: dict, out: Path, tasks: int, classes_per_task: int, density: float) -> None:
    """Results files, exact densities, zero forgetting, and learning clearly above chance."""
    for key in ("config", "acc_matrix", "acc", "bwt", "fwt", "inc_acc", "per_task", "environment"):
        assert key in results, key
    for name in (run_dir.CONFIG_FILE, run_dir.LOG_FILE, run_dir.REPORT_FILE, CHECKPOINT):
        assert (out / name).is_file(), name
    assert results["environment"]["torch"] == torch.__version__
    acc = np.array(results["acc_matrix"], dtype=float)
    assert acc.shape == (tasks, tasks)
    # isolation: each task's accuracy after the last task equals the one right after training it
    for j in range(tasks):
        assert np.all(acc[j:, j] == acc[j, j]), acc
    assert results["bwt"] == 0.0
    assert results["acc"] == pytest.approx(acc[-1].mean())
    for record in results["per_task"]:
        assert abs(record["density"] - density) < 1e-5, record  # exact counts, rounding only
        assert record["capacity_used"] + record["capacity_free"] == pytest.approx(1.0)
    assert results["per_task"][-1]["capacity_used"] > density  # later tasks add weights
    chance = 100 / classes_per_task
    assert acc[-1].mean() > chance + 15, acc  # e.g. > 35 % with 5 classes per task
    store = TaskMasks.from_state_dict(run_dir.load_checkpoint(out / CHECKPOINT)["task_masks"])
    assert len(store) == tasks


def test_cifar100_end_to_end(cifar_dir, tmp_path):
    out = tmp_path / "run"
    results = run("cifar100", cifar_dir, out, "--num_tasks", "2", "--num_classes", "10",
                  "--num_classes_per_task", "5", "--epochs", "2", "--max_batches", "10", "--density", "0.2",
                  "--sparse_init", "ERK", "--growth", "gradient",
                  "--update_frequency", "10")  # half of each epoch's 20 batches (ACC 52.6 % on the subset)
    check_isolated_run(results, out, tasks=2, classes_per_task=5, density=0.2)
    assert results["config"]["growth"] == "gradient"
    assert "ACCURACY MATRIX" in (out / run_dir.REPORT_FILE).read_text()


def test_miniimagenet_end_to_end(mini_dir, tmp_path):
    out = tmp_path / "run"
    results = run("miniImageNet", mini_dir, out, "--num_tasks", "2", "--num_classes", "10",
                  "--num_classes_per_task", "5", "--epochs", "5", "--batch_size", "16", "--test_per_class", "10",
                  "--density", "0.3", "--sparse_init", "uniform", "--growth", "momentum", "--update_frequency", "20")
    check_isolated_run(results, out, tasks=2, classes_per_task=5, density=0.3)
    assert (mini_dir / "miniImageNet_32px.npz").is_file()


# Machinery runs (determinism, resume, baselines): small test sets, two test batches of 16 a task,
# and the narrow backbone
TEST_SETS = ["--test_per_class", "16", "--test_batch_size", "16"]
SMALL = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "2",
         "--max_batches", "3", "--batch_size", "16", "--update_frequency", "2", "--growth", "random",
         *TEST_SETS, *SMALL_NET, "--task_inference", "confidence"]  # the task-agnostic figures are compared too


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return run_dir.load_checkpoint(out / CHECKPOINT)["model"]


@pytest.fixture(scope="module")
def small_run(cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A finished run with the SMALL flags (read, never written, by the tests that use it)."""
    return run_once(tmp_path_factory, "small", cifar_dir, *SMALL)


def test_same_seed_same_results_bit_for_bit(cifar_dir, small_run, tmp_path):
    (first, a), b = small_run, run("cifar100", cifar_dir, tmp_path / "b", *SMALL)
    assert a["acc_matrix"] == b["acc_matrix"] and a["acc_matrix_agnostic"] == b["acc_matrix_agnostic"]
    wa, wb = final_weights(first), final_weights(tmp_path / "b")
    assert all(torch.equal(wa[name], wb[name]) for name in wa)
    run("cifar100", cifar_dir, tmp_path / "c", *SMALL, "--seed", "1")
    wc = final_weights(tmp_path / "c")
    assert not all(torch.equal(wa[name], wc[name]) for name in wa)


def test_resume_after_a_task_continues_identically(cifar_dir, small_run, tmp_path, monkeypatch):
    reference_dir, reference = small_run

    calls = []
    real_train_task = experiment.train_task

    def interrupted(*args, **kwargs):
        if calls:
            raise Killed  # the run dies during the second task
        calls.append(1)
        return real_train_task(*args, **kwargs)

    monkeypatch.setattr(experiment, "train_task", interrupted)
    with pytest.raises(Killed):
        run("cifar100", cifar_dir, tmp_path / "cut", *SMALL)
    assert not (tmp_path / "cut" / RESULTS).exists()
    assert run_dir.load_checkpoint(tmp_path / "cut" / CHECKPOINT)["tasks_done"] == 1
    monkeypatch.setattr(experiment, "train_task", real_train_task)

    resumed = run("cifar100", cifar_dir, tmp_path / "cut", *SMALL, "--resume")
    assert resumed["acc_matrix"] == reference["acc_matrix"]
    assert resumed["acc_matrix_agnostic"] == reference["acc_matrix_agnostic"]  # the task-id-hidden rows kept
    wr, wf = final_weights(reference_dir), final_weights(tmp_path / "cut")
    assert all(torch.equal(wr[name], wf[name]) for name in wr)


def test_existing_run_needs_resume_and_resume_checks_the_config(cifar_dir, small_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(small_run[0], out)  # a finished run with these flags (refused: nothing is written)
    argv = ["--data_dir", str(cifar_dir), "--no-download", "--device", "cpu", "--output_dir", str(out), *SMALL]
    assert main("cifar100", argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main("cifar100", [*argv, "--resume", "--density", "0.5"]) == 2
    assert "density" in capsys.readouterr().err


def test_baselines_dense_and_without_isolation_run(cifar_dir, tmp_path):
    dense = run("cifar100", cifar_dir, tmp_path / "dense", *SMALL, "--no-sparse")
    assert dense["config"]["sparse"] is False and "density" not in dense["per_task"][0]
    noiso = run("cifar100", cifar_dir, tmp_path / "noiso", *SMALL, "--no-isolate", "--eval", "all_logits")
    assert noiso["per_task"][1]["capacity_reused"] == 0.0  # nothing frozen, so nothing counted as reused
    static = run("cifar100", cifar_dir, tmp_path / "static", *SMALL, "--update_frequency", "0", "--keep", "last")
    assert static["bwt"] == 0.0


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main("cifar100", ["--data_dir", str(tmp_path), "--no-download", "--output_dir", str(tmp_path / "o"),
                             "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "cifar-100-python") in err
    assert main("cifar100", ["--num_classes", "7"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_files_are_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results.json"
    run_dir.write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        run_dir.write_json(target, {"a": float("nan")})  # strict JSON refuses NaN before writing
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(Exception):
        run_dir.save_checkpoint(tmp_path / "ckpt.pt", {"bad": lambda: None})  # cannot be pickled
    assert not (tmp_path / "ckpt.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


MID_TASK = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "3",
            "--max_batches", "3", "--batch_size", "16", "--update_frequency", "2", "--growth", "momentum",
            "--checkpoint_every", "1", "--checkpoint_minutes", "0", *TEST_SETS, *SMALL_NET,
            "--task_inference", "confidence"]


@pytest.fixture(scope="module")
def mid_task_reference(cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run with the MID_TASK flags."""
    return run_once(tmp_path_factory, "mid_task", cifar_dir, *MID_TASK)


@pytest.mark.parametrize("interrupt_at", [2, 5], ids=["in_first_task", "in_second_task"])
def test_resume_in_the_middle_of_a_task_continues_identically(cifar_dir, mid_task_reference, tmp_path, monkeypatch,
                                                              interrupt_at):
    reference_dir, reference = mid_task_reference
    assert not (reference_dir / run_dir.PROGRESS_FILE).exists()  # removed once a task is finished

    epochs_started = []
    real_train_epoch = train.train_epoch

    def interrupted(*args, **kwargs):
        epochs_started.append(1)
        if len(epochs_started) == interrupt_at:  # 3 epochs per task: 2 = task 1 epoch 2, 5 = task 2 epoch 2
            raise Killed
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    with pytest.raises(Killed):
        run("cifar100", cifar_dir, tmp_path / "cut", *MID_TASK)
    progress = run_dir.load_checkpoint(tmp_path / "cut" / run_dir.PROGRESS_FILE)
    assert (progress["task"], progress["epochs_done"]) == ((interrupt_at - 1) // 3, 1)
    monkeypatch.setattr(train, "train_epoch", real_train_epoch)

    resumed = run("cifar100", cifar_dir, tmp_path / "cut", *MID_TASK, "--resume")
    assert resumed["acc_matrix"] == reference["acc_matrix"]
    assert resumed["acc_matrix_agnostic"] == reference["acc_matrix_agnostic"]
    assert resumed["task_id_accuracy"] == reference["task_id_accuracy"]
    assert [r["kept_epoch"] for r in resumed["per_task"]] == [r["kept_epoch"] for r in reference["per_task"]]
    wr, wc = final_weights(reference_dir), final_weights(tmp_path / "cut")
    assert all(torch.equal(wr[name], wc[name]) for name in wr)
    mr, mc = (TaskMasks.from_state_dict(run_dir.load_checkpoint(d / CHECKPOINT)["task_masks"])
              for d in (reference_dir, tmp_path / "cut"))
    assert all(torch.equal(mr[t][n], mc[t][n]) for t in range(2) for n in mr[t])


def test_zero_forgetting_holds_when_every_network_is_tested_again(cifar_dir, tmp_path, device):
    """A run on `device` forgets nothing (BWT 0, each column of the accuracy matrix constant below
    the diagonal). The run reuses the accuracy of a network whose weights did not change; here every
    task's network is tested again on the same device, from the final checkpoint, on its test set:
    the same numbers."""
    from data import TensorLoader
    from models import build_model
    from utils.acceleration import Acceleration
    from utils.cli import parse_config
    from utils.evaluation import evaluate_row

    out = tmp_path / "run"
    argv = ["--data_dir", str(cifar_dir), "--no-download", "--device", str(device), "--output_dir", str(out),
            "--num_tasks", "3", "--num_classes", "6", "--num_classes_per_task", "2", "--epochs", "1",
            "--max_batches", "3", "--batch_size", "16", "--update_frequency", "2", "--growth", "gradient",
            *SMALL_NET]
    assert main("cifar100", argv) == 0
    results = json.loads((out / RESULTS).read_text())
    acc = np.array(results["acc_matrix"], dtype=float)
    assert results["bwt"] == 0.0
    for j in range(3):
        assert np.all(acc[j:, j] == acc[j, j]), acc
    config = parse_config(argv, "cifar100")
    checkpoint = run_dir.load_checkpoint(out / CHECKPOINT)
    model = build_model(config.net_name, config.num_classes, config.net_width).to(device)
    model.load_state_dict(checkpoint["model"])
    store = TaskMasks.from_state_dict(checkpoint["task_masks"], device)
    tasks = experiment.build_tasks(config)
    channels_last = Acceleration.for_device(device).channels_last  # the batches of the run's own tests
    loaders = [TensorLoader(task.test, batch_size=config.test_batch_size, train=False, device=device,
                            channels_last=channels_last) for task in tasks]
    row = evaluate_row(model, store, [task.classes for task in tasks], loaders, 2,
                       mode=config.eval)  # no EvaluatedNetworks: every cell measured
    assert row.tolist() == acc[-1].tolist() == [acc[0, 0], acc[1, 1], acc[2, 2]]


def test_topology_updates_are_counted_per_task_in_the_results_and_the_log(cifar_dir, tmp_path):
    """(A task with no update at all is warned about: tests/test_masking.py.)"""
    flags = ["--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task", "2", "--epochs", "2",
             "--max_batches", "3", "--batch_size", "16", *TEST_SETS, *SMALL_NET,
             "--update_frequency", "2"]  # 6 steps a task: updates after steps 2, 4, 6
    results = run("cifar100", cifar_dir, tmp_path / "run", *flags)
    assert [record["topology_updates"] for record in results["per_task"]] == [3, 3]
    assert [(record["task"], record["classes"]) for record in results["per_task"]] == [(1, [0, 1]), (2, [2, 3])]
    log = (tmp_path / "run" / run_dir.LOG_FILE).read_text()
    assert "task 2/2 (classes 2-3)" in log and "3 topology updates" in log  # the log and the file agree
    assert "no topology update" not in log
    assert log.rstrip().splitlines()[-1].split(": ", 1)[1].startswith(f"finished 2 tasks: ACC {results['acc']:.2f} %")
