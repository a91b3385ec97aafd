"""How a run uses its device beyond plain float32: autocast, memory format, torch.compile.

| | CUDA | CPU (and other devices) |
|---|---|---|
| data sets resident on the device, batches cut there | always | always |
| channels_last input batches | always | off |
| bfloat16 autocast (`--amp`) | opt-in | off; `--amp` logs a notice |
| `torch.compile` (`--compile`) | opt-in | opt-in |

The weights stay in the default (contiguous) layout everywhere: the masks index them as flat
tensors, and convolutions take channels_last inputs with such weights. Loss and accuracy are
accumulated on the device, so the training loop never waits for the GPU within an epoch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    """The speed settings in effect for one run."""

    device: torch.device
    amp: bool
    channels_last: bool
    compile: bool

    @classmethod
    def for_device(cls, device: str | torch.device, *, amp: bool = False, compile: bool = False) -> Acceleration:
        """The settings a run on `device` uses, given whether --amp and --compile were asked for."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if amp and not cuda:
            log.warning("--amp: bfloat16 autocast is used on CUDA only; running in float32 on %s", device)
        return cls(device=device, amp=amp and cuda, channels_last=cuda, compile=compile)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: bfloat16 autocast with --amp, else nothing."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Compile `model` in place when asked (parameter names and state_dict keys unchanged)."""
        if self.compile:
            model.compile()
        return model
