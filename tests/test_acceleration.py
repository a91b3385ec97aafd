"""The GPU speed-ups (bf16 autocast, channels_last batches, torch.compile): where each is on,
that each is refused with one clear line where it cannot work, and that the code paths they
switch on keep the masking invariants (run here on the CPU, which has no GPU)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from data import Split, TensorLoader
from models import build_model
from sparselearning import Masking
from utils.acceleration import Acceleration
from utils.cli import parse_config
from utils.errors import UserError


def for_config(config) -> Acceleration:
    return Acceleration.for_config(config)


def test_on_the_cpu_everything_is_off_and_amp_is_a_noop_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING):
        accel = for_config(parse_config(["--device", "cpu", "--amp"], "cifar100"))
    assert (accel.amp, accel.channels_last, accel.compile) == (False, False, False)
    assert "--amp" in caplog.text and "float32 on cpu" in caplog.text
    assert isinstance(accel.autocast(), type(for_config(parse_config([], "cifar100")).autocast()))


def test_on_a_gpu_batches_are_channels_last_and_amp_and_compile_are_opt_in(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("utils.cli._check_compile", lambda device: None)
    plain = for_config(parse_config(["--device", "cuda"], "cifar100"))
    assert (plain.amp, plain.channels_last, plain.compile, plain.cudnn_benchmark) == (False, True, False, False)
    assert plain.deterministic is True
    fast = for_config(parse_config(["--device", "cuda", "--amp", "--compile", "--cudnn_benchmark", "--no-deterministic"],
                                   "cifar100"))
    assert (fast.amp, fast.channels_last, fast.compile, fast.cudnn_benchmark) == (True, True, True, True)
    assert fast.deterministic is False
    contiguous = for_config(parse_config(["--device", "cuda", "--no-channels_last"], "cifar100"))
    assert contiguous.channels_last is False


def test_layout_and_autotuning_flags_parse_and_resolve_per_device(caplog):
    default = parse_config(["--device", "cpu"], "cifar100")
    assert (default.channels_last, default.cudnn_benchmark) == (None, False)  # None: the device decides
    assert parse_config(["--device", "cpu", "--channels_last"], "cifar100").channels_last is True
    assert parse_config(["--device", "cpu", "--no-channels_last"], "cifar100").channels_last is False
    assert for_config(parse_config(["--device", "cpu", "--channels_last"], "cifar100")).channels_last is True
    with caplog.at_level(logging.WARNING):
        accel = for_config(parse_config(["--device", "cpu", "--cudnn_benchmark", "--no-deterministic"], "cifar100"))
    assert accel.cudnn_benchmark is False and "--cudnn_benchmark" in caplog.text and "ignored on cpu" in caplog.text
    for argv in (["--cudnn_benchmark", "yes"], ["--channels_last=1"], ["--no-cudnn_benchmark", "--channels"]):
        with pytest.raises(UserError):
            parse_config(["--device", "cpu", *argv], "cifar100")


def test_neither_layout_nor_autotuning_counts_as_result_neutral():
    from utils.cli import RESULT_NEUTRAL_SETTINGS, RESUME_MAY_CHANGE

    for flag in ("channels_last", "cudnn_benchmark"):
        assert flag not in RESULT_NEUTRAL_SETTINGS and flag not in RESUME_MAY_CHANGE


def test_prepare_sets_cudnn_autotuning_on_a_gpu_only():
    before = torch.backends.cudnn.benchmark
    try:
        for on in (True, False):
            Acceleration(torch.device("cuda"), amp=False, channels_last=True, compile=False,
                         cudnn_benchmark=on).prepare(torch.nn.Identity())
            assert torch.backends.cudnn.benchmark is on
        torch.backends.cudnn.benchmark = True
        Acceleration.for_device("cpu", cudnn_benchmark=True).prepare(torch.nn.Identity())
        assert torch.backends.cudnn.benchmark is True  # untouched by a CPU run
    finally:
        torch.backends.cudnn.benchmark = before


def test_compile_is_refused_where_torch_compile_cannot_work(monkeypatch):
    import shutil

    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(UserError, match="torch.compile does not support this Python or platform"):
        parse_config(["--device", "cpu", "--compile"], "cifar100")
    monkeypatch.undo()

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile on cpu needs a C\\+\\+ compiler"):
        parse_config(["--device", "cpu", "--compile"], "cifar100")
    monkeypatch.undo()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    with pytest.raises(UserError, match="--compile on CUDA needs triton"):
        parse_config(["--device", "cuda", "--compile"], "cifar100")


def test_compile_and_amp_flags_through_the_script_fail_in_one_line(monkeypatch, capsys, tmp_path):
    import torch._dynamo

    from utils.entry import main

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert main("cifar100", ["--device", "cpu", "--compile", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile" in err
    assert not (tmp_path / "o").exists()


def split(n: int = 20) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 labels=torch.arange(n) % 4)


def test_channels_last_batches_hold_the_same_values():
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=8)
    for train in (True, False):
        plain = list(TensorLoader(split(), train=train, seed=3, **stats))
        fast = list(TensorLoader(split(), train=train, seed=3, channels_last=True, **stats))
        for (x, y), (xc, yc) in zip(plain, fast, strict=True):
            assert xc.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, xc) and torch.equal(y, yc)


@pytest.mark.parametrize(("amp", "channels_last"), [(True, False), (False, True)])
def test_the_accelerated_step_keeps_the_masking_invariants(amp, channels_last):
    """bf16 autocast (on the CPU here) and channels_last inputs: weights stay contiguous, frozen
    weights bit-identical, masked-out weights zero, and the step close to the plain one."""

    def one_step(accel: Acceleration):
        torch.manual_seed(0)
        model = build_model("resnet18", 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # an update proportional to the gradient
        frozen = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.1
                  for n, p in model.named_parameters() if p.dim() > 1}
        masking = Masking(optimizer, density=0.2, update_frequency=0, total_steps=4, frozen=frozen, seed=0)
        masking.add_module(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        if accel.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accel.autocast():
            logits = model(x)
        F.cross_entropy(logits.float(), torch.arange(8) % 4).backward()
        masking.step()
        return model, masking, before, frozen

    plain_model, _, plain_before, _ = one_step(Acceleration(torch.device("cpu"), amp=False, channels_last=False, compile=False))
    model, masking, before, frozen = one_step(
        Acceleration(torch.device("cpu"), amp=amp, channels_last=channels_last, compile=False))
    params = dict(model.named_parameters())
    for name, mask in masking.masks.items():
        weight = params[name]
        assert weight.is_contiguous()
        assert torch.equal(weight[frozen[name] & mask], before[name][frozen[name] & mask])
        assert not weight[~mask].any()
    plain_update = torch.cat([(w - plain_before[n]).flatten() for n, w in plain_model.named_parameters()])
    update = torch.cat([(params[n] - before[n]).flatten() for n in params])
    if amp:  # bfloat16 has 8 bits of mantissa: the same direction, not the same digits
        assert F.cosine_similarity(update, plain_update, dim=0) > 0.9
    else:
        assert torch.allclose(update, plain_update, atol=1e-5)
