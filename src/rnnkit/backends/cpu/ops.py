"""The C++ kernels as ``torch.library`` custom ops, with fake (meta) kernels and autograd.

``rnnkit::layer_forward`` runs one layer in one direction over the whole sequence and returns,
besides ``(out, h_n, c_n)``, what its backward needs; ``rnnkit::layer_backward`` is the
hand-written backpropagation through time. Autograd, torch.compile and torch.export see one op
each. Shapes (rnn_kernels.cpp states them in full): x (T, B, I), h0 (B, P), c0 (B, H),
w_ih (G, I), w_hh (G, P), b_ih/b_hh (G), w_hr (P, H), lengths (B,) int64; the regularisers
state_mask (B, P) (state dropout) and zone_h (T, B, P) or (P,), zone_c (T, B, H) or (H,)
(zoneout: 1 = keep the previous value, or in eval mode the probability) are constants: they get
no gradient. peep (3, H) stacks the peephole LSTM's w_ci, w_cf, w_co.

Defining the ops builds nothing: the kernels are compiled when an op first runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import build

if TYPE_CHECKING:
    from .. import Direction

__all__ = [
    "KERNELS",
    "MODE_IDS",
    "Regularisers",
    "gates_of",
    "in_kernel",
    "layer",
    "layer_backward",
    "layer_forward",
    "pair",
    "pair_backward",
    "pair_forward",
]

#: The kernels' cell ids.
MODE_IDS = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
_LSTM = MODE_IDS["lstm"]
#: Every cell mode the kernels run: (cell id, peepholes).
KERNELS = {**{mode: (i, False) for mode, i in MODE_IDS.items()}, "lstm_peephole": (_LSTM, True)}

_Tensors8 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_Tensors9 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _saved_width(mode: int, hidden: int) -> int:
    return 4 * hidden if mode in (MODE_IDS["lstm"], MODE_IDS["gru"]) else hidden


@torch.library.custom_op("rnnkit::layer_forward", mutates_args=())
def layer_forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    mode: int,
    reverse: bool,
    save: bool,
    state_mask: Tensor | None = None,
    zone_h: Tensor | None = None,
    zone_c: Tensor | None = None,
    peep: Tensor | None = None,
) -> _Tensors8:
    """One layer, one direction: ``(out, h_n, c_n, act, hprev, c, hpre, cprev)``; the last five
    are saved for backward and empty unless ``save``."""
    build.ensure()
    return torch.ops.rnnkit_cpu.layer_forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, save,
        state_mask, zone_h, zone_c, peep,
    )  # fmt: skip


@layer_forward.register_fake
def _layer_forward_fake(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, save,
    state_mask=None, zone_h=None, zone_c=None, peep=None,
):  # fmt: skip
    steps, batch, _ = x.shape
    gates = w_ih.shape[0]
    hidden = gates // {0: 1, 1: 1, 2: 4, 3: 3}[mode]
    state = h0.shape[1]
    empty = x.new_empty(0)

    def saved(width: int, used: bool) -> Tensor:
        return x.new_empty(steps, batch, width) if save and used else x.new_empty(0)

    return (
        x.new_empty(steps, batch, state),
        x.new_empty(batch, state),
        x.new_empty(batch, hidden) if mode == _LSTM else empty,
        saved(_saved_width(mode, hidden), True),
        saved(state, True),
        saved(hidden, mode == _LSTM),
        saved(hidden, w_hr is not None),
        saved(hidden, mode == _LSTM and (zone_h is not None or peep is not None)),
    )


@torch.library.custom_op("rnnkit::layer_backward", mutates_args=())
def layer_backward(
    grad_out: Tensor | None,
    grad_hn: Tensor | None,
    grad_cn: Tensor | None,
    x: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    act: Tensor,
    hprev: Tensor,
    c: Tensor,
    hpre: Tensor,
    mode: int,
    reverse: bool,
    has_bias: bool,
    need_dx: bool,
    state_mask: Tensor | None = None,
    zone_h: Tensor | None = None,
    zone_c: Tensor | None = None,
    cprev: Tensor | None = None,
    peep: Tensor | None = None,
) -> _Tensors9:
    """Backpropagation through one layer_forward: ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh,
    dw_hr, dpeep)``; dx is empty unless ``need_dx``, the biases without ``has_bias``, dw_hr
    without a projection, dc0 unless LSTM, dpeep without peepholes."""
    build.ensure()
    return torch.ops.rnnkit_cpu.layer_backward(
        grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, w_hr, lengths, act, hprev, c, hpre,
        mode, reverse, has_bias, need_dx, state_mask, zone_h, zone_c, cprev, peep,
    )  # fmt: skip


@layer_backward.register_fake
def _layer_backward_fake(
    grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, w_hr, lengths, act, hprev, c, hpre, mode,
    reverse, has_bias, need_dx, state_mask=None, zone_h=None, zone_c=None, cprev=None, peep=None,
):  # fmt: skip
    batch = x.shape[1]
    gates = w_ih.shape[0]
    hidden = gates // {0: 1, 1: 1, 2: 4, 3: 3}[mode]
    state = w_hh.shape[1]
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_dx else empty,
        x.new_empty(batch, state),
        x.new_empty(batch, hidden) if mode == _LSTM else x.new_empty(0),
        x.new_empty(w_ih.shape),
        x.new_empty(w_hh.shape),
        x.new_empty(gates) if has_bias else x.new_empty(0),
        x.new_empty(gates) if has_bias else x.new_empty(0),
        x.new_empty(w_hr.shape) if w_hr is not None else x.new_empty(0),
        x.new_empty(peep.shape) if peep is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, _, c0, w_ih, w_hh, b_ih, _, w_hr, lengths, mode, reverse, save, *extra = inputs
    _, _, _, act, hprev, c, hpre, cprev = output
    ctx.mode, ctx.reverse, ctx.save = mode, reverse, save
    ctx.has_bias = b_ih is not None
    ctx.has_c0, ctx.has_w_hr = c0 is not None, w_hr is not None
    # state_mask, zone_h, zone_c, peep (torch.compile may drop trailing Nones)
    extra = (extra + [None] * 4)[:4]
    ctx.save_for_backward(x, c0, w_ih, w_hh, w_hr, lengths, act, hprev, c, hpre, cprev, *extra)
    ctx.mark_non_differentiable(act, hprev, c, hpre, cprev)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_hn, grad_cn, *_saved_grads):
    if not ctx.save:
        raise RuntimeError(
            "rnnkit::layer_forward ran with save=False (no gradient was expected), so it kept "
            "nothing for backward"
        )
    x, c0, w_ih, w_hh, w_hr, lengths, act, hprev, c, hpre, cprev, *extra = ctx.saved_tensors
    mask, zone_h, zone_c, peep = extra
    need_dx = ctx.needs_input_grad[0]
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeep = layer_backward(
        grad_out, grad_hn, grad_cn if ctx.mode == _LSTM else None, x, c0, w_ih, w_hh, w_hr,
        lengths, act, hprev, c, hpre, ctx.mode, ctx.reverse, ctx.has_bias, need_dx, mask, zone_h,
        zone_c, cprev, peep,
    )  # fmt: skip
    return (
        dx if need_dx else None,
        dh0,
        dc0 if ctx.has_c0 else None,
        dw_ih,
        dw_hh,
        db_ih if ctx.has_bias else None,
        db_hh if ctx.has_bias else None,
        dw_hr if ctx.has_w_hr else None,
        None,  # lengths
        None,  # mode
        None,  # reverse
        None,  # save
        None,  # state_mask: a constant
        None,  # zone_h: a constant
        None,  # zone_c: a constant
        None if peep is None else dpeep,
    )


layer_forward.register_autograd(_backward, setup_context=_setup_context)


class Regularisers(NamedTuple):
    """One direction's in-kernel regularisers, as the ops take them (None = off): state_mask
    (B, P) multiplies h_{t-1} entering the step; zone_h (T, B, P) or (P,) and zone_c (T, B, H) or
    (H,) [LSTM] are zoneout's keep weights (0/1 per step in training, p in eval mode)."""

    state_mask: Tensor | None = None
    zone_h: Tensor | None = None
    zone_c: Tensor | None = None


