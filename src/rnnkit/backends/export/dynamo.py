"""The layer's ONNX lowering under ``torch.onnx.export(..., dynamo=True)``.

That exporter translates each op of the traced graph through a table built before the model is
traced, into which a library cannot add its own ops. So, while it traces, the export backend
emits in place of :func:`rnnkit.backends.export.ops.export_layer` the torch ops it translates, with the
same arguments and results (:func:`lower`):

* ONNX's own RNN, GRU or LSTM, through ``torch.onnx.ops.symbolic_multi_out``, where they compute
  the layer exactly (:func:`rnnkit.backends.export.layout.native_reason`): the weights in ONNX's gate
  order (GRU ``zrh`` with ``linear_before_reset=1``, LSTM ``iofc``, peepholes ``P`` in ``iof``),
  ``sequence_lens`` = ``lengths``, ``direction`` forward, reverse or bidirectional (the reverse
  direction reads each sequence from its own end); then the outputs at padded steps are set to 0
  and a length-0 sequence's final state to its initial state, as rnnkit's contract says (the
  ONNX specification leaves both open; onnxruntime zeroes the padded outputs itself, but gives
  a length-0 sequence a final state of zeros);
* else a ``scan`` over the cell's own step (:func:`rnnkit.functional.step`, the reference
  math), which the exporter lowers to an ONNX Scan: with ``lengths``, a padded step keeps the
  state and outputs 0, and the reverse direction reads each sequence from its own end (the
  reversal within each length is a GatherElements).

Both keep T and B dynamic.

An ``ExportedProgram`` of a model (``torch.export.export``) holds the op itself; handed to
``torch.onnx.export``, the op is decomposed into the same lowering (:func:`decompose`, in torch's
decomposition table, which that exporter consults while it translates an ExportedProgram), so
no ``custom_translation_table`` is needed. Outside the ONNX exporter the decomposition declines
and the op stays one op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ... import functional as F
from ... import lengths as L
from ...cells.table import SPECS
from .layout import NATIVE_OPS, ONNX_GATES, ONNX_PEEPHOLES, Layout, native_reason
from .ops import export_layer, fake_export_layer

__all__ = ["active", "decompose", "lower"]


def active() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=True)`` is tracing (it traces with
    ``torch.export``; the TorchScript-based exporter does not)."""
    return bool(torch.onnx.is_in_onnx_export() and torch.compiler.is_exporting())


