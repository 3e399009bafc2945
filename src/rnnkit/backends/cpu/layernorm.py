"""The LayerNorm LSTM and GRU kernels (``layernorm_kernels.cpp``) as ``torch.library`` custom ops,
and the cpu backend's check and run for the two LayerNorm modes.

``rnnkit::layernorm_forward`` runs one layer in one direction over the whole sequence and returns,
besides ``(out, h_n, c_n)``, what its backward needs; ``rnnkit::layernorm_backward`` is the
hand-written backpropagation through time. Shapes (layernorm_kernels.cpp states them in full):
x (T, B, I), h0 and c0 (B, H), w_ih (G, I), w_hh (G, H), b_ih/b_hh (G), the gains and biases of
the input-side and recurrent LayerNorms (G) and of the cell-state one (H, LSTM only), lengths (B,)
int64; G = 4H (LSTM) or 3H (GRU).

Defining the ops builds nothing: the kernels are compiled when an op first runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import LayerCall, LayerResult, Request
from . import build, ops

__all__ = [
    "MODE_IDS",
    "check",
    "layernorm_backward",
    "layernorm_forward",
    "run_direction",
    "run_layer",
]

#: The LayerNorm kernels' cell ids, by the cells' mode names.
MODE_IDS = {"lstm_layernorm": 0, "gru_layernorm": 1}
_LSTM = MODE_IDS["lstm_layernorm"]
_DTYPES = (torch.float32, torch.float64)
_OFF = ops.Regularisers()

_Tensors11 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip
_Tensors13 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip


@torch.library.custom_op("rnnkit::layernorm_forward", mutates_args=())
def layernorm_forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    ln_ih_w: Tensor,
    ln_ih_b: Tensor,
    ln_hh_w: Tensor,
    ln_hh_b: Tensor,
    ln_c_w: Tensor | None,
    ln_c_b: Tensor | None,
    lengths: Tensor | None,
    eps: float,
    mode: int,
    reverse: bool,
    save: bool,
    state_mask: Tensor | None = None,
    zone_h: Tensor | None = None,
    zone_c: Tensor | None = None,
) -> _Tensors11:
    """One layer, one direction: ``(out, h_n, c_n, act, hprev, c, xhat, hhat, chat, rstd,
    cprev)``; the last eight are saved for backward and empty unless ``save`` (cprev unless the
    LSTM has zoneout). ``state_mask``, ``zone_h``, ``zone_c``: the in-kernel regularisers, as
    :class:`ops.Regularisers` describes them (None = off)."""
    build.ensure()
    return tuple(torch.ops.rnnkit_cpu.layernorm_forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
        lengths, eps, mode, reverse, save, state_mask, zone_h, zone_c,
    ))  # fmt: skip


@layernorm_forward.register_fake
def _layernorm_forward_fake(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
    lengths, eps, mode, reverse, save, state_mask=None, zone_h=None, zone_c=None,
):  # fmt: skip
    steps, batch, _ = x.shape
    gates = w_ih.shape[0]
    lstm = mode == _LSTM
    hidden = gates // (4 if lstm else 3)

    def saved(width: int, used: bool = True) -> Tensor:
        return x.new_empty(steps, batch, width) if save and used else x.new_empty(0)

    return (
        x.new_empty(steps, batch, hidden),
        x.new_empty(batch, hidden),
        x.new_empty(batch, hidden) if lstm else x.new_empty(0),
        saved(4 * hidden),
        saved(hidden),
        saved(hidden, lstm),
        saved(gates),
        saved(gates),
        saved(hidden, lstm),
        saved(3),
        saved(hidden, lstm and zone_h is not None),
    )


@torch.library.custom_op("rnnkit::layernorm_backward", mutates_args=())
def layernorm_backward(
    grad_out: Tensor | None,
    grad_hn: Tensor | None,
    grad_cn: Tensor | None,
    x: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    ln_ih_w: Tensor,
    ln_hh_w: Tensor,
    ln_c_w: Tensor | None,
    ln_c_b: Tensor | None,
    lengths: Tensor | None,
    act: Tensor,
    hprev: Tensor,
    c: Tensor,
    xhat: Tensor,
    hhat: Tensor,
    chat: Tensor,
    rstd: Tensor,
    mode: int,
    reverse: bool,
    has_bias: bool,
    need_dx: bool,
    state_mask: Tensor | None = None,
    zone_h: Tensor | None = None,
    zone_c: Tensor | None = None,
    cprev: Tensor | None = None,
) -> _Tensors13:
    """Backpropagation through one layernorm_forward: ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih,
    db_hh, dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b, dln_c_w, dln_c_b)``; dx is empty unless
    ``need_dx``, the biases without ``has_bias``, dc0 and the cell LayerNorm's unless LSTM."""
    build.ensure()
    return tuple(torch.ops.rnnkit_cpu.layernorm_backward(
        grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, lengths,
        act, hprev, c, xhat, hhat, chat, rstd, mode, reverse, has_bias, need_dx, state_mask,
        zone_h, zone_c, cprev,
    ))  # fmt: skip