_OFF = Regularisers()


def in_kernel(direction: Direction) -> Regularisers:
    """A direction's state dropout and zoneout masks as the kernels take them: zoneout's bool
    masks (T, B, n) as 0/1 in the input's dtype, its eval-mode probabilities as (n,) vectors."""
    masks = direction.masks
    if masks is None:
        return Regularisers()
    h0 = direction.state[0]
    zone: list[Tensor | None] = [None, None]
    if masks.zoneout is not None:
        for k, (z, like) in enumerate(zip(masks.zoneout, direction.state, strict=False)):
            size = like.shape[-1]
            zone[k] = z.to(h0.dtype) if isinstance(z, Tensor) else h0.new_full((size,), z)
    return Regularisers(masks.state, zone[0], zone[1])


Gates = tuple[Tensor, ...]


def gates_of(mode: int, act: Tensor, c: Tensor) -> Gates:
    """The gate activations of every step, (T, B, H) each, from what layer_forward saved: LSTM
    ``i, f, g, o, c`` (act holds i f g o, c the new cell state), GRU ``r, z, n`` (act holds r z n
    hn). Copies, not differentiable: the saved activations are outputs without a gradient."""
    hidden = act.shape[-1] // 4
    if mode == _LSTM:
        return (*(a.contiguous() for a in act.split(hidden, dim=-1)), c.clone())
    return tuple(a.contiguous() for a in act.split(hidden, dim=-1)[:3])


