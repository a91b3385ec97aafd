"""Determinism on a GPU (`--deterministic`, the default) and the random states a task checkpoint
keeps; `--device mps` refused.

The CUDA switches are plain process-wide settings, so where they are set is tested here without a
GPU (every test restores them: `process_switches`); the CUDA generator's part of a checkpoint is
tested with torch.cuda's state functions stood in for. What only a GPU can show (two runs of a
seed bit-identical, a stopped and resumed run bit-identical to the uninterrupted one, no op of a
run without a deterministic CUDA kernel) are the CUDA cases, skipped without one.
"""

import copy
import dataclasses
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from data import Split, TensorLoader
from data.split import Normalization
from models import build_model
from models.resnet import BasicBlock, batch_norm
from sparselearning import Masking, derive_seed
from tests.conftest import CUDA_CASE
from tests.suite_control import send_to_this_process
from tests.test_reliability import comparable, results_of
from utils import run_dir
from utils.acceleration import CUBLAS_WORKSPACE_ENV, Acceleration
from utils.cli import parse_config
from utils.entry import main
from utils.errors import UserError
from utils.evaluation import predictions
from utils.train import CUDA_STREAM, Task, TaskTraining, global_rng_state, restore_global_rng_state, train_epoch

CPU = torch.device("cpu")
GPU = torch.device("cuda")  # a device object: no GPU is needed to name one


def on_gpu(test):
    """The CUDA case of a test: `pytest -k cuda` selects it; skipped without a GPU."""
    for mark in reversed(CUDA_CASE):
        test = mark(test)
    return test


@pytest.fixture(autouse=True)
def process_switches(monkeypatch: pytest.MonkeyPatch):
    """Each test starts without CUBLAS_WORKSPACE_CONFIG; afterwards every switch is as before (the
    environment by monkeypatch, cuDNN's and torch's flags here), whatever the test set."""
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    benchmark, deterministic, algorithms, warn_only = before
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


def switches() -> dict:
    return {"cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas": os.environ.get(CUBLAS_WORKSPACE_ENV)}


# ----------------------------------------------------------------------------- the CUDA switches

def test_a_gpu_run_switches_on_every_determinism_setting():
    accel = Acceleration.for_config(parse_config(["--device", "cpu"], "cifar100"))
    assert accel.deterministic is False  # a CPU run has nothing to switch
    accel = Acceleration.for_device(GPU)
    assert (accel.deterministic, accel.cudnn_benchmark) == (True, False)  # a run's defaults
    torch.backends.cudnn.benchmark = True  # as something earlier in the process may have left it
    accel.apply()
    assert switches() == {"cudnn.benchmark": False, "cudnn.deterministic": True, "algorithms": True,
                          "warn_only": True, "cublas": ":4096:8"}


def test_no_deterministic_lets_the_gpu_pick_its_kernels_and_autotune():
    Acceleration.for_device(GPU).apply()
    Acceleration.for_device(GPU, deterministic=False, cudnn_benchmark=True).apply()  # a later run in the process
    assert switches() == {"cudnn.benchmark": True, "cudnn.deterministic": False, "algorithms": False,
                          "warn_only": False, "cublas": ":4096:8"}  # the environment is left as it is
    os.environ.pop(CUBLAS_WORKSPACE_ENV)
    Acceleration.for_device(GPU, deterministic=False).prepare(nn.Identity())
    assert switches()["cublas"] is None and switches()["cudnn.benchmark"] is False


def test_a_cublas_workspace_the_user_set_is_kept(monkeypatch, caplog):
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":16:8")
    with caplog.at_level(logging.WARNING):
        Acceleration.for_device(GPU).apply()
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16:8" and not caplog.records
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":0:0")
    monkeypatch.setattr("utils.acceleration._reported_workspaces", set())
    with caplog.at_level(logging.WARNING):
        Acceleration.for_device(GPU).apply()
        Acceleration.for_device(GPU).prepare(nn.Identity())  # as a run: apply() at its start, again in prepare()
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":0:0"
    assert len(caplog.records) == 1  # said once
    assert "CUBLAS_WORKSPACE_CONFIG=:0:0 is kept" in caplog.text and ":4096:8" in caplog.text


