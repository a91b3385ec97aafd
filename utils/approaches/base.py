"""The approach interface: how one task is trained, and which network it leaves behind.

An approach is everything that differs between DST (the paper's), its baselines and its peers
(WSN, PackNet, SupSup); the loop (`utils.train`), the data, the evaluation, the metrics and the
run directory are shared. One `Approach` object serves one task, built fresh when the task
starts. The loop calls it in this order:

    approach = Cls(model, frozen, config, total_steps, seed, carried)   # the task starts
    approach.measure(input_shape)             # the layers' MACs for the task's images (one image's shape)
    for every batch:
        logits = approach.forward(x)          # the network the task trains
        loss.backward(); approach.step()      # the update (instead of optimizer.step())
        approach.count_step(len(x))           # the step's training cost (`step_macs`)
    approach.keepable()                       # after every epoch: may the loop keep this one?
    approach.end_epoch(epochs_done)           # then the approach's own work (PackNet prunes)
    mask, record = approach.finish()          # the task's network and what the log reports
    carried = approach.carry()                # handed to the next task's approach (WSN: its scores)

The loop steps the approach's LR schedule (`make_scheduler`) after every epoch.
`finish` returns the task's network as a mask over the model's maskable weights (bool tensors
by parameter name, stored by `TaskMasks`; task t's network at test time is its mask applied to
the model's weights) or None when the task's network is the whole model (dense fine-tuning).
Weights inside an earlier task's mask must not change afterwards: that is what makes isolation
(BWT = 0) hold, and each approach's tests check it.

`state_dict()` / `load_state_dict()` hold the approach's own state for the task in progress
(copies, not references: a saved epoch must not change with training); the model, the
optimizer (`self.optimizer`, built by the approach because some approaches train more than the
model's weights) and the LR schedule are saved by the loop.

Training cost. `count_step` adds, after every step, the batch's images times `step_macs()`, the
per-image MACs of the step just taken, counted as RigL counts them (`sparselearning.flops`): a
forward pass f_S, where f_S is the MACs of the network the task trains, and a backward pass of
2 f_S (the activations' gradients and the weights'); a step that needs the dense weight gradient
(growth by gradient or momentum, scores of every weight) costs f_S + f_S + f_D instead, f_D the
dense network's. The base class counts dense training, 3 f_D; each approach overrides only
`step_macs`. The counters (`train_macs`, `train_images`) are not in `state_dict()`: that is also
what the kept epoch copies and restores, and the cost counts every step trained, every epoch. The
loop saves them with its own state (`TaskTraining.state_dict`), so a resumed task counts exactly
what an uninterrupted one does. `cost_record(mask)` gives the task record's FLOPs entries.

A new approach: one module in this package with a subclass of `Approach` (a `name`, a docstring
saying what it is and where it differs from its paper), and its class added to `APPROACHES` in
`utils/approaches/__init__.py`; `--approach NAME` then runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from sparselearning import maskable_weights
from sparselearning.flops import FLOPS_PER_MAC, layer_macs, network_macs, sparse_macs

if TYPE_CHECKING:
    from utils.cli import Config

Mask = dict[str, torch.Tensor]


def make_optimizer(config: Config, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
    """A fresh optimizer for each task (the authors' choice), over `params` (tensors or param groups).

    The fused implementations compute the same update in one kernel; on a CPU, fused Adam is
    about 5x faster than the default and, unlike it, not slowed by the zero moments of
    masked-out weights.
    """
    fused = torch.device(config.device).type in ("cpu", "cuda")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.l2, fused=fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.l2, fused=fused)


class Approach:
    """How one task is trained and which network it leaves (see the module's docstring).

    Args:
        model: the shared backbone, holding every earlier task's weights.
        frozen: parameter name -> bool tensor of the weights earlier tasks own (the union of
            their masks, `TaskMasks.frozen_before`), or None: nothing frozen (the first task, or
            a run without isolation).
        config: the run's settings.
        total_steps: the optimizer steps of this task (epochs x batches).
        seed: seeds every random draw the approach makes for this task.
        carried: what the previous task's approach handed on (`carry()`); None for the first task.
    """

    name: ClassVar[str]

    def __init__(self, model: nn.Module, frozen: Mask | None, config: Config, total_steps: int, seed: int,
                 carried: Any = None) -> None:
        self.model, self.frozen, self.config, self.total_steps, self.seed = model, frozen, config, total_steps, seed
        self.optimizer = make_optimizer(config, self.trained_parameters())
        self.layer_macs: dict[str, int] | None = None  # per image, by maskable weight (`measure`)
        self.train_macs: int | None = 0  # MACs of the steps trained so far, all epochs (None: not known)
        self.train_images = 0  # the images those steps trained on

    def trained_parameters(self) -> list[torch.Tensor]:
        """What the task's optimizer trains (called once, by `__init__`): the model's parameters."""
        return list(self.model.parameters())

    def make_scheduler(self, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The task's LR schedule, stepped after every epoch: the authors' MultiStepLR, x0.1 at 50 % and 75 %
        of the epochs."""
        milestones = [int(epochs * 0.5), int(epochs * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=0.1)

    @property
    def topology_updates(self) -> int:
        """Mask changes during the task so far (DST's prune-and-grow cycles); 0 for approaches without."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the network this task trains."""
        return self.model(x)

    def step(self) -> None:
        """The update after `loss.backward()`."""
        self.optimizer.step()

    def measure(self, input_shape: Sequence[int]) -> None:
        """The dense MACs per image of every maskable weight (`sparselearning.flops.layer_macs`) for
        inputs of `input_shape` (one image: channels, height, width); once, before `count_step`."""
        self.layer_macs = layer_macs(self.model, input_shape)
        self._numels = {name: p.numel() for name, p in maskable_weights(self.model).items()}
        self._dense_macs = network_macs(self.layer_macs)  # asked every step: summed once

    @property
    def dense_macs(self) -> int:
        """f_D: the dense network's MACs per image."""
        self._measured()
        return self._dense_macs

    def network_macs(self, counts: Mapping[str, int]) -> int:
        """The MACs per image of a network with `counts[name]` active weights in each layer (ints:
        no device synchronisation)."""
        return sparse_macs(self._measured(), counts, self._numels)

    def _measured(self) -> dict[str, int]:
        if self.layer_macs is None:
            raise RuntimeError("the approach's layers are not measured: call measure(input_shape) first")
        return self.layer_macs

    def step_macs(self) -> int:
        """The per-image MACs of the training step just taken (asked after `step()`), forward and
        backward: dense training, 3 f_D."""
        return 3 * self.dense_macs

    def count_step(self, images: int) -> None:
        """Count the step just taken on a batch of `images` images (the loop calls it after `step()`)."""
        if self.train_macs is not None:
            self.train_macs += images * self.step_macs()
        self.train_images += images

    def cost_record(self, mask: Mask | None) -> dict[str, Any]:
        """The task record's FLOPs entries (FLOPs = 2 x MACs): `train_flops`, the training steps'
        (all epochs); `train_flops_dense`, what dense training (3 f_D per image) would have cost on
        the same images; their ratio `train_flops_fraction`; `inference_flops`, per image, of the
        network `mask` gives (None: the whole model), and its share of the dense network's.
        The training entries are None when not known (a task resumed from a checkpoint of an
        earlier version, which did not count)."""
        dense, inference = self.dense_macs, network_macs(self._measured(), mask)
        train_dense = 3 * dense * self.train_images
        known = self.train_macs is not None and train_dense > 0
        return {"train_flops": FLOPS_PER_MAC * self.train_macs if known else None,
                "train_flops_dense": FLOPS_PER_MAC * train_dense if known else None,
                "train_flops_fraction": self.train_macs / train_dense if known else None,
                "inference_flops": FLOPS_PER_MAC * inference,
                "inference_flops_fraction": inference / dense}

    def keepable(self) -> bool:
        """Whether the epoch just ended may be the one the task keeps (`--keep`); asked before `end_epoch`."""
        return True

    def end_epoch(self, epochs_done: int) -> None:
        """Called after each epoch (`epochs_done` counts it), once the loop has decided whether to keep it."""

    def finish(self) -> tuple[Mask | None, dict[str, Any]]:
        """End the task: its network's mask (None: the whole model) and its record's extra entries."""
        return None, {}

    def carry(self) -> Any:
        """What the next task's approach starts from (after `finish`; saved with the run's checkpoint);
        None: nothing."""
        return None

    def state_dict(self) -> Any:
        """The approach's state for the task in progress (copies); None when it has none."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Continue from `state_dict()`; the approach was built fresh for the same task."""
