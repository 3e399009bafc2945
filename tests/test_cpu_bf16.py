"""bfloat16 in the cpu backend: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` and for
bfloat16 modules, the fused kernels run their GEMMs with bfloat16 operands (float32
accumulation; the gate math and the cell state in float32) where the CPU has bf16 instructions,
return the dtypes torch.nn returns for the same call, and send float32 gradients to float32
master weights. Every cell and variant is compared with the same module in float32: outputs,
final states and every gradient within bfloat16's tolerance.

Also here: every backend returns torch.nn's dtypes under autocast (the composer's contract).
"""

from __future__ import annotations

import pytest
import torch
from conftest import weighted_sum
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit.backends.cpu import build, gemm
from rnnkit.backends.native import onednn_computes

T, B, I, H = 9, 4, 6, 8
LENGTHS = [9, 3, 0, 6]
#: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operand): over a few steps of
#: GEMMs with fp32 accumulation, outputs and gradients stay within this of the fp32 results, in
#: relative norm (torch.nn's own autocast, the reference backend here, differs from fp32 by
#: about as much: 1e-2 to 4e-2).
BF16_TOL = 5e-2
#: the kernels without bf16 GEMMs compute in float32: equal to the float32 run to rounding
FP32_TOL = 1e-5

CELLS = {
    "rnn_tanh": lambda i: rnnkit.RNNCell(i, H),
    "rnn_relu": lambda i: rnnkit.RNNCell(i, H, nonlinearity="relu"),
    "lstm": lambda i: rnnkit.LSTMCell(i, H),
    "lstm_proj": lambda i: rnnkit.LSTMCell(i, H, proj_size=5),
    "gru": lambda i: rnnkit.GRUCell(i, H),
    "lstm_peephole": lambda i: rnnkit.PeepholeLSTMCell(i, H),
    "lstm_layernorm": lambda i: rnnkit.LayerNormLSTMCell(i, H),
    "gru_layernorm": lambda i: rnnkit.LayerNormGRUCell(i, H),
}
STRUCTURES = ("forward", "reverse", "bidirectional", "stack")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


def make(cell: str, structure: str, backend: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)

    def recurrent(i: int, reverse: bool = False) -> rnnkit.Recurrent:
        return rnnkit.Recurrent(CELLS[cell](i), reverse=reverse, backend=backend)

    def bidirectional(i: int) -> rnnkit.Bidirectional:
        return rnnkit.Bidirectional(recurrent(i), recurrent(i, reverse=True))

    if structure in ("forward", "reverse"):
        return recurrent(I, structure == "reverse")
    if structure == "bidirectional":
        return bidirectional(I)
    first = bidirectional(I)
    return rnnkit.Stacked([first, bidirectional(first.output_size)])


