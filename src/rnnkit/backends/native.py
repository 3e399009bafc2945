"""The native backend: torch's own fused recurrent ops (oneDNN on CPU, cuDNN on GPU).

Chosen only when the configuration is exactly what those ops compute: a built-in cell, no lengths
or lengths that can be packed (all >= 1), and no single reversed direction with lengths.
"""

from __future__ import annotations

from torch import _VF, Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import Call, Request

_OPS = {"rnn_tanh": _VF.rnn_tanh, "rnn_relu": _VF.rnn_relu, "lstm": _VF.lstm, "gru": _VF.gru}


class NativeBackend:
    name = "native"
    priority = 10
    why = "torch's fused RNN op computes exactly this configuration"

    def check(self, request: Request) -> str | None:
        if request.mode not in _OPS:
            return f"torch has no fused op for {request.mode or 'a custom cell'}"
        if request.zoneout or request.state_dropout or request.variational:
            return "torch's op has no zoneout or variational dropout inside the stack"
        if request.gates:
            return "torch's op does not return its gates"
        if request.lengths == "has_zero":
            return "a length of 0 cannot be packed"
        if request.reverse and request.lengths != "none":
            return "torch has no single reversed direction over packed lengths"
        if not request.dtype.is_floating_point:
            return f"dtype {request.dtype} is not floating point"
        return None

    def run(self, call: Call) -> tuple[Tensor, Tensor, Tensor | None]:
        req = call.request
        op = _OPS[req.mode]
        lstm = req.mode == "lstm"
        hx = [call.h0, call.c0] if lstm else [call.h0]
        args = (
            call.weights,
            req.bias,
            req.num_layers,
            call.dropout,
            call.training,
            req.bidirectional,
        )
        if call.lengths is None:
            x = call.x.flip(0) if req.reverse else call.x
            out, *states = op(x, hx if lstm else hx[0], *args, False)
            if req.reverse:
                out = out.flip(0)
        else:
            steps = call.x.shape[0]
            packed = pack_padded_sequence(call.x, call.lengths.cpu(), enforce_sorted=False)
            order, unorder = packed.sorted_indices, packed.unsorted_indices
            hx = [h.index_select(1, order) for h in hx]
            out, *states = op(packed.data, packed.batch_sizes, hx if lstm else hx[0], *args)
            states = [s.index_select(1, unorder) for s in states]
            out, _ = pad_packed_sequence(
                type(packed)(out, packed.batch_sizes, order, unorder), total_length=steps
            )
        return out, states[0], states[1] if lstm else None
