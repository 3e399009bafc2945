"""The stack composer: layers x directions around a backend's one-layer runs, written once.

Every backend runs one layer (:meth:`Backend.run_layer`); this module does the rest of a stack
for all of them, in one place:

* the regulariser masks of every layer and direction, drawn once per call from the torch
  generator in a fixed order (layer by layer, forward direction first; within a direction
  input, state, output, zoneout, DropConnect), so a seed gives every backend the same masks; or
  the masks drawn beforehand for a whole sequence (:class:`StackMasks`, streaming in chunks);
* DropConnect: the direction's ``weight_hh`` times its mask, differentiated by autograd;
* variational dropout: each direction's input times its input mask (a backend that fuses the
  directions sees their own inputs), the layer's output times the output masks;
* dropout between layers, in training (drawn with the masks, so that chunks see it too);
* checkpointed backpropagation through time (``Call.checkpoint``): each layer runs in segments
  of that many steps whose activations are recomputed, segment by segment, in the backward pass;
* the final states and gates, per layer and direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from .. import functional as F
from .. import lengths as L
from ..cells.table import SPECS
from ..regularisers import Masks, tensor_mismatch
from . import (
    Backend,
    Call,
    Direction,
    LayerCall,
    LayerResult,
    StackMasks,
    StackResult,
    autocast_dtypes,
    exporting,
)

__all__ = ["auto_checkpoint", "compose", "directions_apart", "draw_masks"]


def _input_features(call: Call, index: int) -> int:
    if index == 0:
        return call.x.shape[-1]
    return sum(d.output_size for d in call.layers[index - 1])


def _mask_args(
    call: Call, index: int, d: Direction, steps: int, batch: int
) -> tuple[Tensor, int, tuple[tuple[int, ...], ...], Tensor | None]:
    """What :meth:`Regularisers.draw` takes for direction ``d`` of layer ``index`` over a
    sequence of ``steps`` x ``batch``: its input's like (no data), output size, state shapes and
    the weight DropConnect masks (None without weight_drop)."""
    regs = d.regularisers
    like = call.x.new_empty(steps, batch, _input_features(call, index))
    w_hh = d.weights.get("weight_hh") if regs.weight_drop else None
    if regs.weight_drop and w_hh is None:
        raise ValueError(
            f"weight_drop = {regs.weight_drop} needs a recurrent weight named weight_hh"
        )
    return like, d.output_size, tuple(tuple(s.shape[1:]) for s in d.state), w_hh


def _between_shapes(call: Call, steps: int, batch: int) -> list[tuple[int, int, int]]:
    """The shapes of the dropout masks between the layers of ``call`` (none outside training or
    without dropout)."""
    if not (call.dropout > 0 and call.training and len(call.layers) > 1):
        return []
    return [(steps, batch, _input_features(call, k)) for k in range(1, len(call.layers))]


def draw_masks(call: Call) -> StackMasks:
    """Every direction's regulariser masks for ``call`` (None where it has none), then the
    dropout masks between its layers (in training), drawn now."""
    steps, batch = call.x.shape[0], call.x.shape[1]
    layers = []
    for index, layer in enumerate(call.layers):
        drawn: list[Masks | None] = []
        for d in layer:
            if not d.regularisers.any:
                drawn.append(None)
                continue
            drawn.append(
                d.regularisers.draw(call.training, *_mask_args(call, index, d, steps, batch))
            )
        layers.append(tuple(drawn))
    between: tuple[Tensor | None, ...] = ()
    p = call.dropout
    shapes = _between_shapes(call, steps, batch)
    if shapes:
        # as F.dropout draws it on the layer's input: bernoulli(1 - p) / (1 - p), per element
        # (p = 1: zeros, drawing nothing)
        between = (
            None,
            *(
                call.x.new_zeros(s) if p == 1.0 else call.x.new_empty(s).bernoulli_(1 - p) / (1 - p)
                for s in shapes
            ),
        )
    return StackMasks(tuple(layers), steps, batch, between=between, training=call.training)


def _chunk(masks: Masks, start: int, steps: int) -> Masks:
    """``masks`` with zoneout's per-step masks cut to the steps [start, start + steps)."""
    if masks.zoneout is None or not isinstance(masks.zoneout[0], Tensor):
        return masks
    return replace(masks, zoneout=tuple(z[start : start + steps] for z in masks.zoneout))