def test_a_cpu_run_touches_no_switch():
    torch.backends.cudnn.benchmark = True
    before = switches()
    for deterministic in (True, False):
        accel = Acceleration.for_device(CPU, deterministic=deterministic)
        accel.apply()
        accel.prepare(nn.Identity())
    assert switches() == before


def test_cudnn_autotuning_needs_no_deterministic():
    for device in ("cpu", "cuda"):  # refused the same way on every machine
        with pytest.raises(UserError) as refused:
            parse_config(["--device", device, "--cudnn_benchmark"], "cifar100")
        assert "\n" not in str(refused.value) and "add --no-deterministic to autotune" in str(refused.value)
    config = parse_config(["--device", "cpu", "--cudnn_benchmark", "--no-deterministic"], "cifar100")
    assert (config.cudnn_benchmark, config.deterministic) == (True, False)


def test_a_run_sets_its_switches_before_building_the_model_and_puts_them_back_after(cifar_dir, tmp_path, monkeypatch):
    """The run's first CUDA call comes with the model; the cuBLAS workspace must be fixed before it."""
    from utils.experiment import run

    class Built(Exception):
        pass

    seen = {}

    def build_model(*args, **kwargs):
        seen.update(switches())
        raise Built

    as_configured = Acceleration.for_config
    monkeypatch.setattr(Acceleration, "for_config",  # a CUDA run's settings on this CPU machine
                        classmethod(lambda cls, config: dataclasses.replace(as_configured(config), device=GPU,
                                                                            deterministic=True)))
    monkeypatch.setattr("utils.experiment.build_model", build_model)
    before = switches()
    config = parse_config(["--data_dir", str(cifar_dir), "--no-download", "--device", "cpu", "--output_dir",
                           str(tmp_path / "run"), "--num_tasks", "1", "--num_classes", "2",
                           "--num_classes_per_task", "2"], "cifar100")
    with pytest.raises(Built):
        run(config)
    assert (seen["algorithms"], seen["cudnn.deterministic"], seen["cublas"]) == (True, True, ":4096:8")
    assert switches() == before


# ----------------------------------------------------------------------------- the random states

def tiny_task() -> Task:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(12) % 2,
                  Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    return Task(0, slice(0, 2), split, split)


def tiny_training(seed: int = 0) -> TaskTraining:
    config = parse_config(["--device", "cpu", "--num_tasks", "1", "--num_classes", "2", "--num_classes_per_task", "2",
                           "--batch_size", "4", "--epochs", "2", "--seed", str(seed)], "cifar100")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 2, bias=False))
    return TaskTraining(model, tiny_task(), None, config, Acceleration.for_config(config))


def test_a_task_checkpoint_restores_the_cpu_generator_and_ignores_a_gpu_state_on_a_cpu(caplog, monkeypatch):
    training = tiny_training(seed=7)
    state = training.state_dict()
    assert "cuda_rng" not in state  # a CPU run has no CUDA generator to save
    expected = torch.rand(5)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args: pytest.fail("a CUDA state set on a CPU run"))
    with caplog.at_level(logging.WARNING):
        training.load_state_dict({**state, "cuda_rng": torch.arange(16, dtype=torch.uint8)})  # saved on a GPU
    assert torch.equal(torch.rand(5), expected)
    assert "holds a CUDA random state, which this run on cpu does not use" in caplog.text

    seeds = []  # the seed a GPU would take for this task
    monkeypatch.setattr("utils.train.restore_global_rng_state", lambda state, device, seed: seeds.append(seed))
    training.load_state_dict(state)
    assert seeds == [derive_seed(7, CUDA_STREAM, 0)]


def test_a_checkpoint_of_an_earlier_version_leaves_the_generators_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    restore_global_rng_state({}, CPU, seed=0)
    assert torch.equal(torch.rand(4), expected)


@pytest.fixture
def fake_gpu_generator(monkeypatch) -> dict:
    """torch.cuda's generator functions on this CPU machine: one state per device; the seeds given, recorded."""
    states: dict = {}
    calls: dict = {"set": [], "seed": []}

    def get_rng_state(device="cuda"):
        return states.setdefault(str(device), torch.arange(16, dtype=torch.uint8)).clone()

    def set_rng_state(state, device="cuda"):
        calls["set"].append(str(device))
        states[str(device)] = state.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls["seed"].append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls["seed"].append(seed))
    return {"states": states, "calls": calls}


