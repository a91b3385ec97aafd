"""Argument checks shared by the core's public functions: one clear `ValueError` per misuse.

A researcher's wrong call into the core would otherwise give wrong science, not an error (a float
mask of 0.5s read as True, a mask of another layer's shape broadcast, a bool taken for an int),
so every public entry point checks its arguments here, once, before it changes anything. None of
these run per training step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int: an integer (Python or numpy) that is not a bool, at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> float:
    """`value` as a float: a real number that is not a bool, in the interval from `low` to `high`
    (open at either end as asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """`value`, which must be a bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def some(names: Iterable[str], shown: int = 4) -> str:
    """The first `shown` names, quoted, and how many there are in all when more."""
    names = list(names)
    if not names:
        return "none"
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def check_mask_dict(what: str, masks: Any) -> dict[str, torch.Tensor]:
    """`masks` as a dict: a mapping of parameter names (str) to dense bool tensors.

    A float or integer mask is refused, even one that holds only 0 and 1: a float mask of 0.5s
    (a bug) would convert to True silently; the caller converts with `.bool()` when it knows
    the mask holds 0 and 1. `what` names the argument in the message ("frozen", "masks").
    """
    if not isinstance(masks, Mapping):
        raise ValueError(f"{what} must be a dict of parameter name -> bool tensor, got {type(masks).__name__}")
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise ValueError(f"{what} must be keyed by parameter name (str), got the key {name!r}")
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"{what}[{name!r}] has dtype {mask.dtype}, but masks must be bool tensors: pass mask.bool() "
                "if it holds exactly 0 and 1 (a float mask is refused because a 0.5 would silently become True)")
        if mask.layout != torch.strided:
            raise ValueError(f"{what}[{name!r}] is a {mask.layout} tensor; pass a dense one (.to_dense())")
    return dict(masks)


def check_mask_names(what: str, names: Iterable[str], known: Iterable[str], aliases: Mapping[str, str] | None = None,
                     *, complete: bool = False, known_as: str = "the model's maskable weights") -> None:
    """The names of the masks `what` must be among the parameter names `known` (`known_as` in
    the message), and all of them when `complete`; a name in `aliases` (a tied weight's second
    name -> its first) is refused with the name to use instead."""
    names, known = list(names), list(known)
    unknown = [n for n in names if n not in known]
    tied = [n for n in unknown if aliases and n in aliases]
    if tied:
        pairs = ", ".join(f"{n!r} is {aliases[n]!r}" for n in tied)  # type: ignore[index]
        raise ValueError(f"{what} names tied weights by their second name ({pairs}: the same tensor); a shared "
                         "tensor is masked once, under its first name (as model.named_parameters() names it): "
                         "key it that way")
    if unknown:
        raise ValueError(f"{what} names weights that are not among {known_as}: {some(unknown, 8)}; "
                         f"those are {some(known)}")
    missing = [n for n in known if n not in names] if complete else []
    if missing:
        raise ValueError(f"{what} lacks the weights {some(missing, 8)} of {known_as}; it must cover them all")


def check_mask_shapes(what: str, masks: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                      expected_as: str = "its weight's") -> None:
    """Each mask of `what` has the shape `shapes` gives its name (`expected_as` in the message)."""
    wrong = [f"{n!r} is {tuple(m.shape)}, {expected_as} {tuple(shapes[n])}" for n, m in masks.items()
             if n in shapes and m.shape != shapes[n]]
    if wrong:
        raise ValueError(f"{what} has masks of the wrong shape: " + "; ".join(wrong[:4])
                         + (f"; ... ({len(wrong)} in all)" if len(wrong) > 4 else ""))
