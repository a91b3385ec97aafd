"""A library caller's mistakes end in one clear error, never in wrong science.

`sparselearning` is imported into researchers' own training code, where a wrong call used to run
on silently: a float or mis-shaped `frozen` mask, `step()` before `add_module()` (a plain optimizer
step on every weight), `add_module()` twice (counts no longer exact), use after `consolidate()`,
tied weights masked twice (the density off), a checkpoint of another model or schedule, a bool
where an int belongs. Each case here asserts the exception type (ValueError for a bad argument,
RuntimeError for a call out of order) and that the message names the argument or call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselearning import (
    MaskedLayer,
    Masking,
    TaskMasks,
    allocate_counts,
    cosine_death_rate,
    derive_seed,
    layer_densities,
    maskable_weights,
    top_indices,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def net() -> nn.Sequential:
    """Two bias-free linear layers: maskable weights '0.weight' (5x4) and '2.weight' (3x5)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))


def masking(model: nn.Module, **kw) -> Masking:
    """A Masking over `model` with an SGD optimizer; `kw` overrides the settings."""
    settings = {"density": 0.5, "update_frequency": 2, "total_steps": 10, "seed": 0} | kw
    return Masking(torch.optim.SGD(model.parameters(), lr=0.1), **settings)


def backward(model: nn.Module) -> None:
    """One batch's gradients on every weight."""
    torch.manual_seed(1)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(3, (8,))).backward()


def bool_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """A bool mask of every maskable weight's shape (a third of the weights True)."""
    g = torch.Generator().manual_seed(2)
    return {name: torch.rand(p.shape, generator=g) < 0.3 for name, p in maskable_weights(model).items()}


# --------------------------------------------------------------------------- frozen masks


def tied_net() -> nn.Sequential:
    """'1.weight' is the same tensor as '0.weight' (tied weights)."""
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False))
    model[1].weight = model[0].weight
    return model


FROZEN_MISUSES = {
    # name: (model, frozen, fragments the message must contain)
    "float 0/1 mask": (net, lambda: {"0.weight": torch.ones(5, 4)}, ["frozen['0.weight']", "float32", ".bool()"]),
    "float mask of 0.5s": (net, lambda: {"0.weight": torch.full((5, 4), 0.5)}, ["frozen['0.weight']", ".bool()"]),
    "uint8 mask": (net, lambda: {"0.weight": torch.ones(5, 4, dtype=torch.uint8)}, ["frozen['0.weight']", ".bool()"]),
    "broadcastable wrong shape": (net, lambda: {"0.weight": torch.ones(1, 4, dtype=torch.bool)},
                                  ["frozen", "'0.weight' is (1, 4)", "(5, 4)"]),
    "transposed shape": (net, lambda: {"2.weight": torch.ones(5, 3, dtype=torch.bool)},
                         ["frozen", "'2.weight' is (5, 3)", "(3, 5)"]),
    "unknown name": (net, lambda: {"module.0.weight": torch.ones(5, 4, dtype=torch.bool)},
                     ["frozen", "'module.0.weight'", "'0.weight'", "'2.weight'"]),
    "tied weight's second name": (tied_net, lambda: {"1.weight": torch.ones(6, 6, dtype=torch.bool)},
                                  ["frozen", "'1.weight' is '0.weight'", "first name"]),
    "a list": (net, lambda: [torch.ones(5, 4, dtype=torch.bool)], ["frozen must be a dict", "list"]),
    "a value not a tensor": (net, lambda: {"0.weight": [[True] * 4] * 5}, ["frozen['0.weight']", "list"]),
    "a key not a name": (net, lambda: {0: torch.ones(5, 4, dtype=torch.bool)}, ["frozen", "parameter name", "0"]),
}


@pytest.mark.parametrize("case", FROZEN_MISUSES)
def test_a_bad_frozen_mask_is_refused(case):
    """Refused at Masking() (type, dtype) or add_module (names, shapes), before any weight changes."""
    make_model, make_frozen, fragments = FROZEN_MISUSES[case]
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as error:
        masking(model, frozen=make_frozen()).add_module(model)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "changed the weights"


