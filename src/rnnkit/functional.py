"""The math of one recurrent step, per cell family: the oracle every other implementation matches.

Shapes: ``x`` is (B, I), ``h`` is (B, H) (``(B, P)`` for a projected LSTM), ``c`` is (B, H).
Weights follow torch.nn's layout: ``w_ih`` is (G, I) and ``w_hh`` is (G, H) (``(G, P)`` with a
projection), where ``G = gates * H`` and the gate blocks are stacked in the order given by
the cell table (:mod:`rnnkit.cells.table`, re-exported here as :data:`GATES`);
:func:`split_gates` and :func:`reorder_gates` are the converters everything else uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .cells.table import SPECS, TORCH_MODES, spec
from .errors import ShapeError

__all__ = [
    "GATES",
    "GATE_OUTPUTS",
    "MODES",
    "gate_count",
    "gru_step",
    "layer_norm",
    "layernorm_gru_step",
    "layernorm_lstm_step",
    "lstm_step",
    "peephole_lstm_step",
    "reorder_gates",
    "rnn_step",
    "split_gates",
    "step",
]

#: Gate order of the stacked weight blocks for each cell family (torch.nn's order), from the cell
#: table (:mod:`rnnkit.cells.table`).
GATES: dict[str, tuple[str, ...]] = {m: SPECS[m].gates for m in TORCH_MODES}

#: The cell families with a built-in step, by the name the backends use.
MODES: tuple[str, ...] = TORCH_MODES

#: What ``return_gates=True`` returns per step, in order (LSTM adds the new cell state).
GATE_OUTPUTS: dict[str, tuple[str, ...]] = {
    m: SPECS[m].gate_outputs for m in TORCH_MODES if SPECS[m].gate_outputs
}


def gate_count(mode: str) -> int:
    """Number of stacked gate blocks in ``w_ih``/``w_hh`` for ``mode`` (1, 4 or 3)."""
    return spec(mode).gate_count


def _check_blocks(t: Tensor, count: int, dim: int, gates: str) -> None:
    """ValueError unless ``t`` splits into ``count`` equal gate blocks along ``dim``."""
    size = t.shape[dim]
    if size % count:
        raise ValueError(
            f"t has size {size} along dim {dim}, which does not split into the {count} equal "
            f"blocks of {gates}; expected gates * H = a multiple of {count}"
        )


def split_gates(t: Tensor, mode: str, dim: int = 0) -> tuple[Tensor, ...]:
    """Split a stacked (G, ...) weight, bias or pre-activation into its gate blocks, in order."""
    count = gate_count(mode)
    _check_blocks(t, count, dim, f"{mode}'s gates {spec(mode).gates}")
    # Slices rather than chunk: the same views, and an exported graph holds Slice ops, which
    # every ONNX opset reads alike (a Split's form changed at opset 18, and converting a graph
    # down to an earlier opset leaves those inside a Scan's body as they were).
    size = t.shape[dim] // count
    return tuple(t.narrow(dim, k * size, size) for k in range(count))


def reorder_gates(t: Tensor, src: Sequence[str], dst: Sequence[str], dim: int = 0) -> Tensor:
    """Permute stacked gate blocks from order ``src`` to order ``dst``.

    Use it to load weights from libraries with another layout, e.g. a gate order
    ``("i", "g", "f", "o")`` into rnnkit's ``GATES["lstm"]``.
    """
    if sorted(src) != sorted(dst):
        raise ValueError(f"gate orders {tuple(src)} and {tuple(dst)} name different gates")
    if len(set(src)) != len(src):
        raise ValueError(f"gate order {tuple(src)} names a gate twice; expected distinct gates")
    _check_blocks(t, len(src), dim, f"the gates {tuple(src)}")
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
    return_gates: bool = False,
) -> tuple[Tensor, ...]:
    """One step of the LSTM (with an optional output projection, LSTMP).

        i = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)    input gate
        f = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)    forget gate
        g = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)       candidate cell
        o = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)    output gate
        c_t = f * c_{t-1} + i * g                             the cell state: forget, then write
        h_t = o * tanh(c_t)                                   (then W_hr h_t with a projection)

    The forget gate decides what of the cell state to keep, the input gate what to write, the
    output gate what to show. Returns ``(h_t, c_t)``: (B, H) or (B, P), and (B, H); with
    ``return_gates`` also the tuple ``(i, f, g, o, c_t)`` (:data:`GATE_OUTPUTS` order).
    """
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = split_gates(pre, "lstm", dim=1)
    i = torch.sigmoid(i)
    f = torch.sigmoid(f)
    g = torch.tanh(g)
    o = torch.sigmoid(o)
    c_t = f * c + i * g
    h_t = o * torch.tanh(c_t)
    return _lstm_out(h_t, c_t, w_hr, (i, f, g, o, c_t) if return_gates else None)


def peephole_lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_ci: Tensor,
    w_cf: Tensor,
    w_co: Tensor,
    w_hr: Tensor | None = None,
    return_gates: bool = False,
) -> tuple[Tensor, ...]:
    """One step of the peephole LSTM (Gers & Schmidhuber 2000): the gates see the cell state.

        i = sigmoid(W_ii x_t + W_hi h_{t-1} + w_ci * c_{t-1} + b_i)    input gate peeks at c_{t-1}
        f = sigmoid(W_if x_t + W_hf h_{t-1} + w_cf * c_{t-1} + b_f)    forget gate peeks at c_{t-1}
        g = tanh(W_ig x_t + W_hg h_{t-1} + b_g)
        c_t = f * c_{t-1} + i * g
        o = sigmoid(W_io x_t + W_ho h_{t-1} + w_co * c_t + b_o)        output gate peeks at c_t
        h_t = o * tanh(c_t)                                            (then W_hr h_t)

    ``w_ci``, ``w_cf``, ``w_co`` are (H,) diagonal peephole weights. Returns as :func:`lstm_step`.
    """
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = split_gates(pre, "lstm", dim=1)
    i = torch.sigmoid(i + w_ci * c)
    f = torch.sigmoid(f + w_cf * c)
    g = torch.tanh(g)
    c_t = f * c + i * g
    o = torch.sigmoid(o + w_co * c_t)
    h_t = o * torch.tanh(c_t)
    return _lstm_out(h_t, c_t, w_hr, (i, f, g, o, c_t) if return_gates else None)


def layernorm_lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    ln_ih: tuple[Tensor, Tensor],
    ln_hh: tuple[Tensor, Tensor],
    ln_c: tuple[Tensor, Tensor],
    eps: float = 1e-5,
    return_gates: bool = False,
) -> tuple[Tensor, ...]:
    """One step of the layer-normalised LSTM (Ba, Kiros & Hinton 2016).

        (i, f, g, o) = LN(W_ih x_t; a_x, b_x) + LN(W_hh h_{t-1}; a_h, b_h) + b_ih + b_hh
        i, f, o = sigmoid(i), sigmoid(f), sigmoid(o);  g = tanh(g)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(LN(c_t; a_c, b_c))

    Each LN normalises over all G = 4H pre-activations (or the H cells) and applies its gain and
    bias: ``ln_* = (gain, bias)``. Returns as :func:`lstm_step`.
    """
    pre = layer_norm(x @ w_ih.T, *ln_ih, eps) + layer_norm(h @ w_hh.T, *ln_hh, eps)
    if b_ih is not None:
        pre = pre + b_ih
    if b_hh is not None:
        pre = pre + b_hh
    i, f, g, o = split_gates(pre, "lstm", dim=1)
    i = torch.sigmoid(i)
    f = torch.sigmoid(f)
    g = torch.tanh(g)
    o = torch.sigmoid(o)
    c_t = f * c + i * g
    h_t = o * torch.tanh(layer_norm(c_t, *ln_c, eps))
    return _lstm_out(h_t, c_t, None, (i, f, g, o, c_t) if return_gates else None)


def _lstm_out(h_t: Tensor, c_t: Tensor, w_hr: Tensor | None, gates: tuple | None) -> tuple:
    if w_hr is not None:
        h_t = _linear(h_t, w_hr, None)
    return (h_t, c_t) if gates is None else (h_t, c_t, gates)


def autocasting(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (False for a device type autocast does
    not know, such as meta, where torch raises instead)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def layer_norm(x: Tensor, gain: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``gain * (x - mean(x)) / sqrt(var(x) + eps) + bias`` over the last dimension.

    Autocast runs layer_norm in float32 but converts only its own dtype's tensors to it: the
    gains and biases of a float16 layer under bf16 autocast are converted here, as the fused
    kernels read them."""
    if gain.dtype == torch.float16 and autocasting(x.device.type):
        gain, bias = gain.float(), bias.float()
    return torch.nn.functional.layer_norm(x, x.shape[-1:], gain, bias, eps)