def test_a_gpu_task_checkpoint_saves_and_restores_the_gpu_generator(fake_gpu_generator):
    device = torch.device("cuda:1")
    saved = global_rng_state(device)
    assert set(saved) == {"torch_rng", "cuda_rng"} and torch.equal(saved["cuda_rng"], torch.arange(16, dtype=torch.uint8))
    fake_gpu_generator["states"]["cuda:1"] = torch.zeros(16, dtype=torch.uint8)  # the generator drew on
    expected = torch.rand(3)
    restore_global_rng_state(saved, device, seed=5)
    assert fake_gpu_generator["calls"] == {"set": ["cuda:1"], "seed": []}
    assert torch.equal(fake_gpu_generator["states"]["cuda:1"], saved["cuda_rng"])
    assert torch.equal(torch.rand(3), expected)  # the CPU generator back where it was saved too


def test_a_cpu_checkpoint_resumed_on_a_gpu_seeds_the_gpu_generator_from_the_seed(fake_gpu_generator, caplog):
    saved = global_rng_state(CPU)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            restore_global_rng_state(saved, GPU, seed=derive_seed(7, CUDA_STREAM, 1))
    assert fake_gpu_generator["calls"]["seed"] == [derive_seed(7, CUDA_STREAM, 1)] * 2  # the same every time
    assert "holds no CUDA random state" in caplog.text and "seeded from --seed" in caplog.text


@on_gpu
def test_the_cuda_generator_continues_where_the_task_checkpoint_left_it():
    device = torch.device("cuda")
    torch.cuda.manual_seed(11)
    saved = global_rng_state(device)
    expected = torch.rand(8, device=device)
    torch.rand(100, device=device)  # the generator draws on
    restore_global_rng_state(saved, device, seed=0)
    assert torch.equal(torch.rand(8, device=device), expected)


# ----------------------------------------------------------------------------- mps

