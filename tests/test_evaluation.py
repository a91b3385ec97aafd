"""The accuracy matrix's bookkeeping: a network is tested again exactly when its weights changed."""

import torch
import torch.nn as nn

from sparselearning import TaskMasks
from utils.evaluation import EvaluatedNetworks


def test_a_network_is_tested_again_only_when_its_own_weights_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 3, bias=False))
    masks = {name: torch.rand(p.shape) < 0.5 for name, p in model.named_parameters()}
    store = TaskMasks()
    store.add(masks)
    tests = []

    def test() -> float:
        tests.append(1)
        return 50.0 + len(tests)

    tested = EvaluatedNetworks()
    assert tested.accuracy(model, store, 0, test) == 51.0
    assert tested.accuracy(model, store, 0, test) == 51.0 and len(tests) == 1  # unchanged: not re-run
    with torch.no_grad():
        model[0].weight[~masks["0.weight"]] += 1.0  # outside task 0's mask: not its network
    assert tested.accuracy(model, store, 0, test) == 51.0 and len(tests) == 1
    with torch.no_grad():
        model[1].weight[masks["1.weight"].nonzero()[0].tolist()] += 1e-6  # one of its weights
    assert tested.accuracy(model, store, 0, test) == 52.0 and len(tests) == 2


def test_dense_networks_are_always_tested():
    model = nn.Linear(4, 2, bias=False)
    tested, tests = EvaluatedNetworks(), []
    for _ in range(2):
        tested.accuracy(model, TaskMasks(), 0, lambda: tests.append(1) or 10.0)
    assert len(tests) == 2


def test_a_change_of_an_unmasked_bias_or_a_batchnorm_buffer_is_seen():
    """Biases and BatchNorm statistics are outside the masks, but the network computes with them:
    a change to either must make the task's network be tested again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3, bias=False))
    masks = {name: torch.rand(module.weight.shape) < 0.5
             for name, module in (("0.weight", model[0]), ("2.weight", model[2]))}
    store = TaskMasks()
    store.add(masks)
    tests = []

    def test() -> float:
        tests.append(1)
        return float(len(tests))

    tested = EvaluatedNetworks()
    assert tested.accuracy(model, store, 0, test) == 1.0
    with torch.no_grad():
        model[0].bias += 0.5  # an unmasked parameter, changed in place
    assert tested.accuracy(model, store, 0, test) == 2.0
    model.train()
    model(torch.randn(16, 8))  # BatchNorm updates its running statistics in place
    assert tested.accuracy(model, store, 0, test) == 3.0
    assert tested.accuracy(model, store, 0, test) == 3.0 and len(tests) == 3  # unchanged again: not re-run