def gru_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    return_gates: bool = False,
    h_rec: Tensor | None = None,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One step of the GRU.

        r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)           reset gate
        z = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)           update gate
        n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))        candidate state
        h_t = (1 - z) * n + z * h_{t-1}

    The update gate decides how much of the old state to keep, the reset gate how much of it the
    candidate may see; the reset applies to ``W_hn h + b_hn`` as in torch.nn. ``h_rec`` (B, H),
    when given, is the h_{t-1} the recurrent products ``W_h. h_{t-1}`` read in place of ``h``
    (state dropout's masked state); the carry ``z * h_{t-1}`` always reads ``h``. Returns ``h_t``
    (B, H); with ``return_gates`` the pair ``(h_t, (r, z, n))``.
    """
    rec = h if h_rec is None else h_rec
    return _gru_from(_linear(x, w_ih, b_ih), _linear(rec, w_hh, b_hh), h, return_gates)


def layernorm_gru_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    ln_ih: tuple[Tensor, Tensor],
    ln_hh: tuple[Tensor, Tensor],
    eps: float = 1e-5,
    return_gates: bool = False,
    h_rec: Tensor | None = None,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One step of the layer-normalised GRU: LN on the input and recurrent pre-activations.

        (x_r, x_z, x_n) = LN(W_ih x_t; a_x, b_x) + b_ih
        (h_r, h_z, h_n) = LN(W_hh h_{t-1}; a_h, b_h) + b_hh
        r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z)               reset and update gates
        n = tanh(x_n + r * h_n)
        h_t = (1 - z) * n + z * h_{t-1}

    Each LN normalises over all G = 3H pre-activations. ``h_rec`` and the return as
    :func:`gru_step`.
    """
    gi = layer_norm(x @ w_ih.T, *ln_ih, eps)
    gh = layer_norm((h if h_rec is None else h_rec) @ w_hh.T, *ln_hh, eps)
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    return _gru_from(gi, gh, h, return_gates)


def _gru_from(gi: Tensor, gh: Tensor, h: Tensor, return_gates: bool):
    i_r, i_z, i_n = split_gates(gi, "gru", dim=1)
    h_r, h_z, h_n = split_gates(gh, "gru", dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    h_t = (1 - z) * n + z * h
    return (h_t, (r, z, n)) if return_gates else h_t


def _check_state(mode: str, family: str, state: Any) -> None:
    """TypeError unless ``state`` is what ``mode`` steps from: the pair (h, c) for the LSTM
    family (a lone tensor would be unpacked along its batch dimension), h for the others."""
    if isinstance(state, Tensor):
        if family == "lstm":
            raise TypeError(
                f"state for {mode!r} is a tensor of shape {tuple(state.shape)}; expected the "
                "pair (h, c)"
            )
        return
    if family != "lstm":
        raise TypeError(f"state for {mode!r} is a {type(state).__name__}; expected h, a tensor")
    if not (isinstance(state, tuple | list) and len(state) == 2):
        what = (
            f"a {type(state).__name__} of {len(state)}"
            if isinstance(state, tuple | list)
            else repr(state)
        )
        raise TypeError(f"state for {mode!r} is {what}; expected the pair (h, c)")


def _check_step_inputs(mode: str, weights: Mapping[str, Tensor], x: Any) -> None:
    """A clear error unless ``weights`` holds every weight ``mode`` needs (the cell table's names,
    biases and projection optional) and ``x`` is a (B, I) tensor that ``weight_ih`` reads."""
    table = spec(mode)
    missing = [n for n in table.weight_names(bias=False) if n not in weights]
    if missing:
        raise ValueError(
            f"weights for {mode!r} lack {', '.join(missing)}; expected "
            f"{', '.join(table.weight_names(bias=True, proj=table.projection))} (biases and "
            "projection optional)"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"x is a {type(x).__name__}; expected a Tensor (B, I)")
    w_ih = weights["weight_ih"]
    if x.dim() != 2 or x.shape[1] != w_ih.shape[1]:
        raise ShapeError(
            f"x has shape {tuple(x.shape)}; expected (B, I) with I = {w_ih.shape[1]}, the columns "
            "of weight_ih (one step of a batch; the cells also take an unbatched (I,))"
        )


def step(
    mode: str,
    weights: Mapping[str, Tensor],
    x: Tensor,
    state: Any,
    return_gates: bool = False,
    eps: float = 1e-5,
    state_mask: Tensor | None = None,
) -> tuple:
    """One step of the built-in cell ``mode`` (a key of the cell table), with one direction's
    ``weights`` by the table's names (``weight_ih``, ``weight_hh``, ``bias_ih``, ...; biases and
    projection optional): ``(out_t, new_state)``, plus the gates (the table's ``gate_outputs``)
    with ``return_gates``, as a cell's ``forward`` returns them. ``state`` is h, or (h, c) for
    the LSTM family; ``eps`` is the LayerNorm cells'. ``state_mask`` (B, P), state dropout's
    mask, multiplies h_{t-1} where the recurrent products read it, and nowhere else (a GRU's
    carry ``z * h_{t-1}`` reads the unmasked state).
    """
    family = spec(mode).family  # an unknown mode is named before any weight is looked up
    _check_state(mode, family, state)
    _check_step_inputs(mode, weights, x)
    w = weights
    ih, hh, b_ih, b_hh = w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh")
    if family == "gru":
        rec = None if state_mask is None else state * state_mask
        if mode == "gru_layernorm":
            ln = (w["ln_ih.weight"], w["ln_ih.bias"]), (w["ln_hh.weight"], w["ln_hh.bias"])
            out = layernorm_gru_step(x, state, ih, hh, b_ih, b_hh, *ln, eps, return_gates, rec)
        else:
            out = gru_step(x, state, ih, hh, b_ih, b_hh, return_gates, rec)
        h, *gates = out if return_gates else (out,)
        return (h, h, *gates)
    if state_mask is not None:  # elsewhere h_{t-1} enters the recurrent product alone
        state = state * state_mask if family == "rnn" else (state[0] * state_mask, state[1])
    if family == "rnn":
        h = rnn_step(x, state, ih, hh, b_ih, b_hh, mode.removeprefix("rnn_"))
        return h, h
    if mode == "lstm_layernorm":
        ln = [(w[f"{n}.weight"], w[f"{n}.bias"]) for n in ("ln_ih", "ln_hh", "ln_c")]
        h, c, *gates = layernorm_lstm_step(x, *state, ih, hh, b_ih, b_hh, *ln, eps, return_gates)
    elif mode == "lstm_peephole":
        peep = w["weight_ci"], w["weight_cf"], w["weight_co"]
        h, c, *gates = peephole_lstm_step(
            x, *state, ih, hh, b_ih, b_hh, *peep, w.get("weight_hr"), return_gates
        )
    else:
        h, c, *gates = lstm_step(x, *state, ih, hh, b_ih, b_hh, w.get("weight_hr"), return_gates)
    return (h, (h, c), *gates)