def test_device_mps_is_refused_in_one_line(tmp_path, capsys):
    for device in ("mps", "mps:0"):
        assert main("cifar100", ["--device", device, "--output_dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"--device {device}: not supported: " in err and err.endswith("use cpu")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the ops of a run

RAISING = {  # torch.use_deterministic_algorithms's list of ops that raise on CUDA (torch 2.14), by ATen name
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "adaptive_max_pool3d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward",
    "upsample_bilinear2d_backward", "upsample_bicubic2d_backward", "upsample_trilinear3d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward", "nll_loss2d_forward",
    "_ctc_loss_backward", "_embedding_bag_dense_backward", "put_", "put", "histc", "bincount", "median",
    "nanmedian", "grid_sampler_2d_backward", "grid_sampler_3d_backward", "resize_",
}


class OpLog(TorchDispatchMode):
    """The ATen ops dispatched inside, by name, with scatter_reduce's reductions."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.reductions: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.names.add(name)
        if name.startswith("scatter_reduce"):
            self.reductions.add(kwargs.get("reduce", args[4] if len(args) > 4 else None))  # (self, dim, index, src, reduce)
        return func(*args, **kwargs)


def narrow_resnet18() -> nn.Module:
    """ResNet-18's own forward and blocks at a few channels, one block of each kind: the ops of the
    real network at a fraction of its cost on a CPU."""
    model = build_model("resnet18", 2)
    model.conv1, model.bn1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), batch_norm(8)
    model.layer1, model.layer2 = nn.Sequential(BasicBlock(8, 8, 1)), nn.Sequential(BasicBlock(8, 16, 2))
    model.layer3, model.layer4 = nn.Identity(), nn.Identity()
    model.linear = nn.Linear(16, 2, bias=False)
    return model


def run_ops(device: torch.device, narrow: bool) -> None:
    """What a run computes, in small: a training epoch with a topology update at every step, for each
    growth mode, on a task with weights frozen by earlier ones, its end, then its test predictions; on
    ResNet-18 (its full width exercises the sampling path of top-k selection too) or a narrow one."""
    config = parse_config(["--device", str(device), "--num_tasks", "1", "--num_classes", "2",
                           "--num_classes_per_task", "2", "--batch_size", "4", "--epochs", "1", "--update_frequency",
                           "1", "--max_batches", "1", "--image_size", "16"], "cifar100")
    accel = Acceleration.for_config(config)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(8) % 2,
                  Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    task = Task(0, slice(0, 2), split, split)
    torch.manual_seed(0)
    initial = (narrow_resnet18() if narrow else build_model("resnet18", 2)).to(device)
    for growth in ("random", "unfired", "momentum", "gradient"):
        model = copy.deepcopy(initial)
        frozen = {name: (torch.rand(p.shape, generator=g) < 0.1).to(device)
                  for name, p in model.named_parameters() if p.dim() > 1}
        training = TaskTraining(model, task, frozen, dataclasses.replace(config, growth=growth), accel)
        training.end_epoch(*train_epoch(training, 0))
        training.finish()
        with torch.no_grad():
            for x, y in TensorLoader(split, batch_size=4, train=False, device=device):
                (predictions(model(x), task.classes, "task") == y).sum()


def test_no_op_of_a_run_is_one_torch_cannot_run_deterministically_on_a_gpu():
    """A proxy for the CUDA case below, on this CPU: the ATen ops a run dispatches (the same above
    the kernels on every device) include none that torch's deterministic mode refuses on CUDA, so
    the run needs no op to warn (warn_only only covers older torch releases)."""
    with OpLog() as ops:
        run_ops(CPU, narrow=True)
    assert {"convolution", "convolution_backward", "mean"} <= ops.names  # it saw the run
    assert not ops.names & RAISING
    assert ops.reductions <= {"amin", "amax"}  # scatter_reduce's order-independent reductions only


@on_gpu
def test_no_op_of_a_run_lacks_a_deterministic_cuda_kernel(monkeypatch):
    """The same ops on the GPU, full width, in torch's strict deterministic mode (not a run's
    warn_only): any op without a deterministic CUDA kernel raises."""
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":4096:8")  # as a deterministic run has it
    torch.use_deterministic_algorithms(True)  # strict; the fixture puts the mode back
    run_ops(torch.device("cuda"), narrow=False)


# ----------------------------------------------------------------------------- a GPU run, twice and resumed

GPU_RUN = ["--no-download", "--device", "cuda", "--num_tasks", "2", "--num_classes", "4", "--num_classes_per_task",
           "2", "--epochs", "2", "--max_batches", "3", "--batch_size", "16", "--update_frequency", "2",
           "--task_inference", "none", "--checkpoint_minutes", "0"]


def gpu_run(data_dir: Path, out: Path, *flags: str) -> int:
    return main("cifar100", ["--data_dir", str(data_dir), "--output_dir", str(out), *GPU_RUN, *flags])


def same_bits(a: Path, b: Path) -> None:
    """Two finished runs' results (less timings) and final weights, bit for bit."""
    assert comparable(results_of(a)) == comparable(results_of(b))
    weights = [run_dir.load_checkpoint(out / run_dir.CHECKPOINT_FILE)["model"] for out in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.fixture(scope="module")
def first_gpu_run(cifar_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "run"
    assert gpu_run(cifar_dir, out) == 0
    return out


@on_gpu
def test_two_gpu_runs_of_a_seed_are_bit_identical(cifar_dir, first_gpu_run, tmp_path):
    assert gpu_run(cifar_dir, tmp_path / "again") == 0
    same_bits(first_gpu_run, tmp_path / "again")


@on_gpu
def test_a_gpu_run_stopped_and_resumed_is_bit_identical_to_the_uninterrupted_one(cifar_dir, first_gpu_run, tmp_path,
                                                                                monkeypatch):
    real_step, steps = Masking.step, []

    def step(self):
        steps.append(1)
        if len(steps) == 8:  # 6 steps a task: task 2, epoch 1, batch 2
            send_to_this_process(signal.SIGTERM)
        real_step(self)

    monkeypatch.setattr(Masking, "step", step)
    out = tmp_path / "stopped"
    assert gpu_run(cifar_dir, out) == 3
    monkeypatch.setattr(Masking, "step", real_step)
    assert "cuda_rng" in run_dir.load_checkpoint(out / run_dir.PROGRESS_FILE)
    assert gpu_run(cifar_dir, out, "--resume") == 0
    same_bits(first_gpu_run, out)