def test_a_bool_frozen_mask_of_a_subset_of_the_weights_is_taken():
    """The valid counterpart: a weight missing from `frozen` has nothing frozen."""
    model = net()
    frozen = {"0.weight": bool_masks(model)["0.weight"]}
    mask = masking(model, frozen=frozen)
    mask.add_module(model)
    assert torch.equal(mask.frozen["0.weight"], frozen["0.weight"]) and not mask.frozen["2.weight"].any()


# --------------------------------------------------------------------------- call order

CALLS: dict[str, Callable[[Masking, nn.Module], object]] = {
    "step()": lambda m, model: m.step(),
    "update_topology()": lambda m, model: m.update_topology(),
    "consolidate()": lambda m, model: m.consolidate(),
    "capacity()": lambda m, model: m.capacity(),
    "state_dict()": lambda m, model: m.state_dict(),
    "load_state_dict()": lambda m, model: m.load_state_dict(trained_state()),
    "growth_scores()": lambda m, model: m.growth_scores("0.weight"),
}


def trained_state() -> dict:
    """A valid state of the same settings over `net()`."""
    model = net()
    mask = masking(model)
    mask.add_module(model)
    return mask.state_dict()


@pytest.mark.parametrize("call", CALLS)
def test_a_call_before_add_module_is_refused(call):
    """step() before add_module() used to run a plain optimizer step on every weight."""
    model = net()
    backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    mask = masking(model, growth="gradient")
    with pytest.raises(RuntimeError, match=rf"{re.escape(call)} before add_module\(\): call add_module\(model\) first"):
        CALLS[call](mask, model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "changed the weights"


def test_add_module_twice_is_refused_and_the_counts_stay_exact():
    model = net()
    mask = masking(model)
    mask.add_module(model)
    with pytest.raises(RuntimeError, match=r"add_module\(\) called twice.*new Masking"):
        mask.add_module(model)
    for name, p in maskable_weights(model).items():
        assert int((p != 0).sum()) == mask.counts[name] == int(mask.masks[name].sum())


MUTATIONS = ("step()", "update_topology()", "consolidate()", "load_state_dict()", "add_module()")


@pytest.mark.parametrize("call", MUTATIONS)
def test_a_change_after_consolidate_is_refused(call):
    """A Masking serves one task: after consolidate() its weights belong to the store."""
    model = net()
    mask = masking(model)
    mask.add_module(model)
    state = mask.state_dict()
    backward(model)
    mask.consolidate()
    after = [p.detach().clone() for p in model.parameters()]
    do = {**CALLS, "add_module()": lambda m, model: m.add_module(model),
          "load_state_dict()": lambda m, model: m.load_state_dict(state)}[call]
    with pytest.raises(RuntimeError, match=r"consolidate\(\).*a Masking serves one task.*new Masking") as error:
        do(mask, model)
    assert call in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters(), strict=True)), "changed the weights"


def test_reads_after_consolidate_are_allowed():
    """capacity() and state_dict() only read; utils.train reads capacity() before consolidating."""
    model = net()
    mask = masking(model)
    mask.add_module(model)
    capacity, final = mask.capacity(), mask.consolidate()
    assert mask.capacity() == capacity and set(mask.state_dict()["masks"]) == set(final)


# --------------------------------------------------------------------------- tied weights


