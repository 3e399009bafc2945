"""Argument checks shared by the models' generation and search methods."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["whole"]


def whole(value: Any) -> int | None:
    """``value`` as an int if it is an integer (a Python or NumPy one, not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
