"""The triton backend beyond the conformance suite: where dispatch sends a call on a GPU, what
it says without triton or a GPU, the one-launch-per-step kernels at shapes with several
batch and hidden tiles, the custom ops (opcheck), and that the kernels compile for a GPU.

The tests that run the kernels need ``TRITON_INTERPRET=1`` set before the kernels are first
used (CI runs ``TRITON_INTERPRET=1 python -m pytest tests/test_conformance.py
tests/test_triton.py -k triton``); the compile test needs triton without the interpreter.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL
from torch.utils._pytree import tree_leaves

import rnnkit
from rnnkit import backends
from rnnkit.backends import Request
from rnnkit.backends import triton as triton_backend
from rnnkit.backends.triton import ops
from rnnkit.cells.table import SPECS

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and triton_backend.interpreting()),
    reason="runs the kernels on the CPU: needs TRITON_INTERPRET=1",
)
needs_compiler = pytest.mark.skipif(
    not HAS_TRITON or triton_backend.interpreting(),
    reason="compiles for a GPU: needs triton without TRITON_INTERPRET=1",
)


def _cuda(mode: str | None, **kw) -> Request:
    return Request(mode=mode, device_type="cuda", **kw)


# -- dispatch ------------------------------------------------------------------------------------


def test_declines_without_triton(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    reason = triton_backend.TritonBackend().check(_cuda("lstm_layernorm"))
    assert reason == "Triton is not installed (pip install 'rnnkit[gpu]')"
    with pytest.raises(rnnkit.BackendUnavailable, match=r"'triton' cannot run this call: Triton"):
        backends.select(_cuda("lstm_layernorm"), "triton")
    backend, choice = backends.select(_cuda("lstm_layernorm"), "auto")
    assert backend.name == "reference"
    assert "not triton: Triton is not installed" in choice.reason


@needs_triton
@pytest.mark.parametrize(
    ("request_", "chosen", "says"),
    [
        (_cuda("lstm"), "native", "torch's fused RNN op computes exactly"),
        (_cuda("lstm", lengths="positive", bidirectional=True), "native", "exactly"),
        (_cuda("gru", lengths="has_zero"), "triton", "not native: a length of 0 cannot be packed"),
        (_cuda("lstm", zoneout=True), "triton", "not native: torch's op has no zoneout"),
        (_cuda("rnn_tanh", gates=True), "triton", "not native: torch's op does not return"),
        (_cuda("lstm_layernorm"), "triton", "not native: torch has no fused op"),
        (_cuda("lstm_peephole", dtype=torch.bfloat16), "triton", "hand-written BPTT"),
        (_cuda("gru_layernorm", dtype=torch.float16), "triton", "hand-written BPTT"),
        (_cuda(None), "reference", "not triton: no Triton kernel for a custom cell"),
        (
            _cuda("lstm_layernorm", func_transforms=("grad",)),
            "reference",
            "not triton: torch.func's transforms (grad, vjp, jvp, vmap) cannot see through the "
            "Triton kernels",
        ),
        (
            _cuda("gru", lengths="has_zero", dtype=torch.float64),
            "reference",
            "not triton: dtype torch.float64 has no Triton kernel (float32, bfloat16, float16 do)",
        ),
        (
            Request(mode="lstm_layernorm", device_type="mps"),
            "reference",
            "not triton: the Triton kernels run on CUDA devices, not on mps",
        ),
    ],
)
def test_dispatch_on_a_gpu_prefers_native_then_triton_then_reference(
    request_: Request, chosen: str, says: str
) -> None:
    backend, choice = backends.select(request_, "auto")
    assert backend.name == chosen
    assert says in choice.reason


@needs_triton
def test_on_the_cpu_triton_runs_only_under_the_interpreter(monkeypatch) -> None:
    backends.available()  # the built-ins registered; then all but the C++ kernels
    keep = {k: v for k, v in backends._registry.items() if k in ("reference", "native", "triton")}
    monkeypatch.setattr(backends, "_registry", keep)
    request = Request(mode="lstm_layernorm", device_type="cpu")
    reason = triton_backend.TritonBackend().check(request)
    if triton_backend.interpreting():
        assert reason is None
        bf16 = Request(mode="lstm_layernorm", device_type="cpu", dtype=torch.bfloat16)
        assert triton_backend.TritonBackend().check(bf16) == (
            "dtype torch.bfloat16 has no Triton kernel under the interpreter (float32 do)"
        )
    else:
        assert reason == (
            "the Triton kernels run on CUDA devices, and on the CPU only under the Triton "
            "interpreter (TRITON_INTERPRET=1)"
        )
    # automatic dispatch never picks the interpreter, which is slower than the Python loop
    backend, choice = backends.select(request, "auto")
    assert backend.name == "reference"
    slower = "the Triton interpreter is a test tool, far slower than the reference loop"
    assert f"not triton: {slower if reason is None else reason}" in choice.reason


def test_kernel_shape_follows_the_weights_size(monkeypatch) -> None:
    monkeypatch.delenv(ops.KERNEL_ENV, raising=False)
    f32, bf16 = torch.float32, torch.bfloat16
    assert ops.kernel_path("lstm", 64, 64, False, f32) == "persistent"  # 4 * 64 * 64 * 4 B
    assert ops.kernel_path("lstm", 65, 65, False, f32) == "stepwise"
    assert ops.kernel_path("lstm", 256, 256, False, bf16) == "stepwise"
    assert ops.kernel_path("rnn_tanh", 128, 128, False, bf16) == "persistent"
    assert ops.kernel_path("rnn_tanh", 128, 128, False, f32) == "stepwise"  # exact fp32 dots
    monkeypatch.setenv(ops.KERNEL_ENV, "stepwise")
    assert ops.kernel_path("lstm", 5, 5, False, f32) == "stepwise"


@needs_triton
def test_a_bad_forced_kernel_shape_is_one_error_wherever_the_kernels_could_run(
    monkeypatch,
) -> None:
    """As RNNKIT_GEMM: read without case or spaces, "auto" leaves the choice to the size, and
    any other value is an error as soon as the backend could take the call, named or not."""
    f32 = torch.float32
    monkeypatch.setenv(ops.KERNEL_ENV, "auto")
    assert ops.kernel_path("lstm", 65, 65, False, f32) == "stepwise"
    monkeypatch.setenv(ops.KERNEL_ENV, " Persistent ")
    assert ops.kernel_path("lstm", 65, 65, False, f32) == "persistent"
    monkeypatch.setenv(ops.KERNEL_ENV, "fast")
    expected = (
        r"^RNNKIT_TRITON_KERNEL = 'fast'; "
        r"expected one of \('auto', 'persistent', 'stepwise'\)$"
    )
    for run in (
        lambda: ops.kernel_path("lstm", 5, 5, False, f32),
        lambda: triton_backend.TritonBackend().check(_cuda("lstm")),
        lambda: backends.select(_cuda("lstm"), "triton"),
    ):
        with pytest.raises(ValueError, match=expected):
            run()
    # Where the kernels cannot run the call, the variable is not theirs to read.
    assert "no Triton kernel" in triton_backend.TritonBackend().check(_cuda(None))


def test_the_op_checks_every_argument() -> None:
    T, B, I, H = 3, 4, 2, 5
    x = torch.randn(T, B, I)
    good = dict(
        x=x, x_b=None, h0=torch.zeros(1, B, H), c0=torch.zeros(1, B, H),
        w_ih=torch.randn(1, 4 * H, I), w_hh=torch.randn(1, 4 * H, H), b_ih=None, b_hh=None,
        w_hr=None, peep=None, ln_ih=None, ln_hh=None, ln_c=None, lengths=None,
        state_mask=None, zone_h=None, zone_c=None, mode="lstm", reverse=0, eps=1e-5, save=False,
    )  # fmt: skip
    bad = {
        "h0": (torch.zeros(1, B, H + 1), r"h0 has shape \(1, 4, 6\); expected \(1, 4, 5\)"),
        "c0": (None, "c0 is required for mode 'lstm'"),
        "lengths": (torch.tensor([3, 1, 0, 2], dtype=torch.int32), "lengths has dtype torch.int32"),
        "w_ih": (torch.randn(1, 4 * H, I).double(), r"w_ih has dtype torch.float64; expected"),
        "zone_h": (torch.zeros(1, T, B), r"zone_h has shape \(1, 3, 4\); expected"),
        "mode": ("lstm_tanh", "mode = 'lstm_tanh' has no Triton kernel"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            ops.triton_forward(**{**good, name: value})


# -- the kernels, under the interpreter ------------------------------------------------------------


def _run(module, x, state, lengths, backend: str):
    torch.manual_seed(5)  # the same regulariser masks for every backend
    with rnnkit.use_backend(backend):
        out, final = module(x, state, lengths=lengths)
    values = [out, *tree_leaves(final)]
    g = torch.Generator().manual_seed(2)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in values)
    inputs = [x, *tree_leaves(state), *module.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return values, [
        torch.zeros_like(t) if d is None else d for d, t in zip(grads, inputs, strict=True)
    ]


def _bidirectional(cell, **regs) -> rnnkit.Bidirectional:
    torch.manual_seed(0)
    return rnnkit.Bidirectional(
        rnnkit.Recurrent(cell(), **regs), rnnkit.Recurrent(cell(), reverse=True, **regs)
    )


# wide enough for two hidden tiles (64 columns each) and two batch tiles (16 rows each)
T, B, I, H = 3, 18, 4, 70
LENGTHS = [3, 0, 1, 2] * 4 + [3, 3]
WIDE = {
    "lstm": lambda: rnnkit.LSTMCell(I, H),
    "lstm_proj": lambda: rnnkit.LSTMCell(I, H, proj_size=20),
    "lstm_peephole": lambda: rnnkit.PeepholeLSTMCell(I, H),
    "gru": lambda: rnnkit.GRUCell(I, H),
    "rnn_relu": lambda: rnnkit.RNNCell(I, H, nonlinearity="relu"),
    "gru_layernorm": lambda: rnnkit.LayerNormGRUCell(I, H),
    "lstm_layernorm": lambda: rnnkit.LayerNormLSTMCell(I, H),
}


@needs_interpreter
@pytest.mark.parametrize(
    ("cell", "kernel"),
    # the persistent kernel: its wide tiles for a projection and a LayerNorm row (the rest of
    # it is the conformance suite's)
    [(cell, "stepwise") for cell in WIDE]
    + [("lstm_proj", "persistent"), ("gru_layernorm", "persistent")],
)
def test_wide_layers_equal_the_reference(monkeypatch, cell: str, kernel: str) -> None:
    """Both kernel shapes over several batch and hidden tiles, lengths with zeros, both
    directions, state dropout and zoneout in training."""
    monkeypatch.setenv(ops.KERNEL_ENV, kernel)
    module = _bidirectional(WIDE[cell], dropout_state=0.3, zoneout=0.2).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g, requires_grad=True)
    sizes = module.forward_layer.cell.state_sizes
    state = tuple(
        tuple(torch.randn(B, n, generator=g).requires_grad_() for n in sizes) for _ in range(2)
    )
    state = tuple(s if len(s) > 1 else s[0] for s in state)
    lengths = torch.tensor(LENGTHS)
    ref_values, ref_grads = _run(module, x, state, lengths, "reference")
    values, grads = _run(module, x, state, lengths, "triton")
    for v, r in zip(values, ref_values, strict=True):
        torch.testing.assert_close(v, r, atol=OUT_TOL, rtol=OUT_TOL)
    for d, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(d, r, atol=GRAD_TOL, rtol=GRAD_TOL)


def _op_args(mode: str, proj: int = 0, directions: int = 2, zone: str = "train"):
    spec = SPECS[mode]
    g = torch.Generator().manual_seed(0)
    T, B, I, H, D = 3, 5, 2, 4, directions
    P, G = proj or H, spec.gate_count * H
    lstm = spec.has_cell_state

    def r(*shape: int, grad: bool = True) -> torch.Tensor:
        return (0.5 * torch.randn(*shape, generator=g)).requires_grad_(grad)

    zone_h = zone_c = None
    if zone == "train":
        zone_h = (torch.rand(D, T, B, P, generator=g) < 0.3).float()
        zone_c = (torch.rand(D, T, B, H, generator=g) < 0.3).float() if lstm else None
    elif zone == "eval":
        zone_h = torch.full((D, P), 0.25)
        zone_c = torch.full((D, H), 0.25) if lstm else None
    ln = spec.layernorm
    return (
        r(T, B, I), r(T, B, I) if D == 2 else None, r(D, B, P), r(D, B, H) if lstm else None,
        r(D, G, I), r(D, G, P), r(D, G), r(D, G), r(D, P, H) if proj else None,
        r(D, 3, H) if spec.peephole else None, r(D, 2, G) if ln else None,
        r(D, 2, G) if ln else None, r(D, 2, H) if ln and lstm else None,
        torch.tensor([3, 0, 1, 2, 3]), (torch.rand(D, B, P, generator=g) < 0.7).float() / 0.7,
        zone_h, zone_c, mode, 2 if D == 2 else 0, 1e-5, True,
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize(
    ("mode", "proj", "directions", "zone"),
    [("lstm_peephole", 3, 2, "train"), ("gru_layernorm", 0, 1, "eval")],
)
def test_opcheck(mode: str, proj: int, directions: int, zone: str) -> None:
    """Schema, fake kernels, autograd registration and AOT dispatch of both custom ops."""
    args = _op_args(mode, proj, directions, zone)
    torch.library.opcheck(ops.triton_forward, args)
    out = ops.triton_forward(*args)
    grads = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])]
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    backward_args = (
        *grads, *(detached[k] for k in (0, 1, 2, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16)),
        *(t.detach() for t in out[3:]), mode, args[18], 1e-5, True, True,
    )  # fmt: skip
    torch.library.opcheck(ops.triton_backward, backward_args)


# -- the kernels, compiled for a GPU ---------------------------------------------------------------


@needs_compiler
@pytest.mark.parametrize(
    ("mode", "hidden", "proj", "dtype", "kernels"),
    [
        # the peephole terms of d c_{t-1} once crashed LLVM's SLP vectoriser for sm_90
        ("lstm_peephole", 16, 0, torch.float32, 2),
        # stepwise with a projection: the host projects (an in-kernel W_hr spilled 16 KB)
        ("lstm", 512, 256, torch.bfloat16, 4),
        ("gru_layernorm", 100, 0, torch.float32, 2),
    ],
)
def test_kernels_compile_for_sm90(mode, hidden, proj, dtype, kernels, monkeypatch) -> None:
    from rnnkit.backends.triton import ahead

    monkeypatch.delenv(ops.KERNEL_ENV, raising=False)
    compiled = ahead.compile_layer(mode, hidden, proj_size=proj, dtype=dtype, capability=90)
    assert len(compiled) == kernels
    for c in compiled:
        assert c.spill_stack is None or c.spill_stack < 1024, (c.kernel, c.spill_stack)


@needs_interpreter
def test_an_empty_batch() -> None:
    lstm = rnnkit.LSTM(3, 5, bidirectional=True, backend="triton")
    x = torch.randn(4, 0, 3, requires_grad=True)
    out, (h, c) = lstm(x)
    out.sum().backward()
    assert out.shape == (4, 0, 10) and h.shape == (2, 0, 5) and c.shape == (2, 0, 5)
    assert x.grad is not None and x.grad.shape == x.shape


@needs_interpreter
def test_a_second_derivative_raises_and_first_ones_stay_exact() -> None:
    gru = rnnkit.GRU(3, 4, bidirectional=True, backend="triton")
    x = torch.randn(5, 2, 3, requires_grad=True)
    plain = torch.autograd.grad(gru(x, lengths=[5, 2])[0].square().sum(), x)[0]
    (dx,) = torch.autograd.grad(gru(x, lengths=[5, 2])[0].square().sum(), x, create_graph=True)
    assert torch.equal(dx, plain) and dx.requires_grad
    with pytest.raises(RuntimeError, match="^a second derivative through rnnkit's Triton"):
        torch.autograd.grad(dx.sum(), x)


@needs_interpreter
@pytest.mark.parametrize(
    ("mode", "proj", "dtype"),
    [("lstm_peephole", 3, torch.bfloat16), ("gru_layernorm", 0, torch.float16)],
)
def test_16_bit_on_the_stepwise_kernels(monkeypatch, mode: str, proj: int, dtype) -> None:
    """bf16/fp16 weights and inputs, fp32 state and accumulation, against fp32. The stepwise
    kernels have no tl.dot (the host's GEMMs do them), so the interpreter can run them in 16
    bits; its 16-bit tl.dot is unreliable, so the persistent kernel's are checked on a GPU
    (benchmarks/bench_gpu.py)."""
    monkeypatch.setenv(ops.KERNEL_ENV, "stepwise")
    args = _op_args(mode, proj, 2, "train")
    float_args = [k for k, t in enumerate(args) if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(cast):
        inputs = [
            cast(t).detach().requires_grad_() if k in float_args else t for k, t in enumerate(args)
        ]
        if inputs[14] is not None:
            inputs[14] = cast(inputs[14])  # the state dropout mask, in the input's dtype
        out, h_n, c_n, *_ = ops.triton_forward(*inputs)
        loss = out.float().pow(2).sum() + h_n.float().sum() + c_n.float().sum()
        grads = torch.autograd.grad(loss, [inputs[k] for k in float_args])
        return [out, h_n, c_n, *grads]

    full, half = run(lambda t: t.float()), run(lambda t: t.to(dtype))
    for a, b in zip(half, full, strict=True):
        assert a.dtype == (dtype if b.numel() else a.dtype)
        error = float((a.float() - b).norm() / b.norm().clamp_min(1e-6))
        assert error < 3e-2, error