def test_a_tied_weight_is_masked_once_under_its_first_name(caplog):
    """One tensor reached from two modules: one masked layer, so the density is exact (two
    layers used to give 11 nonzero weights of 36 where density 0.5 asks 18), named as
    model.named_parameters() names it, so TaskMasks.apply finds it."""
    model = tied_net()
    mask = masking(model, density=0.5)
    with caplog.at_level(logging.INFO, logger="sparselearning"):
        mask.add_module(model)
    assert list(mask.counts) == ["0.weight"] == [name for name, _ in model.named_parameters()]
    assert int((model[0].weight != 0).sum()) == mask.counts["0.weight"] == 18
    assert "tied weights: 1.weight is 0.weight" in caplog.text
    store = TaskMasks()
    store.add(mask.consolidate())
    with store.apply(model, 0):
        assert int((model[1].weight != 0).sum()) == 18


# --------------------------------------------------------------------------- numbers and types

NUMBER_MISUSES = [
    ("density", True), ("density", "0.2"),
    ("death_rate", "0.5"),
    ("update_frequency", 2.5), ("update_frequency", True), ("update_frequency", 100.0),
    ("total_steps", 10.0), ("total_steps", True),
    ("seed", -1), ("seed", True), ("seed", 1.5),
    ("regrow_frozen", "yes"), ("regrow_frozen", 1),
]


@pytest.mark.parametrize(("argument", "value"), NUMBER_MISUSES, ids=[f"{a}={v!r}" for a, v in NUMBER_MISUSES])
def test_a_number_of_the_wrong_type_or_range_is_refused(argument, value):
    """A bool or a float where an int belongs, a string, a negative seed: refused at Masking()."""
    with pytest.raises(ValueError, match=argument):
        masking(net(), **{argument: value})


@pytest.mark.parametrize("model", ["lazy", "two devices", "not a module"])
def test_weights_a_mask_cannot_be_drawn_on_are_refused(model):
    """Uninitialized lazy weights; weights on two devices (the meta device stands in for a GPU);
    something that is not a model."""
    if model == "lazy":
        module, fragment = nn.Sequential(nn.LazyLinear(3, bias=False)), "lazy modules' weights '0.weight'"
    elif model == "two devices":
        module = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False, device="meta"))
        fragment = "must all be on one device"
    else:
        module, fragment = [nn.Linear(4, 4)], "model must be a torch.nn.Module"
    optimizer = torch.optim.SGD(module.parameters() if isinstance(module, nn.Module) else module[0].parameters())
    with pytest.raises(ValueError, match=fragment):
        Masking(optimizer, density=0.5, total_steps=10, seed=0).add_module(module)


def test_growth_scores_of_an_unknown_layer_is_refused():
    model = net()
    mask = masking(model, growth="gradient")
    mask.add_module(model)
    with pytest.raises(ValueError, match=r"growth_scores: no masked layer 'fc\.weight'.*'0\.weight'"):
        mask.growth_scores("fc.weight")


# --------------------------------------------------------------------------- checkpoints


def other_model() -> nn.Sequential:
    """`net()` with a third layer, '3.weight'."""
    return nn.Sequential(*net(), nn.Linear(3, 3, bias=False))


STATE_MISUSES = {
    # name: (settings of the saving Masking, model it saved, fragments of the message)
    "another model": ({}, other_model, ["another model", "'3.weight'"]),
    "fewer total_steps than it took": ({"total_steps": 40}, net, ["total_steps 40 there, 10 here"]),
    "another update_frequency": ({"update_frequency": 3}, net, ["update_frequency 3 there, 2 here"]),
    "another growth": ({"growth": "unfired"}, net, ["growth 'unfired' there, 'random' here"]),
}


