"""The cpu backend: fused C++ kernels with hand-written backpropagation through time.

``rnn_kernels.cpp`` runs one layer in one direction over the whole sequence (forward and
backward, lengths and reversal inside the kernel); ``ops.py`` registers it as torch.library
custom ops with autograd; ``build.py`` compiles it at first use. A deep or bidirectional stack is
composed here, one kernel call per layer and direction, with dropout between layers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import Call, Request
from . import build, ops

__all__ = ["CpuBackend"]

_DTYPES = (torch.float32, torch.float64)


class CpuBackend:
    name = "cpu"
    priority = 20
    why = (
        "fused C++ kernels with hand-written BPTT (lengths and reversal in the kernel) are faster "
        "than torch's ops here"
    )

    def check(self, request: Request) -> str | None:
        if request.mode not in ops.MODE_IDS:
            return "a custom cell has no C++ kernel"
        if request.device_type != "cpu":
            return f"the C++ kernels run on the CPU, not on {request.device_type}"
        if request.dtype not in _DTYPES:
            return f"dtype {request.dtype} has no C++ kernel (float32 and float64 do)"
        return build.unavailable()

    def run(self, call: Call) -> tuple[Tensor, Tensor, Tensor | None]:
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
            outs = []
            for d in range(directions):
                k = layer * directions + d
                out, h, c = ops.layer(
                    x,
                    call.h0[k],
                    call.c0[k] if lstm else None,
                    call.weights[k * per : (k + 1) * per],
                    lengths,
                    req.mode,
                    req.reverse != (d == 1),
                    req.bias,
                    req.proj,
                )
                outs.append(out)
                h_n.append(h)
                if lstm:
                    c_n.append(c)
            x = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
        return x, torch.stack(h_n), torch.stack(c_n) if lstm else None