def lower(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    lengths: Tensor | None,
    mode: str,
    direction: str,
    bias: bool,
    proj: bool,
    zoneout: list[float],
    eps: float,
    constants: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """What :func:`~rnnkit.backends.export.ops.export_layer` computes, as ops the ONNX exporter
    translates: ONNX's own operator where it is exact, else a Scan. ``constants``: whether the
    ops may hold tensor constants (not in a decomposition of an ExportedProgram)."""
    layout = Layout(mode, direction, bias, proj)
    if native_reason(layout, zoneout, x.dtype) is None:
        return _native(x, h0, c0, layout.split(weights), lengths, layout, constants)
    return _scan(x, h0, c0, weights, lengths, layout, zoneout, eps)


def decompose(*args: Any, **kwargs: Any) -> Any:
    """``rnnkit::export_layer`` as :func:`lower`'s ops while ``torch.onnx.export`` translates an
    ExportedProgram that holds it. Anywhere else the op stays one op: fake tensors (whose mode
    reads this table before the op's fake kernel) get that kernel's results, any other caller
    NotImplemented."""
    if torch.onnx.is_in_onnx_export():
        return lower(*args, **kwargs, constants=False)
    if isinstance(args[0], FakeTensor):
        return fake_export_layer(*args, **kwargs)
    return NotImplemented


def _register_decomposition() -> None:
    """Put :func:`decompose` in torch's decomposition table, which ``torch.onnx.export`` reads
    when it is given an ExportedProgram (where a library cannot add to its translation table)."""
    from torch._decomp import decomposition_table, register_decomposition

    op = export_layer._opoverload
    if op not in decomposition_table:
        register_decomposition(op)(decompose)


_register_decomposition()


def _onnx_order(t: Tensor, mode: str, constants: bool = True) -> Tensor:
    """A stacked (G, ...) weight or bias with its gate blocks in ONNX's order: an index the
    exporter folds into the constant, where a chunked reorder would stay in the graph; chunked
    without ``constants`` (a decomposition cannot add the index as a constant)."""
    spec = SPECS[mode]
    if spec.family not in ONNX_GATES:
        return t
    order = [spec.gates.index(g) for g in ONNX_GATES[spec.family]]
    if not constants:
        blocks = t.chunk(spec.gate_count, 0)
        return torch.cat([blocks[k] for k in order])
    return t.unflatten(0, (spec.gate_count, -1))[order].flatten(0, 1)


def _native(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    per: list[dict[str, Tensor]],
    lengths: Tensor | None,
    layout: Layout,
    constants: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    mode, count = layout.mode, len(per)
    steps, batch = x.shape[0], x.shape[1]
    hidden = h0.shape[2]
    W = torch.stack([_onnx_order(d["weight_ih"], mode, constants) for d in per])  # (D, G, I)
    R = torch.stack([_onnx_order(d["weight_hh"], mode, constants) for d in per])  # (D, G, H)
    B = (
        torch.stack(
            [
                torch.cat([_onnx_order(d[n], mode, constants) for n in ("bias_ih", "bias_hh")])
                for d in per
            ]
        )  # (D, 2G)
        if layout.bias
        else None
    )
    sequence_lens = lengths.to(torch.int32) if lengths is not None else None
    attrs: dict[str, Any] = {"hidden_size": hidden, "direction": layout.direction}
    inputs: list[Tensor | None] = [x, W, R, B, sequence_lens, h0]
    family = SPECS[mode].family
    if family == "rnn":
        attrs["activations"] = ["Tanh" if mode == "rnn_tanh" else "Relu"] * count
    elif family == "gru":
        attrs["linear_before_reset"] = 1
    else:
        peep = (
            torch.stack([torch.cat([d[n] for n in ONNX_PEEPHOLES]) for d in per])  # (D, 3H)
            if SPECS[mode].peephole
            else None
        )
        inputs += [c0, peep]
    state = [count, batch, hidden]
    shapes = [[steps, count, batch, hidden], state] + ([state] if c0 is not None else [])
    y, *finals = torch.onnx.ops.symbolic_multi_out(
        NATIVE_OPS[mode], inputs, attrs, dtypes=[x.dtype] * len(shapes), shapes=shapes
    )
    out = y.permute(0, 2, 1, 3).reshape(steps, batch, count * hidden)  # (T, B, D*H)
    if lengths is not None:
        valid = L.mask(lengths, steps).unsqueeze(-1)  # (T, B, 1)
        out = torch.where(valid, out, 0.0)
        empty = (lengths == 0).view(1, -1, 1)  # (1, B, 1): keeps its initial state
        finals = [torch.where(empty, s0, s) for s0, s in zip((h0, c0), finals, strict=False)]
    c_n = finals[1] if c0 is not None else x.new_empty(0)
    return out, finals[0], c_n


def _body(
    layout: Layout, zones: list[tuple[float, ...] | None], masked: bool, eps: float
) -> Callable[..., tuple[Tensor, ...]]:
    """The Scan body, flat as torch's scan operator calls it: ``body(*states, *x_t[, valid_t],
    *weights) -> (*new_states, *out_t)``, every direction side by side (the reverse ones read
    inputs reversed beforehand). Per direction: one step of the cell, zoneout's expectation,
    the mask."""
    count, states, names = len(zones), layout.states, layout.names

    def body(*args: Tensor) -> tuple[Tensor, ...]:
        carries = [args[k * states : (k + 1) * states] for k in range(count)]
        rest = args[count * states :]
        xs, rest = rest[:count], rest[count:]  # (B, I) each
        valid, rest = (rest[0], rest[1:]) if masked else (None, rest)  # (B, 1)
        news, outs = [], []
        for k, (carry, x_t, zone) in enumerate(zip(carries, xs, zones, strict=True)):
            weights = dict(zip(names, rest[k * len(names) : (k + 1) * len(names)], strict=True))
            state = carry if states == 2 else carry[0]
            out, new = F.step(layout.mode, weights, x_t, state, False, eps)[:2]
            new = tuple(new) if states == 2 else (new,)
            if zone is not None:  # eval mode: the expectation p * previous + (1 - p) * new
                new = tuple(
                    n if z == 0.0 else z * o + (1 - z) * n
                    for z, n, o in zip(zone, new, carry, strict=True)
                )
                out = new[0]
            if valid is not None:
                new = tuple(torch.where(valid, n, o) for n, o in zip(new, carry, strict=True))
                out = torch.where(valid, out, 0.0)
            else:
                out = out.clone()  # a scan output may not be a carried state as well
            news += new
            outs.append(out)
        return (*news, *outs)

    return body


def _scan(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    lengths: Tensor | None,
    layout: Layout,
    zoneout: list[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The layer as one torch scan operator (both directions in one loop), which the exporter
    lowers to an ONNX Scan.

    The operator itself is called (``scan_op``, with the weights as its additional inputs,
    everything detached: the graph is for inference): the ``scan`` function in front of it
    compiles the whole loop with torch.compile first, which takes seconds per call."""
    try:
        from torch._higher_order_ops.scan import scan_op
    except ImportError as e:  # pragma: no cover - torch versions without scan
        raise RuntimeError(
            f"exporting {layout.mode} to ONNX needs torch's scan operator, which this torch "
            f"({torch.__version__}) lacks; use the TorchScript-based exporter (dynamo=False)"
        ) from e
    count = len(layout.reverses)
    states = (h0, c0) if c0 is not None else (h0,)
    inits = [s[k].clone() for k in range(count) for s in states]  # views of one tensor alias
    xs = [L.reverse_padded(x, lengths) if r else x for r in layout.reverses]
    if lengths is not None:
        xs.append(L.mask(lengths, x.shape[0]).unsqueeze(-1))  # (T, B, 1)
    constants = tuple(w.detach() for w in weights)
    body = _body(layout, layout.zoneouts(zoneout), lengths is not None, eps)
    # Every operand detached: an input computed from parameters (a Linear's output) would send
    # the operator through its autograd rule when an exporter pass re-runs the graph, and that
    # rule fails on a dynamic batch (it stacks the sizes it saves for backward as outputs).
    results = scan_op(body, [s.detach() for s in inits], [t.detach() for t in xs], constants)
    finals, ys = results[: len(inits)], results[len(inits) :]
    outs = [
        L.reverse_padded(y, lengths) if r else y for y, r in zip(ys, layout.reverses, strict=True)
    ]
    out = outs[0] if count == 1 else torch.cat(outs, dim=-1)
    h_n = torch.stack(list(finals[:: layout.states]))
    c_n = torch.stack(list(finals[1 :: layout.states])) if c0 is not None else x.new_empty(0)
    return out, h_n, c_n
