"""The math of one recurrent step, per cell family: the oracle every other implementation matches.

Shapes: ``x`` is (B, I), ``h`` is (B, H) (``(B, P)`` for a projected LSTM), ``c`` is (B, H).
Weights follow torch.nn's layout: ``w_ih`` is (G, I) and ``w_hh`` is (G, H) (``(G, P)`` with a
projection), where ``G = gates * H`` and the gate blocks are stacked in the order given by
:data:`GATES`. This module is the one place that knows that order; :func:`split_gates` and
:func:`reorder_gates` are the converters everything else uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "GATES",
    "MODES",
    "gate_count",
    "gru_step",
    "lstm_step",
    "reorder_gates",
    "rnn_step",
    "split_gates",
]

#: Gate order of the stacked weight blocks for each cell family (torch.nn's order).
GATES: dict[str, tuple[str, ...]] = {
    "rnn_tanh": ("h",),
    "rnn_relu": ("h",),
    "lstm": ("i", "f", "g", "o"),
    "gru": ("r", "z", "n"),
}

#: The cell families with a built-in step, by the name the backends use.
MODES: tuple[str, ...] = tuple(GATES)


def gate_count(mode: str) -> int:
    """Number of stacked gate blocks in ``w_ih``/``w_hh`` for ``mode`` (1, 4 or 3)."""
    try:
        return len(GATES[mode])
    except KeyError:
        raise ValueError(f"mode = {mode!r} is not a cell family; expected one of {MODES}") from None


def split_gates(t: Tensor, mode: str, dim: int = 0) -> tuple[Tensor, ...]:
    """Split a stacked (G, ...) weight, bias or pre-activation into its gate blocks, in order."""
    return t.chunk(gate_count(mode), dim=dim)


def reorder_gates(t: Tensor, src: Sequence[str], dst: Sequence[str], dim: int = 0) -> Tensor:
    """Permute stacked gate blocks from order ``src`` to order ``dst``.

    Use it to load weights from libraries with another layout, e.g. a gate order
    ``("i", "g", "f", "o")`` into rnnkit's ``GATES["lstm"]``.
    """
    if sorted(src) != sorted(dst):
        raise ValueError(f"gate orders {tuple(src)} and {tuple(dst)} name different gates")
    blocks = dict(zip(src, t.chunk(len(src), dim=dim), strict=True))
    return torch.cat([blocks[g] for g in dst], dim=dim)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, w, b)


def rnn_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One step of the Elman RNN.

        h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),   act = tanh or relu

    The new hidden state mixes the current input with the previous hidden state.
    Returns ``h_t`` of shape (B, H).
    """
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"nonlinearity = {nonlinearity!r}; expected 'tanh' or 'relu'")


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the LSTM (with an optional output projection, LSTMP).

        i = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)    input gate
        f = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)    forget gate
        g = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)       candidate cell
        o = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)    output gate
        c_t = f * c_{t-1} + i * g                             the cell state: forget, then write
        h_t = o * tanh(c_t)                                   (then h_t = W_hr h_t with a projection)

    The forget gate decides what of the cell state to keep, the input gate what to write, the
    output gate what to show. Returns ``(h_t, c_t)``: (B, H) or (B, P), and (B, H).
    """
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = split_gates(gates, "lstm", dim=1)
    i = torch.sigmoid(i)
    f = torch.sigmoid(f)
    g = torch.tanh(g)
    o = torch.sigmoid(o)
    c_t = f * c + i * g
    h_t = o * torch.tanh(c_t)
    if w_hr is not None:
        h_t = _linear(h_t, w_hr, None)
    return h_t, c_t


def gru_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One step of the GRU.

        r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)           reset gate
        z = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)           update gate
        n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))        candidate state
        h_t = (1 - z) * n + z * h_{t-1}

    The update gate decides how much of the old state to keep, the reset gate how much of it the
    candidate may see; the reset applies to ``W_hn h + b_hn`` as in torch.nn. Returns (B, H).
    """
    gi = _linear(x, w_ih, b_ih)
    gh = _linear(h, w_hh, b_hh)
    i_r, i_z, i_n = split_gates(gi, "gru", dim=1)
    h_r, h_z, h_n = split_gates(gh, "gru", dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h
