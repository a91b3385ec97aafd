"""Dynamic sparse training core (`Masking`): exact sparsity, isolation, prune/grow, resume.

Invariants from DESIGN.md section 3: exact per-layer counts, frozen weights bit-identical under
any optimizer, masked-out weights and their optimizer state zero, regrown weights start at zero
(or at their stored value when frozen), same seed -> same run. The tests of invariants 1-4 run on
every `device` (tests/conftest.py): the CPU, and the GPU when there is one.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselearning import Masking, TaskMasks, allocate_counts

GROWTHS = ("random", "unfired", "momentum", "gradient")
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg")


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


class ConvNet(nn.Module):
    """Tiny conv net with the things that must NOT be masked: biases and BatchNorm."""

    def __init__(self, bias: bool = True, affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8, affine=affine, track_running_stats=False)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16, affine=False, track_running_stats=False)
        self.head = nn.Sequential(nn.Linear(16, 12, bias=bias), nn.ReLU(), nn.Linear(12, 10, bias=bias))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


MASKABLE = {"conv1.weight", "conv2.weight", "head.0.weight", "head.2.weight"}


CPU = torch.device("cpu")


def build(seed: int = 0, device: torch.device = CPU, **kw) -> ConvNet:
    """The ConvNet with the weights that `seed` draws on the CPU, on `device`."""
    torch.manual_seed(seed)
    return ConvNet(**kw).to(device)


def make_batches(n: int, seed: int, bs: int = 16, device: torch.device = CPU):
    """n batches drawn on the CPU from `seed` (the same on every device), on `device`."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, 3, 8, 8, generator=g).to(device), torch.randint(0, 10, (bs,), generator=g).to(device))
        for _ in range(n)
    ]


def make_opt(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)
    if kind == "adam0":
        return torch.optim.Adam(params, lr=1e-2)
    if kind == "sgd0":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam_fused":  # the training loop's optimizer
        return torch.optim.Adam(params, lr=1e-2, fused=True)
    if kind == "adam_fused_wd":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3, fused=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    if kind == "rmsprop":  # masked gradients are exact for RMSprop too: zero gradient, zero state, zero update
        return torch.optim.RMSprop(params, lr=1e-3, momentum=0.9, weight_decay=1e-3)
    if kind == "rmsprop_centered":  # also a running mean of the gradient, which must stay zero too
        return torch.optim.RMSprop(params, lr=1e-3, momentum=0.9, weight_decay=1e-3, centered=True)
    raise ValueError(kind)


def train(model, opt, mask, batches, after_step=None):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mask.step()
        if after_step is not None:
            after_step(i)


def clone_masks(masks):
    return {k: v.clone() for k, v in masks.items()}


def state_tensors(opt, p):
    st = opt.state.get(p, {})
    return {k: st[k] for k in STATE_KEYS if torch.is_tensor(st.get(k))}


def check_invariants(model, opt, mask, require_state=True):
    """Exact counts, bool masks, zero outside mask, zero optimizer state outside trainable."""
    params = dict(model.named_parameters())
    assert set(mask.masks) == MASKABLE
    for n, m in mask.masks.items():
        p = params[n].detach()
        assert m.dtype == torch.bool and m.shape == p.shape, n
        assert int(m.sum()) == mask.counts[n], n
        assert torch.all(p[~m] == 0), f"{n}: nonzero weight outside mask"
        trainable = m & ~mask.frozen[n]
        st = state_tensors(opt, params[n])
        if require_state:
            assert st, f"{n}: no optimizer state to check"
        for k, t in st.items():
            assert torch.all(t[~trainable] == 0), f"{n}.{k} nonzero outside trainable set"


def run_task1(opt_kind="adam", growth="random", steps=20, density=0.3, seed=0, model=None, device=CPU):
    """Train task 1 on `device`, consolidate; return model, task-1 masks and the consolidated weights."""
    model = build(device=device) if model is None else model
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(opt, density=density, growth=growth, update_frequency=4, total_steps=steps, seed=seed)
    mask.add_module(model)
    train(model, opt, mask, make_batches(steps, 1, device=device))
    masks1 = mask.consolidate()
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, masks1, w1


# --------------------------------------------------------------------------- maskable set, init


def test_maskable_set_is_conv_and_linear_weights_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)  # first conv: masked
            self.bn = nn.BatchNorm2d(4)  # bn.weight is a 'weight' but not maskable
            self.blocks = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 3)  # classifier: masked

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mask = Masking(opt, density=0.5, total_steps=10)
    mask.add_module(model)
    assert set(mask.masks) == {"stem.weight", "blocks.0.weight", "fc.weight"}
    assert set(mask.counts) == set(mask.masks)
    assert set(mask.frozen) == set(mask.masks)
    # BN / LayerNorm weights and biases untouched (dense, not zeroed)
    assert torch.all(model.bn.weight != 0) and torch.all(model.norm.weight != 0)


@pytest.mark.parametrize("init", ["uniform", "ERK"])
@pytest.mark.parametrize("new_weights", ["zero", "init"])
def test_initial_masks_match_allocation(init, new_weights, device):
    model = build(device=device)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, sparse_init=init, total_steps=10, new_weights=new_weights)
    mask.add_module(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in MASKABLE}
    assert mask.counts == allocate_counts(shapes, 0.3, init)
    params = dict(model.named_parameters())
    for n, m in mask.masks.items():
        assert m.dtype == torch.bool
        assert int(m.sum()) == mask.counts[n]
        assert not mask.frozen[n].any()
        assert torch.equal(mask.fired[n], m)
        p = params[n].detach()
        assert torch.all(p[~m] == 0)
        # first task: active weights keep the model's own init
        assert torch.equal(p[m], orig[n][m])
    for n in ("conv1.bias", "head.0.bias", "bn1.weight"):
        assert torch.equal(params[n].detach(), orig[n])


