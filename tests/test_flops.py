"""Training and inference FLOPs counted from the masks (`sparselearning.flops`, `Approach.step_macs`):
a hand-counted network dense and under two masks, each approach's per-step rule, the records of
real runs, a resumed task counting what an uninterrupted one does, and the report's table and figure."""

import copy
import csv
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from data import Normalization, Split
from models import build_model
from sparselearning import TaskMasks
from sparselearning.flops import FLOPS_PER_MAC, layer_macs, network_macs, sparse_macs
from tests.conftest import finished_run
from tests.paper_commands import write_data
from tests.test_report import fake_run
from utils import report, run_dir
from utils.acceleration import Acceleration
from utils.approaches import APPROACHES
from utils.approaches.dst import DST, Dense
from utils.cli import parse_config
from utils.train import Task, TaskTraining, train_epoch


def small_net(outputs: int = 5) -> nn.Sequential:
    """conv 3->4 k3 pad 1 on 8x8 (out 8x8), conv 4->8 k3 stride 2 pad 1 (out 4x4), linear 128->outputs."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, outputs, bias=False))


# By hand: conv1 has 4 x 3 x 3 x 3 = 108 weights, each used at 8 x 8 = 64 output positions: 6912 MACs;
# conv2 has 8 x 4 x 3 x 3 = 288 weights at 4 x 4 = 16 positions: 4608; the linear layer 128 x 5 = 640
# weights, used once: 640. Dense: 6912 + 4608 + 640 = 12160 MACs = 24320 FLOPs per image.
DENSE = {"0.weight": 6912, "2.weight": 4608, "5.weight": 640}


def mask_with(shape: tuple[int, ...], active: int) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[:active] = True
    return mask


def test_a_hand_counted_network_dense_and_at_two_densities():
    model = small_net()
    macs = layer_macs(model, (3, 8, 8))
    assert macs == DENSE and network_macs(macs) == 12160 and FLOPS_PER_MAC * network_macs(macs) == 24320
    shapes = {name: p.shape for name, p in model.named_parameters()}
    # A quarter of every layer: 27 x 64 + 72 x 16 + 160 x 1 = 1728 + 1152 + 160 = 3040 (= 12160 / 4).
    quarter = {"0.weight": mask_with(shapes["0.weight"], 27), "2.weight": mask_with(shapes["2.weight"], 72),
               "5.weight": mask_with(shapes["5.weight"], 160)}
    assert network_macs(macs, quarter) == 3040
    # conv1 dense, half of conv2, a tenth of the linear layer: 108 x 64 + 144 x 16 + 64 x 1 = 6912 + 2304 + 64 = 9280.
    mixed = {"0.weight": mask_with(shapes["0.weight"], 108), "2.weight": mask_with(shapes["2.weight"], 144),
             "5.weight": mask_with(shapes["5.weight"], 64)}
    assert network_macs(macs, mixed) == 9280
    assert sparse_macs(macs, {"0.weight": 108, "2.weight": 144, "5.weight": 64},
                       {"0.weight": 108, "2.weight": 288, "5.weight": 640}) == 9280


def test_linear_positions_tied_weights_modes_and_hooks():
    # a linear layer over the last dimension of a (3, 6) input: 4 x 6 = 24 weights at 3 positions: 72 MACs
    assert layer_macs(nn.Linear(6, 4, bias=False), (3, 6)) == {"weight": 72}
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight  # one tensor used twice: counted once by name, 16 + 16 MACs
    assert layer_macs(tied, (4,)) == {"0.weight": 32}
    model = small_net().train()
    model[2].eval()  # a mixed state comes back as it was
    with pytest.raises(RuntimeError):
        layer_macs(model, (5, 8, 8))  # the wrong channels: the forward pass fails
    layer_macs(model, (3, 8, 8))
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True, True]
    assert all(not m._forward_hooks for m in model.modules())  # removed, on the error too


# ---- each approach's training cost, per step ----------------------------------------------------------

POSITIONS = {"0.weight": 64, "2.weight": 16, "5.weight": 1}  # MACs per active weight and image, by hand
IMAGES, STEPS = 4, 4


def config_for(*flags: str):
    return parse_config(["--device", "cpu", "--num_tasks", "1", "--num_classes", "5", "--num_classes_per_task", "5",
                         "--density", "0.5", "--sparse_init", "uniform", "--epochs", "2", *flags], "cifar100")


def trained(cls, *flags: str, prune_after_step: int | None = None):
    """An approach of `cls` on the small net after STEPS steps of IMAGES images each, counted."""
    torch.manual_seed(0)
    approach = cls(small_net(), None, config_for(*flags), total_steps=STEPS, seed=1)
    approach.measure((3, 8, 8))
    x = torch.randn(IMAGES, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for step in range(STEPS):
        if step == prune_after_step:
            approach.end_epoch(1)  # PackNet prunes after its dense epoch
        approach.optimizer.zero_grad()
        approach.forward(x).square().mean().backward()
        approach.step()
        approach.count_step(IMAGES)
    return approach


def by_hand(counts: dict[str, int]) -> int:
    return sum(count * POSITIONS[name] for name, count in counts.items())


def test_each_approach_counts_its_steps_as_rigl_does():
    f_d = 12160
    dense = trained(Dense, "--no-sparse")
    assert dense.train_macs == 3 * f_d * IMAGES * STEPS and dense.train_images == IMAGES * STEPS
    random = trained(DST, "--growth", "random", "--update_frequency", "2")
    f_s = by_hand(random.masking.counts)
    assert 0 < f_s < f_d and f_s == network_macs(random.layer_macs, random.masking.masks)
    assert random.topology_updates == 2 and random.train_macs == 3 * f_s * IMAGES * STEPS
    momentum = trained(DST, "--growth", "momentum", "--update_frequency", "2")
    assert momentum.train_macs - random.train_macs == (f_d - f_s) * IMAGES * STEPS  # the dense gradient, every step
    gradient = trained(DST, "--growth", "gradient", "--update_frequency", "2")  # dense on steps 2 and 4 only
    assert gradient.train_macs == 3 * f_s * IMAGES * STEPS + (f_d - f_s) * IMAGES * 2
    static = trained(DST, "--growth", "momentum", "--update_frequency", "0")
    assert static.train_macs == random.train_macs  # static sparse: nothing grows, no dense gradient
    for name in ("wsn", "supsup"):  # every score's gradient needs the dense weight gradient
        approach = trained(APPROACHES[name])
        assert approach.train_macs == (2 * by_hand(approach.scores.counts) + f_d) * IMAGES * STEPS
    packnet = trained(APPROACHES["packnet"], prune_after_step=2)  # 2 dense steps, then 2 of its network
    kept = by_hand(packnet.masking.counts)
    assert kept < f_d and packnet.train_macs == 3 * f_d * IMAGES * 2 + 3 * kept * IMAGES * 2
    mask, _ = random.finish()
    record = random.cost_record(mask)
    assert record == {"train_flops": 2 * 3 * f_s * IMAGES * STEPS, "train_flops_dense": 2 * 3 * f_d * IMAGES * STEPS,
                      "train_flops_fraction": f_s / f_d, "inference_flops": 2 * f_s, "inference_flops_fraction": f_s / f_d}
    assert dense.cost_record(None)["inference_flops_fraction"] == 1.0


# ---- a task stopped and resumed counts what an uninterrupted one does ---------------------------------

def tiny_training(model: nn.Module) -> TaskTraining:
    config = parse_config(["--device", "cpu", "--num_tasks", "1", "--num_classes", "2", "--num_classes_per_task", "2",
                           "--batch_size", "4", "--epochs", "2", "--density", "0.5", "--sparse_init", "uniform",
                           "--growth", "gradient", "--update_frequency", "2"], "cifar100")
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split(images, torch.arange(12) % 2, Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    return TaskTraining(model, Task(0, slice(0, 2), split, split), None, config, Acceleration.for_config(config))


def saved(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


FLOPS_KEYS = ("train_flops", "train_flops_dense", "train_flops_fraction", "inference_flops", "inference_flops_fraction")


def test_a_resumed_task_counts_every_step_once_and_an_old_checkpoint_says_unknown():
    torch.manual_seed(0)
    initial = small_net(2)
    whole = tiny_training(copy.deepcopy(initial))
    for epoch in range(2):  # 3 batches an epoch, a gradient-growth update every 2 steps: uneven costs
        whole.end_epoch(*train_epoch(whole, epoch))
    expected = whole.finish().record
    # f_D = 6912 + 4608 + 256 (linear 128 -> 2) = 11776 MACs; 2 epochs of 12 images; FLOPs = 2 x MACs
    assert expected["train_flops_dense"] == 2 * 3 * 11776 * 24
    first = tiny_training(copy.deepcopy(initial))
    first.end_epoch(*train_epoch(first, 0))
    state = saved(first.state_dict())
    for cost in (state["train_cost"], None):
        resumed = tiny_training(copy.deepcopy(initial))
        resumed.load_state_dict({**state, "train_cost": cost} if cost else
                                {k: v for k, v in state.items() if k != "train_cost"})  # an earlier version's
        resumed.end_epoch(*train_epoch(resumed, 1))
        record = resumed.finish().record
        if cost:
            assert {k: record[k] for k in FLOPS_KEYS} == {k: expected[k] for k in FLOPS_KEYS}
        else:
            assert record["train_flops"] is record["train_flops_fraction"] is None
            assert record["inference_flops"] == expected["inference_flops"]


# ---- real runs: the records, results.json, and the report ----------------------------------------------

RUN = ["--num_tasks", "1", "--num_classes", "2", "--num_classes_per_task", "2", "--epochs", "1", "--max_batches", "2",
       "--batch_size", "8", "--density", "0.2", "--test_per_class", "4", "--task_inference", "none"]
TRAINED_IMAGES = 1 * 2 * 8  # epochs x batches x batch size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = write_data(tmp_path_factory.mktemp("flops_data"))
    root = tmp_path_factory.mktemp("flops_runs")
    return root, {name: finished_run("cifar100", data, root / name, *RUN, *flags)
                  for name, flags in (("dense", ["--no-sparse"]), ("dst", ["--growth", "random"]))}


def test_runs_record_training_and_inference_flops_per_task(runs):
    root, results = runs
    f_d = network_macs(layer_macs(build_model("resnet18", 2), (3, 32, 32)))
    dense = results["dense"]["per_task"][0]
    assert dense["train_flops_fraction"] == dense["inference_flops_fraction"] == 1.0
    assert dense["inference_flops"] == 2 * f_d and dense["train_flops"] == 2 * 3 * f_d * TRAINED_IMAGES
    assert results["dense"]["train_flops_fraction"] == 1.0
    sparse = results["dst"]["per_task"][0]
    mask = TaskMasks.from_state_dict(run_dir.load_checkpoint(root / "dst" / run_dir.CHECKPOINT_FILE)["task_masks"])[0]
    f_s = network_macs(layer_macs(build_model("resnet18", 2), (3, 32, 32)), mask)
    assert sparse["inference_flops"] == 2 * f_s and sparse["train_flops"] == 2 * 3 * f_s * TRAINED_IMAGES
    assert sparse["train_flops_dense"] == dense["train_flops_dense"]
    assert 0.15 < sparse["train_flops_fraction"] == sparse["inference_flops_fraction"] < 0.25  # density 0.2
    assert results["dst"]["train_flops_fraction"] == sparse["train_flops_fraction"]
    assert "mask_bits" in sparse and "mask_bits" not in dense


def with_flops(directory, train: float, inference: float) -> None:
    """Add FLOPs records to a fabricated results.json (`tests.test_report.fake_run`, a fixture)."""
    path = directory / "results.json"
    results = json.loads(path.read_text())
    for task in results["per_task"]:
        task.update(train_flops=int(train * 1000), train_flops_dense=1000, inference_flops_fraction=inference)
    path.write_text(json.dumps(results))


def test_the_report_has_a_flops_table_csv_columns_and_an_acc_vs_flops_figure(tmp_path):
    root = tmp_path / "runs"
    for seed, acc in enumerate((60.0, 62.0)):
        fake_run(root / f"dst_s{seed}", acc, seed=seed)
        with_flops(root / f"dst_s{seed}", 0.25 + 0.05 * seed, 0.2)
    fake_run(root / "dense", 30.0, sparse=False, isolate=False)
    with_flops(root / "dense", 1.0, 1.0)
    assert report.main([str(root)]) == 0
    text = (root / "report.md").read_text()
    assert "Training FLOPs / inference FLOPs per image, % of dense" in text
    lines = [line for line in text.split("Training FLOPs / inference FLOPs")[1].splitlines() if line.startswith("| ")]
    assert lines[1:] == ["| ERK + random |  | 27.5 / 20.0 |", "| dense fine-tuning | 100.0 / 100.0 |  |"]
    rows = {Path(row["run"]).name: row for row in csv.DictReader(io.StringIO((root / "report.csv").read_text()))}
    assert float(rows["dst_s1"]["train_flops_fraction"]) == 0.3
    assert float(rows["dst_s1"]["inference_flops_fraction"]) == pytest.approx(0.2)
    if report.load_pyplot() is not None:
        assert (root / "figures" / "cifar100_3tasks_x10_acc_vs_train_flops.png").is_file()
        assert "(figures/cifar100_3tasks_x10_acc_vs_train_flops.png)" in text


def test_the_flops_table_says_how_many_of_a_cells_runs_counted_them(tmp_path):
    """Runs of versions before FLOPs were counted have none: a cell's mean is over the runs that have."""
    root = tmp_path / "runs"
    for seed, acc in enumerate((60.0, 62.0, 61.0)):
        fake_run(root / f"dst_s{seed}", acc, seed=seed)
    with_flops(root / "dst_s2", 0.3, 0.2)
    assert report.main([str(root), "--no-figures"]) == 0
    text = (root / "report.md").read_text()
    lines = [line for line in text.split("Training FLOPs / inference FLOPs")[1].splitlines() if line.startswith("| ")]
    assert lines[1:] == ["| ERK + random | 30.0 / 20.0 (n=1 of 3) |"]
