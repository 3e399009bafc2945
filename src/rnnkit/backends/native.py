"""The native backend: torch's own fused recurrent ops (oneDNN on CPU, cuDNN on GPU).

Chosen only when the layer is exactly what those ops compute: a torch.nn cell (Elman RNN, LSTM
with or without projection, GRU), no regularisers or gates, no lengths or lengths that can be
packed (all >= 1), and no single reversed direction with lengths. It runs one layer per call
(both directions at once), like every backend; the composer stacks the layers.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import _VF, Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import Direction, LayerCall, LayerResult, Request
from .stack import directions_apart

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
        if request.autocast not in (None, request.dtype) and request.dtype != torch.float32:
            return (
                f"torch's op fails on {request.dtype} weights under {request.autocast} autocast "
                "(it converts float32 only)"
            )
        # unpacked, without projection: the calls torch's LSTM op gives to oneDNN
        lstm_in_onednn = request.mode == "lstm" and not request.proj and request.lengths == "none"
        low = request.autocast if request.autocast in (torch.bfloat16, torch.float16) else None
        if lstm_in_onednn and request.device_type == "cpu" and low and not onednn_computes(low):
            name = "bf16" if low == torch.bfloat16 else "fp16"
            return (
                f"torch's LSTM op hands {name} under autocast to oneDNN, which refuses it on this "
                f"CPU (its oneDNN has no {name} here)"
            )
        return _func_transforms_missing(request)

    def run_layer(self, layer: LayerCall) -> LayerResult:
        directions = layer.directions
        if len({(d.output_size, d.state[-1].shape[-1]) for d in directions}) > 1:
            return self._apart(layer)
        mode = directions[0].mode
        assert mode is not None
        op = _OPS[mode]
        lstm = mode == "lstm"
        bidirectional = len(directions) == 2
        reverse = not bidirectional and directions[0].reverse
        # torch's flat weights: per direction w_ih, w_hh[, b_ih, b_hh][, w_hr], the table's order
        weights = [w for d in directions for w in d.weights.values()]
        bias = "bias_ih" in directions[0].weights
        h0 = torch.stack([d.state[0] for d in directions])  # (D, B, P)
        hx = [h0, torch.stack([d.state[1] for d in directions])] if lstm else [h0]
        args = (weights, bias, 1, 0.0, layer.training, bidirectional)
        x = layer.inputs[0]
        if layer.lengths is None or x.shape[1] == 0:  # an empty batch has nothing to pack
            if reverse:
                x = x.flip(0)
            out, *finals = op(x, hx if lstm else hx[0], *args, False)
            if reverse:
                out = out.flip(0)
        else:
            steps = x.shape[0]
            # A segment of a checkpointed call holds the sequences that ended before it with a
            # length of 0 (the request's lengths were all >= 1): they run one step, then keep
            # their initial state and a zero output, as any backend's do.
            ended = layer.lengths == 0
            packed = pack_padded_sequence(x, layer.lengths.clamp(min=1).cpu(), enforce_sorted=False)
            order, unorder = packed.sorted_indices, packed.unsorted_indices
            initial = hx
            hx = [h.index_select(1, order) for h in hx]
            out, *finals = op(packed.data, packed.batch_sizes, hx if lstm else hx[0], *args)
            finals = [s.index_select(1, unorder) for s in finals]
            out, _ = pad_packed_sequence(
                type(packed)(out, packed.batch_sizes, order, unorder), total_length=steps
            )
            out = out.masked_fill(ended.view(1, -1, 1), 0.0)
            finals = [
                torch.where(ended.view(1, -1, 1), s0, s)
                for s0, s in zip(initial, finals, strict=True)
            ]
        states: list[tuple[Tensor, ...]] = [
            tuple(s[k] for s in finals) for k in range(len(directions))
        ]
        return LayerResult(out, states)

    def _apart(self, layer: LayerCall) -> LayerResult:
        """Two directions of different sizes (torch's op takes one size for both): one call
        each, forward-reading (the composer's :func:`~rnnkit.backends.stack.directions_apart`)."""

        def run(x: Tensor, d: Direction) -> tuple[Tensor, tuple[Tensor, ...], tuple[()]]:
            result = self.run_layer(replace(layer, inputs=[x], directions=[d]))
            return result.out, result.states[0], ()

        return directions_apart(layer, run)


@functools.cache
def onednn_computes(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN computes in ``dtype`` (bfloat16 or float16) on this CPU; torch's
    LSTM op under autocast to that dtype sends it the dtype either way, and where oneDNN does
    not compute in it, the op fails."""
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    check = getattr(torch.ops.mkldnn, f"_is_mkldnn_{name}_supported", None)
    return True if check is None else bool(check())


def _func_transforms_missing(request: Request) -> str | None:
    """What torch's op lacks under the :mod:`torch.func` transforms of ``request`` (None: it
    runs under them, as grad and vjp of a padded batch do)."""
    transforms = set(request.func_transforms)
    if not transforms:
        return None
    if transforms - {"grad", "jvp", "vmap", "functionalize"}:
        return "torch.func's transforms are active and torch does not say which"
    if "vmap" in transforms:
        return "torch's fused op has no batching rule for torch.func.vmap"
    if request.lengths != "none":
        return "packing the lengths reads memory that torch.func's transforms hide"
    if "jvp" in transforms and request.mode == "lstm" and request.device_type == "cpu":
        if request.dtype != torch.float64:  # torch runs these on oneDNN
            return f"torch's {request.dtype} CPU LSTM (oneDNN) has no forward-mode derivative"
    return None