@pytest.mark.parametrize("case", STATE_MISUSES)
def test_load_state_dict_of_another_model_or_schedule_is_refused(case):
    settings, saved_model, fragments = STATE_MISUSES[case]
    model = saved_model()
    saver = masking(model, **settings)
    saver.add_module(model)
    backward(model)
    for _ in range(12):  # more steps than the loading Masking's total_steps
        saver.step()
    state = saver.state_dict()
    model = net()
    mask = masking(model)
    mask.add_module(model)
    with pytest.raises(ValueError, match="state") as error:
        mask.load_state_dict(state)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_a_state_of_an_earlier_version_with_more_steps_than_total_steps_is_refused():
    """States saved before the settings were recorded: total_steps checked against the steps."""
    state = trained_state()
    state.pop("settings", None)
    model = net()
    mask = masking(model)
    mask.add_module(model)
    mask.load_state_dict(state)  # an earlier version's state is still read
    with pytest.raises(ValueError, match=r"more than this Masking's total_steps 10"):
        mask.load_state_dict({**state, "steps": 11})
    with pytest.raises(ValueError, match=r"state is not a Masking\.state_dict\(\): it lacks 'generator'"):
        mask.load_state_dict({key: value for key, value in state.items() if key != "generator"})
    with pytest.raises(ValueError, match=r"state must be a Masking\.state_dict\(\), got list"):
        mask.load_state_dict([state])


# --------------------------------------------------------------------------- TaskMasks


def stored(model: nn.Module) -> TaskMasks:
    store = TaskMasks()
    store.add(bool_masks(model))
    return store


def with_bits(state: dict, name: str, bits: torch.Tensor) -> dict:
    return {**state, "tasks": [{**state["tasks"][0], name: bits}]}


TASK_MASKS_MISUSES: dict[str, tuple[Callable[[], object], list[str]]] = {
    "add: float masks": (lambda: stored(net()).add({n: m.float() for n, m in bool_masks(net()).items()}),
                         ["masks['0.weight']", ".bool()"]),
    "add: float first task": (lambda: TaskMasks().add({"0.weight": torch.full((5, 4), 0.5)}), [".bool()"]),
    "add: empty": (lambda: TaskMasks().add({}), ["masks is empty"]),
    "add: not a dict": (lambda: TaskMasks().add([torch.ones(2, dtype=torch.bool)]), ["masks must be a dict"]),
    "add: broadcastable wrong shape": (
        lambda: stored(net()).add({"0.weight": torch.ones(1, 4, dtype=torch.bool),
                                   "2.weight": torch.ones(3, 5, dtype=torch.bool)}),
        ["masks", "'0.weight' is (1, 4)", "(5, 4)"]),
    "add: a layer missing": (lambda: stored(net()).add({"0.weight": torch.ones(5, 4, dtype=torch.bool)}),
                             ["masks lacks the weights '2.weight'"]),
    "add: an extra layer": (lambda: stored(net()).add({**bool_masks(net()), "x": torch.ones(2, dtype=torch.bool)}),
                            ["masks", "'x'"]),
    "store[-1]": (lambda: stored(net())[-1], ["TaskMasks[task]: task -1 out of range", "0..0"]),
    "store[1]": (lambda: stored(net())[1], ["TaskMasks[task]: task 1 out of range"]),
    "store[True]": (lambda: stored(net())[True], ["task must be an int"]),
    "frozen_before(2)": (lambda: stored(net()).frozen_before(2), ["frozen_before(task): task 2", "0..1"]),
    "frozen_before(-1)": (lambda: stored(net()).frozen_before(-1), ["frozen_before(task): task -1"]),
    "apply: task out of range": (lambda: stored(net()).apply(net(), 1).__enter__(), ["apply(model, task): task 1"]),
    "apply: another model": (lambda: stored(net()).apply(nn.Linear(4, 4), 0).__enter__(),
                             ["model lacks the masked weights '0.weight', '2.weight'"]),
    "apply: other shapes": (lambda: stored(net()).apply(nn.Sequential(nn.Linear(1, 5, bias=False), nn.ReLU(),
                                                                      nn.Linear(5, 3, bias=False)), 0).__enter__(),
                            ["other shapes", "'0.weight' is (5, 1), its masks (5, 4)"]),
    "from_state_dict: extra bits": (
        lambda: TaskMasks.from_state_dict(with_bits(stored(net()).state_dict(), "0.weight",
                                                    torch.zeros(4, dtype=torch.uint8))),
        ["task 0", "'0.weight'", "not 3 packed uint8 bytes"]),
    "from_state_dict: a layer missing": (
        lambda: TaskMasks.from_state_dict({**stored(net()).state_dict(), "shapes": {"0.weight": [5, 4]}}),
        ["state's task 0", "'2.weight'"]),
    "from_state_dict: another format": (
        lambda: TaskMasks.from_state_dict({**stored(net()).state_dict(), "format": "float32"}), ["format 'float32'"]),
}


