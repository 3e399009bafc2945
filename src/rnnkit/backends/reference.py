"""The reference backend: the Python time loop (:func:`scan`, the one time loop of rnnkit) over the
cell's step, differentiated by autograd.

It supports every cell (built-in or custom), every option and every lengths pattern, and is the
readable oracle each fused backend is tested against. A built-in cell's step is
:func:`rnnkit.functional.step` over the direction's weights; a custom cell runs its own
``forward`` (with DropConnect's masked ``weight_hh`` in place of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .. import lengths as L
from . import Direction, LayerCall, LayerResult, Request, exporting

__all__ = ["ReferenceBackend", "scan", "step_of"]

Step = Callable[..., tuple]


def _where(valid: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``valid`` (B, 1), else ``old``: per sequence, for state tensors (B, ...)."""
    if isinstance(new, Tensor):
        return torch.where(valid.view(-1, *(1,) * (new.dim() - 1)), new, old)
    return type(new)(_where(valid, n, o) for n, o in zip(new, old, strict=True))


def _states(state: Any) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


def _like(state: Any, tensors: list[Tensor]) -> Any:
    return tensors[0] if isinstance(state, Tensor) else type(state)(tensors)


def _zone(new: Any, old: Any, zoneout: tuple, t: int) -> Any:
    """Zoneout: keep previous units where the step's mask says so (eval: the expectation)."""
    mixed = []
    for z, n, o in zip(zoneout, _states(new), _states(old), strict=True):
        if isinstance(z, Tensor):
            mixed.append(torch.where(z[t], o, n))
        else:
            mixed.append(n if z == 0.0 else z * o + (1 - z) * n)
    return _like(new, mixed)


def scan(
    step: Step,
    x: Tensor,
    state: Any,
    lengths: Tensor | None = None,
    reverse: bool = False,
    *,
    zoneout: tuple | None = None,
    state_mask: Tensor | None = None,
    return_gates: bool = False,
) -> tuple:
    """Run ``step(x_t, state) -> (out_t, state)`` over time-major ``x`` (T, B, I): THE time loop.

    With ``lengths`` (B,), steps at or beyond a sequence's length leave its state unchanged and
    give a zero output, so the final state is the one at the sequence's own last step. With
    ``reverse`` the sequence is read from each sequence's own last valid step back to its first;
    outputs are returned in the original time order.

    Regularisers (see :mod:`rnnkit.regularisers`): ``state_mask`` (B, n) multiplies h_{t-1}
    (the first state tensor) where the step's recurrent products read it: a built-in step (one
    that takes a ``state_mask`` keyword, as :func:`step_of`'s do) applies it itself, so a GRU's
    carry reads the unmasked state; a custom cell is handed the masked state. ``zoneout`` holds,
    per state tensor, a (T, B, n) bool mask (True = keep the previous value at that step) or an
    eval-mode probability; with zoneout the output is the zoned-out h. With ``return_gates`` the
    step is called with ``return_gates=True`` and its gates are returned stacked over time.

    Returns ``(out (T, B, O), final_state)``, plus a tuple of (T, B, n) gates with ``return_gates``.
    """
    steps = x.shape[0]
    masks = list(zoneout) if zoneout is not None and isinstance(zoneout[0], Tensor) else []
    if reverse:
        x = L.reverse_padded(x, lengths)
        masks = [L.reverse_padded(m, lengths) for m in masks]
    if masks:
        zoneout = tuple(masks)
    valid = None
    run = steps
    if lengths is not None:
        valid = L.mask(lengths, steps).unsqueeze(-1)  # (T, B, 1)
        # the steps after the longest sequence are skipped, except while compiled or exported
        # (lengths is then an input of the graph, whose longest value the trace cannot know) and
        # on the meta device (no values)
        if not (exporting() or torch.compiler.is_compiling() or lengths.is_meta):
            run = int(lengths.max()) if lengths.numel() else 0
    kw: dict[str, Any] = {"return_gates": True} if return_gates else {}
    inside = state_mask is not None and getattr(step, "takes_state_mask", False)
    if inside:
        kw["state_mask"] = state_mask
    columns: list[tuple[Tensor, ...]] = []  # per step: out, then the gates
    # when every sequence is empty (run = 0) one step still runs, fully masked: it gives the
    # shapes, and outputs and states that stay in the graph (zero gradients), as a kernel's do
    for t in range(max(run, 1)):
        entering = state
        if state_mask is not None and not inside:
            first, *rest = _states(state)
            entering = _like(state, [first * state_mask, *rest])
        out, new, *gates = step(x[t], entering, **kw)
        if zoneout is not None:
            new = _zone(new, state, zoneout, t)
            out = _states(new)[0]
        column = (out, *(gates[0] if gates else ()))
        if valid is not None:
            column = tuple(torch.where(valid[t], c, 0.0) for c in column)
            new = _where(valid[t], new, state)
        columns.append(column)
        state = new
    pad = [tuple(torch.zeros_like(c) for c in columns[0])] * (steps - len(columns))
    stacked = [torch.stack(c) for c in zip(*columns, *pad, strict=True)]
    if reverse:
        stacked = [L.reverse_padded(c, lengths) for c in stacked]
    if return_gates:
        return stacked[0], state, tuple(stacked[1:])
    return stacked[0], state


def step_of(direction: Direction) -> Step:
    """The one-step function ``step(x_t, state, return_gates=False)`` of a direction."""
    if direction.mode is not None:
        mode, weights, eps = direction.mode, direction.weights, direction.eps

        def built_in(
            x: Tensor, state: Any, return_gates: bool = False, state_mask: Tensor | None = None
        ) -> tuple:
            return F.step(mode, weights, x, state, return_gates, eps, state_mask)

        built_in.takes_state_mask = True  # type: ignore[attr-defined]
        return built_in
    cell = direction.cell
    assert cell is not None, "a direction without a mode runs its own cell"
    if "weight_hh" not in direction.weights:
        return cell
    overrides = {"weight_hh": direction.weights["weight_hh"]}  # DropConnect's masked weight

    def custom(x: Tensor, state: Any, **kw: Any) -> tuple:
        return torch.func.functional_call(cell, overrides, (x, state), kw)

    return custom


class ReferenceBackend:
    name = "reference"
    priority = 0
    why = "the Python time loop over the cell (supports everything)"

    def check(self, request: Request) -> str | None:
        return None

    def run_layer(self, layer: LayerCall) -> LayerResult:
        outs, states, gates = [], [], []
        for x, d in zip(layer.inputs, layer.directions, strict=True):
            m = d.masks
            state = tuple(d.state) if d.tuple_state else d.state[0]
            out, final, *g = scan(
                step_of(d), x, state, layer.lengths, d.reverse,
                zoneout=None if m is None else m.zoneout,
                state_mask=None if m is None else m.state,
                return_gates=layer.gates,
            )  # fmt: skip
            outs.append(out)
            states.append(_states(final))
            gates.append(g[0] if g else ())
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return LayerResult(out, states, gates if layer.gates else None)
