"""The C++ kernels as two ``torch.library`` custom ops, with fake (meta) kernels and autograd.

``rnnkit::layer_forward`` runs one layer of any built-in cell over the whole sequence, in one
direction or both directions of a bidirectional layer at once, and returns per direction the
output, the final states and what its backward needs; ``rnnkit::layer_backward`` is the
hand-written backpropagation through time. Autograd, torch.compile and torch.export see one op
each. Their arguments are grouped per direction (ops.cpp states them in full): the inputs, the
initial states (the cell table's ``states``), the weights in the cell table's order (``weights``;
an absent bias or projection as an empty tensor), the in-kernel regularisers (:data:`MASKS`),
then the lengths, the cell table's ``kernel_id`` and the directions' reading orders. Every shape
here comes from the cell table (:data:`rnnkit.cells.table.SPECS`).

Defining the ops builds nothing: the kernels are compiled when an op first runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...cells.table import SPECS, CellSpec
from ..first_order import first_order
from . import build, gemm

if TYPE_CHECKING:
    from .. import Direction

__all__ = [
    "MASKS",
    "SAVED",
    "eager_layer_forward",
    "gates",
    "layer_backward",
    "layer_forward",
    "masks",
    "saved_widths",
]

#: One direction's in-kernel regularisers, in the order the ops take them: state_mask (B, P)
#: multiplies h_{t-1} entering the step; zone_h (T, B, P) or (P,) and zone_c (T, B, H) or (H,)
#: are zoneout's keep weights (0/1 per step in training, the probability in eval mode). They are
#: constants: they get no gradient.
MASKS = ("state_mask", "zone_h", "zone_c")
#: What the forward keeps for backward, per direction, in the order the op returns it.
SAVED = ("act", "hprev", "c", "cprev", "hpre", "xhat", "hhat", "chat", "rstd")

_BY_KERNEL = {s.kernel_id: s for s in SPECS.values()}
#: What a second derivative would go through (first_order's message).
KERNELS = "rnnkit's C++ CPU kernels"


def _spec(kernel_id: int) -> CellSpec:
    try:
        return _BY_KERNEL[kernel_id]
    except KeyError:
        raise ValueError(
            f"kernel_id = {kernel_id}; expected one of the cell table's {sorted(_BY_KERNEL)}"
        ) from None


def saved_widths(
    spec: CellSpec, hidden: int, state: int, projection: bool, zoneout: bool
) -> tuple[int, ...]:
    """The width of each :data:`SAVED` array (T, B, width) of one direction, 0 where the cell
    does not use it: act S = saved * H; hprev P; the cell state c and, with zoneout or
    peepholes, c_{t-1}; hpre H with a projection; the LayerNorm cells' xhat, hhat (G), chat (H,
    LSTM) and rstd (3)."""
    cell, norm = spec.has_cell_state, spec.layernorm
    gates = spec.gate_count * hidden
    return (
        spec.saved * hidden,
        state,
        hidden if cell else 0,
        hidden if cell and (zoneout or spec.peephole) else 0,
        hidden if projection else 0,
        gates if norm else 0,
        gates if norm else 0,
        hidden if norm and cell else 0,
        3 if norm else 0,
    )


def _direction(spec: CellSpec, inputs, states, weights, masks, d: int):
    """T, B, I, H, P, projection and zoneout of direction ``d`` of an op's arguments."""
    x = inputs[d if len(inputs) > 1 else 0]
    nw = len(spec.weights)
    w = dict(zip(spec.weights, weights[d * nw : (d + 1) * nw], strict=True))
    hidden = w["weight_ih"].shape[0] // spec.gate_count
    state = states[d * len(spec.states)].shape[-1]
    projection = "weight_hr" in w and w["weight_hr"].numel() > 0
    zoneout = masks[d * len(MASKS) + 1].numel() > 0
    return (*x.shape, hidden, state, projection, zoneout)


@torch.library.custom_op("rnnkit::layer_forward", mutates_args=())
def layer_forward(
    inputs: list[Tensor],
    states: list[Tensor],
    weights: list[Tensor],
    masks: list[Tensor],
    lengths: Tensor | None,
    kernel_id: int,
    reverse: list[bool],
    eps: float,
    save: bool,
    gemm_step: int = 0,
    gemm_bulk: int = 0,
    bf16: bool = False,
    split: bool = False,
) -> list[Tensor]:
    """One layer: per direction ``out, *final states, *saved`` (:data:`SAVED`, empty unless
    ``save``). ``gemm_step`` and ``gemm_bulk``: the GEMM sources of the recurrent step and of
    the GEMMs over all steps (:data:`rnnkit.backends.cpu.gemm.SOURCES`); ``bf16``: the GEMMs
    take bfloat16 operands and accumulate in float32 (float32 calls only); ``split``: the steps
    run on one slice of the batch per thread (the same results, another schedule)."""
    build.ensure()
    gemm.open_sources(gemm_step, gemm_bulk)
    return torch.ops.rnnkit_cpu.layer_forward(
        inputs, states, weights, masks, lengths, kernel_id, reverse, eps, save, gemm_step,
        gemm_bulk, bf16, split,
    )  # fmt: skip


