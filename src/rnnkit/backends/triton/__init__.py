"""The triton backend: Triton GPU kernels with hand-written backpropagation through time.

Every built-in cell (Elman tanh/relu, LSTM with or without projection, peephole LSTM, GRU,
LayerNorm LSTM and GRU) runs forward and backward in the kernels of :mod:`.kernels`, registered
as ``torch.library`` custom ops by :mod:`.ops`: lengths (0 included) and reversal inside the
kernel, both directions of a bidirectional layer in one launch, state dropout and zoneout from
the composer's masks (DropConnect and variational dropout the composer applies around it),
gate outputs (detached), float32 and bfloat16/float16 (fp32 accumulation and fp32 state).

The kernel shape follows the size (:func:`.ops.kernel_path`): a persistent kernel (one
program per batch tile loops over all steps, its recurrent weights resident on chip) while one
direction's recurrent weights fit in 64 KiB, else one launch per step beside the host's cuBLAS
GEMM; ``RNNKIT_TRITON_KERNEL=persistent|stepwise`` forces either (``auto`` or unset: by size).
fp32 dots are exact unless ``torch.set_float32_matmul_precision("high")`` allows TF32, as for
torch's own matmuls.
:mod:`.ahead` compiles the kernels for a GPU target on a machine without one.

Triton is optional (``pip install 'rnnkit[gpu]'``): without it the backend declines, naming
that. On CUDA it is chosen after ``native`` (torch's cuDNN op, where that computes the call
exactly) and before ``reference``. With ``TRITON_INTERPRET=1`` set before the kernels are first
used, it accepts float32 CPU tensors, so the conformance suite runs it without a GPU; automatic
dispatch never picks the interpreter, which is far slower than the reference loop.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from ...cells.table import SPECS
from .. import FUNC_TRANSFORMS, JIT_TRACING, Direction, LayerCall, LayerResult, Request

__all__ = ["TritonBackend", "interpreting", "unavailable"]

_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRETER_DTYPES = (torch.float32,)


def unavailable() -> str | None:
    """Why the kernels cannot run at all (None: triton is importable)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'rnnkit[gpu]')"
    return None


def interpreting() -> bool:
    """Whether the kernels run under the Triton interpreter (on CPU tensors): decided by
    TRITON_INTERPRET=1 when the kernels are first defined, and fixed from then on."""
    module = sys.modules.get(f"{__name__}.kernels")
    if module is not None:
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


class TritonBackend:
    """Runs every built-in cell with every option on CUDA devices (float32, bfloat16, float16),
    and on CPU tensors in float32 under the Triton interpreter (for tests)."""

    name = "triton"
    priority = 5  # after native (torch's exact cuDNN op), before reference
    why = (
        "Triton kernels with hand-written BPTT: lengths, reversal, state dropout and zoneout in "
        "the kernel, both directions in one launch"
    )

    def check(self, request: Request) -> str | None:
        missing = unavailable()
        if missing is not None:
            return missing
        if request.mode not in SPECS:
            return f"no Triton kernel for {request.mode or 'a custom cell'}"
        if request.device_type == "cuda":
            dtypes = _CUDA_DTYPES
        elif request.device_type == "cpu":
            if not interpreting():
                return (
                    "the Triton kernels run on CUDA devices, and on the CPU only under the "
                    "Triton interpreter (TRITON_INTERPRET=1)"
                )
            dtypes = _INTERPRETER_DTYPES
        else:
            return f"the Triton kernels run on CUDA devices, not on {request.device_type}"
        if request.dtype not in dtypes:
            where = " under the interpreter" if request.device_type == "cpu" else ""
            return f"dtype {request.dtype} has no Triton kernel{where} ({_names(dtypes)} do)"
        if request.func_transforms:
            return FUNC_TRANSFORMS.format(what="the Triton kernels")
        if request.jit_tracing:
            return JIT_TRACING.format(what="the Triton kernels")
        # A bad RNNKIT_TRITON_KERNEL is an error wherever the kernels could run the call (as a
        # bad RNNKIT_GEMM is for the cpu backend), not only once they do.
        from .ops import forced_kernel

        forced_kernel()
        return None

    def slower(self, request: Request) -> str | None:
        if request.device_type == "cpu":
            return "the Triton interpreter is a test tool, far slower than the reference loop"
        return None

    def run_layer(self, layer: LayerCall) -> LayerResult:
        """One layer: both directions in one op when they have the same weights' shapes (the
        usual bidirectional layer), else one op per direction."""
        directions = layer.directions
        if len(directions) == 2 and not _fusable(*directions):
            parts = [
                self.run_layer(
                    LayerCall(layer.request, [x], [d], layer.lengths, layer.training, layer.gates)
                )
                for x, d in zip(layer.inputs, directions, strict=True)
            ]
            out = torch.cat([p.out for p in parts], dim=-1)
            gates = [p.gates[0] for p in parts] if layer.gates else None  # type: ignore[index]
            return LayerResult(out, [p.states[0] for p in parts], gates)
        return _run(layer)


