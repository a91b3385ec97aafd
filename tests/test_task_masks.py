"""Per-task mask store (`TaskMasks`): bookkeeping, capacity, compact save/load, apply().

Bit packing, the union of earlier tasks, save/load and apply() run on every `device`
(tests/conftest.py); the masks are drawn on the CPU and moved there."""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselearning import TaskMasks
from tests.shapes import resnet18_shapes


# --------------------------------------------------------------------------- helpers


def hand_masks(device: torch.device = torch.device("cpu")):
    """Two tasks over a [2,2] and a [3,4] layer, small enough to check capacity by hand (on `device`)."""
    a0 = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool, device=device)
    a1 = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool, device=device)
    b0 = torch.zeros(3, 4, dtype=torch.bool, device=device)
    b0[0, 0] = True
    b1 = torch.zeros(3, 4, dtype=torch.bool, device=device)
    b1[1, 1] = b1[1, 2] = True
    return [{"a.weight": a0, "b.weight": b0}, {"a.weight": a1, "b.weight": b1}]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


MASKED = ("conv.weight", "fc.weight")


def random_masks(model, seed, p=0.4):
    """Masks drawn on the CPU from `seed`, on the device of `model`."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: (torch.rand(params[n].shape, generator=g) < p).to(params[n].device) for n in MASKED}


# --------------------------------------------------------------------------- tests


def test_add_get_len(device):
    tm = TaskMasks()
    assert len(tm) == 0
    m0, m1 = hand_masks(device)
    tm.add(m0)
    assert len(tm) == 1
    tm.add(m1)
    assert len(tm) == 2
    for t, ref in enumerate((m0, m1)):
        got = tm[t]
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == torch.bool and got[k].device == ref[k].device
            assert torch.equal(got[k], ref[k]), (t, k)


def test_frozen_before_is_union_of_earlier_tasks(device):
    g = torch.Generator().manual_seed(0)
    shapes = {"x.weight": (5, 7), "y.weight": (3, 2, 3, 3)}
    tasks = [{k: (torch.rand(s, generator=g) < 0.3).to(device) for k, s in shapes.items()} for _ in range(3)]
    tm = TaskMasks()
    for m in tasks:
        tm.add(m)
    assert tm.frozen_before(0) is None
    for t in (1, 2, 3):
        fb = tm.frozen_before(t)
        for k in shapes:
            want = tasks[0][k].clone()
            for u in range(1, t):
                want |= tasks[u][k]
            assert fb[k].dtype == torch.bool and fb[k].device == want.device
            assert torch.equal(fb[k], want), (t, k)
    # strictly earlier tasks only: task 1's own mask is not in frozen_before(1)
    only1 = tasks[1]["x.weight"] & ~tasks[0]["x.weight"]
    assert only1.any()
    assert not (tm.frozen_before(1)["x.weight"] & only1).any()


def test_capacity_hand_checked():
    m0, m1 = hand_masks()
    tm = TaskMasks()
    tm.add(m0)
    cap = tm.capacity()
    assert cap["layers"]["a.weight"]["used"] == pytest.approx(1 / 4)
    assert cap["layers"]["b.weight"]["used"] == pytest.approx(1 / 12)
    assert cap["total"]["used"] == pytest.approx(2 / 16)
    assert cap["total"]["free"] == pytest.approx(14 / 16)
    tm.add(m1)
    cap = tm.capacity()
    assert cap["layers"]["a.weight"]["used"] == pytest.approx(2 / 4)
    assert cap["layers"]["a.weight"]["free"] == pytest.approx(2 / 4)
    assert cap["layers"]["b.weight"]["used"] == pytest.approx(3 / 12)
    assert cap["layers"]["b.weight"]["free"] == pytest.approx(9 / 12)
    # weighted by layer size (5/16), not the mean of the layer fractions (0.375)
    assert cap["total"]["used"] == pytest.approx(5 / 16)
    assert cap["total"]["free"] == pytest.approx(11 / 16)


def test_save_load_lossless_and_bit_packed(tmp_path):
    shapes = resnet18_shapes()
    g = torch.Generator().manual_seed(0)
    # density 0.5: incompressible, so only bit-packing (1 bit per weight) meets the bound
    tasks = [{k: torch.rand(s, generator=g) < p for k, s in shapes.items()} for p in (0.5, 0.3)]
    tm = TaskMasks()
    for m in tasks:
        tm.add(m)
    path = tmp_path / "task_masks.pt"
    tm.save(path)
    assert os.path.isfile(path), "save(path) must write exactly to path"
    n_weights = sum(math.prod(s) for s in shapes.values())
    float32_bytes = len(tasks) * n_weights * 4
    size = os.path.getsize(path)
    assert size <= float32_bytes / 25, f"{size} bytes > 1/25 of {float32_bytes}"

    loaded = TaskMasks.load(path)
    assert isinstance(loaded, TaskMasks)
    assert len(loaded) == 2
    for t, ref in enumerate(tasks):
        got = loaded[t]
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == torch.bool
            assert got[k].shape == ref[k].shape
            assert torch.equal(got[k], ref[k]), (t, k)
    fb = loaded.frozen_before(2)
    assert torch.equal(fb["fc.weight"], tasks[0]["fc.weight"] | tasks[1]["fc.weight"])


def test_save_load_odd_sizes(tmp_path, device):
    # numel not a multiple of 8: padding bits must not leak into the masks
    g = torch.Generator().manual_seed(1)
    shapes = {"a.weight": (3, 3), "b.weight": (7, 5, 1, 1), "c.weight": (1, 1)}
    tasks = [{k: (torch.rand(s, generator=g) < 0.5).to(device) for k, s in shapes.items()} for _ in range(3)]
    tasks[0]["c.weight"][:] = True
    tm = TaskMasks()
    for m in tasks:
        tm.add(m)
    tm.save(tmp_path / "m.pt")
    loaded = TaskMasks.load(tmp_path / "m.pt", device)
    assert len(loaded) == 3
    for t in range(3):
        for k in shapes:
            assert torch.equal(loaded[t][k], tasks[t][k]), (t, k)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """save() goes through write_atomically: whole file or none, even when writing fails."""
    tm = TaskMasks()
    tm.add(hand_masks()[0])
    path = tmp_path / "m.pt"
    tm.save(path)
    before = path.read_bytes()
    tm.add(hand_masks()[1])

    def fail(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        tm.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    monkeypatch.undo()
    assert len(TaskMasks.load(path)) == 1


def test_apply_masks_and_restores_exactly(device):
    torch.manual_seed(0)
    model = Net().to(device)
    with torch.no_grad():  # make BN affine params non-trivial
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    model.eval()  # forward must not touch BN running statistics
    orig = copy.deepcopy(model.state_dict())
    tm = TaskMasks()
    masks = [random_masks(model, 1), random_masks(model, 2)]
    for m in masks:
        tm.add(m)
    x = torch.randn(4, 3, 5, 5).to(device)
    for t in (0, 1):
        with tm.apply(model, t):
            params = dict(model.named_parameters())
            for n, p in params.items():
                if n in MASKED:
                    m = masks[t][n]
                    assert torch.equal(p.detach()[m], orig[n][m]), (t, n)
                    assert torch.all(p.detach()[~m] == 0), (t, n)
                else:
                    assert torch.equal(p.detach(), orig[n]), (t, n)
            # forward equals the forward of the hand-masked network
            out = model(x)
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in MASKED:
                    p.mul_(masks[t][n])
        assert torch.equal(out, ref(x))
        sd = model.state_dict()
        for k, v in orig.items():
            assert torch.equal(sd[k], v), (t, k)


def test_apply_restores_on_exception():
    torch.manual_seed(0)
    model = Net()
    orig = copy.deepcopy(model.state_dict())
    tm = TaskMasks()
    tm.add(random_masks(model, 3))
    with pytest.raises(RuntimeError):
        with tm.apply(model, 0):
            assert not torch.equal(model.conv.weight.detach(), orig["conv.weight"])
            raise RuntimeError("boom")
    sd = model.state_dict()
    for k, v in orig.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 3, 3), (100, 513)])
def test_bit_packing_is_numpys_layout_and_round_trips(shape, device):
    import numpy as np

    from sparselearning.task_masks import pack_bits, unpack_bits

    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.3).to(device)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert packed.device == mask.device  # packed where the mask is
    assert np.array_equal(packed.cpu().numpy(), np.packbits(mask.cpu().numpy().ravel()))  # the on-disk format
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_the_store_holds_one_bit_per_weight_per_task_in_memory():
    """20 tasks of ResNet-18 masks cost 20 x 1.4 MB of packed bits plus one bool union."""
    shapes = resnet18_shapes()
    g = torch.Generator().manual_seed(0)
    tm = TaskMasks()
    for _ in range(20):
        tm.add({name: torch.rand(shape, generator=g) < 0.2 for name, shape in shapes.items()})
    numel = sum(math.prod(shape) for shape in shapes.values())
    packed_bytes = sum(bits.numel() for masks in tm._packed for bits in masks.values())
    assert packed_bytes <= 20 * math.ceil(numel / 8) + 20 * len(shapes)
    assert sum(u.numel() * u.element_size() for u in tm._union.values()) == numel
