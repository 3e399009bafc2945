"""The cpu backend (fused C++ kernels) with gate outputs, regularisers and the peephole LSTM
equals the reference backend: outputs, final states, gates and every gradient, with the same seed
(so the same masks), through the torch.nn drop-ins and Recurrent/Bidirectional/Stacked."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL

import rnnkit
from rnnkit.backends.cpu import CpuBackend, build

T, B, I, H = 6, 5, 4, 5
# Right-padded lengths with a 0, a 1 and a full-length T, in no particular order.
LENGTHS = {"none": None, "mixed": [3, T, 0, 1, 5]}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


def _x(requires_grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(T, B, I, generator=g).requires_grad_(requires_grad)


# -- gates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_drop_in_gates_equal_reference(cls, bidirectional, num_layers, lengths):
    torch.manual_seed(0)
    module = cls(I, H, num_layers, bidirectional=bidirectional)
    x = _x()
    results = {}
    for backend in ("reference", "cpu"):
        with rnnkit.use_backend(backend):
            out, _, gates = module(x, lengths=LENGTHS[lengths], return_gates=True)
        (dx,) = torch.autograd.grad(out.sum(), [x])
        results[backend] = out, gates, dx
    (ref_out, ref_gates, ref_dx), (out, gates, dx) = results["reference"], results["cpu"]
    torch.testing.assert_close(out, ref_out, atol=OUT_TOL, rtol=OUT_TOL)
    torch.testing.assert_close(dx, ref_dx, atol=GRAD_TOL, rtol=GRAD_TOL)
    assert list(gates) == list(ref_gates)
    for label, per_gate in ref_gates.items():
        assert list(gates[label]) == list(per_gate)
        for name, want in per_gate.items():
            got = gates[label][name]
            torch.testing.assert_close(got, want, atol=OUT_TOL, rtol=OUT_TOL)
            assert not got.requires_grad  # for inspection: detached, never a silent wrong grad


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("make", [rnnkit.LSTMCell, rnnkit.GRUCell])
def test_recurrent_gates_equal_reference(make, reverse):
    torch.manual_seed(0)
    layer = rnnkit.Recurrent(make(I, H), reverse=reverse, batch_first=True)
    x = _x(False).transpose(0, 1)
    with rnnkit.use_backend("reference"):
        _, _, want = layer(x, lengths=LENGTHS["mixed"], return_gates=True)
    with rnnkit.use_backend("cpu"), torch.no_grad():
        _, _, got = layer(x, lengths=LENGTHS["mixed"], return_gates=True)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=OUT_TOL, rtol=OUT_TOL)


def test_gates_are_accepted_and_not_left_to_onednn():
    backend = CpuBackend()
    request = rnnkit.backends.Request(mode="lstm", gates=True)
    assert backend.check(request) is None and backend.slower(request) is None


# -- regularisers through the torch.nn drop-ins ----------------------------------------------------

REGS = {
    "variational": {"dropout_input": 0.3, "dropout_output": 0.4},
    "weight_drop": {"weight_drop": 0.4},
}
DROP_INS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}


def initial_state(module, requires_grad: bool = True):
    layers = module.num_layers * module.num_directions
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(layers, B, module.state_size, generator=g).requires_grad_(requires_grad)
    if module.mode != "LSTM":
        return h0
    return h0, torch.randn(layers, B, H, generator=g).requires_grad_(requires_grad)


def run(module, backend: str, x, state, lengths, seed: int = 11, **kw):
    """Outputs, final states and the gradients of a position-weighted loss w.r.t. x, every
    parameter and the initial state; masks drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    with rnnkit.use_backend(backend):
        out, final = module(x, state, lengths=lengths, **kw)
    finals = list(torch.utils._pytree.tree_leaves(final))
    loss = (out * out.detach().cos()).sum() + sum((f * f.detach().sin()).sum() for f in finals)
    inputs = [x, *module.parameters(), *torch.utils._pytree.tree_leaves(state)]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
    return [out, *finals], grads


def assert_same(module, x, state, lengths, **kw):
    ref_vals, ref_grads = run(module, "reference", x, state, lengths, **kw)
    cpu_vals, cpu_grads = run(module, "cpu", x, state, lengths, **kw)
    for r, c in zip(ref_vals, cpu_vals, strict=True):
        torch.testing.assert_close(c, r, atol=OUT_TOL, rtol=OUT_TOL)
    names = ["x", *(n for n, _ in module.named_parameters()), "h0", "c0"]
    for name, r, c in zip(names, ref_grads, cpu_grads, strict=False):
        torch.testing.assert_close(
            c, r, atol=GRAD_TOL, rtol=GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("mode", list(DROP_INS))
def test_drop_in_regularisers_equal_reference(mode, reg, bidirectional, num_layers, lengths):
    torch.manual_seed(0)
    module = DROP_INS[mode](I, H, num_layers, bidirectional=bidirectional, **REGS[reg]).train()
    x = _x()
    # DropConnect only masks the weight handed to the kernel: a plain LSTM stays with oneDNN
    onednn = mode == "lstm" and reg == "weight_drop" and lengths == "none"
    want = "native" if onednn else "cpu"
    assert rnnkit.explain(module, x, lengths=LENGTHS[lengths]).backend == want
    assert_same(module, x, initial_state(module), LENGTHS[lengths])