def test_initial_mask_is_uniform_over_entries():
    # 20 entries, 5 active: each entry should be chosen in ~1/4 of 400 seeds
    model = nn.Sequential(nn.Linear(5, 4, bias=False))
    hits = torch.zeros(4, 5)
    n_seeds = 400
    for s in range(n_seeds):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mask = Masking(opt, density=0.25, sparse_init="uniform", total_steps=10, seed=s)
        mask.add_module(model)
        assert int(mask.masks["0.weight"].sum()) == 5
        hits += mask.masks["0.weight"].float()
    # mean 100, sd ~8.7: a 5-sigma band
    assert hits.min() >= 55 and hits.max() <= 145, hits


def test_same_seed_same_run_different_seed_different_masks():
    def run(global_seed, seed):
        model = build(0)
        torch.manual_seed(global_seed)  # the Masking must not depend on the global RNG
        opt = make_opt("adam", model.parameters())
        mask = Masking(opt, density=0.3, growth="random", update_frequency=3, total_steps=12, seed=seed)
        mask.add_module(model)
        init = clone_masks(mask.masks)
        train(model, opt, mask, make_batches(12, 2))
        return init, clone_masks(mask.masks), {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b, c = run(1, 0), run(2, 0), run(1, 1)
    for n in MASKABLE:
        assert torch.equal(a[0][n], b[0][n]), n
        assert torch.equal(a[1][n], b[1][n]), n
    for n in a[2]:
        assert torch.equal(a[2][n], b[2][n]), n
    assert any(not torch.equal(a[0][n], c[0][n]) for n in MASKABLE)


# --------------------------------------------------------------------------- exact sparsity


@pytest.mark.parametrize("opt_kind", ["adam", "sgd"])
@pytest.mark.parametrize("init", ["uniform", "ERK"])
@pytest.mark.parametrize("growth", GROWTHS)
def test_counts_constant_under_topology_updates(growth, init, opt_kind, device):
    model = build(device=device)
    opt = make_opt(opt_kind, model.parameters())
    # ERK at 0.5 makes the two linear layers dense (they must be skipped)
    density = 0.5 if init == "ERK" else 0.3
    mask = Masking(opt, density=density, sparse_init=init, growth=growth, update_frequency=1, total_steps=50)
    mask.add_module(model)
    init_masks = clone_masks(mask.masks)
    dense = {n for n, c in mask.counts.items() if c == mask.masks[n].numel()}
    if init == "ERK":
        assert dense == {"head.0.weight", "head.2.weight"}
    changes = 0
    prev = clone_masks(mask.masks)

    def after(i):
        nonlocal changes, prev
        check_invariants(model, opt, mask)
        for n in MASKABLE:
            assert not (mask.masks[n] & ~mask.fired[n]).any(), "active entry not marked fired"
            if not torch.equal(prev[n], mask.masks[n]):
                changes += 1
        for n in dense:
            assert mask.masks[n].all()
        prev = clone_masks(mask.masks)

    train(model, opt, mask, make_batches(50, 1, device=device), after)
    assert changes >= 40, "topology updates did not change the masks"
    for n in MASKABLE:
        assert int(mask.masks[n].sum()) == int(init_masks[n].sum()) == mask.counts[n]
    if growth in ("random", "unfired"):
        sparse = [n for n in MASKABLE if n not in dense]
        assert any(int(mask.fired[n].sum()) > mask.counts[n] for n in sparse)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_outside_mask_zero_and_state_zero_first_task(opt_kind, device):
    model = build(device=device)
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(opt, density=0.2, growth="random", update_frequency=2, total_steps=20)
    mask.add_module(model)
    train(model, opt, mask, make_batches(20, 1, device=device), lambda i: check_invariants(model, opt, mask))


# --------------------------------------------------------------------------- schedule, frequency


@pytest.mark.parametrize("dr", [0.5, 0.3])
def test_death_rate_cosine_schedule(dr):
    model = build()
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, death_rate=dr, total_steps=200)
    mask.add_module(model)
    assert mask.death_rate_at(0) == pytest.approx(dr, abs=1e-12)
    assert mask.death_rate_at(100) == pytest.approx(0.005 + 0.5 * (dr - 0.005), abs=1e-12)
    assert mask.death_rate_at(200) == pytest.approx(0.005, abs=1e-12)
    want50 = 0.005 + 0.5 * (dr - 0.005) * (1 + math.cos(math.pi * 50 / 200))
    assert mask.death_rate_at(50) == pytest.approx(want50, abs=1e-12)


def test_update_uses_decayed_rate():
    # 100 active of 200, unfired growth so every grown entry is visible as newly active
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mask = Masking(opt, density=0.5, sparse_init="uniform", growth="unfired", update_frequency=0, total_steps=100)
    mask.add_module(model)
    assert mask.counts["0.weight"] == 100
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        opt.zero_grad()
        x = torch.randn(8, 20, generator=g)
        F.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g)).backward()
        mask.step()
    old = mask.masks["0.weight"].clone()
    mask.update_topology()
    k = int((mask.masks["0.weight"] & ~old).sum())
    allowed = {math.ceil(mask.death_rate_at(s) * 100) for s in (49, 50, 51)}
    assert k in allowed, (k, allowed)
    assert int(mask.masks["0.weight"].sum()) == 100


def test_update_frequency_zero_never_changes_masks():
    model = build()
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, growth="random", update_frequency=0, total_steps=30)
    mask.add_module(model)
    init = clone_masks(mask.masks)
    train(model, opt, mask, make_batches(30, 1))
    for n in MASKABLE:
        assert torch.equal(mask.masks[n], init[n]), n


