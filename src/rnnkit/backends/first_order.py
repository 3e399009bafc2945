"""Gradients from a hand-written backward (the cpu and triton backends), which has no derivative
of its own.

Under ``create_graph=True`` autograd runs a backward with gradient tracking on, so that the
gradients it returns can be differentiated again. A fused kernel's backward returns plain
tensors: on their own they would enter the graph as constants, and a second derivative would
silently leave out the layer's part. :func:`first_order` links them instead to what they derive
from (the incoming gradients, the layer's inputs, states and weights) through one node whose
derivative raises, naming the backends that can differentiate twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SECOND_DERIVATIVE", "first_order"]

SECOND_DERIVATIVE = (
    "a second derivative through {what}: their backward is written by hand and has no "
    "derivative of its own; run the layer with backend='reference' (or backend='native', "
    "torch's own op, where it computes the call) to differentiate its gradients"
)


class _FirstOrder(torch.autograd.Function):
    """The first ``count`` tensors (gradients), as a function of every tensor given."""

    @staticmethod
    def forward(ctx, what: str, count: int, *tensors: Tensor):  # type: ignore[override]
        ctx.what = what
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        raise RuntimeError(SECOND_DERIVATIVE.format(what=ctx.what))


def first_order(
    what: str, results: Sequence[Tensor | None], sources: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """``results`` (a backward's gradients, None where there is none) unchanged, or, when the
    backward runs under ``create_graph=True`` and ``sources`` take part in the graph, linked to
    ``sources`` by a node whose derivative raises (``what`` names the kernels)."""
    tracked = [s for s in sources if s is not None and s.requires_grad]
    if not torch.is_grad_enabled() or not tracked:
        return list(results)
    given = [k for k, r in enumerate(results) if r is not None]
    if not given:
        return list(results)
    linked = _FirstOrder.apply(what, len(given), *(results[k] for k in given), *tracked)
    out = list(results)
    for k, r in zip(given, linked, strict=True):
        out[k] = r
    return out
