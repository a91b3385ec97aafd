"""PackNet (`utils.approaches.packnet`): train the free weights densely, prune to the task's share by
magnitude, retrain, freeze; on a small network driven directly (runs of the ResNet-18:
tests/test_peers.py)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselearning import TaskMasks, allocate_counts
from utils.approaches.packnet import PackNet, lr_factor, prune_after
from utils.cli import parse_config

EPOCHS, BATCHES = 3, 4  # pruned after epoch 2 (two thirds of 3), one epoch of retraining


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False, track_running_stats=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 8, bias=False))


def small_config(*flags: str):
    return parse_config(["--approach", "packnet", "--density", "0.3", "--sparse_init", "ERK", "--epochs",
                         str(EPOCHS), "--device", "cpu", "--l2", "0.0005", *flags], "cifar100")


def train_small_task(model, frozen, config, task: int) -> tuple[PackNet, dict, list[dict]]:
    """One task of PackNet on random data (classes 2t, 2t+1); the mask, and the approach's masks
    after each epoch."""
    approach = PackNet(model, frozen, config, total_steps=EPOCHS * BATCHES, seed=task)
    generator = torch.Generator().manual_seed(task)
    after_epoch = []
    for epoch in range(EPOCHS):
        for _ in range(BATCHES):
            x = torch.randn(8, 3, 8, 8, generator=generator)
            y = torch.randint(0, 2, (8,), generator=generator)
            loss = F.cross_entropy(approach.forward(x)[:, 2 * task:2 * task + 2], y)
            approach.optimizer.zero_grad()
            loss.backward()
            approach.step()
        keepable = approach.keepable()
        approach.end_epoch(epoch + 1)
        after_epoch.append({"keepable": keepable, "masks": {n: m.clone() for n, m in approach.masking.masks.items()}})
    mask, _ = approach.finish()
    return approach, mask, after_epoch


def test_packnet_trains_the_free_weights_then_keeps_its_share_by_magnitude_and_freezes_it():
    model, config, store = small_model(), small_config(), TaskMasks()
    shapes = {name: p.shape for name, p in model.named_parameters()}
    shares = allocate_counts(shapes, 0.3, "ERK")
    for task in range(4):  # the fourth finds the layers nearly full: 0.3 x 3 = 0.9 owned
        frozen = store.frozen_before(task) if task else None
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        approach, mask, after_epoch = train_small_task(model, frozen, config, task)
        owned = frozen or {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
        params = dict(model.named_parameters())
        for name in shapes:
            # dense over the free weights before pruning (earlier tasks' in the mask, frozen)
            assert bool(after_epoch[0]["masks"][name].all())
            own = mask[name] & ~owned[name]
            assert int(own.sum()) == min(shares[name], int((~owned[name]).sum())), name  # the exact share
            assert bool((mask[name] & owned[name] == owned[name]).all())  # every earlier weight stays in the network
            # frozen: bit-identical, whatever Adam and weight decay did
            assert torch.equal(params[name].detach()[owned[name]], before[name][owned[name]])
            # pruned free weights are zero (the rule that picks the kept: the next test)
            assert bool((params[name].detach()[~mask[name]] == 0).all())
        assert [state["keepable"] for state in after_epoch] == [False, False, True]  # only after pruning
        store.add(mask)
    assert len(store) == 4


def test_packnet_keeps_the_largest_free_weights():
    """The pruning rule itself: per layer, the share's largest |w| among the free weights."""
    model, config = small_model(), small_config()
    frozen = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    frozen["0.weight"].view(-1)[:50] = True
    approach = PackNet(model, frozen, config, total_steps=4, seed=0)
    keep = approach.kept_mask()
    shares = allocate_counts({n: p.shape for n, p in model.named_parameters()}, 0.3, "ERK")
    for name, p in model.named_parameters():
        free = ~frozen[name]
        chosen = keep[name] & free
        assert int(chosen.sum()) == shares[name]
        if bool((free & ~chosen).any()):
            assert p.detach()[chosen].abs().min() >= p.detach()[free & ~chosen].abs().max()
        assert bool(keep[name][frozen[name]].all())


def test_packnet_follows_the_schedule_of_its_scripts():
    """PackNet's scripts: 20 epochs at lr 1e-3, x0.1 after 10, pruning, 10 epochs at 1e-4."""
    assert prune_after(30, None) == 20 and prune_after(2, None) == 1 and prune_after(3, None) == 2
    assert prune_after(30, 5) == 5
    assert [lr_factor(e, 20) for e in range(30)] == [1.0] * 10 + [0.1] * 20
    assert [lr_factor(e, 1) for e in range(2)] == [1.0, 0.1]  # one dense epoch: no decay before pruning