def test_update_frequency_period():
    model = build()
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, growth="random", update_frequency=5, total_steps=30)
    mask.add_module(model)
    prev = clone_masks(mask.masks)
    changed_at = []

    def after(i):
        nonlocal prev
        if any(not torch.equal(prev[n], mask.masks[n]) for n in MASKABLE):
            changed_at.append(i)
        prev = clone_masks(mask.masks)

    train(model, opt, mask, make_batches(30, 1), after)
    assert len(changed_at) == 6, changed_at
    assert all(b - a == 5 for a, b in zip(changed_at, changed_at[1:])), changed_at


# --------------------------------------------------------------------------- prune / grow rules


def _unique_boundary(values_sorted, k):
    return k == 0 or k >= len(values_sorted) or values_sorted[k - 1] != values_sorted[k]


def pruned_mask(old, w, k):
    """Brute force: the k active entries with the smallest |w|."""
    active = old.flatten().nonzero().squeeze(1)
    pruned = torch.zeros(old.numel(), dtype=torch.bool)
    pruned[active[torch.argsort(w.flatten()[active].abs())[:k]]] = True
    return pruned.view_as(old)


def expected_topology(old, w, scores, k):
    """Brute force: prune the k smallest |w| among active, grow the top-k scores among inactive."""
    flat_old = old.flatten()
    active = flat_old.nonzero().squeeze(1)
    mags = w.flatten()[active].abs()
    order = torch.argsort(mags)
    assert _unique_boundary(mags[order].tolist(), k), "test setup: tied magnitudes"
    pruned = active[order[:k]]
    remaining = flat_old.clone()
    remaining[pruned] = False
    cand = (~remaining).nonzero().squeeze(1)
    s = scores.flatten()[cand]
    order_s = torch.argsort(s, descending=True)
    assert _unique_boundary(s[order_s].tolist(), k), "test setup: tied scores"
    grown = cand[order_s[:k]]
    new = remaining.clone()
    new[grown] = True
    return new.view_as(old)


# "large" (60000 entries) goes past the size where a fast top-k may switch to sampling
@pytest.mark.parametrize("dims", [(6, 5), (300, 200)], ids=["tiny", "large"])
@pytest.mark.parametrize(
    "growth,opt_kind", [("gradient", "adam"), ("gradient", "sgd"), ("momentum", "adam"), ("momentum", "sgd")]
)
def test_score_growth_picks_exact_topk(growth, opt_kind, dims):
    torch.manual_seed(0)
    d_in, d_out = dims
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    p = model[0].weight
    if opt_kind == "adam":
        betas = (0.8, 0.99)  # not the defaults: the Masking must read them from the optimizer
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=betas)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.7)
    mask = Masking(
        opt, density=0.5, sparse_init="uniform", growth=growth, update_frequency=0, total_steps=10**6, seed=0
    )
    mask.add_module(model)
    name = "0.weight"
    count = mask.counts[name]
    assert count == d_in * d_out // 2
    g = torch.Generator().manual_seed(1)

    def loss():
        x = torch.randn(8, d_in, generator=g)
        return F.cross_entropy(model(x), torch.randint(0, d_out, (8,), generator=g))

    grads = []
    for _ in range(6):
        opt.zero_grad()
        loss().backward()
        grads.append(p.grad.clone())
        mask.step()
    # the current batch's dense gradient, as when step() triggers the update
    opt.zero_grad()
    loss().backward()
    grad_now = p.grad.clone()
    if growth == "gradient":
        scores = grad_now.abs()
    else:
        scores = mask.growth_scores(name).detach().clone()
        assert scores.shape == p.shape
        # reference: dense running averages of the raw gradient with the optimizer's constants
        if opt_kind == "adam":
            m = torch.zeros_like(p)
            v = torch.zeros_like(p)
            for gr in grads:
                m = betas[0] * m + (1 - betas[0]) * gr
                v = betas[1] * v + (1 - betas[1]) * gr * gr
            ref = (m / (v.sqrt() + 1e-8)).abs()
        else:
            buf = torch.zeros_like(p)
            for gr in grads:
                buf = 0.7 * buf + gr
            ref = buf.abs()
        assert torch.allclose(scores, ref, rtol=1e-4, atol=1e-6), (scores, ref)
    old = mask.masks[name].clone()
    w = p.detach().clone()
    ks = {math.ceil(mask.death_rate_at(s) * count) for s in (6, 7)}
    assert len(ks) == 1
    k = ks.pop()
    assert k == math.ceil(count / 2)
    want = expected_topology(old, w, scores, k)
    mask.update_topology()
    new = mask.masks[name]
    assert torch.equal(new, want), (new, want)
    pw = p.detach()
    kept = old & new & ~pruned_mask(old, w, k)  # survivors; a pruned entry regrown starts afresh
    assert torch.equal(pw[kept], w[kept])
    assert torch.all(pw[~kept] == 0)  # pruned are zero, grown start at zero
    for key, t in state_tensors(opt, p).items():
        assert torch.all(t[~kept] == 0), key


def test_gradient_growth_via_step_uses_dense_gradient():
    """When step() triggers the update, growth must see the dense gradient of the batch."""
    model = build()
    opt = make_opt("adam0", model.parameters())
    # update_frequency=1: whichever phase the counter uses, this step() runs the update
    mask = Masking(opt, density=0.3, growth="gradient", update_frequency=1, total_steps=10**6)
    mask.add_module(model)
    batches = make_batches(4, 5)
    train(model, opt, mask, batches[:3])
    old = clone_masks(mask.masks)
    opt.zero_grad()
    x, y = batches[3]
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().abs().clone() for n, p in model.named_parameters() if n in MASKABLE}
    mask.step()
    informative = 0
    for n in MASKABLE:
        new = mask.masks[n]
        grown = new & ~old[n]
        if grads[n][~old[n]].max() == 0:  # every weight inactive before the update ties at 0 (dead
            continue                      # ReLU units): the lowest indices may be the pruned ones
        assert grown.sum() > 0, n
        # every grown entry scores at least as high as every entry left inactive
        # (dead ReLU units give exact-zero gradients, so ties at 0 are allowed)
        assert grads[n][grown].min() >= grads[n][~new].max(), n
        informative += int(grads[n][~new].max() > 0)
    assert informative >= 2, "test setup: inactive gradients all zero"


