"""What every benchmark runs on: the run's Config, its CIFAR-100 tasks read by the project's own
reader, the ResNet-18 with a Masking at density 0.2 ERK, and a dense training step."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import Split, TensorLoader
from data.cifar100 import FOLDER, IMAGE_SHAPE, NUM_CLASSES
from models import build_model
from sparselearning import Masking, TaskMasks
from utils.acceleration import Acceleration
from utils.cli import Config, parse_config
from utils.experiment import build_tasks
from utils.approaches import make_optimizer
from utils.train import Task

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DENSITY, SPARSE_INIT = 0.2, "ERK"
BATCH = 64  # training batch, as the paper's CIFAR-100 runs


@dataclass(frozen=True)
class Repeats:
    """How long each benchmark measures: timed rounds (after a warm-up round) and sizes."""

    step_rounds: int = 15  # the headline step ratio; the other step settings get a third
    step_other_settings: bool = True
    topology_rounds: int = 5
    data_epochs: int = 10
    epoch_rounds: int = 3
    eval_rounds: int = 2
    eval_tasks: int = 10
    eval_images_per_task: int | None = None  # None: the whole test split
    max_batches: int | None = None  # None: the whole training epoch
    rss_tasks: int = 20
    sync_batches: int = 10  # syncs per step: epochs of N and 2N batches
    run_tasks: int = 10  # the whole run: the paper's 10 tasks of 10 classes ...
    run_epochs: int = 2  # ... with this many epochs a task ...
    run_max_batches: int | None = None  # ... of at most this many batches (None: all) ...
    run_small_data: bool = False  # ... on a small random stand-in (20 + 10 images a class) instead
    bare_rounds: int = 3  # rounds of bare dense steps the whole run is compared with
    concurrent_runs: tuple[int, ...] = (1, 2, 4, 8)  # K concurrent training processes on one device
    concurrent_steps: int = 200  # steps each process times, after its warm-up steps
    concurrent_batch: int = BATCH


DEFAULT = Repeats()
QUICK = Repeats(step_rounds=2, step_other_settings=False, topology_rounds=1, data_epochs=1, epoch_rounds=1,
                eval_rounds=1, eval_tasks=3, eval_images_per_task=128, max_batches=3, rss_tasks=3, sync_batches=2,
                run_tasks=2, run_epochs=1, run_max_batches=3, run_small_data=True, bare_rounds=1, concurrent_runs=(1, 2),
                concurrent_steps=6, concurrent_batch=8)
# On a CPU, K processes share its few cores: K = 1, 2 and tiny sizes show the mechanism, no more.
CPU_CONCURRENCY = {"concurrent_runs": (1, 2), "concurrent_steps": 6, "concurrent_batch": 8}


@dataclass(frozen=True)
class Workload:
    config: Config
    accel: Acceleration  # the training loop's device settings for this config
    tasks: list[Task]
    repeats: Repeats

    @property
    def device(self) -> torch.device:
        return self.accel.device

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The data set's normalization, as its splits carry it."""
        return self.tasks[0].train.normalization

    def loader(self, split: Split, train: bool) -> TensorLoader:
        """Batches of `split` as the training loop draws them: training batches (shuffled,
        augmented) or test batches."""
        batch_size = self.config.batch_size if train else self.config.test_batch_size
        return TensorLoader(split, batch_size=batch_size, train=train, device=self.device,
                            channels_last=self.accel.channels_last)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.accel.prepare(build_model(self.config.net_name, self.config.num_classes, self.config.net_width).to(self.device))

    def optimizer(self, model: nn.Module, **changes) -> torch.optim.Optimizer:
        """The training loop's optimizer (fused Adam), with config fields changed as given."""
        return make_optimizer(dataclasses.replace(self.config, **changes), model.parameters())

    def masking(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, growth: str = "random",
                frozen: dict[str, torch.Tensor] | None = None, update_frequency: int = 0,
                seed: int = 0) -> Masking:
        """A task's Masking at density 0.2 ERK over `model`, its initial mask drawn."""
        masking = Masking(optimizer, density=DENSITY, sparse_init=SPARSE_INIT, growth=growth,
                          update_frequency=update_frequency, total_steps=10_000, frozen=frozen, seed=seed)
        masking.add_module(model)
        return masking

    def mask_store(self, model: nn.Module, tasks: int,
                   after_each: Callable[[TaskMasks], None] | None = None) -> TaskMasks:
        """The mask store of a run after `tasks` tasks, built as the training loop builds it:
        per task a Masking with the earlier tasks' weights frozen, consolidated and added
        (without training: the masks are the initial ones)."""
        store = TaskMasks()
        for t in range(tasks):
            store.add(self.masking(model, self.optimizer(model), frozen=store.frozen_before(t), seed=t).consolidate())
            if after_each is not None:
                after_each(store)
        return store

    def training_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                      batch: tuple[torch.Tensor, torch.Tensor], masking: Masking | None = None) -> Callable[[], None]:
        """One bare training step on `batch`: forward, cross-entropy, backward, optimizer (or
        masked) step; no data loading, metrics or logging."""
        x, y = batch

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with self.accel.autocast():
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
            (masking or optimizer).step()

        return step

    def fixed_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch of 32x32 inputs, the same for every step."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, *IMAGE_SHAPE, generator=generator)
        y = torch.randint(0, self.config.num_classes, (BATCH,), generator=generator)
        return x.to(self.device, memory_format=self.memory_format), y.to(self.device)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.accel.channels_last else torch.contiguous_format


def has_cifar100(data_dir: Path) -> bool:
    return (data_dir / FOLDER / "train").is_file() and (data_dir / FOLDER / "test").is_file()


def write_standin_cifar100(root: Path, train_per_class: int = 250, test_per_class: int = 100) -> None:
    """Random images in the official CIFAR-100 pickle layout, as many per class as the shared
    subset has, so that the real reader and every measurement run unchanged."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(NUM_CLASSES), per_class)
        pixels = rng.integers(0, 256, (len(labels), int(np.prod(IMAGE_SHAPE))), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": pixels, "fine_labels": labels.tolist(), "batch_label": split}, f, protocol=4)


def benchmark_config(data_dir: Path, device: str, max_batches: int | None) -> Config:
    """The paper's 10-task CIFAR-100 run (density 0.2 ERK, random growth), one epoch per task."""
    argv = ["--num_tasks", "10", "--num_classes", "100", "--num_classes_per_task", "10",
            "--sparse_init", SPARSE_INIT, "--growth", "random", "--density", str(DENSITY),
            "--update_frequency", "400", "--epochs", "1", "--batch_size", str(BATCH),
            "--data_dir", str(data_dir), "--no-download", "--device", device]
    if max_batches is not None:
        argv += ["--max_batches", str(max_batches)]
    return parse_config(argv, "cifar100")


def load_workload(data_dir: Path, device: str, repeats: Repeats) -> Workload:
    """Read the data set through the training loop's own `build_tasks` (reader and task split)."""
    if torch.device(device).type == "cpu":
        repeats = dataclasses.replace(repeats, **CPU_CONCURRENCY)
    config = benchmark_config(data_dir, device, repeats.max_batches)
    accel = Acceleration.for_config(config)
    return Workload(config, accel, build_tasks(config), repeats)
