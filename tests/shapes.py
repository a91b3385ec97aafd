"""Reference weight shapes, written out by hand so tests do not derive them from the code under test."""

import torch


def resnet18_shapes(num_classes: int = 100) -> dict[str, torch.Size]:
    """Weight shapes of the authors' ResNet-18 (7x7 stem, 1x1 shortcuts, fc over the classes)."""
    shapes = {"conv1.weight": torch.Size([64, 3, 7, 7])}
    in_c = 64
    for li, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            cin = in_c if b == 0 else c
            shapes[f"layer{li}.{b}.conv1.weight"] = torch.Size([c, cin, 3, 3])
            shapes[f"layer{li}.{b}.conv2.weight"] = torch.Size([c, c, 3, 3])
            if b == 0 and li > 1:
                shapes[f"layer{li}.{b}.shortcut.0.weight"] = torch.Size([c, in_c, 1, 1])
        in_c = c
    shapes["fc.weight"] = torch.Size([num_classes, 512])
    return shapes