@pytest.mark.parametrize("width", [10, 300], ids=["tiny", "large"])
@pytest.mark.parametrize("with_frozen", [False, True])
def test_death_prunes_exactly_smallest_magnitudes(with_frozen, width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 8 if width == 10 else 200, bias=False), nn.ReLU(),
                          nn.Linear(8 if width == 10 else 200, 4, bias=False))
    frozen = None
    if with_frozen:
        g = torch.Generator().manual_seed(5)
        frozen = {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()}
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask = Masking(
        opt, density=0.5, sparse_init="uniform", growth="random", update_frequency=0,
        total_steps=10**6, frozen=frozen, seed=2,  # tiny case: some trainable entries survive
    )
    mask.add_module(model)
    params = dict(model.named_parameters())
    # one step so that the trainable entries carry momentum state
    g = torch.Generator().manual_seed(2)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(16, width, generator=g)), torch.randint(0, 4, (16,), generator=g)).backward()
    mask.step()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # distinct magnitudes with mixed signs on the trainable entries
        for n, p in params.items():
            trainable = mask.masks[n] & ~mask.frozen[n]
            vals = (torch.randperm(p.numel(), generator=gen) + 1).float().view_as(p) * 1e-3
            signs = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            p[trainable] = (vals * signs)[trainable]
    old = clone_masks(mask.masks)
    w = {n: p.detach().clone() for n, p in params.items()}
    mask.update_topology()
    for n, p in params.items():
        o, new, fz = old[n], mask.masks[n], mask.frozen[n]
        if with_frozen:
            assert (o & fz).any() and torch.equal(w[n][o & fz], stored[n][o & fz])
        count = mask.counts[n]
        ks = {math.ceil(mask.death_rate_at(s) * count) for s in (0, 1, 2)}
        assert len(ks) == 1
        k = ks.pop()
        active = o.flatten().nonzero().squeeze(1)
        mags = w[n].flatten()[active].abs()
        order = torch.argsort(mags)
        assert _unique_boundary(mags[order].tolist(), k)
        P = torch.zeros(o.numel(), dtype=torch.bool)
        P[active[order[:k]]] = True
        P = P.view_as(o)
        survivors = o & ~P
        pw = p.detach()
        assert int(new.sum()) == count, n
        assert not (survivors & ~new).any(), f"{n}: pruned an entry that is not among the k smallest"
        assert torch.equal(pw[survivors], w[n][survivors])
        # grown = (new & ~old) plus pruned-and-regrown: exactly k in total
        assert int((new & ~o).sum()) + int((new & P).sum()) == k, n
        assert torch.all(pw[P & ~new] == 0)
        # a pruned entry that growth picks again is a regrown entry: it restarts at zero
        assert torch.all(pw[P & new & ~fz] == 0), f"{n}: pruned-and-regrown entry kept its old value"
        assert torch.equal(pw[P & new & fz], stored[n][P & new & fz])
        buf = opt.state[p]["momentum_buffer"]
        assert (buf[survivors & ~fz] != 0).any()  # the state check below is not vacuous
        assert torch.all(buf[P] == 0), f"{n}: pruned (or pruned-and-regrown) entry kept momentum"


def test_unfired_growth_prefers_never_fired():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mask = Masking(
        opt, density=7 / 30, sparse_init="uniform", growth="unfired", update_frequency=0,
        total_steps=10**6, seed=0,
    )
    mask.add_module(model)
    name = "0.weight"
    p = model[0].weight
    count = mask.counts[name]
    assert count == 7
    k = math.ceil(mask.death_rate_at(0) * count)
    assert k == 4
    assert torch.equal(mask.fired[name], mask.masks[name])
    gen = torch.Generator().manual_seed(3)
    saw_full = saw_partial = False
    for _ in range(10):
        old = mask.masks[name].clone()
        fired_before = mask.fired[name].clone()
        with torch.no_grad():  # distinct nonzero magnitudes so pruning is well-defined
            p.copy_(old * (torch.rand(p.shape, generator=gen) + 0.1))
        mask.update_topology()
        new = mask.masks[name]
        grown = new & ~old
        unfired = ~fired_before
        n_unfired = int(unfired.sum())
        assert int(new.sum()) == count
        if n_unfired >= k:
            saw_full = True
            assert not (grown & fired_before).any(), "grew a fired entry while unfired ones remain"
            assert int(grown.sum()) == k
        elif n_unfired > 0:
            saw_partial = True
            assert not (unfired & ~new).any(), "not all remaining unfired entries were grown"
        assert torch.equal(mask.fired[name], fired_before | new)
    assert saw_full and saw_partial
    assert mask.fired[name].all()


# --------------------------------------------------------------------------- isolation (frozen)


