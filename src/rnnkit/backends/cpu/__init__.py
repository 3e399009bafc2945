"""The cpu backend: fused C++ kernels with hand-written backpropagation through time.

``rnn_kernels.cpp`` runs one layer in one direction over the whole sequence (forward and
backward, lengths and reversal inside the kernel), or both directions of a layer at once;
``ops.py`` registers it as torch.library custom ops with autograd; ``build.py`` compiles it at
first use. The stack composer (:mod:`rnnkit.backends.stack`) runs the layers. The LayerNorm
LSTM and GRU have their own kernels (``layernorm_kernels.cpp``) and glue (``layernorm.py``), to
which check and run_layer hand those two modes.
"""

from __future__ import annotations

import torch

from ...cells.table import SPECS
from .. import LayerCall, LayerResult, Request
from . import build, layernorm, ops

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

    def run_layer(self, layer: LayerCall) -> LayerResult:
        """One layer: both directions in one op (each on its own thread) or one direction; state
        dropout and zoneout inside the kernels, from the composer's masks; gates read from the
        kernel's saved activations, detached (not differentiable)."""
        d0 = layer.directions[0]
        mode = d0.mode
        assert mode is not None
        if mode in layernorm.MODE_IDS:
            return layernorm.run_layer(layer)
        lstm = SPECS[mode].has_cell_state
        bias = "bias_ih" in d0.weights
        proj = "weight_hr" in d0.weights
        regs = [ops.in_kernel(d) for d in layer.directions]
        weights = [list(d.weights.values()) for d in layer.directions]
        if (
            len(layer.directions) == 2
            and not layer.directions[0].reverse
            and layer.directions[1].reverse
        ):
            f, b = layer.directions
            x, x_b = layer.inputs
            out, h, c, g = ops.pair(
                x,
                (f.state[0], b.state[0]),
                (f.state[1], b.state[1]) if lstm else None,
                (weights[0], weights[1]),
                layer.lengths,
                mode,
                bias,
                proj,
                layer.gates,
                x_b=None if x_b is x else x_b,
                regularisers=(regs[0], regs[1]),
            )
            states = [(h[0], c[0]) if lstm else (h[0],), (h[1], c[1]) if lstm else (h[1],)]
            return LayerResult(out, states, list(g) if g is not None else None)
        outs, states, gates = [], [], []
        for x, d, w, r in zip(layer.inputs, layer.directions, weights, regs, strict=True):
            out, h, c, g = ops.layer(
                x, d.state[0], d.state[1] if lstm else None, w, layer.lengths, mode, d.reverse,
                bias, proj, layer.gates, regularisers=r,
            )  # fmt: skip
            outs.append(out)
            states.append((h, c) if lstm else (h,))
            gates.append(g)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return LayerResult(out, states, gates if layer.gates else None)
