"""The cpu backend: fused C++ kernels with hand-written backpropagation through time.

``rnn_kernels.cpp`` runs one layer in one direction over the whole sequence (forward and
backward, lengths and reversal inside the kernel); ``ops.py`` registers it as torch.library
custom ops with autograd; ``build.py`` compiles it at first use. A deep or bidirectional stack is
composed here, one kernel call per layer and direction, with dropout between layers. The
LayerNorm LSTM and GRU have their own kernels (``layernorm_kernels.cpp``) and glue
(``layernorm.py``), to which check and run hand those two modes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import Call, Request
from . import build, layernorm, ops

__all__ = ["CpuBackend"]

_DTYPES = (torch.float32, torch.float64)


class CpuBackend:
    """Runs every built-in cell and option on the CPU (float32, float64).

    :meth:`slower` names the configurations where BENCHMARKS.md measured torch's own op to be
    as fast or faster (a plain LSTM, on oneDNN): automatic dispatch then skips this backend,
    while ``backend="cpu"`` still runs them.
    """

    name = "cpu"
    priority = 20
    why = (
        "fused C++ kernels with hand-written BPTT, lengths and reversal in the kernel "
        "(measured against torch.nn in BENCHMARKS.md)"
    )

    def check(self, request: Request) -> str | None:
        if request.mode in layernorm.MODE_IDS:
            return layernorm.check(request)
        if request.mode not in ops.MODE_IDS:
            return f"no C++ kernel for {request.mode or 'a custom cell'} yet"
        if request.zoneout or request.state_dropout or request.variational:
            return "the C++ kernels have no zoneout or variational dropout yet"
        if request.gates:
            return "the C++ kernels do not return gates yet"
        if request.device_type != "cpu":
            return f"the C++ kernels run on the CPU, not on {request.device_type}"
        if request.dtype not in _DTYPES:
            return f"dtype {request.dtype} has no C++ kernel (float32 and float64 do)"
        return build.unavailable()

    def slower(self, request: Request) -> str | None:
        """Why automatic dispatch should prefer another backend for ``request``, though this one
        can run it (None: this one measured faster)."""
        if request.mode == "lstm" and request.lengths == "none" and not request.proj:
            return (
                "torch's oneDNN LSTM measured as fast or faster for an LSTM without lengths or "
                "projection (BENCHMARKS.md)"
            )
        return None

    def run(self, call: Call) -> tuple[Tensor, Tensor, Tensor | None]:
        if call.request.mode in layernorm.MODE_IDS:
            return layernorm.run(call)
        req = call.request
        lstm = req.mode == "lstm"
        directions = 2 if req.bidirectional else 1
        per = len(call.weights) // (req.num_layers * directions)
        lengths = call.lengths
        x = call.x
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(req.num_layers):
            if layer and call.dropout > 0 and call.training:
                x = F.dropout(x, call.dropout, True)
            if directions == 2:
                k = 2 * layer
                x, h, c = ops.pair(
                    x,
                    (call.h0[k], call.h0[k + 1]),
                    (call.c0[k], call.c0[k + 1]) if lstm else None,
                    (
                        call.weights[k * per : (k + 1) * per],
                        call.weights[(k + 1) * per : (k + 2) * per],
                    ),
                    lengths,
                    req.mode,
                    req.bias,
                    req.proj,
                )
            else:
                x, h, c = ops.layer(
                    x,
                    call.h0[layer],
                    call.c0[layer] if lstm else None,
                    call.weights[layer * per : (layer + 1) * per],
                    lengths,
                    req.mode,
                    req.reverse,
                    req.bias,
                    req.proj,
                )
                h, c = (h,), (c,)
            h_n += h
            if lstm:
                c_n += c
        return x, torch.stack(h_n), torch.stack(c_n) if lstm else None