@pytest.mark.parametrize(
    "opt_kind", ["sgd", "adam", "sgd0", "adam0", "adam_fused", "adam_fused_wd", "adamw", "rmsprop", "rmsprop_centered"]
)
@pytest.mark.parametrize("growth", GROWTHS)
def test_frozen_weights_bit_identical(opt_kind, growth, device):
    model, masks1, w1 = run_task1(opt_kind, device=device)
    params = dict(model.named_parameters())
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(
        opt, density=0.3, growth=growth, update_frequency=3, total_steps=40,
        frozen=clone_masks(masks1), seed=1,
    )
    mask.add_module(model)
    start = {n: params[n].detach().clone() for n in MASKABLE}
    stats = {"overlap": 0, "changes": 0}
    prev = clone_masks(mask.masks)

    def check_frozen(i=None):
        for n, fz in masks1.items():
            p, m = params[n].detach(), mask.masks[n]
            assert torch.equal(mask.frozen[n], fz), n
            assert torch.equal(p[fz & m], w1[n][fz & m]), f"{n}: frozen weight changed"
            assert torch.all(p[fz & ~m] == 0), n
            stats["overlap"] += int((fz & m & (w1[n] != 0)).sum())
            if not torch.equal(prev[n], m):
                stats["changes"] += 1
            prev[n] = m.clone()
        if i is not None:
            check_invariants(model, opt, mask)

    check_frozen()
    train(model, opt, mask, make_batches(40, 2, device=device), check_frozen)
    assert stats["overlap"] > 0, "no frozen weight was ever reused: test is vacuous"
    assert stats["changes"] > 0
    moved = any(
        ((params[n].detach() != start[n]) & mask.masks[n] & ~masks1[n]).any() for n in MASKABLE
    )
    assert moved, "trainable weights did not train"
    before = {n: params[n].detach().clone() for n in MASKABLE}
    final = clone_masks(mask.masks)
    returned = mask.consolidate()
    for n, fz in masks1.items():
        p = params[n].detach()
        assert torch.equal(returned[n], final[n])
        assert torch.equal(p[fz], w1[n][fz]), f"{n}: frozen values not restored bit-identically"
        own = final[n] & ~fz
        assert torch.equal(p[own], before[n][own])
        assert torch.all(p[~(fz | final[n])] == 0)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam", "adamw", "rmsprop", "rmsprop_centered"])
def test_trainable_weights_step_as_with_the_plain_optimizer(opt_kind):
    """The one step path (masked gradients) is exact: on the trainable weights of a later task,
    Masking.step() gives bit for bit what the plain optimizer gives on the unmasked gradients,
    momentum, weight decay and RMSprop's centering included."""
    model, masks1, _ = run_task1("adam")
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(opt, density=0.3, update_frequency=0, total_steps=20, frozen=clone_masks(masks1), seed=1)
    mask.add_module(model)
    params = mask.params
    ref = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    ref_opt = make_opt(opt_kind, list(ref.values()))
    start = {n: p.detach().clone() for n, p in params.items()}
    for x, y in make_batches(8, 4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in params.items():
            ref[n].grad = p.grad.clone()
        ref_opt.step()
        mask.step()
        for n, p in params.items():
            t = mask.trainable[n]
            assert torch.equal(p.detach()[t], ref[n].detach()[t]), n
    assert all((params[n].detach() != start[n])[mask.trainable[n]].any() for n in MASKABLE), "nothing trained"
    check_invariants(model, opt, mask)


class _AdamVariant(torch.optim.Adam):
    """A subclass may change the update: refused like any optimizer not known to be exact."""


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.Adamax(params, lr=1e-2),  # its norm grows by eps on zero gradients
    lambda params: torch.optim.Adagrad(params, lr=1e-2),
    lambda params: _AdamVariant(params, lr=1e-2),
], ids=["Adamax", "Adagrad", "Adam subclass"])
def test_other_optimizers_are_refused(make):
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make(model.parameters())
    mask = Masking(opt, density=0.3, total_steps=10)
    with pytest.raises(ValueError, match=rf"SGD, Adam, AdamW, RMSprop .*not {type(opt).__name__}: .*zero gradient"):
        mask.add_module(model)
    assert not mask.masks
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("growth", ["random", "unfired"])
def test_sampling_growth_modes_have_no_scores(growth):
    model = build()
    mask = Masking(make_opt("adam", model.parameters()), density=0.3, growth=growth, total_steps=10)
    mask.add_module(model)
    with pytest.raises(ValueError, match="samples weights directly"):
        mask.growth_scores("conv1.weight")


def test_consolidate_returns_a_copy():
    model = build()
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, total_steps=5)
    mask.add_module(model)
    train(model, opt, mask, make_batches(5, 1))
    snapshot = clone_masks(mask.masks)
    out = mask.consolidate()
    for n in MASKABLE:
        assert torch.equal(out[n], snapshot[n])
        out[n].fill_(True)
        assert torch.equal(mask.masks[n], snapshot[n]), "consolidate() returned the live mask"


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_regrown_entries_start_values_and_state(opt_kind, growth, device):
    model, masks1, w1 = run_task1(opt_kind, density=0.5, device=device)
    params = dict(model.named_parameters())
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(
        opt, density=0.3, growth=growth, update_frequency=0, total_steps=1000,
        frozen=clone_masks(masks1), seed=2,
    )
    mask.add_module(model)
    batches = make_batches(15, 3, device=device)
    n_frozen_regrown = n_free_regrown = 0
    for cycle in range(5):
        train(model, opt, mask, batches[3 * cycle: 3 * cycle + 3])
        old = clone_masks(mask.masks)
        mask.update_topology()
        for n, fz in masks1.items():
            new = mask.masks[n]
            grown = new & ~old[n]
            p = params[n].detach()
            assert int(new.sum()) == mask.counts[n]
            assert torch.equal(p[grown & fz], w1[n][grown & fz]), f"{n}: regrown frozen entry lost its value"
            assert torch.all(p[grown & ~fz] == 0), f"{n}: regrown free entry not zero"
            assert torch.all(p[~new] == 0)
            st = state_tensors(opt, params[n])
            assert st
            for key, t in st.items():
                assert torch.all(t[grown] == 0), f"{n}.{key}: regrown entry has optimizer state"
                assert torch.all(t[~(new & ~fz)] == 0), f"{n}.{key}: state outside trainable set"
            n_frozen_regrown += int((grown & fz & (w1[n] != 0)).sum())
            n_free_regrown += int((grown & ~fz).sum())
    assert n_frozen_regrown > 0 and n_free_regrown > 0


