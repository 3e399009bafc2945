"""The reference backend: the layer's own Python time loop over its cell, differentiated by autograd.

It supports every cell (built-in or custom), every option and every lengths pattern, and is the
readable oracle each fused backend is tested against.
"""

from __future__ import annotations

from torch import Tensor

from . import Call, Request


class ReferenceBackend:
    name = "reference"
    priority = 0
    why = "the Python time loop over the cell (supports everything)"

    def check(self, request: Request) -> str | None:
        return None

    def run(self, call: Call) -> tuple[Tensor, Tensor, Tensor | None]:
        return call.reference()
