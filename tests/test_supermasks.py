"""Score-chosen masks (`sparselearning.supermask`) and the two approaches built on them: WSN
(scores and weights learned together, earlier tasks' weights frozen) and SupSup (fixed
signed-constant weights, a mask per task). Small networks, driven directly."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselearning import TaskMasks, allocate_counts, maskable_weights
from sparselearning.supermask import SupermaskScores, masked_forward, top_count_mask
from utils.approaches.supsup import SupSup
from utils.approaches.wsn import WSN
from utils.cli import parse_config


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False, track_running_stats=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 8, bias=False))


def config(approach: str, *flags: str):
    return parse_config(["--approach", approach, "--density", "0.3", "--sparse_init", "ERK", "--device", "cpu",
                         *flags], "cifar100")


def batches(task: int, n: int):
    generator = torch.Generator().manual_seed(100 + task)
    for _ in range(n):
        yield torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 2, (8,), generator=generator)


def train(approach, task: int, steps: int, after_step=None) -> None:
    for x, y in batches(task, steps):
        loss = F.cross_entropy(approach.forward(x)[:, 2 * task:2 * task + 2], y)
        approach.optimizer.zero_grad()
        loss.backward()
        approach.step()
        if after_step is not None:
            after_step(approach)


# ---- the core ------------------------------------------------------------------------------------

def test_the_mask_holds_exactly_the_largest_magnitudes_and_ties_go_to_the_lowest_indices():
    scores = torch.tensor([0.5, -0.9, 0.1, 0.5, -0.5, 0.2])
    assert top_count_mask(scores, 3).tolist() == [True, True, False, True, False, False]  # |-0.5| ties, lowest first
    assert int(top_count_mask(torch.randn(1000), 137).sum()) == 137


def test_the_gradient_reaches_the_scores_straight_through_with_the_sign_of_the_score():
    """d loss / d score = g * w * sign(score), g the gradient of the masked weight (edge-popup's rule
    on |score|; without the sign, negative scores would move the wrong way)."""
    torch.manual_seed(1)
    layer = nn.Linear(6, 3, bias=False)
    params = {"weight": layer.weight}
    scores = SupermaskScores(params, {"weight": 9}, torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    masks = scores.training_masks()
    masked = layer.weight.detach() * masks["weight"]
    assert torch.equal(masks["weight"].bool(), scores.masks()["weight"]) and int(masks["weight"].sum()) == 9
    out = masked_forward(layer, x, {"weight": masked})
    assert torch.equal(out, x @ masked.T)
    out.square().sum().backward()
    g = 2 * (x @ masked.T).T @ x  # gradient of the masked weight
    expected = g * layer.weight.detach() * scores.scores["weight"].detach().sign()
    assert torch.allclose(scores.scores["weight"].grad, expected, atol=1e-6)


# ---- WSN -----------------------------------------------------------------------------------------

def test_wsn_masks_are_the_top_scores_after_every_step_and_frozen_weights_never_move_while_their_scores_do():
    model, store = small_model(), TaskMasks()
    cfg = config("wsn", "--l2", "0.001")  # weight decay would move frozen weights: they must not move
    counts = allocate_counts({n: p.shape for n, p in model.named_parameters()}, 0.3, "ERK")
    carried = None
    for task in range(3):
        frozen = store.frozen_before(task) if task else None
        approach = WSN(model, frozen, cfg, total_steps=6, seed=task, carried=carried)
        owned = frozen or {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scores_before = approach.scores.state_dict()
        if carried is not None:  # WSN's scores go on from the last task
            assert all(torch.equal(scores_before[n], carried[n]) for n in carried)

        def check(approach):
            for name, p in model.named_parameters():
                s = approach.scores.scores[name].detach()
                mask = approach.scores.masks()[name]
                assert int(mask.sum()) == counts[name]
                kth = s.abs().view(-1).topk(counts[name]).values[-1]
                assert bool((s.abs()[mask] >= kth).all()) and bool((s.abs()[~mask] <= kth).all())
                assert torch.equal(p.detach()[owned[name]], before[name][owned[name]])  # bit-identical

        train(approach, task, 6, check)
        if task:
            moved = any(bool((approach.scores.scores[n].detach() != scores_before[n])[owned[n]].any()) for n in owned)
            assert moved  # an earlier task's weights' scores still learn: the task chooses what it reuses
        mask, record = approach.finish()
        assert {n: int(m.sum()) for n, m in mask.items()} == counts
        assert record["density"] == pytest.approx(sum(counts.values()) / sum(m.numel() for m in mask.values()))
        store.add(mask)
        carried = approach.carry()


def test_wsn_trains_only_the_weights_in_its_mask():
    model = small_model()
    approach = WSN(model, None, config("wsn"), total_steps=1, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = approach.scores.masks()  # the mask of the one step below
    train(approach, 0, 1)
    for name, p in model.named_parameters():
        changed = p.detach() != before[name]
        assert not bool((changed & ~mask[name]).any())  # a fresh optimizer: outside the mask no gradient, no move
        assert bool(changed[mask[name]].any())


# ---- SupSup --------------------------------------------------------------------------------------

def test_supsup_weights_are_signed_constants_that_never_change():
    model, store = small_model(), TaskMasks()
    signs = {n: p.detach().sign() for n, p in model.named_parameters()}
    cfg = config("supsup", "--l2", "0.001")
    for task in range(3):
        approach = SupSup(model, store.frozen_before(task) if task else None, cfg, total_steps=5, seed=task)
        if task == 0:
            constants = {n: p.detach().clone() for n, p in model.named_parameters()}
            for name, p in constants.items():
                assert torch.equal(p, signs[name] * math.sqrt(2 / p[0].numel()))
        train(approach, task, 5)
        mask, _ = approach.finish()
        store.add(mask)
        assert all(torch.equal(p.detach(), constants[n]) for n, p in model.named_parameters())
    assert approach.optimizer.param_groups[0]["params"] == approach.scores.parameters()  # scores only


def test_supsup_tasks_accuracy_depends_only_on_their_own_scores():
    """Task 1's network computes the same after tasks 2 and 3 were trained, and the same whatever
    task 2 trained on; a task's fresh scores do not start from another's."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    outputs = []
    for task_2_seed in (1, 2):
        model, store = small_model(), TaskMasks()
        first = SupSup(model, None, config("supsup"), total_steps=5, seed=0)
        train(first, 0, 5)
        store.add(first.finish()[0])
        with store.apply(model, 0):
            right_after = model(x)
        second = SupSup(model, store.frozen_before(1), config("supsup"), total_steps=5, seed=task_2_seed)
        assert not torch.equal(second.scores.state_dict()["0.weight"], first.scores.state_dict()["0.weight"])
        train(second, task_2_seed, 5)
        store.add(second.finish()[0])
        with store.apply(model, 0):
            later = model(x)
        assert torch.equal(later, right_after)
        outputs.append(later)
    assert torch.equal(outputs[0], outputs[1])
    assert set(maskable_weights(model)) == {"0.weight", "4.weight"}



def test_supsup_says_when_erk_keeps_a_layer_whole_where_its_mask_could_learn_nothing(caplog):
    """ERK at density 0.2 keeps some of the (narrow) ResNet-18's layers whole, the classifier among
    them: a mask of all ones, nothing to learn. Uniform keeps every layer sparse and says nothing."""
    from models import build_model

    for init, warned in (("ERK", True), ("uniform", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="utils.approaches.supsup"):
            SupSup(build_model("resnet18", 10, 8), None, config("supsup", "--density", "0.2", "--sparse_init", init),
                   total_steps=5, seed=0)
        messages = [r.getMessage() for r in caplog.records if r.name == "utils.approaches.supsup"]
        if warned:
            [message] = messages
            assert "layer(s) kept whole by --sparse_init ERK at density 0.2 (layer1.0.conv1.weight" in message
            assert "their mask is all ones" in message and "--sparse_init uniform" in message
        else:
            assert messages == []
