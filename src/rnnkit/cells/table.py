"""The facts of every built-in cell, in one table: the one place that spells them.

Each mode (the name the backends use for a built-in step) has a :class:`CellSpec`: its gates in
the order of the stacked weight blocks (torch.nn's), what ``return_gates`` returns, its state
tensors, the names of one direction's weights in the order the kernels take them, the cell class
that computes it, the id the fused kernels know it by, what their forward saves per step, and
which variants it is. ``functional``, the cells, the backends and the drop-ins read these facts
from here; nothing else spells a gate count.

This module imports nothing from rnnkit, so every other module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BIASES", "PROJECTION", "REGULARISERS", "SPECS", "TORCH_MODES", "CellSpec", "spec"]

#: The bias names of every cell (present unless ``bias=False``).
BIASES = ("bias_ih", "bias_hh")
#: The projection of a projected LSTM (present when ``proj_size > 0``).
PROJECTION = "weight_hr"
#: The regularisers every built-in cell takes (see :mod:`rnnkit.regularisers`); zoneout_cell
#: applies to the cells with a cell state.
REGULARISERS = (
    "dropout_input",
    "dropout_state",
    "dropout_output",
    "zoneout",
    "zoneout_cell",
    "weight_drop",
)


@dataclass(frozen=True)
class CellSpec:
    """What rnnkit knows of one built-in step.

    ``weights``: one direction's weights, in the order the kernels take them; the biases and the
    projection are left out of a cell built without them (:meth:`weight_names`). ``saved``: the
    activations the fused forward keeps per step, in units of H (S = saved * H). ``kernel_id``:
    the id of the cell in the C++ kernels.
    """

    mode: str
    family: str  # "rnn", "lstm" or "gru": the torch.nn layer it belongs with
    gates: tuple[str, ...]
    gate_outputs: tuple[str, ...]
    states: tuple[str, ...]
    weights: tuple[str, ...]
    cell: str  # the class in rnnkit.cells that computes it
    kernel_id: int
    saved: int
    projection: bool = False  # may have weight_hr (P, H)
    peephole: bool = False
    layernorm: bool = False

    @property
    def gate_count(self) -> int:
        return len(self.gates)

    @property
    def has_cell_state(self) -> bool:
        return "c" in self.states

    def weight_names(self, bias: bool = True, proj: bool = False) -> tuple[str, ...]:
        """One direction's weights of a cell with (or without) biases and a projection."""
        return tuple(
            n
            for n in self.weights
            if (bias or n not in BIASES) and (n != PROJECTION or (proj and self.projection))
        )


_PLAIN = ("weight_ih", "weight_hh", *BIASES)
_PEEPHOLES = ("weight_ci", "weight_cf", "weight_co")
_LN = ("ln_ih.weight", "ln_ih.bias", "ln_hh.weight", "ln_hh.bias")
_LSTM_GATES = ("i", "f", "g", "o")
_GRU_GATES = ("r", "z", "n")

#: Every built-in step, by mode.
SPECS: dict[str, CellSpec] = {
    s.mode: s
    for s in (
        CellSpec("rnn_tanh", "rnn", ("h",), (), ("h",), _PLAIN, "RNNCell", 0, 1),
        CellSpec("rnn_relu", "rnn", ("h",), (), ("h",), _PLAIN, "RNNCell", 1, 1),
        CellSpec(
            "lstm",
            "lstm",
            _LSTM_GATES,
            (*_LSTM_GATES, "c"),
            ("h", "c"),
            (*_PLAIN, PROJECTION),
            "LSTMCell",
            2,
            4,
            projection=True,
        ),
        CellSpec("gru", "gru", _GRU_GATES, _GRU_GATES, ("h",), _PLAIN, "GRUCell", 3, 4),
        CellSpec(
            "lstm_peephole",
            "lstm",
            _LSTM_GATES,
            (*_LSTM_GATES, "c"),
            ("h", "c"),
            (*_PLAIN, *_PEEPHOLES, PROJECTION),
            "PeepholeLSTMCell",
            4,
            4,
            projection=True,
            peephole=True,
        ),
        CellSpec(
            "lstm_layernorm",
            "lstm",
            _LSTM_GATES,
            (*_LSTM_GATES, "c"),
            ("h", "c"),
            (*_PLAIN, *_LN, "ln_c.weight", "ln_c.bias"),
            "LayerNormLSTMCell",
            5,
            4,
            layernorm=True,
        ),
        CellSpec(
            "gru_layernorm",
            "gru",
            _GRU_GATES,
            _GRU_GATES,
            ("h",),
            (*_PLAIN, *_LN),
            "LayerNormGRUCell",
            6,
            4,
            layernorm=True,
        ),
    )
}


#: The modes torch.nn's RNN, LSTM and GRU compute (rnnkit's drop-ins run these).
TORCH_MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def spec(mode: str) -> CellSpec:
    """The spec of ``mode``, or ValueError naming the modes there are."""
    try:
        return SPECS[mode]
    except KeyError:
        raise ValueError(
            f"mode = {mode!r} is not a built-in cell; expected one of {tuple(SPECS)}"
        ) from None
