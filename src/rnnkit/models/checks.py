"""Argument checks shared by the models' forward passes, generation and search methods."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

from .. import backends

__all__ = ["check_ids", "whole"]


def whole(value: Any) -> int | None:
    """``value`` as an int if it is an integer (a Python or NumPy one, not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_ids(name: str, ids: Any, vocab: int) -> None:
    """TypeError unless ``ids`` is an integer tensor; ValueError naming the first id outside
    ``[0, vocab)`` (an embedding would fail on it with an IndexError, or a device-side assert on
    a GPU). While a model is traced (export, torch.compile) only the dtype is checked."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} is a {type(ids).__name__}; expected a tensor of token ids")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} has dtype {ids.dtype}; expected integer token ids")
    if ids.numel() == 0 or backends.exporting() or torch.compiler.is_compiling():
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        index = ", ".join(map(str, where))
        raise ValueError(
            f"{name}[{index}] = {int(ids[where])}; expected a token id in [0, {vocab})"
        )
