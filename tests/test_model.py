"""The authors' ResNet-18: structure, shapes and the BatchNorm that keeps no task state."""

import torch
import torch.nn as nn

from models import build_model
from sparselearning import maskable_weights
from tests.shapes import resnet18_shapes


def test_maskable_weights_are_the_reference_resnet18():
    model = build_model("resnet18", 100)
    shapes = {name: p.shape for name, p in maskable_weights(model).items()}
    reference = resnet18_shapes(100)
    reference["linear.weight"] = reference.pop("fc.weight")  # our classifier's name
    assert shapes == reference
    assert sum(s.numel() for s in shapes.values()) == 11_218_112
    # no biases and no BatchNorm parameters: every parameter is a maskable weight
    assert {n for n, _ in model.named_parameters()} == set(shapes)


def test_stem_is_7x7_stride_2_without_max_pool():
    model = build_model("resnet18", 10)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_batchnorm_uses_batch_statistics_in_train_and_eval():
    model = build_model("resnet18", 10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model.train()
        train_out = model(x)
        model.eval()
        assert torch.allclose(model(x), train_out)  # no running averages to switch to
        assert not any(b.numel() for b in model.buffers())
