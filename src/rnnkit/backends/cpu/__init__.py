"""The cpu backend: fused C++ kernels with hand-written backpropagation through time.

The kernels run one layer of any built-in cell over the whole sequence (forward and backward,
lengths, reversal and the in-step regularisers inside the kernel), one direction or both
directions of a bidirectional layer at once: ``driver.h`` is the one forward and one backward
driver, ``cells.h`` the cells as its policies, ``ops.cpp`` the op entries; ``ops.py`` registers
them as torch.library custom ops with autograd; ``build.py`` compiles them at first use. The
stack composer (:mod:`rnnkit.backends.stack`) runs the layers.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor

from ...cells.table import SPECS
from .. import FUNC_TRANSFORMS, JIT_TRACING, LayerCall, LayerResult, Request, accepts
from . import build, dispatch, gemm, ops

__all__ = [
    "CpuBackend",
    "denormals_flushed",
    "flush_denormals",
    "gemm_plan",
    "release_memory",
    "scratch_memory",
]

#: The dtypes the kernels compute in; bfloat16 and float16 layers run in float32 inside (their
#: GEMMs in bfloat16 where the CPU has bf16 instructions) and return their own dtype.
_DTYPES = (torch.float32, torch.float64)
_WIDENED = (torch.bfloat16, torch.float16)


def gemm_plan(request: Request) -> gemm.Plan:
    """Where the GEMMs of ``request`` come from and in which precision: bfloat16 operands for a
    bfloat16 layer or under bfloat16 autocast (where the CPU has bf16 instructions), float32
    otherwise; the sources by measurement (:mod:`.gemm`)."""
    low = request.dtype == torch.bfloat16 or (
        request.dtype == torch.float32 and request.autocast == torch.bfloat16
    )
    spec = SPECS[request.mode]  # type: ignore[index]
    return gemm.plan(
        request.steps, request.batch, request.input_size, request.hidden_size, spec.gate_count,
        low,
    )  # fmt: skip


def scratch_memory() -> tuple[int, int]:
    """(bytes kept, limit) of the kernels' scratch pool: the large arrays of a call (the input
    projection and gate gradients of every step, what the forward saves for backward) are kept
    between calls and reused, so that a training step does not fault in fresh pages each time.
    The limit comes from ``RNNKIT_CPU_SCRATCH_MB`` (default 1024; 0: keep nothing)."""
    build.ensure()
    kept, limit = torch.ops.rnnkit_cpu.scratch_memory(-1)
    return int(kept), int(limit)


#: The largest limit_mb of :func:`release_memory`: its bytes fit the kernels' int64.
_MAX_LIMIT_MB = (2**63 - 1) >> 20


def release_memory(limit_mb: float | None = None) -> None:
    """Frees what the kernels' scratch pool keeps (as ``torch.cuda.empty_cache`` does for CUDA);
    with ``limit_mb``, also sets how much it may keep from now on (0: nothing)."""
    if build.unavailable() is not None:
        return
    new = None
    if limit_mb is not None:
        if isinstance(limit_mb, bool) or not isinstance(limit_mb, numbers.Real):
            raise TypeError(f"limit_mb = {limit_mb!r}; expected a number of megabytes >= 0")
        if not 0 <= limit_mb <= _MAX_LIMIT_MB:  # NaN and inf included
            raise ValueError(
                f"limit_mb = {limit_mb}; expected a number >= 0 (at most {_MAX_LIMIT_MB})"
            )
        new = int(limit_mb * (1 << 20))
    _, limit = scratch_memory()
    torch.ops.rnnkit_cpu.scratch_memory(0)
    torch.ops.rnnkit_cpu.scratch_memory(limit if new is None else new)


def flush_denormals(on: bool) -> bool:
    """Treat subnormal floats as zero (FTZ and DAZ) on every thread of torch's CPU thread pool
    and the calling thread (``on``), or compute on them again; returns whether the calling
    thread flushed before, for restoring. ``torch.set_flush_denormal`` reaches the calling thread
    alone, while the other threads of a parallel op keep computing on subnormals, each operation
    on one up to ~100x slower: a model that has trained for a while produces them (its softmaxes
    grow confident), and one late in training measured 1.9x slower per step than the same model
    at its start. Values below 1.2e-38 (float32) then read as zero. Where the kernels cannot be
    built, only the calling thread is set (``torch.set_flush_denormal``), and what it did before
    is found by computing a subnormal on it."""
    if build.unavailable() is None:  # builds the kernels at first use
        return bool(torch.ops.rnnkit_cpu.flush_denormals(bool(on)))
    before = _flushing_here()
    torch.set_flush_denormal(bool(on))
    return before


def _flushing_here() -> bool:
    """Whether the calling thread flushes subnormals (FTZ or DAZ): half the smallest normal
    float32, computed on it (one element: no other thread takes part), comes out as zero."""
    with torch.no_grad():
        tiny = torch.full((1,), torch.finfo(torch.float32).tiny, dtype=torch.float32)
        return bool((tiny * 0.5 == 0).item())


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """:func:`flush_denormals` on inside, the calling thread's setting restored after."""
    before = flush_denormals(True)
    try:
        yield
    finally:
        flush_denormals(before)