@pytest.mark.parametrize("new_weights", ["zero", "init"])
def test_new_weights_of_later_task(new_weights, device):
    model, masks1, w1 = run_task1("adam", device=device)
    params = dict(model.named_parameters())
    opt = make_opt("adam", model.parameters())
    mask = Masking(
        opt, density=0.4, frozen=clone_masks(masks1), new_weights=new_weights, total_steps=10, seed=3
    )
    mask.add_module(model)
    scaled = []
    for n, fz in masks1.items():
        p, m = params[n].detach(), mask.masks[n]
        fresh = m & ~fz
        assert torch.equal(p[m & fz], w1[n][m & fz])
        assert torch.all(p[~m] == 0)
        if new_weights == "zero":
            assert torch.all(p[fresh] == 0)
        else:
            bound = 1.0 / math.sqrt(p[0].numel())  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
            scaled.append(p[fresh] / bound)
    if new_weights == "init":
        v = torch.cat(scaled)
        assert v.numel() >= 100
        assert torch.all(v != 0)
        assert v.abs().max() <= 1 + 1e-6
        # a fresh U(-bound, bound) draw: mean |v| ~ 0.5, both signs
        assert 0.4 < v.abs().mean() < 0.6
        assert (v > 0).sum() > 0.3 * v.numel() and (v < 0).sum() > 0.3 * v.numel()


def test_capacity_fractions():
    model, masks1, _ = run_task1("adam", density=0.4)
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, sparse_init="ERK", frozen=clone_masks(masks1), total_steps=10, seed=7)
    mask.add_module(model)
    cap = mask.capacity()
    tot = {"used": 0, "task": 0, "reused": 0}
    numel = 0
    layer_used = []
    for n in MASKABLE:
        m, fz = mask.masks[n], masks1[n]
        want = {
            "used": (fz | m).float().mean().item(),
            "task": m.float().mean().item(),
            "reused": (m & fz).float().mean().item(),
        }
        want["free"] = 1 - want["used"]
        for key, val in want.items():
            assert cap["layers"][n][key] == pytest.approx(val, abs=1e-6), (n, key)
        tot["used"] += int((fz | m).sum())
        tot["task"] += int(m.sum())
        tot["reused"] += int((m & fz).sum())
        numel += m.numel()
        layer_used.append(want["used"])
    for key in ("used", "task", "reused"):
        assert cap["total"][key] == pytest.approx(tot[key] / numel, abs=1e-6), key
    assert cap["total"]["free"] == pytest.approx(1 - tot["used"] / numel, abs=1e-6)
    assert abs(sum(layer_used) / len(layer_used) - tot["used"] / numel) > 1e-3  # weighted != mean


def test_consolidate_and_apply_reproduce_each_task(device):
    """Zero forgetting: a task's network after later tasks equals the one at its end."""
    model = build(0, device, bias=False, affine=False)  # nothing outside the masks is shared
    model.eval()
    x_eval = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(42)).to(device)
    tm = TaskMasks()
    eff, outs = [], []
    for t in range(3):
        opt = make_opt("adam", model.parameters())
        mask = Masking(
            opt, density=0.3, growth="momentum", update_frequency=4, total_steps=20,
            frozen=tm.frozen_before(t), seed=t,
        )
        mask.add_module(model)
        model.train()
        train(model, opt, mask, make_batches(20, 10 + t, device=device))
        model.eval()
        masks_t = mask.consolidate()
        tm.add(masks_t)
        params = dict(model.named_parameters())
        eff.append({n: params[n].detach() * masks_t[n] for n in MASKABLE})
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.mul_(masks_t[n])
            outs.append(ref(x_eval))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for t in range(3):
            with tm.apply(model, t):
                params = dict(model.named_parameters())
                for n in MASKABLE:
                    assert torch.equal(params[n].detach(), eff[t][n]), (t, n)
                assert torch.equal(model(x_eval), outs[t]), t
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), final[n]), (t, n)
    # the tasks really are different networks
    assert not torch.equal(outs[0], outs[2])


# --------------------------------------------------------------------------- resume


def _resume_case(growth, frozen_run: bool):
    """Resume the documented way: build fresh objects, add_module, then load all three states."""
    steps, cut = 18, 7
    kw = dict(density=0.3, growth=growth, update_frequency=3, total_steps=30, seed=4)
    opt_kind = "sgd" if frozen_run else "adam"
    if frozen_run:
        model, masks1, _ = run_task1("sgd", growth="random")
        kw["frozen"] = clone_masks(masks1)
    else:
        model = build()
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(opt, **kw)
    mask.add_module(model)
    batches = make_batches(steps, 7)
    train(model, opt, mask, batches[:cut])
    snap_model = copy.deepcopy(model.state_dict())
    snap_opt = copy.deepcopy(opt.state_dict())
    snap_mask = copy.deepcopy(mask.state_dict())
    train(model, opt, mask, batches[cut:])
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_masks = clone_masks(mask.masks)
    ref_fired = clone_masks(mask.fired)
    ref_cons = mask.consolidate()
    ref_cons_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2 = build(seed=999)  # different init and global RNG state
    opt2 = make_opt(opt_kind, model2.parameters())
    mask2 = Masking(opt2, **kw)
    mask2.add_module(model2)
    model2.load_state_dict(snap_model)
    opt2.load_state_dict(snap_opt)
    mask2.load_state_dict(snap_mask)
    torch.manual_seed(12345)
    train(model2, opt2, mask2, batches[cut:])
    for n, p in model2.named_parameters():
        assert torch.equal(p.detach(), ref_params[n]), f"{n}: params diverged after resume"
    for n in MASKABLE:
        assert torch.equal(mask2.masks[n], ref_masks[n]), n
        assert torch.equal(mask2.fired[n], ref_fired[n]), n
    cons2 = mask2.consolidate()
    for n in MASKABLE:
        assert torch.equal(cons2[n], ref_cons[n]), n
    for n, p in model2.named_parameters():
        assert torch.equal(p.detach(), ref_cons_params[n]), f"{n}: consolidated weights differ"


