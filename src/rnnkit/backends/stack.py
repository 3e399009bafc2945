"""The stack composer: layers x directions around a backend's one-layer runs, written once.

Every backend runs one layer (:meth:`Backend.run_layer`); this module does the rest of a stack
for all of them, in one place:

* the regulariser masks of every layer and direction, drawn once per call from the torch
  generator in a fixed order (layer by layer, forward direction first; within a direction
  input, state, output, zoneout, DropConnect), so a seed gives every backend the same masks;
* DropConnect: the direction's ``weight_hh`` times its mask, differentiated by autograd;
* variational dropout: each direction's input times its input mask (a backend that fuses the
  directions sees their own inputs), the layer's output times the output masks;
* dropout between layers, in training;
* the final states and gates, per layer and direction.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.nn import functional as F

from . import Backend, Call, Direction, LayerCall, StackResult

__all__ = ["compose", "draw_masks"]


def draw_masks(call: Call) -> list[list[Direction]]:
    """``call.layers`` with each direction's masks drawn and DropConnect applied to its weights."""
    layers = []
    for index, layer in enumerate(call.layers):
        drawn = []
        for d in layer:
            regs = d.regularisers
            if not regs.any:
                drawn.append(d)
                continue
            features = (
                call.x.shape[-1]
                if index == 0
                else sum(p.output_size for p in call.layers[index - 1])
            )
            like = call.x.new_empty(call.x.shape[0], call.x.shape[1], features)
            w_hh = d.weights.get("weight_hh") if regs.weight_drop else None
            if regs.weight_drop and w_hh is None:
                raise ValueError(
                    f"weight_drop = {regs.weight_drop} needs a recurrent weight named weight_hh"
                )
            sizes = tuple(s.shape[-1] for s in d.state)
            masks = regs.draw(call.training, like, d.output_size, sizes, w_hh)
            weights = d.weights
            if masks.weight_hh is not None:
                weights = {**weights, "weight_hh": weights["weight_hh"] * masks.weight_hh}
            drawn.append(replace(d, masks=masks, weights=weights))
        layers.append(drawn)
    return layers


def compose(call: Call, backend: Backend) -> StackResult:
    """Run ``call`` layer by layer on ``backend``."""
    x = call.x
    states: list[list[tuple[Tensor, ...]]] = []
    gates: list[list[tuple[Tensor, ...]]] = []
    out = x
    last: list[Tensor] = [x]
    for index, directions in enumerate(draw_masks(call)):
        if index and call.dropout > 0 and call.training:
            x = F.dropout(x, call.dropout, True)
        inputs = [
            x * d.masks.input if d.masks is not None and d.masks.input is not None else x
            for d in directions
        ]
        result = backend.run_layer(
            LayerCall(call.request, inputs, directions, call.lengths, call.training, call.gates)
        )
        out = result.out
        output_masks = [d.masks.output if d.masks is not None else None for d in directions]
        if any(m is not None for m in output_masks):
            ones = [torch.ones_like(d.state[0]) for d in directions]
            mask = torch.cat(
                [m if m is not None else o for m, o in zip(output_masks, ones, strict=True)], -1
            )
            out = out * mask  # (B, D*P): one mask per sequence, the same at every step
        sizes = [d.output_size for d in directions]
        last = list(out.split(sizes, dim=-1)) if len(directions) > 1 else [out]
        states.append(list(result.states))
        if call.gates:
            gates.append(list(result.gates or []))
        x = out
    return StackResult(out, last, states, gates if call.gates else None)
