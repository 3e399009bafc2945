"""The cpu backend: fused C++ kernels with hand-written backpropagation through time.

``rnn_kernels.cpp`` runs one layer in one direction over the whole sequence (forward and
backward, lengths and reversal inside the kernel); ``ops.py`` registers it as torch.library
custom ops with autograd; ``build.py`` compiles it at first use. A deep or bidirectional stack is
composed here, one kernel call per layer and direction, with dropout between layers. The
LayerNorm LSTM and GRU have their own kernels (``layernorm_kernels.cpp``) and glue
(``layernorm.py``), to which check and run hand those two modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import Call, Request
from . import build, layernorm, ops

if TYPE_CHECKING:
    from ...layers.regularisers import Masks

__all__ = ["CpuBackend"]

_DTYPES = (torch.float32, torch.float64)


class CpuBackend:
    """Runs the Elman RNN, LSTM (with projection, with peepholes) and GRU on the CPU (float32,
    float64), with every option: lengths, reversal, bidirectional and deep stacks, gate outputs
    (detached), and the regularisers (variational dropout, state dropout, zoneout, DropConnect).

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
        if request.mode not in ops.KERNELS:
            return f"no C++ kernel for {request.mode or 'a custom cell'} yet"
        if request.device_type != "cpu":
            return f"the C++ kernels run on the CPU, not on {request.device_type}"
        if request.dtype not in _DTYPES:
            return f"dtype {request.dtype} has no C++ kernel (float32 and float64 do)"
        return build.unavailable()

    def slower(self, request: Request) -> str | None:
        """Why automatic dispatch should prefer another backend for ``request``, though this one
        can run it (None: this one measured faster)."""
        # torch's op returns no gates and has no regularisers inside the stack
        native_runs_it = not (
            request.gates or request.variational or request.state_dropout or request.zoneout
        )
        if (
            request.mode == "lstm"
            and request.lengths == "none"
            and not request.proj
            and native_runs_it
        ):
            return (
                "torch's oneDNN LSTM measured as fast or faster for an LSTM without lengths or "
                "projection (BENCHMARKS.md)"
            )
        return None

    def run(self, call: Call) -> tuple:
        """``(output, h_n, c_n)``, plus one tuple of gates per layer and direction when the request
        asks for them: read from the kernel's saved activations, detached (not differentiable).

        Variational dropout (``request.variational``: the masks of ``call.masks`` on each layer's
        input and output) is applied here around the kernels, autograd differentiating the
        multiplies; a caller without it has applied its own masks already. State dropout and
        zoneout run inside the kernels, from the same masks.
        """
        if call.request.mode in layernorm.MODE_IDS:
            return layernorm.run(call)
        req = call.request
        lstm = ops.KERNELS[req.mode][0] == ops.MODE_IDS["lstm"]  # the peephole LSTM too
        directions = 2 if req.bidirectional else 1
        per = len(call.weights) // (req.num_layers * directions)
        masks = _per_direction(call.masks, req.num_layers * directions)
        variational = req.variational
        lengths = call.lengths
        x = call.x
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        gates: list[tuple[Tensor, ...]] = []
        for layer in range(req.num_layers):
            if layer and call.dropout > 0 and call.training:
                x = F.dropout(x, call.dropout, True)
            k = directions * layer
            ms = masks[k : k + directions]
            inputs = [x * m.input if variational and m.input is not None else x for m in ms]
            regs = [_in_kernel(m, call.h0[k], None if call.c0 is None else call.c0[k]) for m in ms]
            if directions == 2:
                out, h, c, g = ops.pair(
                    inputs[0],
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
                    req.gates,
                    x_b=None if inputs[1] is inputs[0] else inputs[1],
                    regularisers=(regs[0], regs[1]),
                )
            else:
                out, h, c, g = ops.layer(
                    inputs[0],
                    call.h0[layer],
                    call.c0[layer] if lstm else None,
                    call.weights[layer * per : (layer + 1) * per],
                    lengths,
                    req.mode,
                    req.reverse,
                    req.bias,
                    req.proj,
                    req.gates,
                    regularisers=regs[0],
                )
                h, c, g = (h,), (c,), (g,)
            if variational and ms[0].output is not None:
                out = out * torch.cat([m.output for m in ms], dim=-1)  # (B, D*P) per sequence
            x = out
            h_n += h
            if lstm:
                c_n += c
            if req.gates:
                gates += g
        result = (x, torch.stack(h_n), torch.stack(c_n) if lstm else None)
        return (*result, tuple(gates)) if req.gates else result


def _in_kernel(masks: Masks | None, h0: Tensor, c0: Tensor | None) -> ops.Regularisers:
    """The state dropout and zoneout masks of one layer and direction as the kernels take them:
    zoneout's bool masks (T, B, n) as 0/1 in the input's dtype, its eval-mode probabilities as
    (n,) vectors."""
    if masks is None:
        return ops.Regularisers()
    zone: list[Tensor | None] = [None, None]
    if masks.zoneout is not None:
        for k, (z, like) in enumerate(zip(masks.zoneout, (h0, c0), strict=False)):
            size = like.shape[-1]
            zone[k] = z.to(h0.dtype) if isinstance(z, Tensor) else h0.new_full((size,), z)
    return ops.Regularisers(masks.state, zone[0], zone[1])


def _per_direction(masks: Any, n: int) -> list[Masks | None]:
    """``call.masks`` as one entry per layer and direction (``Recurrent`` hands one set; it runs
    one layer in one direction)."""
    if masks is None:
        return [None] * n
    return list(masks) if isinstance(masks, list | tuple) else [masks]
