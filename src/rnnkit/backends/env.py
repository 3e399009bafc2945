"""Environment variables that force one of a backend's choices (``RNNKIT_GEMM``,
``RNNKIT_TRITON_KERNEL``): read without case or surrounding spaces, "auto" or unset leaving the
choice to the backend."""

from __future__ import annotations

import os

__all__ = ["forced_choice"]


def forced_choice(variable: str, choices: tuple[str, ...]) -> str | None:
    """The choice ``variable`` forces, or None ("auto" or unset); a ValueError naming any other
    value and the ones expected."""
    value = os.environ.get(variable, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in choices:
        raise ValueError(f"{variable} = {value!r}; expected one of {('auto', *choices)}")
    return value
