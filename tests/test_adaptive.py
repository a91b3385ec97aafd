"""Adaptive DST (beyond the paper): ERK to a power (`--erk_power`), growth that moves from
exploration to exploitation over a task (`--growth_later`), and topology updates that stop once
they change little (`--turnover_stop`). Each keeps DST's invariants (exact mask sizes, frozen
weights bit-identical) on a small network; in runs (BWT = 0, learning, resume):
tests/test_adaptive_runs.py."""

import copy
import math

import pytest
import torch

from sparselearning import Masking, allocate_counts, auto_erk_power, layer_densities
from tests.shapes import resnet18_shapes
from tests.test_masking import (
    MASKABLE,
    build,
    check_invariants,
    clone_masks,
    make_batches,
    make_opt,
    run_task1,
    train,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


# ---- ERK to a power ---------------------------------------------------------------------------------

SHAPES = resnet18_shapes(100)


@pytest.mark.parametrize("density", [0.2, 0.1, 0.05])
def test_erk_power_zero_is_uniform_and_one_is_erk_exactly(density):
    assert layer_densities(SHAPES, density, "ERK", 0.0) == layer_densities(SHAPES, density, "uniform")
    assert layer_densities(SHAPES, density, "ERK", 1.0) == layer_densities(SHAPES, density, "ERK")
    assert allocate_counts(SHAPES, density, "ERK", 0) == allocate_counts(SHAPES, density, "uniform")
    assert allocate_counts(SHAPES, density, "ERK", 1) == allocate_counts(SHAPES, density, "ERK")


@pytest.mark.parametrize("density", [0.2, 0.1, 0.05])
def test_erk_power_between_keeps_the_budget_and_spreads_less_than_erk(density):
    sizes = {name: math.prod(shape) for name, shape in SHAPES.items()}
    score = {name: sum(shape) / sizes[name] for name, shape in SHAPES.items()}
    erk, half = layer_densities(SHAPES, density, "ERK"), layer_densities(SHAPES, density, "ERK", 0.5)
    assert sum(half[n] * sizes[n] for n in SHAPES) == pytest.approx(density * sum(sizes.values()), rel=1e-12)
    by_score = sorted(SHAPES, key=score.get)
    assert [half[n] for n in by_score] == sorted(half.values())  # denser where ERK's score is larger
    sparse = [n for n in SHAPES if erk[n] < 1 and half[n] < 1]
    spread = {name: max(d[n] for n in sparse) / min(d[n] for n in sparse) for name, d in (("erk", erk), ("half", half))}
    assert 1 < spread["half"] < spread["erk"]


def test_auto_power_follows_the_papers_findings():
    assert auto_erk_power(0.2) == 1.0 and auto_erk_power(0.5) == 1.0  # ERK at low sparsity
    assert auto_erk_power(0.05) == 0.0 and auto_erk_power(0.01) == 0.0  # uniform at high sparsity
    assert auto_erk_power(0.1) == pytest.approx(0.5, abs=1e-12)  # half-way in log density


def test_erk_power_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="erk_power"):
        layer_densities(SHAPES, 0.1, "uniform", 0.5)
    with pytest.raises(ValueError, match="erk_power"):
        layer_densities(SHAPES, 0.1, "ERK", -1.0)
    model = build()
    with pytest.raises(ValueError, match="erk_power"):
        Masking(make_opt("adam", model.parameters()), density=0.3, sparse_init="uniform", erk_power=0.5,
                total_steps=10)


def test_masking_draws_the_powered_allocation():
    model = build()
    opt = make_opt("adam", model.parameters())
    masking = Masking(opt, density=0.3, sparse_init="ERK", erk_power=0.5, total_steps=10, seed=0)
    masking.add_module(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in MASKABLE}
    assert masking.counts == allocate_counts(shapes, 0.3, "ERK", 0.5)
    assert masking.counts != allocate_counts(shapes, 0.3, "ERK") != allocate_counts(shapes, 0.3, "uniform")
    check_invariants(model, opt, masking, require_state=False)


# ---- exploration, then exploitation ------------------------------------------------------------------

def trained(steps: int = 6, total: int = 20, **kw) -> Masking:
    """A Masking of the same model copy and seed each call, trained on the same batches without updates."""
    model = build(seed=3)
    opt = make_opt("adam0", model.parameters())
    masking = Masking(opt, density=0.3, update_frequency=0, total_steps=total, seed=5, **kw)
    masking.add_module(model)
    train(model, opt, masking, make_batches(steps, 9))
    return masking


def masks_after_update_at(step: int, **kw) -> dict[str, torch.Tensor]:
    masking = trained(**kw)
    masking.steps = step
    masking.update_topology()
    return masking.masks


def test_mixed_growth_is_the_exploring_growth_at_the_start_and_the_later_one_at_the_end():
    total = trained(growth="random", growth_later="momentum").total_steps
    for explore in ("random", "unfired"):  # share 1 at the start: every weight grown by `explore`
        pure = masks_after_update_at(0, growth=explore)
        mixed = masks_after_update_at(0, growth=explore, growth_later="momentum")
        assert all(torch.equal(pure[n], mixed[n]) for n in MASKABLE)
    for late in ("momentum", "gradient"):  # share 0 at the end: every weight grown by `late`
        pure = masks_after_update_at(total, growth=late)
        mixed = masks_after_update_at(total, growth="random", growth_later=late)
        assert all(torch.equal(pure[n], mixed[n]) for n in MASKABLE)


