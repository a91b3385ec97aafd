"""How a run uses its device beyond plain float32: memory format, cuDNN autotuning, autocast,
torch.compile, deterministic algorithms.

| | CUDA | CPU (and other devices) |
|---|---|---|
| data sets resident on the device, batches cut there | always | always |
| channels_last input batches (`--channels_last`) | on unless `--no-channels_last` | off unless `--channels_last` |
| cuDNN autotuning (`--cudnn_benchmark`, needs `--no-deterministic`) | opt-in | off; the flag logs a notice |
| bfloat16 autocast (`--amp`) | opt-in | off; `--amp` logs a notice |
| `torch.compile` (`--compile`) | opt-in | opt-in |
| deterministic algorithms (`--deterministic`) | on unless `--no-deterministic` | nothing to switch: CPU kernels are deterministic |

The weights stay in the default (contiguous) layout everywhere: the masks index them as flat
tensors, and convolutions take channels_last inputs with such weights. Loss and accuracy are
accumulated on the device, so the training loop never waits for the GPU within an epoch.

Neither layout nor autotuning is result-neutral: the memory format and cuDNN's timing-based
choice of convolution algorithms change the floating-point order of the sums, and the timing
can choose differently in two processes (so `--cudnn_benchmark` runs are not bit-repeatable).
The masks, the frozen weights and zero forgetting do not depend on either.

`--deterministic` (the default) makes a CUDA run repeat bit for bit on the same GPU model with
the same torch, CUDA and cuDNN: cuDNN uses deterministic convolution algorithms only
(`torch.backends.cudnn.deterministic`, no autotuning), torch its deterministic kernels
(`torch.use_deterministic_algorithms`, e.g. index_put/index_copy without atomics), and cuBLAS a
fixed workspace (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, unless the environment sets it already).
`warn_only=True`: an op with no deterministic CUDA kernel in the installed torch warns instead
of stopping the run. In torch 2.14 (by the alerts its CUDA library holds) no op of a run lacks
one; older releases (the floor is 2.6) may flag `kthvalue` and `scatter_reduce(amin)`, although
what the run takes from them (the k-th value, a minimum) does not depend on the order of the
threads. All of these are process-wide switches: `Acceleration.apply`
sets them where the run starts, before its first CUDA call (the cuBLAS workspace is fixed when
the first cuBLAS handle is made), and `switches_restored` puts them back when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from utils.cli import Config

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
"""The cuBLAS workspace settings with which torch's deterministic mode accepts cuBLAS; the
first is the one a deterministic run sets where the environment sets none."""


@dataclass(frozen=True)
class Acceleration:
    """The speed settings in effect for one run."""

    device: torch.device
    amp: bool
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool = False
    deterministic: bool = False  # the CUDA determinism switches (see the module's docstring); off on a CPU

    @classmethod
    def for_device(cls, device: str | torch.device, *, amp: bool = False, compile: bool = False,
                   channels_last: bool | None = None, cudnn_benchmark: bool = False,
                   deterministic: bool = True) -> Acceleration:
        """The settings a run on `device` uses, given the flags asked for (`channels_last` None:
        on CUDA, off elsewhere; `deterministic`: a run's default, on)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if amp and not cuda:
            log.warning("--amp: bfloat16 autocast is used on CUDA only; running in float32 on %s", device)
        if cudnn_benchmark and not cuda:
            log.warning("--cudnn_benchmark: cuDNN autotuning exists on CUDA only; ignored on %s", device)
        if not deterministic and not cuda:
            log.debug("--no-deterministic changes nothing on %s: its kernels are deterministic either way", device)
        layout = cuda if channels_last is None else channels_last
        return cls(device=device, amp=amp and cuda, channels_last=layout, compile=compile,
                   cudnn_benchmark=cudnn_benchmark and cuda, deterministic=deterministic and cuda)

    @classmethod
    def for_config(cls, config: Config) -> Acceleration:
        """The settings of the run `config` describes."""
        return cls.for_device(config.device, amp=config.amp, compile=config.compile,
                              channels_last=config.channels_last, cudnn_benchmark=config.cudnn_benchmark,
                              deterministic=config.deterministic)

    def apply(self) -> None:
        """Set the process-wide switches of these settings; call it where the run starts, before
        its first CUDA call. On CUDA: cuDNN autotuning (`torch.backends.cudnn.benchmark`) as
        asked; with `deterministic`, cuDNN's deterministic algorithms, torch's deterministic mode
        (warn_only) and a fixed cuBLAS workspace (`CUBLAS_WORKSPACE_CONFIG`, kept when the
        environment sets it); without, all three off but the environment left as it is. Elsewhere
        nothing: no switch of a CPU run is touched. Both cuDNN flags on (no command line gives
        that): cuDNN times its deterministic algorithms only, and two processes may pick differently.
        """
        if self.device.type != "cuda":
            return
        if self.deterministic:
            _fixed_cublas_workspace()
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.deterministic
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: bfloat16 autocast with --amp, else nothing."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make `model` run as these settings say: the process-wide switches set (`apply`); the
        model compiled in place when asked (parameter names and state_dict keys unchanged)."""
        self.apply()
        if self.compile:
            model.compile()
        return model


_reported_workspaces: set[str] = set()


def _fixed_cublas_workspace() -> None:
    """CUBLAS_WORKSPACE_CONFIG for a deterministic run: `:4096:8` unless the environment sets it
    (the user's value is kept; one that torch's deterministic mode does not accept is reported)."""
    value = os.environ.get(CUBLAS_WORKSPACE_ENV)
    if value is None:
        os.environ[CUBLAS_WORKSPACE_ENV] = CUBLAS_DETERMINISTIC[0]
    elif value not in CUBLAS_DETERMINISTIC and value not in _reported_workspaces:
        _reported_workspaces.add(value)  # once a process: apply() runs at the start and again in prepare()
        log.warning("--deterministic: the environment's %s=%s is kept, but it is none of %s, so cuBLAS may not "
                    "repeat bit for bit (torch warns at its matrix products); unset it or set one of those",
                    CUBLAS_WORKSPACE_ENV, value, " and ".join(CUBLAS_DETERMINISTIC))


@contextlib.contextmanager
def switches_restored() -> Iterator[None]:
    """Inside, any process-wide switch `Acceleration.apply` sets; on leaving, each back as it was
    (for a run in a process that goes on: tests, notebooks). CUBLAS_WORKSPACE_CONFIG goes back
    too, but the workspace torch made from it stays: torch reads the variable once."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              os.environ.get(CUBLAS_WORKSPACE_ENV))
    try:
        yield
    finally:
        benchmark, deterministic, algorithms, warn_only, workspace = before
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE_ENV, None)
        else:
            os.environ[CUBLAS_WORKSPACE_ENV] = workspace