def _check_fit(call: Call, stack: StackMasks) -> None:
    """ValueError unless ``stack`` (a caller's masks) holds the masks this call's layers would
    draw over ``stack.steps`` steps: the same regularisers, shapes, dtype and device."""
    for index, (layer, drawn) in enumerate(zip(call.layers, stack.masks, strict=True)):
        if len(drawn) != len(layer):
            raise ValueError(
                f"masks were drawn for {len(drawn)} directions in layer {index}; this call has "
                f"{len(layer)} (draw them with the draw_masks of the module that runs them)"
            )
        for k, (d, m) in enumerate(zip(layer, drawn, strict=True)):
            args = _mask_args(call, index, d, stack.steps, stack.batch)
            problem = d.regularisers.mismatch(m, call.training, *args)
            if problem:
                where = f"layer {index}" + (f", direction {k}" if len(layer) > 1 else "")
                raise ValueError(
                    f"masks were drawn for another configuration: {problem} ({where}; draw "
                    "them with the draw_masks of the module that runs them)"
                )
    shapes = _between_shapes(call, stack.steps, stack.batch)
    between = [m for m in stack.between[1:] if m is not None] if stack.between else []
    if len(between) != len(shapes):
        raise ValueError(
            f"masks were drawn for another configuration: {len(between)} dropout masks between "
            f"layers; this call has {len(shapes)} (dropout = {call.dropout}, "
            f"{len(call.layers)} layers, {'training' if call.training else 'eval'} mode)"
        )
    for k, (m, shape) in enumerate(zip(between, shapes, strict=True)):
        problem = tensor_mismatch(m, shape, call.x.dtype, call.x.device)
        if problem:
            raise ValueError(
                "masks were drawn for another configuration: the dropout mask between layers "
                f"{k} and {k + 1} {problem}"
            )


def _with_masks(call: Call) -> tuple[list[list[Direction]], list[Tensor | None]]:
    """``call.layers`` with their masks (the call's own, or drawn now) and DropConnect applied,
    and per layer the dropout mask on its input (None: no dropout there), cut to the call's
    steps."""
    stack = call.masks if call.masks is not None else draw_masks(call)
    steps, batch = call.x.shape[0], call.x.shape[1]
    if call.masks is not None:
        if stack.training != call.training:
            mode = {True: "training", False: "eval"}
            raise ValueError(
                f"masks were drawn in {mode[stack.training]} mode; this call runs in "
                f"{mode[call.training]} mode (draw the masks in the mode the module runs in)"
            )
        if stack.batch != batch or len(stack.masks) != len(call.layers):
            raise ValueError(
                f"masks were drawn for {len(stack.masks)} layers and B = {stack.batch}; this call "
                f"has {len(call.layers)} layers and B = {batch}"
            )
        if stack.offset + steps > stack.steps:
            raise ValueError(
                f"masks were drawn for {stack.steps} steps; this chunk runs steps "
                f"{stack.offset}..{stack.offset + steps - 1}"
            )
        _check_fit(call, stack)
    layers = []
    for directions, drawn in zip(call.layers, stack.masks, strict=True):
        out = []
        for d, m in zip(directions, drawn, strict=True):
            if m is None:
                out.append(d)
                continue
            m = _chunk(m, stack.offset, steps)
            weights = d.weights
            if m.weight_hh is not None:
                weights = {**weights, "weight_hh": weights["weight_hh"] * m.weight_hh}
            out.append(replace(d, masks=m, weights=weights))
        layers.append(out)
    between = [
        None if m is None else m[stack.offset : stack.offset + steps]
        for m in stack.between or (None,) * len(layers)
    ]
    return layers, between


def auto_checkpoint(steps: int) -> int:
    """The segment length ``checkpoint="auto"`` means: about sqrt(T)."""
    return max(1, math.ceil(math.sqrt(steps)))


def compose(call: Call, backend: Backend) -> StackResult:
    """Run ``call`` layer by layer on ``backend``."""
    x = call.x
    states: list[list[tuple[Tensor, ...]]] = []
    gates: list[list[tuple[Tensor, ...]]] = []
    out = x
    last: list[Tensor] = [x]
    # Checkpointing saves memory for a backward pass; an exported graph has none (and its T is
    # symbolic: it cannot be cut into segments).
    segment = call.checkpoint if call.request.requires_grad and not exporting() else 0
    if call.lengths is not None and not exporting():
        # Padded steps may hold anything (NaN, inf): zeroed here, no backend reads them, not even
        # as a 0 * NaN in a weight gradient, and their input gradient is exactly 0. The layers
        # above read the outputs below, already zero there.
        x = torch.where(L.mask(call.lengths, x.shape[0]).unsqueeze(-1), x, 0.0)
    layers, between = _with_masks(call)
    for directions, dropped in zip(layers, between, strict=True):
        if dropped is not None:
            x = x * dropped.to(x.dtype)
        inputs = [
            x * d.masks.input if d.masks is not None and d.masks.input is not None else x
            for d in directions
        ]
        layer = LayerCall(call.request, inputs, directions, call.lengths, call.training, call.gates)
        if 0 < segment < x.shape[0]:
            result = _run_checkpointed(backend, layer, segment)
        else:
            result = backend.run_layer(layer)
        out = result.out
        output_masks = [d.masks.output if d.masks is not None else None for d in directions]
        if any(m is not None for m in output_masks):
            ones = [d.state[0].new_ones(d.state[0].shape[0], d.output_size) for d in directions]
            pieces = [m if m is not None else o for m, o in zip(output_masks, ones, strict=True)]
            out = out * torch.cat(pieces, -1)  # (B, D*P): one mask per sequence, every step
        sizes = [d.output_size for d in directions]
        last = list(out.split(sizes, dim=-1)) if len(directions) > 1 else [out]
        states.append(list(result.states))
        if call.gates:
            gates.append(list(result.gates or []))
        x = out
    result = StackResult(out, last, states, gates if call.gates else None)
    return _as_torch_nn(call, result)