@pytest.mark.parametrize("frozen_run", [False, True], ids=["first_task", "later_task"])
@pytest.mark.parametrize("growth", GROWTHS)
def test_state_dict_roundtrip(growth, frozen_run):
    """A restored Masking continues bit-identically: its state holds masks, fired, RNG, step,
    growth statistics and frozen values."""
    _resume_case(growth, frozen_run=frozen_run)


def test_mask_is_independent_of_weights_drawn_with_the_same_seed():
    """torch.manual_seed(s) for the weights and Masking(seed=s) must not share a random stream:
    otherwise the initial mask selects each layer's most positive weights and training stalls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300, bias=False))
    mask = Masking(torch.optim.SGD(model.parameters(), lr=0.1), density=0.1, sparse_init="uniform",
                   update_frequency=0, total_steps=10, seed=0)
    before = model[0].weight.detach().clone()
    mask.add_module(model)
    chosen = before[mask.masks["0.weight"]]
    # 12,000 independent picks: the fraction of positive weights is 0.5 +- 0.005 (1 sd)
    assert abs((chosen > 0).float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])  # both with weight decay: reused indices kept
@pytest.mark.parametrize("growth", GROWTHS)
def test_incremental_bookkeeping_matches_a_full_recompute(growth, optimizer):
    """update_topology updates each layer's derived tensors only where the mask changed; after
    many updates they must equal what a full recompute from mask, frozen and stored gives. (The
    reused indices are kept only with weight decay. The fixed values that an optimizer restored
    after every step needed are gone with that second step path, and so are their checks.)"""
    model, masks1, w1 = run_task1("adam", growth="random")
    opt = make_opt(optimizer, model.parameters())
    mask = Masking(opt, density=0.3, growth=growth, update_frequency=2, total_steps=40,
                   frozen=clone_masks(masks1), seed=3)
    mask.add_module(model)
    train(model, opt, mask, make_batches(30, 5))
    for name, layer in mask.layers.items():
        m, frozen = layer.mask, layer.frozen
        assert m is mask.masks[name] and frozen is mask.frozen[name], name
        assert torch.equal(layer.stored, torch.where(masks1[name], w1[name], 0.0)), name
        assert torch.equal(mask.trainable[name], m & ~frozen), name
        assert torch.equal(layer.trainable_uint8, (m & ~frozen).to(torch.uint8)), name
        assert torch.equal(torch.sort(layer.active).values, m.flatten().nonzero().squeeze(1)), name
        assert torch.equal(mask.fired[name] & m, m), name
        if growth == "unfired":
            assert layer.fired_count == int(mask.fired[name].sum()), name
        assert torch.equal(layer.reused, (m & frozen).flatten().nonzero().squeeze(1)), name


def test_state_dict_roundtrip_breaks_magnitude_ties_the_same_way():
    """Which of equal magnitudes are pruned depends on the order of the active indices, which
    updates scramble: a restored Masking must reproduce it, not re-derive a sorted order."""
    model = build()
    opt = make_opt("adam0", model.parameters())
    kw = dict(density=0.3, growth="random", update_frequency=2, total_steps=100, seed=0)
    mask = Masking(opt, **kw)
    mask.add_module(model)
    train(model, opt, mask, make_batches(6, 3))  # three updates: the active order is no longer sorted
    with torch.no_grad():
        for name, p in mask.params.items():
            p.copy_(mask.masks[name].float())  # every active weight has magnitude 1: all tied
    snap = copy.deepcopy((model.state_dict(), opt.state_dict(), mask.state_dict()))
    mask.update_topology()

    model2 = build(seed=5)
    opt2 = make_opt("adam0", model2.parameters())
    mask2 = Masking(opt2, **kw)
    mask2.add_module(model2)
    model2.load_state_dict(snap[0])
    opt2.load_state_dict(snap[1])
    mask2.load_state_dict(snap[2])
    mask2.update_topology()
    for name in mask.masks:
        assert torch.equal(mask2.masks[name], mask.masks[name]), name


def test_a_task_without_topology_updates_is_warned_about_and_updates_are_counted(caplog):
    model = build()
    opt = make_opt("adam0", model.parameters())
    Masking(opt, density=0.3, update_frequency=50, total_steps=40, seed=0).add_module(model)
    assert "no topology update in this task: update_frequency 50 > its 40 steps" in caplog.text

    caplog.clear()
    mask = Masking(opt, density=0.3, update_frequency=4, total_steps=40, seed=0)
    mask.add_module(model)
    assert "no topology update" not in caplog.text
    train(model, opt, mask, make_batches(10, 1))
    assert mask.topology_updates == 2  # after steps 4 and 8
    mask.update_topology()  # an update asked for by hand counts too
    assert mask.topology_updates == mask.state_dict()["topology_updates"] == 3

    other = build()
    static = Masking(make_opt("adam0", other.parameters()), density=0.3, update_frequency=0, total_steps=40, seed=0)
    static.add_module(other)
    assert "no topology update" not in caplog.text  # update_frequency 0 asks for static sparse training


def test_a_model_with_shared_biases_or_running_statistics_gets_one_warning(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4, bias=False))
    model(torch.randn(2, 3, 8, 8))
    Masking(make_opt("adam0", model.parameters()), density=0.3, update_frequency=0, total_steps=10,
            seed=0).add_module(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "not isolated" in warnings[0]
    for name in ("0.bias", "1.weight", "1.running_mean", "running statistics"):
        assert name in warnings[0]

    caplog.clear()
    safe = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False, track_running_stats=False),
                         nn.Flatten(), nn.Linear(288, 4, bias=False))  # as models/resnet.py builds its layers
    Masking(make_opt("adam0", safe.parameters()), density=0.3, update_frequency=0, total_steps=10,
            seed=0).add_module(safe)
    assert "not isolated" not in caplog.text


@pytest.mark.parametrize("growth", ["gradient", "momentum"])
@pytest.mark.parametrize("regrow_frozen", [False, True])
def test_score_growth_ranks_frozen_weights_last_unless_asked(growth, regrow_frozen):
    """As the authors' code (which zeroes frozen weights' gradients before growth ranks them):
    momentum and gradient growth take a frozen weight only when no other inactive one is left;
    with regrow_frozen they rank frozen weights by their real scores like any other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30, bias=False))
    frozen = {"0.weight": torch.rand(30, 40, generator=torch.Generator().manual_seed(3)) < 0.5}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = Masking(opt, density=0.3, sparse_init="uniform", growth=growth, update_frequency=0,
                   total_steps=10**6, frozen=frozen, regrow_frozen=regrow_frozen, seed=0)
    mask.add_module(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 40, generator=g)), torch.randint(0, 30, (8,), generator=g)).backward()
        mask.step()
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(8, 40, generator=g)), torch.randint(0, 30, (8,), generator=g)).backward()
    scores = mask.growth_scores("0.weight").clone()
    old = mask.masks["0.weight"].clone()
    mask.update_topology()
    new, is_frozen = mask.masks["0.weight"], frozen["0.weight"]
    grown = new & ~old
    frozen_grown = int((grown & is_frozen).sum())
    if regrow_frozen:
        assert frozen_grown > 0  # the real scores favour some frozen weights
        assert scores[grown].min() >= scores[~new].max()
    else:
        assert frozen_grown == 0  # 30 % density: plenty of free, unfrozen weights to grow
        free = ~new & ~is_frozen
        assert scores[grown].min() >= scores[free].max()