def _direction_args(
    weights: list[Tensor], bias: bool, proj: bool, peephole: bool
) -> tuple[list[Tensor | None], Tensor | None]:
    """``[w_ih, w_hh, b_ih, b_hh, w_hr]`` and ``peep`` (3, H) from a cell's per-direction weight
    list ``w_ih, w_hh[, b_ih, b_hh][, w_ci, w_cf, w_co][, w_hr]`` (torch.nn's, plus peepholes)."""
    w_ih, w_hh, *rest = weights
    b_ih, b_hh = (rest[0], rest[1]) if bias else (None, None)
    w_hr = rest[-1] if proj else None
    first = 2 if bias else 0
    peep = torch.stack(rest[first : first + 3]) if peephole else None  # (3, H)
    return [w_ih, w_hh, b_ih, b_hh, w_hr], peep


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    lengths: Tensor | None,
    mode: str,
    reverse: bool,
    bias: bool,
    proj: bool,
    gates: bool = False,
    regularisers: Regularisers = _OFF,
) -> tuple[Tensor, Tensor, Tensor | None, Gates | None]:
    """One layer in one direction of ``mode`` (a key of :data:`KERNELS`) from the cell's
    per-direction weight list ``w_ih, w_hh[, b_ih, b_hh][, w_ci, w_cf, w_co][, w_hr]``: returns
    ``(out (T, B, P), h_n (B, P), c_n (B, H) or None, gates or None)``; with ``gates``,
    :func:`gates_of` (detached copies).
    """
    mode_id, peephole = KERNELS[mode]
    weights, peep = _direction_args(weights, bias, proj, peephole)
    args = [h0, c0, *weights]
    grad = _needs_grad([x, peep, *args])
    out, h_n, c_n, act, _, c, _, _ = layer_forward(
        x, *args, lengths, mode_id, reverse, grad or gates, *regularisers, peep
    )
    return out, h_n, c_n if mode_id == _LSTM else None, gates_of(mode_id, act, c) if gates else None