class CpuBackend:
    """Runs every built-in cell (the Elman RNN, the LSTM with projection or peepholes, the GRU,
    the LayerNorm LSTM and GRU) on the CPU (float32, float64), with every option: lengths,
    reversal, bidirectional and deep stacks, gate outputs (detached), and the regularisers
    (variational dropout, state dropout, zoneout, DropConnect).

    :meth:`slower` names the configurations where torch's own op measured faster (the
    crossovers of :mod:`.dispatch`, by shape, precision and mode): automatic dispatch then
    skips this backend, while ``backend="cpu"`` still runs them.
    """

    name = "cpu"
    priority = 20
    why = (
        "fused C++ kernels with hand-written BPTT, lengths and reversal in the kernel "
        "(measured against torch.nn in BENCHMARKS.md)"
    )

    def check(self, request: Request) -> str | None:
        if request.mode not in SPECS:
            return f"no C++ kernel for {request.mode or 'a custom cell'} yet"
        if request.device_type != "cpu":
            return f"the C++ kernels run on the CPU, not on {request.device_type}"
        if request.dtype not in _DTYPES + _WIDENED:
            return (
                f"dtype {request.dtype} has no C++ kernel (float32, float64, and bfloat16 and "
                "float16 through float32 do)"
            )
        if request.func_transforms:
            return FUNC_TRANSFORMS.format(what="the C++ kernels")
        if request.jit_tracing:
            return JIT_TRACING.format(what="the C++ kernels")
        return build.unavailable()

    def details(self, request: Request) -> str:
        """The call's GEMM plan, for :func:`rnnkit.explain`."""
        return str(gemm_plan(request))

    def slower(self, request: Request) -> str | None:
        """Why automatic dispatch should prefer torch's own op for ``request``, though this
        backend can run it: where it measured faster at the nearest measured shape
        (:mod:`.dispatch`). None: this backend measured faster, or torch's op cannot run it.
        A bad ``RNNKIT_GEMM`` or ``RNNKIT_SPLIT`` is an error here too, where the call then goes
        to torch's op, as it is where the kernels run it."""
        gemm.forced()
        gemm.forced_split()
        # the calls the table measured (no projection) that torch's op, as registered, runs
        if request.proj or not accepts("native", request):
            return None
        low = request.dtype == torch.bfloat16 or request.autocast == torch.bfloat16
        precision = "bf16" if low and gemm.bf16_supported() else "fp32"
        if precision == "bf16" and gemm_plan(request).step == "onednn":
            precision = "bf16-onednn"  # measured apart: its bf16 step is the fastest here
        mode = "rnn_tanh" if request.mode == "rnn_relu" else request.mode
        shape = (request.steps, request.batch, request.input_size, request.hidden_size)
        lengths = request.lengths != "none"
        point = dispatch.nearest(mode, lengths, precision, request.requires_grad, shape)  # type: ignore[arg-type]
        if point is None or point.ratio >= 1.0:
            return None
        kind = "training" if request.requires_grad else "inference"
        measured = dispatch.deciding(mode, lengths, precision, request.requires_grad)
        where = "BENCHMARKS.md" if measured is None else measured.describe()
        return (
            f"torch's fused op measured faster for {request.mode} {precision} {kind}"
            f"{' with lengths' if lengths else ''} at the nearest measured shape (T{point.steps} "
            f"B{point.batch} I{point.input_size} H{point.hidden}: the cpu kernels at "
            f"{point.ratio:.2f}x torch.nn; {where})"
        )

    def run_layer(self, layer: LayerCall) -> LayerResult:
        """One layer in one op: both directions at once (each on its own thread) or one; state
        dropout and zoneout inside the kernels, from the composer's masks; gates read from the
        kernel's saved activations, detached (not differentiable)."""
        first = layer.directions[0]
        spec = SPECS[first.mode]  # type: ignore[index]
        plan = gemm_plan(layer.request)
        x = layer.inputs[0]
        dtype = x.dtype
        # bfloat16 / float16 layers: float32 inside (autograd converts the gradients back)
        wide = (lambda t: t.float()) if dtype in _WIDENED else (lambda t: t)
        inputs = [wide(x)] if all(i is x for i in layer.inputs) else [wide(i) for i in layer.inputs]
        empty = inputs[0].new_empty(0)
        states = [wide(s) for d in layer.directions for s in d.state]
        weights = [
            wide(d.weights[n]) if n in d.weights else empty
            for d in layer.directions
            for n in spec.weights
        ]
        masks = [wide(m) for d in layer.directions for m in ops.masks(d, empty)]
        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (*inputs, *states, *weights)
        )
        reverse = [d.reverse for d in layer.directions]
        # Eager calls on plain tensors run the C++ ops under a plain autograd.Function (the
        # custom op's wrapper costs more than a small layer's whole kernel); tracing, tensor
        # subclasses (fake, functional) and functorch's transforms go through the custom op.
        eager = (
            type(inputs[0]) is Tensor
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
        )
        forward = ops.eager_layer_forward if eager else ops.layer_forward
        r = forward(
            inputs, states, weights, masks, layer.lengths, spec.kernel_id, reverse, first.eps,
            grad or layer.gates, *plan.args(),
        )  # fmt: skip
        ns, per = len(spec.states), 1 + len(spec.states) + len(ops.SAVED)
        runs = [r[d * per : (d + 1) * per] for d in range(len(reverse))]
        out = torch.cat([run[0] for run in runs], dim=-1) if len(runs) > 1 else runs[0][0]
        finals = [tuple(run[1 : 1 + ns]) for run in runs]
        if dtype in _WIDENED:
            out = out.to(dtype)
            finals = [tuple(s.to(dtype) for s in f) for f in finals]
        if not layer.gates:
            return LayerResult(out, finals)
        act, c = ops.SAVED.index("act"), ops.SAVED.index("c")
        gates = [ops.gates(spec, run[1 + ns + act], run[1 + ns + c]) for run in runs]
        if dtype in _WIDENED:
            gates = [tuple(g.to(dtype) for g in gs) for gs in gates]
        return LayerResult(out, finals, gates)
