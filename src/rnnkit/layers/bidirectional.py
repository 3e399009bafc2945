"""Bidirectional: two layers over the same sequence, one reading it forwards, one backwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..backends import Direction, StackMasks
from .composite import Composite, check_layouts
from .recurrent import (
    cell_state,
    dispatch_request,
    given_state_dtypes,
    run_stack,
    signature,
    state_part,
    top_states,
)

__all__ = ["MERGE_MODES", "Bidirectional", "merge"]

MERGE_MODES = ("concat", "sum", "mul", "ave", None)

_MERGES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "concat": lambda a, b: torch.cat([a, b], dim=-1),
    "sum": torch.add,
    "mul": torch.mul,
    "ave": lambda a, b: (a + b) / 2,
}

FORWARD, BACKWARD = "in the forward direction", "in the backward direction"


def check_merge(mode: Any) -> str | None:
    if mode is not None and mode not in _MERGES:
        raise ValueError(f"merge = {mode!r} is not a merge mode; expected one of {MERGE_MODES}")
    return mode


def check_sizes(forward: nn.Module, backward: nn.Module, mode: str | None) -> None:
    """ValueError unless both layers read the same features and, for a merge that combines
    their outputs element by element, output as many (layers that do not say are not checked)."""
    f_in, b_in = (getattr(layer, "input_size", None) for layer in (forward, backward))
    if None not in (f_in, b_in) and f_in != b_in:
        raise ValueError(
            f"the backward layer has input_size = {b_in}, but the forward layer has input_size "
            f"= {f_in}; expected both to read the same input features"
        )
    f_out, b_out = (getattr(layer, "output_size", None) for layer in (forward, backward))
    if mode not in ("concat", None) and None not in (f_out, b_out) and f_out != b_out:
        raise ValueError(
            f"merge = {mode!r} combines the outputs element by element, but the forward layer "
            f"outputs {f_out} features and the backward layer {b_out}; expected the same "
            "output_size (or merge='concat')"
        )


def merge(a: Any, b: Any, mode: str | None) -> Any:
    """Merge forward and backward outputs (Tensors or PackedSequences of the same layout)."""
    if mode is None:
        return a, b
    if isinstance(a, PackedSequence):
        return a._replace(data=_MERGES[mode](a.data, b.data))
    return _MERGES[mode](a, b)


class Bidirectional(Composite):
    """``Bidirectional(forward, backward, merge="concat")``: run both layers, merge their outputs.

    Two :class:`Recurrent` layers over agreeing cells run as the two directions of one layer
    (a backend may run them at once, e.g. one on each thread); other layers run one after the
    other.

    ``backward`` must read the sequence from its end, e.g. ``Recurrent(cell, reverse=True)``; with
    ``lengths`` it then starts at each sequence's own last valid step. Any layers that follow the
    layer contract work (``layer(x, state, lengths=...) -> (output, final_state)``), including ones
    over user-defined cells. ``merge`` is "concat", "sum", "mul", "ave" or None (return both
    outputs as a tuple). ``forward(x, state=None, lengths=None)`` takes and returns
    ``state = (forward_state, backward_state)``.
    """

    _fusion = "both layers to run as one (two Recurrent layers over agreeing cells)"

    def __init__(
        self, forward: nn.Module, backward: nn.Module, merge: str | None = "concat"
    ) -> None:
        super().__init__()
        if getattr(forward, "reverse", False):
            raise ValueError(
                "the forward layer has reverse=True; expected a layer reading forwards"
            )
        if getattr(backward, "reverse", True) is False:
            raise ValueError(
                "the backward layer has reverse=False; expected a layer reading the sequence "
                "backwards, e.g. Recurrent(cell, reverse=True)"
            )
        check_layouts([("the forward layer", forward), ("the backward layer", backward)])
        self.forward_layer = forward
        self.backward_layer = backward
        self.merge = check_merge(merge)
        check_sizes(forward, backward, self.merge)

    @property
    def input_size(self) -> int:
        return self.forward_layer.input_size

    @property
    def output_size(self) -> int:
        size = self.forward_layer.output_size
        if self.merge == "concat":  # both directions' features, side by side
            return size + getattr(self.backward_layer, "output_size", size)
        return size

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}"

    def fused(self) -> bool:
        """Whether both layers run as the two directions of one layer (both :class:`Recurrent`
        over cells that agree: same built-in step and weights, or both custom; same layout and
        backend), so a backend may run them together; else each runs on its own."""
        sig = signature(self.forward_layer)
        return sig is not None and sig == signature(self.backward_layer)

    def directions(self, like: Tensor, state: Any) -> list[list[Direction]]:
        """Both layers as one layer of two directions (when :meth:`fused`)."""
        state = self._check_state(state)
        with state_part(0, FORWARD):
            (forward,) = self.forward_layer.directions(like, state[0])
        with state_part(1, BACKWARD):
            (backward,) = self.backward_layer.directions(like, state[1])
        return [[*forward, *backward]]

    def _parts(self) -> list[nn.Module]:
        return [self.forward_layer, self.backward_layer]

    def _first(self) -> nn.Module:
        return self.forward_layer

    def _check_state(self, state: Any) -> tuple[Any, Any]:
        if state is None:
            return (None, None)
        if not isinstance(state, tuple | list) or len(state) != 2:
            raise TypeError(
                f"state is a {type(state).__name__}; expected (forward_state, backward_state)"
            )
        return state[0], state[1]

    def direction_states(self, state: Any) -> list[Any]:
        """``state`` as the caller gave it, one cell state per direction (when :meth:`fused`)."""
        forward, backward = self._check_state(state)
        with state_part(0, FORWARD):
            first = self.forward_layer.direction_states(forward)
        with state_part(1, BACKWARD):
            return [*first, *self.backward_layer.direction_states(backward)]

    def top_states(self, state: Any) -> tuple[tuple[Tensor, ...], ...]:
        forward, backward = self._check_state(state)
        with state_part(0, FORWARD):
            first = top_states(self.forward_layer, forward)
        with state_part(1, BACKWARD):
            return (*first, *top_states(self.backward_layer, backward))

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        if self.fused():
            inp = self._prepare(x, lengths)
            request = dispatch_request(self, inp, self.directions(inp.x, None))
            return [("Bidirectional", request, self.forward_layer.backend)]
        return [
            (f"{d}.{label}", req, name)
            for d, layer in (("forward", self.forward_layer), ("backward", self.backward_layer))
            for label, req, name in layer.dispatch_requests(x, lengths)
        ]

    def forward(
        self, x: Any, state: Any = None, lengths: Any = None, masks: StackMasks | None = None
    ) -> tuple[Any, tuple[Any, Any]]:
        if self.fused():
            inp = self._prepare(x, lengths)
            layers = self.directions(inp.x, state)
            first = self.forward_layer
            result = run_stack(
                self, inp, layers, first.backend, checkpoint=first.checkpoint, masks=masks,
                state_dtypes=given_state_dtypes(self.direction_states(state), inp.x),
            )  # fmt: skip
            out_f, out_b = (inp.restore(o) for o in result.last)
            out = (
                inp.restore(result.out)
                if self.merge == "concat"
                else merge(out_f, out_b, self.merge)
            )
            (s_f, s_b) = result.states[0]
            return out, (cell_state(layers[0][0], s_f), cell_state(layers[0][1], s_b))
        if masks is not None:
            self._need_fused("masks=")
        state = self._check_state(state)
        with state_part(0, FORWARD):
            out_f, s_f = self.forward_layer(x, state[0], lengths=lengths)
        with state_part(1, BACKWARD):
            out_b, s_b = self.backward_layer(x, state[1], lengths=lengths)
        return merge(out_f, out_b, self.merge), (s_f, s_b)