@layer_forward.register_fake
def _layer_forward_fake(
    inputs, states, weights, masks, lengths, kernel_id, reverse, eps, save, gemm_step=0,
    gemm_bulk=0, bf16=False, split=False,
):  # fmt: skip
    spec = _spec(kernel_id)
    x = inputs[0]
    result = []
    for d in range(len(reverse)):
        steps, batch, _, hidden, state, proj, zone = _direction(
            spec, inputs, states, weights, masks, d
        )
        result.append(x.new_empty(steps, batch, state))
        result += [x.new_empty(batch, state if k == 0 else hidden) for k in range(len(spec.states))]
        for width in saved_widths(spec, hidden, state, proj, zone):
            result.append(x.new_empty(steps, batch, width) if save and width else x.new_empty(0))
    return result


@torch.library.custom_op("rnnkit::layer_backward", mutates_args=())
def layer_backward(
    grads: list[Tensor | None],
    inputs: list[Tensor],
    states: list[Tensor],
    weights: list[Tensor],
    masks: list[Tensor],
    saved: list[Tensor],
    lengths: Tensor | None,
    kernel_id: int,
    reverse: list[bool],
    eps: float,
    need_dx: bool,
    gemm_step: int = 0,
    gemm_bulk: int = 0,
    bf16: bool = False,
    split: bool = False,
) -> list[Tensor]:
    """Backpropagation through one layer_forward: ``dx`` per input (empty unless ``need_dx``),
    then per direction the gradients of the initial states and of the weights (empty where a
    weight is)."""
    build.ensure()
    gemm.open_sources(gemm_step, gemm_bulk)
    return torch.ops.rnnkit_cpu.layer_backward(
        grads, inputs, states, weights, masks, saved, lengths, kernel_id, reverse, eps, need_dx,
        gemm_step, gemm_bulk, bf16, split,
    )  # fmt: skip


@layer_backward.register_fake
def _layer_backward_fake(
    grads, inputs, states, weights, masks, saved, lengths, kernel_id, reverse, eps, need_dx,
    gemm_step=0, gemm_bulk=0, bf16=False, split=False,
):  # fmt: skip
    spec = _spec(kernel_id)
    x = inputs[0]
    nw, ns = len(spec.weights), len(spec.states)
    result = [x.new_empty(i.shape) if need_dx else x.new_empty(0) for i in inputs]
    for d in range(len(reverse)):
        result += [x.new_empty(s.shape) for s in states[d * ns : (d + 1) * ns]]
        result += [x.new_empty(w.shape) for w in weights[d * nw : (d + 1) * nw]]
    return result


def _setup_context(ctx, inputs, output) -> None:
    ins, states, weights, masks, lengths, kernel_id, reverse, eps, save, *plan = inputs
    saved = _saved_of(kernel_id, len(reverse), output)
    ctx.kernel_id, ctx.reverse, ctx.eps, ctx.save = kernel_id, list(reverse), eps, save
    ctx.plan = tuple(plan)
    ctx.counts = (len(ins), len(states), len(weights), len(masks))
    ctx.save_for_backward(*ins, *states, *weights, *masks, *saved, lengths)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)


def _groups(tensors, counts) -> list[list]:
    """``tensors`` cut into consecutive groups of ``counts``; what is left over last."""
    groups, rest = [], list(tensors)
    for count in counts:
        groups.append(rest[:count])
        rest = rest[count:]
    return [*groups, rest]


def _saved_of(kernel_id: int, directions: int, output) -> list[Tensor]:
    """The saved arrays among a layer_forward's outputs."""
    spec = _spec(kernel_id)
    first, per = 1 + len(spec.states), 1 + len(spec.states) + len(SAVED)
    return [t for d in range(directions) for t in output[d * per + first : (d + 1) * per]]


def _gradients(backward_op, grads, groups, saved, lengths, args, need_dx: bool):
    """dx, the initial states' and the weights' gradients of a layer_forward, from the gradients
    of its outputs: ``backward_op`` (the custom op or the C++ op) on the forward's ``groups``
    (inputs, states, weights, masks) and ``saved``; ``args``: the forward's kernel_id, reverse,
    eps, save and GEMM plan."""
    kernel_id, reverse, eps, _, *plan = args
    ins, states, weights, masks = groups
    spec = _spec(kernel_id)
    ns, nw = len(spec.states), len(spec.weights)
    per = 1 + ns + len(SAVED)
    given = [grads[d * per + k] for d in range(len(reverse)) for k in range(1 + ns)]
    r = backward_op(
        given, ins, states, weights, masks, saved, lengths, kernel_id, reverse, eps, need_dx,
        *plan,
    )  # fmt: skip
    dx, r = r[: len(ins)], r[len(ins) :]
    dstates, dweights = [], []
    for d in range(len(reverse)):
        part = r[d * (ns + nw) : (d + 1) * (ns + nw)]
        dstates += part[:ns]
        given_w = weights[d * nw : (d + 1) * nw]
        dweights += [g if w.numel() else None for g, w in zip(part[ns:], given_w, strict=True)]
    return [g if need_dx else None for g in dx], dstates, dweights


