"""The authors' ResNet-18 for task-incremental continual learning.

Differences from torchvision's ResNet-18, all kept from the paper's code so that results
are comparable:

- the stem is a 7x7 stride-2 convolution with no max-pool after it (a 32x32 image
  enters the first stage at 16x16);
- BatchNorm has no affine parameters and keeps no running statistics, so it always
  normalizes with the statistics of the current batch (train and test alike): there is
  nothing task-specific in it that a later task could overwrite;
- one bias-free linear classifier over all classes; each task reads its own slice.

Every weight the sparse core masks is a conv or linear weight; there are no biases.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm that always uses the current batch's statistics and has no parameters."""
    return nn.BatchNorm2d(channels, affine=False, track_running_stats=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = batch_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = batch_norm(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), batch_norm(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with stages of 64-128-256-512 channels (`width` 64, the paper's), two BasicBlocks each.

    `width` is the first stage's channels; the later stages have 2, 4 and 8 times as many. A narrower
    network only makes tests and smoke runs cheaper: every result of the paper is at 64."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = batch_norm(width)
        stages, in_ch = [], width
        for channels, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(nn.Sequential(BasicBlock(in_ch, channels, stride), BasicBlock(channels, channels, 1)))
            in_ch = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(8 * width, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