def run(module, x, lengths, autocast: bool):
    """Outputs, final states and the gradients of x and every parameter of one training step."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, state = module(x, lengths=lengths)
    tensors = [out, *[t for t in _leaves(state)]]
    loss = weighted_sum(*[t.float() for t in tensors])
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *params], strict=True)
    ]
    return tensors, grads, params


def _leaves(state):
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in _leaves(s)]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (a ReLU or a gate near its threshold may flip under
    rounding, so single elements are not compared)."""
    err = float((actual.detach().float() - expected.detach().float()).norm())
    return err / max(float(expected.detach().float().norm()), 1e-3)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = relative(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_autocast_bf16_matches_fp32_within_bf16_tolerance(cell, structure, with_lengths):
    check_autocast(cell, structure, with_lengths)


@pytest.mark.parametrize("cell", list(CELLS))
def test_autocast_bf16_on_the_onednn_source_matches_fp32(monkeypatch, cell):
    # every cell (the projection's packed w_hr too) with oneDNN's bf16 matmuls, both directions
    # at once, with lengths
    if not (gemm.bf16_supported() and gemm.available("onednn", True)):
        pytest.skip(f"no bf16 matmul from oneDNN here ({gemm.onednn_problem() or 'no bf16'})")
    monkeypatch.setenv(gemm.ENV, "onednn")
    module = make(cell, "bidirectional")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "GEMMs bf16 x bf16 -> fp32: step onednn, bulk onednn" in str(
            rnnkit.explain(module, torch.randn(T, B, I))
        )
    check_autocast(cell, "bidirectional", True)


def check_autocast(cell: str, structure: str, with_lengths: bool) -> None:
    # Within BF16_TOL of float32, or (a ReLU's unbounded state, where torch.nn's own autocast
    # strays further) within 1.5x of what the reference backend under autocast strays.
    module = make(cell, structure)
    reference = make(cell, structure, backend="reference")
    x = torch.randn(T, B, I)
    lengths = torch.tensor(LENGTHS) if with_lengths else None
    ref, ref_grads, _ = run(module, x, lengths, autocast=False)
    got, got_grads, params = run(module, x, lengths, autocast=True)
    torch_like, torch_like_grads, _ = run(reference, x, lengths, autocast=True)

    def tol(theirs: torch.Tensor, expected: torch.Tensor) -> float:
        return max(BF16_TOL, 1.5 * relative(theirs, expected))

    for k, (a, e, o) in enumerate(zip(got, ref, torch_like, strict=True)):
        close(a, e, tol(o, e), f"output/state {k}")
    names = ["x", *[n for n, _ in module.named_parameters()]]
    for name, a, e, o in zip(names, got_grads, ref_grads, torch_like_grads, strict=True):
        assert a.dtype == e.dtype == torch.float32, f"{name}: gradient dtype {a.dtype}"
        close(a, e, tol(o, e), f"gradient of {name}")
    assert all(p.dtype == torch.float32 for p in params)


def test_autocast_runs_bf16_gemms_where_the_cpu_has_bf16_instructions():
    module = make("gru", "forward")
    x = torch.randn(T, B, I)
    ref, _, _ = run(module, x, None, autocast=False)
    got, _, _ = run(module, x, None, autocast=True)
    err = float((got[0].detach().float() - ref[0].detach()).abs().max())
    assert got[0].dtype == torch.float32  # torch.nn.GRU's for a float32 input under autocast
    if gemm.bf16_supported():
        # bf16 operands: the GRU's float32 output moved by more than float32 rounding
        assert err > 10 * FP32_TOL
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "GEMMs bf16 x bf16 -> fp32" in str(rnnkit.explain(module, x))
    else:
        assert err <= FP32_TOL


def test_without_bf16_instructions_the_kernel_stays_fp32_and_returns_torch_nn_dtype(
    monkeypatch,
):
    monkeypatch.setattr(gemm, "bf16_supported", lambda: False)
    module = make("rnn_tanh", "forward")
    x = torch.randn(T, B, I)
    ref, ref_grads, _ = run(module, x, None, autocast=False)
    got, got_grads, _ = run(module, x, None, autocast=True)
    assert got[0].dtype == torch.bfloat16  # torch.nn.RNN's under autocast
    # fp32 inside: only the final rounding to bfloat16 differs
    close(got[0], ref[0].bfloat16().float(), FP32_TOL, "output")
    for a, e in zip(got_grads, ref_grads, strict=True):
        close(a, e, 1e-2, "gradient")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "GEMMs fp32" in str(rnnkit.explain(module, x))


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru", "lstm_layernorm"])
def test_bf16_module_runs_on_the_cpu_kernels_and_returns_bf16(cell):
    module = make(cell, "bidirectional")
    x = torch.randn(T, B, I)
    lengths = torch.tensor(LENGTHS)
    ref, ref_grads, _ = run(module, x, lengths, autocast=False)
    half = make(cell, "bidirectional").to(torch.bfloat16)
    assert rnnkit.explain(half, x.bfloat16()).backend == "cpu"
    got, got_grads, params = run(half, x.bfloat16(), lengths, autocast=False)
    assert all(t.dtype == torch.bfloat16 for t in got)
    assert all(
        p.grad is None and g.dtype == torch.bfloat16
        for p, g in zip(params, got_grads[1:], strict=True)
    )
    for k, (a, e) in enumerate(zip(got, ref, strict=True)):
        close(a, e, 2 * BF16_TOL, f"output/state {k}")  # the weights are rounded too
    for a, e in zip(got_grads, ref_grads, strict=True):
        close(a, e, 2 * BF16_TOL, "gradient")


# -- the dtypes torch.nn returns under autocast, on every backend --------------------------------


def skip_unless_torch_nn_runs_on_onednn(name: str) -> None:
    """torch.nn.LSTM hands unpacked bf16 under autocast to oneDNN, and the dtypes it returns are
    oneDNN's; where oneDNN has no bf16 (no AVX-512) the call fails or takes another path with
    other dtypes, so there is no torch.nn answer to compare with (rnnkit keeps oneDNN's)."""
    if name == "lstm" and not onednn_computes(torch.bfloat16):
        pytest.skip("torch.nn.LSTM under bf16 autocast needs oneDNN's bf16 (AVX-512) here")


DROP_INS = {
    "rnn": (torch.nn.RNN, rnnkit.RNN, {}),
    "gru": (torch.nn.GRU, rnnkit.GRU, {}),
    "lstm": (torch.nn.LSTM, rnnkit.LSTM, {}),
    "lstm_proj": (torch.nn.LSTM, rnnkit.LSTM, {"proj_size": 5}),
}


def _dtypes(result) -> list[torch.dtype]:
    out, state = result
    data = out.data if hasattr(out, "batch_sizes") else out
    return [data.dtype, *[t.dtype for t in _leaves(state)]]


@pytest.mark.parametrize("backend", ["cpu", "native", "reference"])
@pytest.mark.parametrize("layout", ["padded", "packed", "bf16 input"])
@pytest.mark.parametrize("name", list(DROP_INS))
def test_every_backend_returns_torch_nn_dtypes_under_autocast(name, layout, backend):
    if backend == "native" and name == "lstm_proj" and layout == "bf16 input":
        pytest.skip("torch's own LSTM with projection runs unpacked bf16 input the same way")
    ref_cls, cls, kw = DROP_INS[name]
    torch.manual_seed(0)
    ref = ref_cls(I, H, num_layers=2, bidirectional=True, **kw)
    mine = cls(I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    lengths = torch.tensor([9, 3, 2, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if (
            backend == "native"
            and name == "lstm"
            and layout != "packed"
            and not onednn_computes(torch.bfloat16)
        ):
            # torch's op would fail in oneDNN: the backend declines the call, naming why
            with pytest.raises(rnnkit.BackendUnavailable, match="oneDNN"):
                mine(x.bfloat16() if layout == "bf16 input" else x)
            return
        if layout != "packed":
            skip_unless_torch_nn_runs_on_onednn(name)
        if layout == "packed":
            want = _dtypes(ref(pack_padded_sequence(x, lengths, enforce_sorted=False)))
            got = _dtypes(mine(x, lengths=lengths))
            got_packed = _dtypes(mine(pack_padded_sequence(x, lengths, enforce_sorted=False)))
            assert got_packed == want
        elif layout == "bf16 input":
            want = _dtypes(ref(x.bfloat16()))
            got = _dtypes(mine(x.bfloat16()))
        else:
            want = _dtypes(ref(x))
            got = _dtypes(mine(x))
    assert got == want, f"{name} {layout} on {backend}: {got}, torch.nn: {want}"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("given", [torch.float32, torch.bfloat16], ids=["fp32 input", "bf16 input"])
@pytest.mark.parametrize("name", list(DROP_INS))
def test_initial_states_of_another_dtype_give_torch_nn_dtypes_under_autocast(
    name, given, packed, backend
):
    """A GRU's h_0 and an LSTM's c_0 carry their dtype into the state torch.nn returns (an
    encoder's bf16 state handed to a decoder fed fp32 embeddings), whatever the input's."""
    ref_cls, cls, kw = DROP_INS[name]
    torch.manual_seed(0)
    ref = ref_cls(I, H, num_layers=2, bidirectional=True, **kw)
    mine = cls(I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    mine.load_state_dict(ref.state_dict())
    other = torch.bfloat16 if given == torch.float32 else torch.float32
    x = torch.randn(T, B, I, dtype=given)
    h0 = torch.randn(4, B, kw.get("proj_size", H), dtype=other)
    hx = (h0, torch.randn(4, B, H, dtype=other)) if ref_cls is torch.nn.LSTM else h0
    lengths = torch.tensor([9, 3, 2, 6])
    if not packed:
        skip_unless_torch_nn_runs_on_onednn(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if packed:
            want = _dtypes(ref(pack_padded_sequence(x, lengths, enforce_sorted=False), hx))
            got = _dtypes(mine(x, hx, lengths=lengths))
        else:
            want, got = _dtypes(ref(x, hx)), _dtypes(mine(x, hx))
    assert got == want, f"{name} on {backend}: {got}, torch.nn: {want}"


@pytest.mark.parametrize("name", list(DROP_INS))
def test_a_float16_layer_under_bf16_autocast_runs_as_torch_nn_runs_it(name):
    """torch's fused op fails on float16 weights under bfloat16 autocast: the native backend
    declines the call and another computes what torch.nn computes."""
    skip_unless_torch_nn_runs_on_onednn(name)
    ref_cls, cls, kw = DROP_INS[name]
    torch.manual_seed(0)
    ref = ref_cls(I, H, num_layers=2, **kw).half()
    mine = cls(I, H, num_layers=2, **kw).half()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), mine(x)
        mine.backend = "native"
        with pytest.raises(rnnkit.BackendUnavailable, match="float16 weights under"):
            mine(x)
    for a, e in zip(_leaves(got), _leaves(want), strict=True):
        assert a.dtype == e.dtype, f"{name}: {a.dtype}, torch.nn: {e.dtype}"
        close(a, e, BF16_TOL, name)


@pytest.mark.parametrize("cell", ["LayerNormLSTMCell", "LayerNormGRUCell"])
def test_a_float16_layernorm_layer_under_bf16_autocast_runs_alike_on_every_backend(cell):
    """Autocast's float32 layer_norm converts bf16 tensors only: the reference step converts a
    float16 layer's gains itself, as the kernels read them, and both compute the same."""
    seen = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        layer = rnnkit.Recurrent(getattr(rnnkit, cell)(I, H), backend=backend).half()
        x = torch.randn(T, B, I).half().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(x)
        out.float().square().sum().backward()
        seen[backend] = (out, x.grad, layer.cell.ln_ih.weight.grad)
    for got, want in zip(seen["cpu"], seen["reference"], strict=True):
        assert got.dtype == want.dtype
        close(got.float(), want.float(), BF16_TOL, cell)


@pytest.mark.parametrize("backend", ["cpu", "native", "reference"])
@pytest.mark.parametrize("name", list(DROP_INS))
def test_a_float64_layer_under_autocast_computes_and_returns_float64(name, backend):
    # autocast leaves float64 operations alone: torch.nn returns float64 at full precision
    ref_cls, cls, kw = DROP_INS[name]
    torch.manual_seed(0)
    ref = ref_cls(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, **kw)
    mine = cls(I, H, num_layers=2, bidirectional=True, backend=backend, **kw).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), mine(x)
    for a, e in zip(_leaves(got), _leaves(want), strict=True):
        assert a.dtype == e.dtype == torch.float64, f"{name} on {backend}: {a.dtype}"
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gru", "lstm", "lstm_proj"])  # an Elman RNN has no gates
def test_gate_outputs_under_autocast_have_one_dtype_on_every_backend(name):
    """Gate outputs come back in the output's dtype (an LSTM's c in the cell state's), whichever
    backend computed them, and agree within bf16 tolerance."""
    _, cls, kw = DROP_INS[name]
    x, lengths = torch.randn(T, B, I), torch.tensor(LENGTHS)
    seen = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        layer = cls(I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state, gates = layer(x, lengths=lengths, return_gates=True)
        c_dtype = state[1].dtype if isinstance(state, tuple) else out.dtype
        for key, layer_gates in gates.items():
            for gate, value in layer_gates.items():
                want = c_dtype if gate == "c" else out.dtype
                assert value.dtype == want, f"{name} {key}.{gate} on {backend}: {value.dtype}"
        seen[backend] = gates
    for key, layer_gates in seen["cpu"].items():
        for gate, value in layer_gates.items():
            expected = seen["reference"][key][gate].float()
            error = (value.float() - expected).norm() / expected.norm().clamp_min(1e-6)
            assert error < BF16_TOL, f"{name} {key}.{gate}: {error:.3g}"


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_where_onednn_lacks_the_dtype_native_declines_an_unpacked_lstm_under_autocast(
    monkeypatch, low
):
    """torch's LSTM op hands bf16 or fp16 under autocast to oneDNN even where oneDNN does not
    compute in it (no AVX-512), which fails there: the native backend declines such calls,
    naming why, and the automatic choice runs them on another backend; packed calls and GRUs
    stay native."""
    import rnnkit.backends.native as native

    monkeypatch.setattr(native, "onednn_computes", lambda dtype: False)
    torch.manual_seed(0)
    lstm, gru = rnnkit.LSTM(I, H, backend="native"), rnnkit.GRU(I, H, backend="native")
    x, lengths = torch.randn(T, B, I), torch.tensor([9, 3, 2, 6])
    with torch.autocast("cpu", dtype=low):
        with pytest.raises(rnnkit.BackendUnavailable, match="refuses it on this CPU"):
            lstm(x)
        assert lstm(x, lengths=lengths)[0].shape == (T, B, H)
        assert gru(x)[0].shape == (T, B, H)
        lstm.backend = "auto"
        assert rnnkit.explain(lstm, x).backend != "native"
        assert lstm(x)[0].shape == (T, B, H)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_kernels_step_aside_only_for_a_native_op_that_runs_the_call(monkeypatch, low):
    """Where the crossover table prefers torch's op (an LSTM's inference at a shape where it
    measured faster) but that op declines the call (oneDNN without the autocast dtype), the
    automatic choice stays with the kernels, not the Python reference loop."""
    import rnnkit.backends.native as native
    from rnnkit.backends.cpu import dispatch

    slow = dispatch.Point(*dispatch.M, 0.5)  # torch's op measured faster at every shape
    monkeypatch.setattr(dispatch, "nearest", lambda *args: slow)
    monkeypatch.setattr(native, "onednn_computes", lambda dtype: False)
    lstm = rnnkit.LSTM(I, H).eval()
    x = torch.randn(T, B, I)
    with torch.no_grad(), torch.autocast("cpu", dtype=low):
        choice = rnnkit.explain(lstm, x)
        assert choice.backend == "cpu", choice
        assert lstm(x)[0].shape == (T, B, H)
    with torch.no_grad():  # float32: torch's op runs it, and measured faster
        assert rnnkit.explain(lstm, x).backend == "native"