# -- both directions of a bidirectional layer in one op ---------------------------------------
# The directions are independent: the kernel runs each on its own thread. Arguments are those of
# layer_forward for the forward direction (_f) and the reverse one (_b); results are
# layer_forward's eight for each, forward direction first.


_Tensors16 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip
_Tensors18 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip


@torch.library.custom_op("rnnkit::pair_forward", mutates_args=())
def pair_forward(
    x: Tensor,
    h0_f: Tensor,
    c0_f: Tensor | None,
    w_ih_f: Tensor,
    w_hh_f: Tensor,
    b_ih_f: Tensor | None,
    b_hh_f: Tensor | None,
    w_hr_f: Tensor | None,
    h0_b: Tensor,
    c0_b: Tensor | None,
    w_ih_b: Tensor,
    w_hh_b: Tensor,
    b_ih_b: Tensor | None,
    b_hh_b: Tensor | None,
    w_hr_b: Tensor | None,
    lengths: Tensor | None,
    mode: int,
    save: bool,
    x_b: Tensor | None = None,
    state_mask_f: Tensor | None = None,
    zone_h_f: Tensor | None = None,
    zone_c_f: Tensor | None = None,
    state_mask_b: Tensor | None = None,
    zone_h_b: Tensor | None = None,
    zone_c_b: Tensor | None = None,
    peep_f: Tensor | None = None,
    peep_b: Tensor | None = None,
) -> _Tensors16:
    """Both directions of one layer: layer_forward's 8 results for each (16 tensors). ``x_b``:
    the reverse direction's own input (None: it reads ``x``)."""
    build.ensure()
    return tuple(torch.ops.rnnkit_cpu.pair_forward(
        x, h0_f, c0_f, w_ih_f, w_hh_f, b_ih_f, b_hh_f, w_hr_f,
        h0_b, c0_b, w_ih_b, w_hh_b, b_ih_b, b_hh_b, w_hr_b, lengths, mode, save, x_b,
        state_mask_f, zone_h_f, zone_c_f, state_mask_b, zone_h_b, zone_c_b, peep_f, peep_b,
    ))  # fmt: skip


@pair_forward.register_fake
def _(x, h0_f, c0_f, w_ih_f, w_hh_f, b_ih_f, b_hh_f, w_hr_f, h0_b, c0_b, w_ih_b, w_hh_b, b_ih_b,
      b_hh_b, w_hr_b, lengths, mode, save, x_b=None, state_mask_f=None, zone_h_f=None,
      zone_c_f=None, state_mask_b=None, zone_h_b=None, zone_c_b=None, peep_f=None,
      peep_b=None):  # fmt: skip
    f = _layer_forward_fake(x, h0_f, c0_f, w_ih_f, w_hh_f, b_ih_f, b_hh_f, w_hr_f, lengths, mode,
                            False, save, state_mask_f, zone_h_f, zone_c_f, peep_f)  # fmt: skip
    b = _layer_forward_fake(x, h0_b, c0_b, w_ih_b, w_hh_b, b_ih_b, b_hh_b, w_hr_b, lengths, mode,
                            True, save, state_mask_b, zone_h_b, zone_c_b, peep_b)  # fmt: skip
    return (*f, *b)