def _linked(grads, groups, dx, dstates, dweights):
    """dx, dstates, dweights as :func:`first_order` links them under ``create_graph=True``."""
    sources = [*grads, *groups[0], *groups[1], *groups[2]]
    flat = first_order(KERNELS, [*dx, *dstates, *dweights], sources)
    n, m = len(dx), len(dx) + len(dstates)
    return flat[:n], flat[n:m], flat[m:]


def _backward(ctx, grads):
    if not ctx.save:
        raise RuntimeError(
            "rnnkit::layer_forward ran with save=False (no gradient was expected), so it kept "
            "nothing for backward"
        )
    *tensors, lengths = ctx.saved_tensors
    *groups, saved = _groups(tensors, ctx.counts)
    args = (ctx.kernel_id, ctx.reverse, ctx.eps, ctx.save, *ctx.plan)
    need_dx = any(ctx.needs_input_grad[0])
    dx, dstates, dweights = _linked(
        grads, groups, *_gradients(layer_backward, grads, groups, saved, lengths, args, need_dx)
    )
    masks = groups[3]
    # masks: constants; lengths, kernel_id, reverse, eps, save and the GEMM plan: not tensors
    # (one None for each argument the op was called with; torch leaves out those at their
    # defaults)
    constants = (None,) * (len(ctx.needs_input_grad) - 4)
    return dx, dstates, dweights, [None] * len(masks), *constants


layer_forward.register_autograd(_backward, setup_context=_setup_context)


def eager_layer_forward(
    inputs: list[Tensor],
    states: list[Tensor],
    weights: list[Tensor],
    masks: list[Tensor],
    lengths: Tensor | None,
    kernel_id: int,
    reverse: list[bool],
    eps: float,
    save: bool,
    gemm_step: int = 0,
    gemm_bulk: int = 0,
    bf16: bool = False,
    split: bool = False,
) -> list[Tensor]:
    """:func:`layer_forward` for eager calls on plain tensors: the C++ ops under a plain
    autograd.Function. The custom op's wrapper (its arguments flattened and checked at every
    call) costs about half a millisecond per training step, more than a small layer's kernels;
    tracing and tensor subclasses take :func:`layer_forward`, which they can see through."""
    build.ensure()
    args = (kernel_id, list(reverse), eps, save, gemm_step, gemm_bulk, bf16, split)
    if not save:  # nothing to differentiate
        return torch.ops.rnnkit_cpu.layer_forward(inputs, states, weights, masks, lengths, *args)
    counts = (len(inputs), len(states), len(weights), len(masks))
    return list(_Layer.apply(counts, lengths, args, *inputs, *states, *weights, *masks))


class _Layer(torch.autograd.Function):
    """One layer_forward / layer_backward pair of the C++ ops, for :func:`eager_layer_forward`:
    the tensors flat (inputs, states, weights, masks) so that autograd sees each."""

    @staticmethod
    def forward(ctx, counts, lengths, args, *tensors):  # type: ignore[override]
        *groups, _ = _groups(tensors, counts)
        out = torch.ops.rnnkit_cpu.layer_forward(*groups, lengths, *args)
        saved = _saved_of(args[0], len(args[1]), out)
        ctx.args, ctx.counts, ctx.lengths = args, counts, lengths
        ctx.save_for_backward(*tensors, *saved)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        *groups, saved = _groups(ctx.saved_tensors, ctx.counts)
        need_dx = any(ctx.needs_input_grad[3 : 3 + ctx.counts[0]])
        with torch.no_grad():
            r = _gradients(
                torch.ops.rnnkit_cpu.layer_backward, grads, groups, saved, ctx.lengths, ctx.args,
                need_dx,
            )  # fmt: skip
        dx, dstates, dweights = _linked(grads, groups, *r)
        return None, None, None, *dx, *dstates, *dweights, *([None] * ctx.counts[3])


def masks(direction: Direction, empty: Tensor) -> list[Tensor]:
    """A direction's state dropout and zoneout as the ops take them (:data:`MASKS`; ``empty``
    where off): zoneout's bool masks (T, B, n) as 0/1 in the state's dtype, its eval-mode
    probabilities as (n,) vectors."""
    drawn = direction.masks
    if drawn is None:
        return [empty] * len(MASKS)
    zone = [empty, empty]
    for k, (z, like) in enumerate(zip(drawn.zoneout or (), direction.state, strict=False)):
        zone[k] = z.to(like.dtype) if isinstance(z, Tensor) else like.new_full(like.shape[-1:], z)
    return [empty if drawn.state is None else drawn.state, *zone]


def gates(spec: CellSpec, act: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    """The cell table's ``gate_outputs`` of every step, (T, B, H) each, from what the forward
    saved: act holds the gates in the table's order (the GRU's followed by hn), c the new cell
    state. Copies, not differentiable: the saved activations are outputs without a gradient."""
    blocks = act.split(act.shape[-1] // spec.saved, dim=-1)
    return tuple(
        c.clone() if name == "c" else blocks[spec.gates.index(name)].contiguous()
        for name in spec.gate_outputs
    )