def test_frozen_last_still_grows_frozen_weights_when_nothing_else_is_free():
    model = nn.Sequential(nn.Linear(20, 10, bias=False))
    frozen = {"0.weight": torch.ones(10, 20, dtype=torch.bool)}
    frozen["0.weight"].view(-1)[:5] = False  # 5 unfrozen weights, far fewer than a growth takes
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = Masking(opt, density=0.5, sparse_init="uniform", growth="gradient", update_frequency=1,
                   total_steps=100, frozen=frozen, seed=0)
    mask.add_module(model)
    F.cross_entropy(model(torch.randn(4, 20)), torch.tensor([0, 1, 2, 3])).backward()
    mask.step()  # the update: k = 50 pruned and regrown
    assert int(mask.masks["0.weight"].sum()) == 100
    assert mask.masks["0.weight"].view(-1)[:5].all()  # the unfrozen inactive ones first


# --------------------------------------------------------------------------- restrict (one-shot pruning to a given mask)


@pytest.mark.parametrize("opt_kind", ["adam", "sgd"])
def test_restrict_shrinks_the_mask_exactly_and_keeps_the_invariants(opt_kind, device):
    model, masks1, w1 = run_task1(opt_kind, device=device)
    opt = make_opt(opt_kind, model.parameters())
    mask = Masking(opt, density=1.0, update_frequency=0, total_steps=20, frozen=masks1, seed=1)
    mask.add_module(model)
    train(model, opt, mask, make_batches(5, 2, device=device))
    keep = {n: m | (torch.rand(m.shape, generator=torch.Generator().manual_seed(3)) < 0.2).to(device)
            for n, m in masks1.items()}
    mask.restrict(keep)
    assert {n: int(m.sum()) for n, m in mask.masks.items()} == {n: int(k.sum()) for n, k in keep.items()}
    assert mask.counts == {n: int(k.sum()) for n, k in keep.items()}
    check_invariants(model, opt, mask)  # the weights and optimizer state that left the mask are zero
    train(model, opt, mask, make_batches(5, 3, device=device), lambda i: check_invariants(model, opt, mask))
    for n, p in model.named_parameters():
        if n in masks1:
            assert torch.equal(p.detach()[masks1[n]], w1[n][masks1[n]])  # frozen: bit-identical
    state = mask.state_dict()
    fresh = Masking(make_opt(opt_kind, model.parameters()), density=1.0, update_frequency=0, total_steps=20,
                    frozen=masks1, seed=1)
    fresh.add_module(model)
    with pytest.raises(ValueError, match="another allocation"):
        fresh.load_state_dict(state)  # a restricted state needs the same restrict first
    fresh.restrict(state["masks"])
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[n], mask.masks[n]) for n in keep)


def test_restrict_refuses_what_is_not_a_subset_and_calls_out_of_order():
    model = build()
    opt = make_opt("adam", model.parameters())
    mask = Masking(opt, density=0.3, update_frequency=0, total_steps=5, seed=0)
    with pytest.raises(RuntimeError, match="before add_module"):
        mask.restrict({})
    mask.add_module(model)
    with pytest.raises(ValueError, match="subset of the current mask"):
        mask.restrict({n: torch.ones_like(m) for n, m in mask.masks.items()})
    with pytest.raises(ValueError, match="keep"):
        mask.restrict({n: m for n, m in list(mask.masks.items())[:1]})  # not every layer
    mask.consolidate()
    with pytest.raises(RuntimeError, match="after consolidate"):
        mask.restrict(mask.masks)
