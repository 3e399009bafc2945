"""The export backend: while a model is exported, every layer becomes one portable op.

It is registered with the built-in backends and marked ``first``: while a model is exported
(:func:`rnnkit.backends.exporting`: ``torch.export.export``, ``torch.onnx.export`` with either
exporter) it runs every call it accepts, even on a layer that names another backend, since an
eager backend's kernels (the C++ ops, torch's fused op) have no ONNX lowering, and an exported
graph is the same whichever backend a layer names. Outside export it declines, and the other
backends run the call.

Each layer (both directions at once when they have one size) becomes:

* under ``torch.export.export`` and the TorchScript-based ONNX exporter: one
  ``rnnkit::export_layer`` op (:mod:`rnnkit.backends.export.ops`); the latter lowers it with the
  symbolic of :mod:`rnnkit.backends.export.legacy`;
* under ``torch.onnx.export(..., dynamo=True)``: the ops of :func:`rnnkit.backends.export.dynamo.lower`
  (ONNX's own RNN/GRU/LSTM, or a Scan over the cell's step).

What it declines while exporting, and why: a custom cell (it has no lowering; the reference
backend's loop is traced instead, unrolled over the example's steps, ``lengths=`` an input of
the graph) and gate outputs (for inspection, not for an exported graph). A layer with
regularisers, or a stack with dropout between its layers, in training mode is refused with an
error (their masks are random): export in eval mode, where dropout is a no-op and zoneout its
expectation, which the op computes. The op has no backward: an exported graph is for inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...cells.table import SPECS
from .. import LayerCall, LayerResult, Request, exporting
from . import dynamo, legacy
from .layout import Layout
from .ops import export_layer

__all__ = ["ExportBackend"]

NOT_EXPORTING = (
    "runs only while a model is exported (torch.export.export, torch.onnx.export); eager calls "
    "run on the other backends"
)
TRAINING = (
    "the regularisers draw random masks in training mode; export the model in eval mode "
    "(model.eval()), where dropout is a no-op and zoneout its expectation"
)
#: A stack's dropout between its layers in training mode, refused while exporting (its mask is
#: random) wherever the layers are composed: here for a fused stack, in Stacked for the others.
DROPOUT_BETWEEN = f"dropout between layers: {TRAINING}"


class ExportBackend:
    """One ``rnnkit::export_layer`` op per layer while exporting (see the module docstring)."""

    name = "export"
    priority = 100
    first = True
    eager = False  # never runs an eager call: not a choice for training, evaluating, predicting
    why = "the model is being exported: one rnnkit::export_layer op per layer, lowered to ONNX"

    def check(self, request: Request) -> str | None:
        if not exporting():
            return NOT_EXPORTING
        if request.mode is None:
            return "a custom cell has no export lowering (the reference loop is traced instead)"
        if request.gates:
            return "gate outputs are for inspection; export without return_gates"
        if not request.dtype.is_floating_point:
            return f"dtype {request.dtype} is not floating point"
        return None

    def run_layer(self, layer: LayerCall) -> LayerResult:
        """One op for the layer, or one per direction when the two differ in size."""
        if layer.request.dropout:  # the composer drew random masks between the layers
            raise RuntimeError(DROPOUT_BETWEEN)
        directions = layer.directions
        sizes = {(d.output_size, d.state[-1].shape[-1]) for d in directions}
        groups = [directions] if len(sizes) == 1 else [[d] for d in directions]
        outs, states = [], []
        for group in groups:
            out, h_n, c_n = self._run(layer.inputs[0], group, layer.lengths)
            outs.append(out)
            lstm = SPECS[group[0].mode].has_cell_state  # type: ignore[index]
            states += [(h_n[k], c_n[k]) if lstm else (h_n[k],) for k in range(len(group))]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return LayerResult(out, states)

    def _run(self, x: Tensor, group: list, lengths: Tensor | None) -> tuple[Tensor, ...]:
        first = group[0]
        mode = first.mode
        if len(group) == 2:
            direction = "bidirectional"
        else:
            direction = "reverse" if first.reverse else "forward"
        zoneout: list[float] = []
        for d in group:
            m = d.masks
            zone = m.zoneout if m is not None else None
            drawn = m is not None and (
                any(t is not None for t in (m.input, m.state, m.output, m.weight_hh))
                or any(isinstance(z, Tensor) for z in zone or ())
            )
            if drawn:  # training mode
                raise RuntimeError(f"{d.regularisers.extra_repr()}: {TRAINING}")
            zoneout += list(zone) if zone is not None else [0.0] * len(d.state)
        if not any(zoneout):
            zoneout = []
        h0 = torch.stack([d.state[0] for d in group])  # (D, B, P)
        c0 = torch.stack([d.state[1] for d in group]) if len(first.state) == 2 else None
        bias, proj = "bias_ih" in first.weights, "weight_hr" in first.weights
        names = Layout(mode, direction, bias, proj).names
        weights = [d.weights[n] for d in group for n in names]  # the op's flat order
        args = (
            x, h0, c0, weights, lengths, mode, direction, bias, proj, zoneout, float(first.eps),
        )  # fmt: skip
        if dynamo.active():
            return dynamo.lower(*args)
        if torch.onnx.is_in_onnx_export():
            legacy.register()
        return export_layer(*args)
