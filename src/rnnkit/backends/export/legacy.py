"""The ONNX lowering of ``rnnkit::export_layer`` for the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``): a symbolic, registered when that exporter first
traces a layer (:func:`register`), for opset 14 and later.

* Where ONNX's own RNN, GRU or LSTM computes the layer exactly
  (:func:`rnnkit.backends.export.layout.native_reason`), one such node: the weights reordered into ONNX's
  gate order (constants, which the exporter folds), ``sequence_lens`` = ``lengths``,
  ``direction`` as the op's; then the padded outputs set to 0 and a length-0 sequence's final
  state to its initial state, which the ONNX specification leaves open (see
  :mod:`rnnkit.backends.export.dynamo`).
* Else, per direction, an ONNX Loop over the steps: the input projection of all steps first
  (one MatMul, and its LayerNorm for the LayerNorm cells), then a body that is one step of the
  cell written in ONNX operators (:func:`_step`, the equations of :mod:`rnnkit.functional`),
  zoneout's expectation, and with ``lengths`` the mask (a padded step keeps the state and
  outputs 0). The reverse direction reads each sequence from its own end: a GatherElements
  reverses every sequence within its length, before the loop and after it.

Shapes in the comments: T steps, B batch, I input, G = gates * H, P the size of h.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...cells.table import SPECS
from .layout import NATIVE_OPS, ONNX_GATES, ONNX_PEEPHOLES, Layout, native_reason
from .ops import NAME

__all__ = ["MIN_OPSET", "register", "symbolic"]

#: The lowest opset the symbolic is registered for (Unsqueeze/Squeeze take their axes as
#: inputs, LSTM has its layout attribute); LayerNormalization is used from opset 17.
MIN_OPSET = 14

_registered = False
#: Whether the symbolic uses ONNX's own operators where they are exact (tests set it to False
#: to run every cell through the Loop).
NATIVE = True

_DTYPES = {
    "Float": torch.float32,
    "Double": torch.float64,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
}


def register() -> None:
    """Register :func:`symbolic` with the TorchScript-based exporter (once)."""
    global _registered
    if not _registered:
        torch.onnx.register_custom_op_symbolic(NAME, symbolic, MIN_OPSET)
        _registered = True


class _Graph:
    """The exporter's graph context with the few helpers the lowering needs."""

    def __init__(self, g: Any, dtype: torch.dtype) -> None:
        self.g, self.dtype = g, dtype

    @property
    def opset(self) -> int:
        return int(self.g.opset)

    def op(self, name: str, *inputs: Any, outputs: int = 1, **attrs: Any) -> Any:
        return self.g.op(name, *inputs, outputs=outputs, **attrs)

    def ints(self, *values: int) -> Any:
        return self.g.op("Constant", value_t=torch.tensor(list(values), dtype=torch.int64))

    def scalar(self, value: float | int | bool, dtype: torch.dtype | None = None) -> Any:
        return self.g.op("Constant", value_t=torch.tensor(value, dtype=dtype or self.dtype))

    def none(self) -> Any:
        """An omitted optional input."""
        n = self.g.op("prim::Constant")
        n.setType(torch._C.OptionalType.ofTensor())
        return n

    def block(self, node: Any) -> _Graph:
        """A context that adds nodes to a new block (a subgraph) of ``node``."""
        return _Graph(dataclasses.replace(self.g, block=node.addBlock()), self.dtype)

    # -- shapes and small pieces -----------------------------------------------------------------

    def size(self, x: Any, axis: int) -> Any:
        """``x.shape[axis]`` as an int64 scalar."""
        return self.op("Gather", self.op("Shape", x), self.scalar(axis, torch.int64), axis_i=0)

    def unsqueeze(self, x: Any, *axes: int) -> Any:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def slice(self, x: Any, start: int, end: int, axis: int) -> Any:
        return self.op("Slice", x, self.ints(start), self.ints(end), self.ints(axis))

    def blocks(self, t: Any, size: int, count: int, axis: int) -> list[Any]:
        """The ``count`` blocks of ``size`` along ``axis`` (the gates of a stacked tensor)."""
        return [self.slice(t, k * size, (k + 1) * size, axis) for k in range(count)]

    def transpose(self, w: Any) -> Any:
        return self.op("Transpose", w, perm_i=[1, 0])

    def layer_norm(self, x: Any, gain: Any, bias: Any, eps: float) -> Any:
        """LayerNorm over the last axis, as torch's: gain * (x - mean) / sqrt(var + eps) + bias."""
        if self.opset >= 17:
            return self.op("LayerNormalization", x, gain, bias, axis_i=-1, epsilon_f=eps)
        mean = self.op("ReduceMean", x, axes_i=[-1], keepdims_i=1)
        d = self.op("Sub", x, mean)
        var = self.op("ReduceMean", self.op("Mul", d, d), axes_i=[-1], keepdims_i=1)
        std = self.op("Sqrt", self.op("Add", var, self.scalar(eps)))
        return self.op("Add", self.op("Mul", self.op("Div", d, std), gain), bias)

    def valid(self, lengths: Any, steps: Any) -> Any:
        """(T, B, 1) bool, True at ``t < lengths[b]``."""
        t = self.op(
            "Range", self.scalar(0, torch.int64), steps, self.scalar(1, torch.int64)
        )  # (T,)
        less = self.op("Less", self.unsqueeze(t, 1), self.unsqueeze(lengths, 0))  # (T, B)
        return self.unsqueeze(less, 2)

    def reverse(self, x: Any, lengths: Any | None) -> Any:
        """Each time-major sequence (T, B, F) reversed within its own length; padding stays
        (:func:`rnnkit.lengths.reverse_padded`); a plain flip without lengths."""
        if lengths is None:
            return self.op(
                "Slice", x, self.ints(-1), self.ints(-(2**63)), self.ints(0), self.ints(-1)
            )
        steps = self.size(x, 0)
        t = self.unsqueeze(
            self.op("Range", self.scalar(0, torch.int64), steps, self.scalar(1, torch.int64)), 1
        )  # (T, 1)
        n = self.unsqueeze(lengths, 0)  # (1, B)
        back = self.op("Sub", self.op("Sub", n, self.scalar(1, torch.int64)), t)
        index = self.op("Where", self.op("Less", t, n), back, t)  # (T, B)
        index = self.op("Expand", self.unsqueeze(index, 2), self.op("Shape", x))
        return self.op("GatherElements", x, index, axis_i=0)