@layernorm_backward.register_fake
def _layernorm_backward_fake(
    grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, lengths,
    act, hprev, c, xhat, hhat, chat, rstd, mode, reverse, has_bias, need_dx, state_mask=None,
    zone_h=None, zone_c=None, cprev=None,
):  # fmt: skip
    batch = x.shape[1]
    gates = w_ih.shape[0]
    lstm = mode == _LSTM
    hidden = gates // (4 if lstm else 3)
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_dx else empty,
        x.new_empty(batch, hidden),
        x.new_empty(batch, hidden) if lstm else x.new_empty(0),
        x.new_empty(w_ih.shape),
        x.new_empty(w_hh.shape),
        x.new_empty(gates) if has_bias else x.new_empty(0),
        x.new_empty(gates) if has_bias else x.new_empty(0),
        x.new_empty(gates),
        x.new_empty(gates),
        x.new_empty(gates),
        x.new_empty(gates),
        x.new_empty(hidden) if lstm else x.new_empty(0),
        x.new_empty(hidden) if lstm else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    (x, _, c0, w_ih, w_hh, b_ih, _, ln_ih_w, _, ln_hh_w, _, ln_c_w, ln_c_b, lengths, _, mode,
     reverse, save, *extra) = inputs  # fmt: skip
    saved = output[3:]  # act, hprev, c, xhat, hhat, chat, rstd, cprev
    ctx.mode, ctx.reverse, ctx.save = mode, reverse, save
    ctx.has_bias, ctx.has_c0 = b_ih is not None, c0 is not None
    # state_mask, zone_h, zone_c (torch.compile may drop trailing Nones)
    extra = (list(extra) + [None] * 3)[:3]
    ctx.save_for_backward(
        x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, lengths, *extra, *saved
    )
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_hn, grad_cn, *_saved_grads):
    if not ctx.save:
        raise RuntimeError(
            "rnnkit::layernorm_forward ran with save=False (no gradient was expected), so it "
            "kept nothing for backward"
        )
    (x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, lengths, mask, zone_h, zone_c,
     *saved, cprev) = ctx.saved_tensors  # fmt: skip
    lstm = ctx.mode == _LSTM
    need_dx = ctx.needs_input_grad[0]
    (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b, dln_c_w,
     dln_c_b) = layernorm_backward(
        grad_out, grad_hn, grad_cn if lstm else None, x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w,
        ln_c_b, lengths, *saved, ctx.mode, ctx.reverse, ctx.has_bias, need_dx, mask, zone_h,
        zone_c, cprev if lstm and zone_h is not None else None,
    )  # fmt: skip
    return (
        dx if need_dx else None,
        dh0,
        dc0 if ctx.has_c0 else None,
        dw_ih,
        dw_hh,
        db_ih if ctx.has_bias else None,
        db_hh if ctx.has_bias else None,
        dln_ih_w,
        dln_ih_b,
        dln_hh_w,
        dln_hh_b,
        dln_c_w if lstm else None,
        dln_c_b if lstm else None,
        None,  # lengths
        None,  # eps
        None,  # mode
        None,  # reverse
        None,  # save
        None,  # state_mask: a constant
        None,  # zone_h: a constant
        None,  # zone_c: a constant
    )


