"""Approaches: how a task is trained and which network it leaves (`base.Approach`), by name.

`--approach` picks one of `APPROACHES`; `--no-sparse` is dense fine-tuning whatever it says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.approaches.base import Approach, Mask, make_optimizer
from utils.approaches.dst import DST, Dense
from utils.approaches.packnet import PackNet
from utils.approaches.supsup import SupSup
from utils.approaches.wsn import WSN

if TYPE_CHECKING:
    from utils.cli import Config

APPROACHES: dict[str, type[Approach]] = {cls.name: cls for cls in (DST, WSN, PackNet, SupSup)}
"""The approaches `--approach` names (the paper's DST first: the default)."""


def approach_class(config: Config) -> type[Approach]:
    """The approach of a run: dense fine-tuning for `--no-sparse`, else `--approach`'s."""
    return APPROACHES[config.approach] if config.sparse else Dense


__all__ = ["APPROACHES", "Approach", "Mask", "approach_class", "make_optimizer"]