@torch.library.custom_op("rnnkit::pair_backward", mutates_args=())
def pair_backward(
    grad_out_f: Tensor | None,
    grad_hn_f: Tensor | None,
    grad_cn_f: Tensor | None,
    c0_f: Tensor | None,
    w_ih_f: Tensor,
    w_hh_f: Tensor,
    w_hr_f: Tensor | None,
    act_f: Tensor,
    hprev_f: Tensor,
    c_f: Tensor,
    hpre_f: Tensor,
    grad_out_b: Tensor | None,
    grad_hn_b: Tensor | None,
    grad_cn_b: Tensor | None,
    c0_b: Tensor | None,
    w_ih_b: Tensor,
    w_hh_b: Tensor,
    w_hr_b: Tensor | None,
    act_b: Tensor,
    hprev_b: Tensor,
    c_b: Tensor,
    hpre_b: Tensor,
    x: Tensor,
    lengths: Tensor | None,
    mode: int,
    has_bias: bool,
    need_dx: bool,
    x_b: Tensor | None = None,
    state_mask_f: Tensor | None = None,
    zone_h_f: Tensor | None = None,
    zone_c_f: Tensor | None = None,
    cprev_f: Tensor | None = None,
    state_mask_b: Tensor | None = None,
    zone_h_b: Tensor | None = None,
    zone_c_b: Tensor | None = None,
    cprev_b: Tensor | None = None,
    peep_f: Tensor | None = None,
    peep_b: Tensor | None = None,
) -> _Tensors18:
    """Backpropagation through pair_forward: layer_backward's 9 results for each direction."""
    build.ensure()
    return tuple(torch.ops.rnnkit_cpu.pair_backward(
        grad_out_f, grad_hn_f, grad_cn_f, c0_f, w_ih_f, w_hh_f, w_hr_f, act_f, hprev_f, c_f,
        hpre_f, grad_out_b, grad_hn_b, grad_cn_b, c0_b, w_ih_b, w_hh_b, w_hr_b, act_b, hprev_b,
        c_b, hpre_b, x, lengths, mode, has_bias, need_dx, x_b, state_mask_f, zone_h_f, zone_c_f,
        cprev_f, state_mask_b, zone_h_b, zone_c_b, cprev_b, peep_f, peep_b,
    ))  # fmt: skip


@pair_backward.register_fake
def _(grad_out_f, grad_hn_f, grad_cn_f, c0_f, w_ih_f, w_hh_f, w_hr_f, act_f, hprev_f, c_f, hpre_f,
      grad_out_b, grad_hn_b, grad_cn_b, c0_b, w_ih_b, w_hh_b, w_hr_b, act_b, hprev_b, c_b, hpre_b,
      x, lengths, mode, has_bias, need_dx, x_b=None, state_mask_f=None, zone_h_f=None,
      zone_c_f=None, cprev_f=None, state_mask_b=None, zone_h_b=None, zone_c_b=None,
      cprev_b=None, peep_f=None, peep_b=None):  # fmt: skip
    f = _layer_backward_fake(grad_out_f, grad_hn_f, grad_cn_f, x, c0_f, w_ih_f, w_hh_f, w_hr_f,
                             lengths, act_f, hprev_f, c_f, hpre_f, mode, False, has_bias,
                             need_dx, peep=peep_f)  # fmt: skip
    b = _layer_backward_fake(grad_out_b, grad_hn_b, grad_cn_b, x, c0_b, w_ih_b, w_hh_b, w_hr_b,
                             lengths, act_b, hprev_b, c_b, hpre_b, mode, True, has_bias,
                             need_dx, peep=peep_b)  # fmt: skip
    return (*f, *b)


def _pair_setup_context(ctx, inputs, output) -> None:
    (x, _, c0_f, w_ih_f, w_hh_f, b_ih_f, _, w_hr_f, _, c0_b, w_ih_b, w_hh_b, _, _, w_hr_b,
     lengths, mode, save, *extra) = inputs  # fmt: skip
    # x_b; state_mask, zone_h, zone_c of each direction; peep_f, peep_b (torch.compile may drop
    # trailing Nones)
    x_b, *regs = (extra + [None] * 9)[:9]
    saved_f, saved_b = output[3:8], output[11:16]
    ctx.mode, ctx.save = mode, save
    ctx.has_bias = b_ih_f is not None
    ctx.has_c0, ctx.has_w_hr = c0_f is not None, w_hr_f is not None
    ctx.has_x_b = x_b is not None
    ctx.has_peep = regs[-1] is not None
    ctx.save_for_backward(
        x, x_b, lengths, c0_f, w_ih_f, w_hh_f, w_hr_f, *saved_f, c0_b, w_ih_b, w_hh_b, w_hr_b,
        *saved_b, *regs,
    )  # fmt: skip
    ctx.mark_non_differentiable(*saved_f, *saved_b)
    ctx.set_materialize_grads(False)


