"""How a run uses its device beyond plain float32: memory format, cuDNN autotuning, autocast,
torch.compile.

| | CUDA | CPU (and other devices) |
|---|---|---|
| data sets resident on the device, batches cut there | always | always |
| channels_last input batches (`--channels_last`) | on unless `--no-channels_last` | off unless `--channels_last` |
| cuDNN autotuning (`--cudnn_benchmark`) | opt-in | off; the flag logs a notice |
| bfloat16 autocast (`--amp`) | opt-in | off; `--amp` logs a notice |
| `torch.compile` (`--compile`) | opt-in | opt-in |

The weights stay in the default (contiguous) layout everywhere: the masks index them as flat
tensors, and convolutions take channels_last inputs with such weights. Loss and accuracy are
accumulated on the device, so the training loop never waits for the GPU within an epoch.

Neither layout nor autotuning is result-neutral: the memory format and cuDNN's timing-based
choice of convolution algorithms change the floating-point order of the sums, and the timing
can choose differently in two processes (so `--cudnn_benchmark` runs are not bit-repeatable).
The masks, the frozen weights and zero forgetting do not depend on either.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from utils.cli import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    """The speed settings in effect for one run."""

    device: torch.device
    amp: bool
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool = False

    @classmethod
    def for_device(cls, device: str | torch.device, *, amp: bool = False, compile: bool = False,
                   channels_last: bool | None = None, cudnn_benchmark: bool = False) -> Acceleration:
        """The settings a run on `device` uses, given the flags asked for (`channels_last` None:
        on CUDA, off elsewhere)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if amp and not cuda:
            log.warning("--amp: bfloat16 autocast is used on CUDA only; running in float32 on %s", device)
        if cudnn_benchmark and not cuda:
            log.warning("--cudnn_benchmark: cuDNN autotuning exists on CUDA only; ignored on %s", device)
        layout = cuda if channels_last is None else channels_last
        return cls(device=device, amp=amp and cuda, channels_last=layout, compile=compile,
                   cudnn_benchmark=cudnn_benchmark and cuda)

    @classmethod
    def for_config(cls, config: Config) -> Acceleration:
        """The settings of the run `config` describes."""
        return cls.for_device(config.device, amp=config.amp, compile=config.compile,
                              channels_last=config.channels_last, cudnn_benchmark=config.cudnn_benchmark)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: bfloat16 autocast with --amp, else nothing."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make `model` run as these settings say: on CUDA, cuDNN autotuning switched on or off
        (a process-wide switch, `torch.backends.cudnn.benchmark`); the model compiled in place
        when asked (parameter names and state_dict keys unchanged)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.compile:
            model.compile()
        return model