@pytest.mark.parametrize("case", TASK_MASKS_MISUSES)
def test_a_task_masks_misuse_is_refused(case):
    call, fragments = TASK_MASKS_MISUSES[case]
    with pytest.raises(ValueError) as error:
        call()
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_a_store_still_iterates_and_stops_at_its_end():
    """Out-of-range indices raise an IndexError that is also a ValueError: iteration stops."""
    store = stored(net())
    store.add(bool_masks(net()))
    assert len(list(store)) == 2
    with pytest.raises(IndexError):
        store[2]


# --------------------------------------------------------------------------- functions

FUNCTION_MISUSES: dict[str, tuple[Callable[[], object], str]] = {
    "layer_densities: density True": (lambda: layer_densities({"a": (4, 4)}, True, "uniform"), "density"),
    "layer_densities: shapes a list": (lambda: layer_densities([(4, 4)], 0.5, "ERK"), "shapes must be a dict"),
    "layer_densities: a zero dimension": (lambda: layer_densities({"a": (0, 4), "b": (4, 4)}, 0.5, "ERK"),
                                          r"shapes\['a'\]"),
    "allocate_counts: a float dimension": (lambda: allocate_counts({"a": (4.5, 4)}, 0.5, "uniform"),
                                           r"shapes\['a'\]"),
    "allocate_counts: an empty shape": (lambda: allocate_counts({"a": ()}, 0.5, "ERK"), r"shapes\['a'\]"),
    "cosine_death_rate: step -1": (lambda: cosine_death_rate(-1, 10, 0.5), "step must be >= 0"),
    "cosine_death_rate: step 1.5": (lambda: cosine_death_rate(1.5, 10, 0.5), "step must be an int"),
    "cosine_death_rate: total_steps 0": (lambda: cosine_death_rate(0, 0, 0.5), "total_steps must be >= 1"),
    "cosine_death_rate: initial 2": (lambda: cosine_death_rate(0, 10, 2.0), "initial"),
    "derive_seed: seed -1": (lambda: derive_seed(-1, 1), "seed must be >= 0"),
    "derive_seed: seed True": (lambda: derive_seed(True, 1), "seed must be an int"),
    "derive_seed: a float key": (lambda: derive_seed(1, 2.0), r"keys\[0\] must be an int"),
    "MaskedLayer: count over numel": (lambda: MaskedLayer(nn.Parameter(torch.ones(2, 2)), 5, None, False),
                                      "count 5 exceeds"),
    "MaskedLayer: float frozen": (lambda: MaskedLayer(nn.Parameter(torch.ones(2, 2)), 2, torch.ones(2, 2), False),
                                  r"frozen.*\.bool\(\)"),
    "maskable_weights: not a module": (lambda: maskable_weights({"w": torch.ones(2)}), "model must be"),
    "top_indices: k over numel": (lambda: top_indices(torch.rand(5), 6), "k 6 exceeds"),
    "top_indices: 2-D scores": (lambda: top_indices(torch.rand(2, 3), 2), "1-D"),
    "top_indices: k -1": (lambda: top_indices(torch.rand(5), -1), "k must be >= 0"),
    "top_indices: float exclude": (lambda: top_indices(torch.rand(5), 2, torch.zeros(5)), "exclude must be a bool"),
}


@pytest.mark.parametrize("case", FUNCTION_MISUSES)
def test_a_public_function_refuses_a_bad_argument(case):
    call, pattern = FUNCTION_MISUSES[case]
    with pytest.raises(ValueError, match=pattern):
        call()