def _pair_backward(ctx, *grads):
    if not ctx.save:
        raise RuntimeError(
            "rnnkit::pair_forward ran with save=False (no gradient was expected), so it kept "
            "nothing for backward"
        )
    x, x_b, lengths, *rest = ctx.saved_tensors
    # per direction: c0, w_ih, w_hh, w_hr, act, hprev, c, hpre, cprev; then the regularisers of
    # each direction and the peepholes of each
    fwd, bwd, regs = rest[:9], rest[9:18], rest[18:]
    lstm = ctx.mode == _LSTM
    g_f = [grads[0], grads[1], grads[2] if lstm else None]
    g_b = [grads[8], grads[9], grads[10] if lstm else None]
    need_dx = ctx.needs_input_grad[0] or (ctx.has_x_b and ctx.needs_input_grad[18])
    r = pair_backward(
        *g_f, *fwd[:8], *g_b, *bwd[:8], x, lengths, ctx.mode, ctx.has_bias, need_dx, x_b,
        *regs[:3], fwd[8], *regs[3:6], bwd[8], *regs[6:],
    )  # fmt: skip
    dx = dx_b = None
    if need_dx and not ctx.has_x_b:
        dx = r[0] + r[9]
    elif need_dx:  # each direction read its own input
        dx, dx_b = r[0], r[9]

    def direction(d):  # dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr of one direction
        dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = d[1:8]
        return (
            dh0,
            dc0 if ctx.has_c0 else None,
            dw_ih,
            dw_hh,
            db_ih if ctx.has_bias else None,
            db_hh if ctx.has_bias else None,
            dw_hr if ctx.has_w_hr else None,
        )

    dpeep = (r[8], r[17]) if ctx.has_peep else (None, None)
    # lengths, mode, save; x_b; the regularisers (constants); the peepholes
    return (dx, *direction(r[:9]), *direction(r[9:]), None, None, None, dx_b, *[None] * 6, *dpeep)


pair_forward.register_autograd(_pair_backward, setup_context=_pair_setup_context)


def pair(
    x: Tensor,
    h0: tuple[Tensor, Tensor],
    c0: tuple[Tensor, Tensor] | None,
    weights: tuple[list[Tensor], list[Tensor]],
    lengths: Tensor | None,
    mode: str,
    bias: bool,
    proj: bool,
    gates: bool = False,
    x_b: Tensor | None = None,
    regularisers: tuple[Regularisers, Regularisers] = (_OFF, _OFF),
) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, tuple[Gates, Gates] | None]:
    """Both directions of a bidirectional layer of ``mode`` (a key of :data:`KERNELS`; weights
    as :func:`layer` takes them), forward first: ``(out (T, B, 2P),
    (h_n forward, h_n reverse), (c_n forward, c_n reverse) or None, gates per direction or None)``.
    ``x_b``: the reverse direction's own input (None: both read ``x``).
    """
    mode_id, peephole = KERNELS[mode]
    args, peeps = [], []
    for d in range(2):
        direction, peep = _direction_args(weights[d], bias, proj, peephole)
        args += [h0[d], None if c0 is None else c0[d], *direction]
        peeps.append(peep)
    grad = _needs_grad([x, x_b, *args, *peeps])
    r = pair_forward(
        x, *args, lengths, mode_id, grad or gates, x_b, *regularisers[0], *regularisers[1], *peeps
    )
    out = torch.cat([r[0], r[8]], dim=-1)
    c_n = (r[2], r[10]) if mode_id == _LSTM else None
    g = (gates_of(mode_id, r[3], r[5]), gates_of(mode_id, r[11], r[13])) if gates else None
    return out, (r[1], r[9]), c_n, g