def test_the_exploring_share_falls_along_the_cosine():
    masking = trained(growth="random", growth_later="momentum")
    shares = [masking.exploration_share(step) for step in range(masking.total_steps + 1)]
    assert shares[0] == 1.0 and shares[-1] == 0.0 and shares[10] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(shares, shares[1:]))
    assert trained(growth="random").exploration_share(10) == 1.0  # no mix: all by --growth


def test_mixed_growth_half_way_takes_from_both():
    start = trained(growth="random").masks["conv2.weight"]
    grown = {name: masks_after_update_at(10, **kw)["conv2.weight"] & ~start
             for name, kw in (("random", {"growth": "random"}), ("momentum", {"growth": "momentum"}),
                              ("mixed", {"growth": "random", "growth_later": "momentum"}))}
    assert 0 < int((grown["mixed"] & grown["momentum"]).sum()) < int(grown["mixed"].sum())
    assert not torch.equal(grown["mixed"], grown["random"])


@pytest.mark.parametrize("growth, later", [("random", "momentum"), ("unfired", "gradient")])
def test_mixed_growth_keeps_mask_sizes_and_frozen_weights_exactly(growth, later):
    model, masks1, w1 = run_task1("adam", growth="random")
    params = dict(model.named_parameters())
    opt = make_opt("adam", model.parameters())
    masking = Masking(opt, density=0.3, growth=growth, growth_later=later, update_frequency=2, total_steps=30,
                      frozen=clone_masks(masks1), seed=1)
    masking.add_module(model)
    counts, changes = dict(masking.counts), []
    previous = clone_masks(masking.masks)

    def check(i):
        check_invariants(model, opt, masking)
        assert masking.counts == counts
        for n, fz in masks1.items():
            m = masking.masks[n]
            assert torch.equal(params[n].detach()[fz & m], w1[n][fz & m]), n
            changes.append(not torch.equal(previous[n], m))
            previous[n] = m.clone()

    train(model, opt, masking, make_batches(30, 2), check)
    assert masking.topology_updates == 15 and any(changes)
    fired = {n: int(f.sum()) for n, f in masking.fired.items()}
    assert all(layer.fired_count == fired[n] for n, layer in masking.layers.items())


def test_growth_later_needs_an_exploring_growth_first():
    model = build()
    with pytest.raises(ValueError, match="growth_later"):
        Masking(make_opt("adam", model.parameters()), density=0.3, growth="gradient", growth_later="momentum",
                total_steps=10)
    with pytest.raises(ValueError, match="growth_later"):
        Masking(make_opt("adam", model.parameters()), density=0.3, growth="random", growth_later="random",
                total_steps=10)


# ---- updates that stop once they change little -------------------------------------------------------

def test_turnover_stop_ends_the_tasks_updates_after_the_first_small_one():
    model = build()
    opt = make_opt("adam", model.parameters())
    masking = Masking(opt, density=0.3, growth="random", update_frequency=2, total_steps=30, turnover_stop=0.99, seed=0)
    masking.add_module(model)
    train(model, opt, masking, make_batches(2, 1))
    assert masking.topology_updates == 1 and masking.settled and 0 < masking.last_turnover < 0.99
    settled = clone_masks(masking.masks)
    train(model, opt, masking, make_batches(20, 2), lambda i: check_invariants(model, opt, masking))
    assert masking.topology_updates == 1  # ten updates were due
    assert all(torch.equal(masking.masks[n], settled[n]) for n in MASKABLE)


def test_turnover_is_the_share_of_the_mask_an_update_changes():
    model = build()
    opt = make_opt("adam", model.parameters())
    masking = Masking(opt, density=0.3, growth="random", update_frequency=2, total_steps=30, turnover_stop=1e-9, seed=0)
    masking.add_module(model)
    for i in range(15):
        before = clone_masks(masking.masks)
        train(model, opt, masking, make_batches(2, 10 + i))
        changed = sum(int((masking.masks[n] & ~before[n]).sum()) for n in MASKABLE)
        assert masking.last_turnover == pytest.approx(changed / sum(masking.counts.values()), abs=1e-12)
    assert masking.topology_updates == 15 and not masking.settled  # random growth always changes something


def test_a_settled_task_stays_settled_after_a_resume():
    kw = dict(density=0.3, growth="momentum", update_frequency=2, total_steps=30, turnover_stop=0.3, seed=0)
    model = build()
    opt = make_opt("adam", model.parameters())
    masking = Masking(opt, **kw)
    masking.add_module(model)
    batches = make_batches(24, 4)
    train(model, opt, masking, batches[:12])
    assert masking.settled
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "masking": masking.state_dict()})
    model2 = build(seed=1)
    opt2 = make_opt("adam", model2.parameters())
    masking2 = Masking(opt2, **kw)
    masking2.add_module(model2)
    model2.load_state_dict(state["model"]), opt2.load_state_dict(state["opt"]), masking2.load_state_dict(state["masking"])
    updates = masking.topology_updates
    train(model, opt, masking, batches[12:]), train(model2, opt2, masking2, batches[12:])
    assert masking2.settled and masking2.topology_updates == masking.topology_updates == updates
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_turnover_stop_must_be_a_fraction():
    model = build()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="turnover_stop"):
            Masking(make_opt("adam", model.parameters()), density=0.3, turnover_stop=bad, total_steps=10)