def _dtype(value: Any) -> torch.dtype:
    name = value.type().scalarType()
    if name not in _DTYPES:
        raise ValueError(f"the export op got an input of dtype {name}; expected a float dtype")
    return _DTYPES[name]


def _sizes(value: Any) -> list[int]:
    sizes = value.type().sizes()
    if sizes is None or any(s is None for s in sizes):
        raise ValueError("the export op needs weights of known shapes")
    return list(sizes)


def symbolic(
    g: Any,
    x: Any,
    h0: Any,
    c0: Any,
    weights: Any,
    lengths: Any,
    mode: Any,
    direction: Any,
    bias: Any,
    proj: Any,
    zoneout: Any,
    eps: Any,
) -> tuple[Any, Any, Any]:
    """The symbolic of ``rnnkit::export_layer`` (see the module docstring)."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    layout = Layout(
        sh._maybe_get_const(mode, "s"),
        sh._maybe_get_const(direction, "s"),
        bool(sh._maybe_get_const(bias, "b")),
        bool(sh._maybe_get_const(proj, "b")),
    )
    zones = [float(z) for z in sh._maybe_get_const(zoneout, "fs")]
    epsilon = float(sh._maybe_get_const(eps, "f"))
    c0 = None if sh._is_none(c0) else c0
    lengths = None if sh._is_none(lengths) else lengths
    per = layout.split(sh._unpack_list(weights))
    G = _Graph(g, _dtype(x))
    if NATIVE and native_reason(layout, zones, G.dtype) is None:
        return _native(G, x, h0, c0, per, lengths, layout)
    return _loops(G, x, h0, c0, per, lengths, layout, zones, epsilon)


def _onnx_order(G: _Graph, w: Any, mode: str) -> Any:
    """A stacked weight or bias with its gate blocks in ONNX's order."""
    spec = SPECS[mode]
    if spec.family not in ONNX_GATES:
        return w
    blocks = dict(
        zip(
            spec.gates,
            G.blocks(w, _sizes(w)[0] // spec.gate_count, spec.gate_count, 0),
            strict=True,
        )
    )
    return G.op("Concat", *[blocks[n] for n in ONNX_GATES[spec.family]], axis_i=0)


def _stack(G: _Graph, tensors: list[Any]) -> Any:
    return G.op("Concat", *[G.unsqueeze(t, 0) for t in tensors], axis_i=0)


def _native(
    G: _Graph,
    x: Any,
    h0: Any,
    c0: Any | None,
    per: list[dict[str, Any]],
    lengths: Any | None,
    layout: Layout,
) -> tuple[Any, Any, Any]:
    mode, count = layout.mode, len(per)
    spec = SPECS[mode]
    hidden = _sizes(per[0]["weight_hh"])[1]
    W = _stack(G, [_onnx_order(G, d["weight_ih"], mode) for d in per])  # (D, G, I)
    R = _stack(G, [_onnx_order(G, d["weight_hh"], mode) for d in per])  # (D, G, H)
    if layout.bias:
        B = _stack(
            G,
            [
                G.op(
                    "Concat",
                    *[_onnx_order(G, d[n], mode) for n in ("bias_ih", "bias_hh")],
                    axis_i=0,
                )
                for d in per
            ],
        )  # (D, 2G)
    else:
        B = G.none()
    int32 = int(torch._C._onnx.TensorProtoDataType.INT32)
    sequence_lens = G.none() if lengths is None else G.op("Cast", lengths, to_i=int32)
    attrs: dict[str, Any] = {"hidden_size_i": hidden, "direction_s": layout.direction}
    inputs = [x, W, R, B, sequence_lens, h0]
    if spec.family == "rnn":
        attrs["activations_s"] = ["Tanh" if mode == "rnn_tanh" else "Relu"] * count
    elif spec.family == "gru":
        attrs["linear_before_reset_i"] = 1
    else:
        peep = (
            _stack(G, [G.op("Concat", *[d[n] for n in ONNX_PEEPHOLES], axis_i=0) for d in per])
            if spec.peephole
            else G.none()
        )  # (D, 3H)
        inputs += [c0, peep]
    outputs = 3 if c0 is not None else 2
    y, *finals = G.op(NATIVE_OPS[mode], *inputs, outputs=outputs, **attrs)
    y = G.op("Transpose", y, perm_i=[0, 2, 1, 3])  # (T, D, B, H) -> (T, B, D, H)
    out = G.op("Reshape", y, G.ints(0, 0, -1))  # (T, B, D*H)
    if lengths is not None:
        out = G.op("Where", G.valid(lengths, G.size(x, 0)), out, G.scalar(0.0))
        empty = G.unsqueeze(G.op("Equal", lengths, G.scalar(0, torch.int64)), 0, 2)  # (1, B, 1)
        finals = [G.op("Where", empty, s0, s) for s0, s in zip((h0, c0), finals, strict=False)]
    c_n = finals[1] if c0 is not None else G.op("Constant", value_t=torch.zeros(0, dtype=G.dtype))
    return out, finals[0], c_n


def _loops(
    G: _Graph,
    x: Any,
    h0: Any,
    c0: Any | None,
    per: list[dict[str, Any]],
    lengths: Any | None,
    layout: Layout,
    zoneout: list[float],
    eps: float,
) -> tuple[Any, Any, Any]:
    steps = G.size(x, 0)
    valid = None if lengths is None else G.valid(lengths, steps)  # (T, B, 1)
    outs, hs, cs = [], [], []
    for k, (w, reverse, zone) in enumerate(
        zip(per, layout.reverses, layout.zoneouts(zoneout), strict=True)
    ):
        index = G.ints(k)
        h = G.op("Squeeze", G.op("Gather", h0, index, axis_i=0), G.ints(0))  # (B, P)
        c = None if c0 is None else G.op("Squeeze", G.op("Gather", c0, index, axis_i=0), G.ints(0))
        xs = G.reverse(x, lengths) if reverse else x
        out, h_n, c_n = _loop(G, xs, h, c, w, valid, steps, layout.mode, zone, eps)
        outs.append(G.reverse(out, lengths) if reverse else out)
        hs.append(h_n)
        cs.append(c_n)
    out = outs[0] if len(outs) == 1 else G.op("Concat", *outs, axis_i=2)
    h_n = _stack(G, hs)
    c_n = (
        _stack(G, cs) if c0 is not None else G.op("Constant", value_t=torch.zeros(0, dtype=G.dtype))
    )
    return out, h_n, c_n


def _projection(G: _Graph, x: Any, w: dict[str, Any], mode: str, eps: float) -> Any:
    """The input side of every step at once: (T, B, G) = f(x W_ih^T) + b_ih, f = LN or 1."""
    gi = G.op("MatMul", x, G.transpose(w["weight_ih"]))
    if SPECS[mode].layernorm:
        gi = G.layer_norm(gi, w["ln_ih.weight"], w["ln_ih.bias"], eps)
    return G.op("Add", gi, w["bias_ih"]) if "bias_ih" in w else gi


def _loop(
    G: _Graph,
    xs: Any,
    h: Any,
    c: Any | None,
    w: dict[str, Any],
    valid: Any | None,
    steps: Any,
    mode: str,
    zone: tuple[float, ...] | None,
    eps: float,
) -> tuple[Any, Any, Any | None]:
    """One direction as an ONNX Loop over the T steps of ``xs`` (already reversed if it reads
    backwards): ``(out (T, B, P), h_n, c_n)``."""
    gi = _projection(G, xs, w, mode, eps)  # (T, B, G)
    w_hh = G.transpose(w["weight_hh"])  # (P, G), outside the loop
    w_hr = G.transpose(w["weight_hr"]) if "weight_hr" in w else None  # (H, P)
    carried = [h] if c is None else [h, c]
    loop = G.op("Loop", steps, G.scalar(True, torch.bool), *carried, outputs=len(carried) + 1)
    body = G.block(loop[0].node())
    block = body.g.block
    step = block.addInputToBlock()
    step.setType(torch._C.TensorType.create_from_tensor(torch.zeros((), dtype=torch.int64)))
    cond = block.addInputToBlock()
    cond.setType(torch._C.TensorType.create_from_tensor(torch.zeros((), dtype=torch.bool)))
    state = []
    for initial in carried:
        value = block.addInputToBlock()
        value.setType(initial.type())
        state.append(value)
    gi_t = body.op("Gather", gi, step, axis_i=0)  # (B, G)
    new = _step(body, mode, gi_t, state, w, w_hh, w_hr, eps)
    out = new[0]
    if zone is not None:  # eval mode: the expectation p * previous + (1 - p) * new
        new = [
            n
            if z == 0.0
            else body.op(
                "Add",
                body.op("Mul", body.scalar(z), o),
                body.op("Mul", body.scalar(1 - z), n),
            )
            for z, n, o in zip(zone, new, state, strict=True)
        ]
        out = new[0]
    if valid is not None:
        v = body.op("Gather", valid, step, axis_i=0)  # (B, 1)
        new = [body.op("Where", v, n, o) for n, o in zip(new, state, strict=True)]
        out = body.op("Where", v, out, body.scalar(0.0))
    else:
        out = body.op("Identity", out)
    block.registerOutput(body.op("Identity", cond))
    for value in new:
        block.registerOutput(value)
    block.registerOutput(out)
    finals, ys = loop[:-1], loop[-1]
    return ys, finals[0], finals[1] if c is not None else None


def _step(
    G: _Graph,
    mode: str,
    gi: Any,
    state: list[Any],
    w: dict[str, Any],
    w_hh: Any,
    w_hr: Any | None,
    eps: float,
) -> list[Any]:
    """One step of the cell in ONNX operators, from the input side ``gi`` (B, G): the new state
    tensors (h first). The equations are those of :mod:`rnnkit.functional`."""
    spec = SPECS[mode]
    h = state[0]
    gh = G.op("MatMul", h, w_hh)  # (B, G)
    if spec.layernorm:
        gh = G.layer_norm(gh, w["ln_hh.weight"], w["ln_hh.bias"], eps)
    if "bias_hh" in w:
        gh = G.op("Add", gh, w["bias_hh"])
    size = _sizes(w["weight_hh"])[0] // spec.gate_count
    if spec.family == "rnn":
        return [G.op("Tanh" if mode == "rnn_tanh" else "Relu", G.op("Add", gi, gh))]
    if spec.family == "gru":
        i_r, i_z, i_n = G.blocks(gi, size, 3, 1)
        h_r, h_z, h_n = G.blocks(gh, size, 3, 1)
        r = G.op("Sigmoid", G.op("Add", i_r, h_r))
        z = G.op("Sigmoid", G.op("Add", i_z, h_z))
        n = G.op("Tanh", G.op("Add", i_n, G.op("Mul", r, h_n)))
        keep = G.op("Sub", G.scalar(1.0), z)
        return [G.op("Add", G.op("Mul", keep, n), G.op("Mul", z, h))]
    c = state[1]
    i, f, g, o = G.blocks(G.op("Add", gi, gh), size, 4, 1)
    if spec.peephole:
        i = G.op("Add", i, G.op("Mul", w["weight_ci"], c))
        f = G.op("Add", f, G.op("Mul", w["weight_cf"], c))
    i, f, g = G.op("Sigmoid", i), G.op("Sigmoid", f), G.op("Tanh", g)
    c_t = G.op("Add", G.op("Mul", f, c), G.op("Mul", i, g))
    if spec.peephole:
        o = G.op("Add", o, G.op("Mul", w["weight_co"], c_t))
    o = G.op("Sigmoid", o)
    shown = c_t
    if spec.layernorm:
        shown = G.layer_norm(c_t, w["ln_c.weight"], w["ln_c.bias"], eps)
    h_t = G.op("Mul", o, G.op("Tanh", shown))
    if w_hr is not None:
        h_t = G.op("MatMul", h_t, w_hr)
    return [h_t, c_t]
