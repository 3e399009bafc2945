"""One layer as the export op takes it, and the facts of ONNX's own recurrent operators.

The export op (:mod:`rnnkit.backends.export.ops`) describes one layer of one or two directions by
plain values that every exporter can carry:

* ``weights``: a flat list, direction by direction (forward first), each direction's weights
  in the cell table's order (:meth:`rnnkit.cells.table.CellSpec.weight_names` of ``bias`` and
  ``proj``), as torch.nn's flat weights are;
* ``direction``: ``"forward"``, ``"reverse"`` or ``"bidirectional"`` (ONNX's words);
* ``zoneout``: the eval-mode zoneout probabilities, one per direction and state tensor
  (``[p_h]`` or ``[p_h, p_c]`` per direction), or empty for none.

:func:`native_reason` says when ONNX's own RNN, GRU or LSTM operator computes such a layer
exactly (then the lowerings use it, ``sequence_lens`` carrying ``lengths=``); everything else
runs as an ONNX Loop/Scan over the cell's step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...cells.table import SPECS, spec

__all__ = [
    "DIRECTIONS",
    "NATIVE_OPS",
    "ONNX_GATES",
    "ONNX_PEEPHOLES",
    "Layout",
    "native_reason",
]

#: The values of ``direction``, as ONNX's RNN/GRU/LSTM name them.
DIRECTIONS = ("forward", "reverse", "bidirectional")

#: ONNX's operator for each mode it can compute (given :func:`native_reason`).
NATIVE_OPS = {
    "rnn_tanh": "RNN",
    "rnn_relu": "RNN",
    "gru": "GRU",
    "lstm": "LSTM",
    "lstm_peephole": "LSTM",
}

#: ONNX's gate order for the stacked weights, in rnnkit's gate names: GRU ``zrh`` (with
#: ``linear_before_reset=1``, ONNX's h gate is torch's n: ``n = tanh(W_in x + b_in + r * (W_hn h
#: + b_hn))``), LSTM ``iofc`` (c is torch's g). torch's orders are the cell table's.
ONNX_GATES = {"gru": ("z", "r", "n"), "lstm": ("i", "o", "f", "g")}

#: ONNX LSTM's peephole input ``P`` stacks (p_i, p_o, p_f): rnnkit's weight_ci, weight_co,
#: weight_cf. ONNX's o gate peeks at c_t and i, f at c_{t-1}, as rnnkit's peephole LSTM does.
ONNX_PEEPHOLES = ("weight_ci", "weight_co", "weight_cf")


@dataclass(frozen=True)
class Layout:
    """How the flat ``weights`` of an export call split into directions and names."""

    mode: str
    direction: str
    bias: bool
    proj: bool

    def __post_init__(self) -> None:
        spec(self.mode)  # a ValueError naming the modes there are
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction = {self.direction!r}; expected one of {DIRECTIONS}")
        if self.proj and not SPECS[self.mode].projection:
            raise ValueError(f"proj = True, but {self.mode} has no projection")

    @property
    def names(self) -> tuple[str, ...]:
        """One direction's weight names, in the order the flat list holds them."""
        return SPECS[self.mode].weight_names(self.bias, self.proj)

    @property
    def reverses(self) -> tuple[bool, ...]:
        """Per direction, whether it reads the sequence backwards (forward first)."""
        return {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}[
            self.direction
        ]

    @property
    def states(self) -> int:
        """State tensors per direction: 2 (h, c) for the LSTM family, else 1."""
        return len(SPECS[self.mode].states)

    def split(self, weights: list[Tensor]) -> list[dict[str, Tensor]]:
        """The flat list as one ``{name: tensor}`` per direction; ValueError if it miscounts."""
        names, count = self.names, len(self.reverses)
        if len(weights) != len(names) * count:
            raise ValueError(
                f"{len(weights)} weights for {count} direction(s) of {self.mode}; expected "
                f"{len(names)} per direction: {names}"
            )
        return [
            dict(zip(names, weights[k * len(names) : (k + 1) * len(names)], strict=True))
            for k in range(count)
        ]

    def zoneouts(self, zoneout: list[float]) -> list[tuple[float, ...] | None]:
        """Per direction, the eval-mode zoneout probability of each state tensor, or None."""
        count = len(self.reverses)
        if not zoneout:
            return [None] * count
        if len(zoneout) != count * self.states:
            raise ValueError(
                f"zoneout has {len(zoneout)} entries; expected {self.states} per direction "
                f"({count} direction(s)) or none"
            )
        per = [tuple(zoneout[k * self.states : (k + 1) * self.states]) for k in range(count)]
        return [z if any(z) else None for z in per]


def native_reason(layout: Layout, zoneout: list[float], dtype: torch.dtype) -> str | None:
    """None if ONNX's own operator computes the layer exactly, else why not (a Loop runs it).

    ONNX's RNN/GRU/LSTM have no projection, no layer normalisation and no zoneout, and
    onnxruntime runs them in float32 only (float64 is "not implemented"): float32 is the dtype
    they are used for.
    """
    if layout.mode not in NATIVE_OPS:
        return f"ONNX has no operator for {layout.mode}"
    if layout.proj:
        return "ONNX's LSTM has no projection"
    if any(zoneout):
        return "ONNX's operators have no zoneout"
    if dtype != torch.float32:
        return f"ONNX's recurrent operators are used for float32, not {dtype}"
    return None