def _fusable(a: Direction, b: Direction) -> bool:
    return (
        a.mode == b.mode
        and a.eps == b.eps
        and a.weights.keys() == b.weights.keys()
        and all(a.weights[k].shape == b.weights[k].shape for k in a.weights)
        and [s.shape for s in a.state] == [s.shape for s in b.state]
    )


def _stack(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _regularisers(directions: list[Direction], steps: int) -> tuple[Tensor | None, ...]:
    """The in-kernel regularisers of every direction, stacked (D, ...): state_mask (D, B, P);
    zone_h (D, T, B, P) as 0/1 in training or (D, P) probabilities in eval mode, zone_c likewise
    (.., H). A direction without one gets the neutral value (mask 1, zoneout 0)."""
    masks = [d.masks for d in directions]
    state = [m.state if m is not None else None for m in masks]
    state_mask = None
    if any(s is not None for s in state):
        state_mask = _stack(
            [s if s is not None else torch.ones_like(d.state[0]) for s, d in zip(state, directions, strict=True)]
        )  # fmt: skip
    zones = [m.zoneout if m is not None else None for m in masks]
    if all(z is None for z in zones):
        return state_mask, None, None
    training = any(z is not None and isinstance(z[0], Tensor) for z in zones)
    out: list[Tensor | None] = []
    for k in range(len(directions[0].state)):  # h, then c
        per: list[Tensor] = []
        for z, d in zip(zones, directions, strict=True):
            like = d.state[k]
            n = like.shape[-1]
            if z is None:
                shape = (steps, *like.shape) if training else (n,)
                per.append(torch.zeros(shape, dtype=torch.float32, device=like.device))
            elif isinstance(z[k], Tensor):
                per.append(z[k].to(torch.float32))
            else:
                per.append(torch.full((n,), float(z[k]), dtype=torch.float32, device=like.device))
        out.append(_stack(per))
    zone_c = out[1] if len(out) > 1 else None
    return state_mask, out[0], zone_c


def _weights(directions: list[Direction], name: str) -> Tensor | None:
    if name not in directions[0].weights:
        return None
    return _stack([d.weights[name] for d in directions])


def _pair(directions: list[Direction], a: str, b: str) -> Tensor | None:
    """(D, 2, n): a LayerNorm's gain and bias."""
    if a not in directions[0].weights:
        return None
    return _stack([torch.stack([d.weights[a], d.weights[b]]) for d in directions])


def _run(layer: LayerCall) -> LayerResult:
    from . import ops

    directions = layer.directions
    d0 = directions[0]
    mode = d0.mode
    assert mode is not None
    spec = SPECS[mode]
    lstm = spec.has_cell_state
    x = layer.inputs[0]
    x_b = layer.inputs[1] if len(layer.inputs) == 2 and layer.inputs[1] is not x else None
    h0 = _stack([d.state[0] for d in directions])
    c0 = _stack([d.state[1] for d in directions]) if lstm else None
    peep = None
    if spec.peephole:
        peep = _stack(
            [torch.stack([d.weights[n] for n in ("weight_ci", "weight_cf", "weight_co")]) for d in directions]
        )  # fmt: skip
    state_mask, zone_h, zone_c = _regularisers(directions, x.shape[0])
    reverse = sum(1 << k for k, d in enumerate(directions) if d.reverse)
    args = (
        x, x_b, h0, c0, _weights(directions, "weight_ih"), _weights(directions, "weight_hh"),
        _weights(directions, "bias_ih"), _weights(directions, "bias_hh"),
        _weights(directions, "weight_hr"), peep,
        _pair(directions, "ln_ih.weight", "ln_ih.bias"),
        _pair(directions, "ln_hh.weight", "ln_hh.bias"),
        _pair(directions, "ln_c.weight", "ln_c.bias"),
        layer.lengths, state_mask, zone_h, zone_c,
    )  # fmt: skip
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)
    out, h_n, c_n, act, _, _, c, *_ = ops.triton_forward(
        *args, mode, reverse, d0.eps, grad or layer.gates
    )
    states = [(h_n[k], c_n[k]) if lstm else (h_n[k],) for k in range(len(directions))]
    gates = None
    if layer.gates:  # the cell table's gate_outputs, read from the saved activations
        count = len(spec.gate_outputs)
        gates = []
        for k in range(len(directions)):
            parts = [p.to(x.dtype) for p in act[k].split(d0.hidden_size, dim=-1)]  # (T, B, H)
            if lstm:
                parts = [*parts[:4], c[k].to(x.dtype, copy=True)]
            gates.append(tuple(p.contiguous() for p in parts[:count]))
    return LayerResult(out, states, gates)
