"""The cpu backend (fused C++ kernels) equals the reference backend: outputs, final states and
every gradient, for every cell, direction, depth, lengths pattern and initial state; gradcheck in
float64 through the custom ops; determinism; torch.compile; no_grad / inference_mode; explain."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL

import rnnkit
from rnnkit.backends.cpu import build, ops

MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")
T, B, I, H = 7, 5, 4, 6
# Right-padded lengths with a 0, a 1 and a full-length T, in no particular order.
LENGTHS = {"none": None, "mixed": [3, T, 0, 1, 5]}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


def make_layer(mode: str, num_layers: int = 1, bidirectional: bool = False, **kw):
    torch.manual_seed(0)
    if mode.startswith("rnn_"):
        return rnnkit.RNN(
            I, H, num_layers, nonlinearity=mode[4:], bidirectional=bidirectional, **kw
        )
    cls = rnnkit.LSTM if mode == "lstm" else rnnkit.GRU
    return cls(I, H, num_layers, bidirectional=bidirectional, **kw)


def initial_state(module, mode: str, requires_grad: bool = True):
    layers = module.num_layers * module.num_directions
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(layers, B, module.state_size, generator=g).requires_grad_(requires_grad)
    if mode != "lstm":
        return h0
    c0 = torch.randn(layers, B, H, generator=g).requires_grad_(requires_grad)
    return (h0, c0)


def run(module, backend: str, x, hx, lengths):
    """Outputs, final states and the gradients of a fixed random loss w.r.t. every input."""
    with rnnkit.use_backend(backend):
        out, state = module(x, hx, lengths=lengths)
    states = list(state) if isinstance(state, tuple) else [state]
    g = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g)).sum() for s in states)
    inputs = [x, *module.parameters()]
    if hx is not None:
        inputs += list(hx) if isinstance(hx, tuple) else [hx]
    grads = torch.autograd.grad(loss, inputs)
    return [out, *states], list(grads)


def assert_same(module, x, hx, lengths):
    ref_vals, ref_grads = run(module, "reference", x, hx, lengths)
    cpu_vals, cpu_grads = run(module, "cpu", x, hx, lengths)
    for r, c in zip(ref_vals, cpu_vals, strict=True):
        torch.testing.assert_close(c, r, atol=OUT_TOL, rtol=OUT_TOL)
    names = ["x", *(n for n, _ in module.named_parameters()), "h0", "c0"]
    for name, r, c in zip(names, ref_grads, cpu_grads, strict=False):
        torch.testing.assert_close(
            c, r, atol=GRAD_TOL, rtol=GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


CELLS = {"rnn_tanh": rnnkit.RNNCell, "lstm": rnnkit.LSTMCell, "gru": rnnkit.GRUCell}


def test_padded_outputs_are_exactly_zero():
    for mode in MODES:
        module = make_layer(mode, 2, True)
        lengths = LENGTHS["mixed"]
        with rnnkit.use_backend("cpu"):
            out, _ = module(torch.randn(T, B, I), lengths=lengths)
        for b, n in enumerate(lengths):
            assert torch.equal(out[n:, b], torch.zeros_like(out[n:, b]))


# -- the custom ops themselves, in float64 -------------------------------------------------------

GC_T, GC_B, GC_I, GC_H, GC_P = 4, 3, 2, 3, 2


def op_args(mode: str, lengths, proj: bool = False, bias: bool = True):
    g = torch.Generator().manual_seed(5)
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode] * GC_H
    state = GC_P if proj else GC_H

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x = rand(GC_T, GC_B, GC_I)
    h0 = rand(GC_B, state)
    c0 = rand(GC_B, GC_H) if mode == "lstm" else None
    w_ih, w_hh = rand(gates, GC_I), rand(gates, state)
    b_ih, b_hh = (rand(gates), rand(gates)) if bias else (None, None)
    w_hr = rand(GC_P, GC_H) if proj else None
    lens = None if lengths is None else torch.tensor(lengths)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens


@pytest.mark.parametrize("lengths", [None, [3, 0, 4]], ids=["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", [*MODES, "lstm-proj"])
def test_gradcheck_float64(mode, reverse, lengths):
    proj = mode == "lstm-proj"
    mode = "lstm" if proj else mode
    args = op_args(mode, lengths, proj)
    mode_id = ops.MODE_IDS[mode]
    inputs = [a for a in args[:8] if a is not None]
    slots = [k for k, a in enumerate(args[:8]) if a is not None]
    if mode == "rnn_relu":  # keep pre-activations away from relu's kink
        with torch.no_grad():
            args[0].add_(0.05 * torch.sign(args[0]))

    def f(*tensors):
        full = list(args[:8])
        for k, t in zip(slots, tensors, strict=True):
            full[k] = t
        out, h_n, c_n, *_ = ops.layer_forward(*full, args[8], mode_id, reverse, True)
        return (out, h_n, c_n) if mode == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck():
    args = op_args("lstm", [3, 0, 4], proj=True)
    torch.library.opcheck(ops.layer_forward, (*args, ops.MODE_IDS["lstm"], True, True))
    args = op_args("gru", None, bias=False)
    torch.library.opcheck(ops.layer_forward, (*args, ops.MODE_IDS["gru"], False, True))


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_pair_op_gradcheck_and_opcheck(mode):
    forward, reverse = op_args(mode, [3, 0, 4]), op_args(mode, [3, 0, 4])
    x, lengths = forward[0], forward[8]
    args = (x, *forward[1:8], *reverse[1:8], lengths, ops.MODE_IDS[mode], True)
    torch.library.opcheck(ops.pair_forward, args)
    inputs = [a for a in args[:15] if a is not None]
    slots = [k for k, a in enumerate(args[:15]) if a is not None]

    def f(*tensors):
        full = list(args)
        for k, t in zip(slots, tensors, strict=True):
            full[k] = t
        return tuple(ops.pair_forward(*full)[k] for k in (0, 1, 8, 9))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# -- behaviour -----------------------------------------------------------------------------------


def test_deterministic():
    module = make_layer("lstm", 2, True)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(3), requires_grad=True)
    first = run(module, "cpu", x, None, LENGTHS["mixed"])
    second = run(module, "cpu", x, None, LENGTHS["mixed"])
    for a, b in zip([*first[0], *first[1]], [*second[0], *second[1]], strict=True):
        assert torch.equal(a, b)


def test_no_grad_and_inference_mode():
    for mode in MODES:
        module = make_layer(mode, 2, True)
        x = torch.randn(T, B, I)
        with rnnkit.use_backend("reference"), torch.no_grad():
            expected = module(x, lengths=LENGTHS["mixed"])[0]
        with rnnkit.use_backend("cpu"):
            with torch.no_grad():
                out = module(x, lengths=LENGTHS["mixed"])[0]
            assert not out.requires_grad
            torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)
            with torch.inference_mode():
                out = module(x, lengths=LENGTHS["mixed"])[0]
            torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)


def test_torch_compile_fullgraph():
    module = make_layer("gru", 2, True)
    x = torch.randn(T, B, I)
    with rnnkit.use_backend("cpu"):
        expected = module(x)[0]
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(x)[0]
    torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)
    out.sum().backward()
    assert module.weight_hh_l1_reverse.grad is not None


def test_explain_reports_cpu():
    x = torch.randn(T, B, I)
    for mode in MODES:
        explanation = rnnkit.explain(make_layer(mode, 2, True), x, lengths=LENGTHS["mixed"])
        assert explanation.backend == "cpu", str(explanation)
        plain = rnnkit.explain(make_layer(mode, 2, True), x)
        if mode == "lstm":  # oneDNN's fused LSTM measured as fast: automatic dispatch leaves it
            assert plain.backend == "native" and "oneDNN LSTM measured as fast" in plain.reason
        else:
            assert plain.backend == "cpu", str(plain)
    layer = rnnkit.Recurrent(rnnkit.GRUCell(I, H), reverse=True)
    assert rnnkit.explain(layer, x, lengths=LENGTHS["mixed"]).backend == "cpu"
    lstm = make_layer("lstm", 1, False, proj_size=3)
    assert rnnkit.explain(lstm, x).backend == "cpu"


def test_plain_lstm_runs_when_forced_and_names_where_onednn_is_as_fast():
    lstm = make_layer("lstm", 2, True)
    backend = rnnkit.backends.cpu.CpuBackend()
    request = lstm.dispatch_requests(torch.randn(T, B, I))[0][1]
    assert "oneDNN LSTM measured as fast" in backend.slower(request)
    layer = make_layer("lstm", 1, False, backend="cpu")
    assert rnnkit.explain(layer, torch.randn(T, B, I)).backend == "cpu"
    layer(torch.randn(T, B, I))


def test_declines_what_it_cannot_run():
    backend = rnnkit.backends.cpu.CpuBackend()
    assert "custom cell" in backend.check(rnnkit.backends.Request(mode=None))
    for mode in ("gru", "lstm_peephole", "lstm_layernorm", "gru_layernorm"):
        for flag in ("zoneout", "state_dropout", "variational", "gates"):
            assert backend.check(rnnkit.backends.Request(mode=mode, **{flag: True})) is None
    assert "cuda" in backend.check(
        rnnkit.backends.Request(mode="gru_layernorm", device_type="cuda")
    )
    assert "bfloat16" in backend.check(rnnkit.backends.Request(mode="lstm", dtype=torch.bfloat16))
    assert "cuda" in backend.check(rnnkit.backends.Request(mode="gru", device_type="cuda"))


def test_without_compiler_warns_once_and_declines(monkeypatch):
    monkeypatch.setattr(build, "_loaded", False)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setattr(build, "_compiler", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = build.unavailable()
        second = build.unavailable()
    assert first == second and "no C++ compiler" in first
    assert len(caught) == 1
    reason = rnnkit.backends.cpu.CpuBackend().check(rnnkit.backends.Request(mode="gru"))
    assert reason == first