def _as_torch_nn(call: Call, result: StackResult) -> StackResult:
    """Under autocast, the output and the final states in the dtypes torch.nn returns for the
    same call (:func:`autocast_dtypes`), whatever dtype the backend computed them in; the gate
    outputs in the output's dtype (an LSTM's ``c`` in the cell state's), on every backend."""
    dtypes = autocast_dtypes(call.request)
    if dtypes is None:
        return result
    h, c = dtypes
    gates = result.gates
    if gates is not None and call.request.mode is not None:
        names = SPECS[call.request.mode].gate_outputs
        gates = [
            [
                tuple(g.to(c if n == "c" else h) for n, g in zip(names, d, strict=True))
                for d in layer
            ]
            for layer in gates
        ]
    if result.out.dtype == h and all(
        s.dtype == (h, c)[min(k, 1)] for layer in result.states for d in layer
        for k, s in enumerate(d)
    ):  # fmt: skip
        return replace(result, gates=gates)
    out = result.out.to(h)
    sizes = [t.shape[-1] for t in result.last]
    last = list(out.split(sizes, dim=-1)) if len(sizes) > 1 else [out]
    states = [
        [tuple(s.to((h, c)[min(k, 1)]) for k, s in enumerate(d)) for d in layer]
        for layer in result.states
    ]
    return StackResult(out, last, states, gates)


# -- checkpointed backpropagation through time ---------------------------------------------------


def _run_checkpointed(backend: Backend, layer: LayerCall, every: int) -> LayerResult:
    """One layer in segments of ``every`` steps: the forward keeps each segment's output and the
    state at its end; the backward recomputes each segment (its input projection included) from
    the state at its start, just before it needs the segment's activations. Each direction runs
    on its own, forward-reading (:func:`directions_apart`), so that the steps can be cut."""
    return directions_apart(layer, lambda x, d: _segments(backend, layer, x, d, every))


#: What :func:`directions_apart` runs for one direction: its input (T, B, I) read forwards and
#: the direction (reverse=False) -> its output, final state and gates (() without gates).
RunDirection = Callable[[Tensor, Direction], tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]]


def directions_apart(layer: LayerCall, run: RunDirection) -> LayerResult:
    """``layer`` with each direction run on its own by ``run``, as a forward-reading one: a
    reversed direction reads its input reversed within each sequence's length (zoneout masks
    likewise) and its output and gates are reversed back; the outputs are joined along the
    features. For a backend or schedule that cannot take the directions together."""
    outs, states, gates = [], [], []
    for x, d in zip(layer.inputs, layer.directions, strict=True):
        reverse = d.reverse
        m = d.masks
        if reverse:
            x = L.reverse_padded(x, layer.lengths)
            if m is not None and m.zoneout is not None and isinstance(m.zoneout[0], Tensor):
                m = replace(m, zoneout=tuple(L.reverse_padded(z, layer.lengths) for z in m.zoneout))
        out, state, g = run(x, replace(d, reverse=False, masks=m))
        if reverse:
            out = L.reverse_padded(out, layer.lengths)
            g = tuple(L.reverse_padded(t, layer.lengths) for t in g)
        outs.append(out)
        states.append(state)
        gates.append(g)
    out = outs[0] if len(outs) == 1 else _cat(outs, dim=-1)
    return LayerResult(out, states, gates if layer.gates else None)


def _segments(
    backend: Backend, layer: LayerCall, x: Tensor, d: Direction, every: int
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One forward-reading direction over ``x`` (T, B, I) in recomputed segments."""
    steps = x.shape[0]
    state = d.state
    outs: list[Tensor] = []
    gates: list[tuple[Tensor, ...]] = []
    # One split, whose backward joins the segments' input gradients in one copy (a slice per
    # segment would fill a zero gradient of the whole input for each: O(T^2 / K) traffic).
    for s0, piece in zip(range(0, steps, every), x.split(every), strict=True):
        s1 = s0 + piece.shape[0]
        lengths = None if layer.lengths is None else (layer.lengths - s0).clamp(0, s1 - s0)
        masks = None if d.masks is None else _chunk(d.masks, s0, s1 - s0)
        part = LayerCall(
            layer.request, [piece], [replace(d, state=state, masks=masks)], lengths,
            layer.training, layer.gates,
        )  # fmt: skip
        result = recompute(backend.run_layer, part, use_reentrant=False)
        outs.append(result.out)
        state = result.states[0]
        if layer.gates:
            gates.append(result.gates[0] if result.gates else ())
    joined = tuple(_cat(parts) for parts in zip(*gates, strict=True)) if gates else ()
    return _cat(outs), tuple(state), joined


def _cat(parts: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` of parts of one dtype, outside autocast: autocast's cat promotes its
    operands' dtypes and fails on float16 ones under bfloat16 autocast on the CPU (a float16
    layer under bf16 autocast, whose kernels return float16 segments)."""
    device = parts[0].device.type
    if not F.autocasting(device):
        return torch.cat(parts, dim)
    with torch.autocast(device, enabled=False):
        return torch.cat(parts, dim)