layernorm_forward.register_autograd(_backward, setup_context=_setup_context)


def run_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    lengths: Tensor | None,
    mode: str,
    reverse: bool,
    bias: bool,
    eps: float,
    gates: bool = False,
    regularisers: ops.Regularisers = _OFF,
) -> tuple[Tensor, Tensor, Tensor | None, ops.Gates | None]:
    """One layer in one direction from the cell's ``kernel_weights()`` list ``w_ih, w_hh[, b_ih,
    b_hh], ln_ih.weight, ln_ih.bias, ln_hh.weight, ln_hh.bias[, ln_c.weight, ln_c.bias]`` (the
    last pair for the LSTM): returns ``(out (T, B, H), h_n (B, H), c_n (B, H) or None, gates or
    None)``; with ``gates``, the activations the kernel saved (``ops.gates_of``: LSTM i, f, g, o,
    c_t; GRU r, z, n), detached copies, zero at padded steps. ``regularisers``: state dropout
    and zoneout inside the kernel (``ops.Regularisers``; masks are constants, not
    differentiated)."""
    mode_id = MODE_IDS[mode]
    lstm = mode_id == _LSTM
    w_ih, w_hh, *rest = weights
    b_ih, b_hh = (rest[0], rest[1]) if bias else (None, None)
    norms = rest[2:] if bias else rest
    ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b = norms[:4]
    ln_c_w, ln_c_b = (norms[4], norms[5]) if lstm else (None, None)
    tensors = (x, h0, c0, *weights)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, h_n, c_n, act, _, c, *_ = layernorm_forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
        lengths, eps, mode_id, reverse, save or gates, *regularisers,
    )  # fmt: skip
    # act and c share the plain kernels' layout (act: i f g o or r z n hn; c: the new c_t)
    g = ops.gates_of(ops.MODE_IDS["lstm" if lstm else "gru"], act, c) if gates else None
    return out, h_n, c_n if lstm else None, g


def check(request: Request) -> str | None:
    """What the LayerNorm kernels cannot run in ``request`` (None: they can): every option of the
    two LayerNorm cells (lengths, reversal, stacks, gates, zoneout, state and variational
    dropout), on the CPU in float32 and float64."""
    if request.device_type != "cpu":
        return f"the C++ kernels run on the CPU, not on {request.device_type}"
    if request.dtype not in _DTYPES:
        return f"dtype {request.dtype} has no C++ kernel (float32 and float64 do)"
    return build.unavailable()


def run_layer(layer: LayerCall) -> LayerResult:
    """One layer of LayerNorm cells: one kernel call per direction (the reverse one after the
    forward one), each reading its own input. With ``layer.gates`` one detached tuple of gates
    per direction."""
    outs, states, gates = [], [], []
    for x, d in zip(layer.inputs, layer.directions, strict=True):
        assert d.mode is not None
        lstm = MODE_IDS[d.mode] == _LSTM
        out, h, c, g = run_direction(
            x,
            d.state[0],
            d.state[1] if lstm else None,
            list(d.weights.values()),
            layer.lengths,
            d.mode,
            d.reverse,
            "bias_ih" in d.weights,
            d.eps,
            layer.gates,
            ops.in_kernel(d),
        )
        outs.append(out)
        states.append((h, c) if lstm else (h,))
        gates.append(g)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return LayerResult(out, states, gates if layer.gates else None)
