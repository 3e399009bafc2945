"""The cpu backend (fused C++ kernels) with gate outputs, regularisers and the peephole LSTM
equals the reference backend: outputs, final states, gates and every gradient, with the same seed
(so the same masks), through the torch.nn drop-ins and Recurrent/Bidirectional/Stacked."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL

import rnnkit
from rnnkit.backends.cpu import CpuBackend, build, ops
from rnnkit.cells import PeepholeLSTMCell

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


def test_gates_are_accepted_and_not_left_to_onednn():
    backend = CpuBackend()
    request = rnnkit.backends.Request(mode="lstm", gates=True)
    assert backend.check(request) is None and backend.slower(request) is None


# -- regularisers through the torch.nn drop-ins ----------------------------------------------------

REGS = {
    "variational": {"dropout_input": 0.3, "dropout_output": 0.4},
    "weight_drop": {"weight_drop": 0.4},
    "state": {"dropout_state": 0.3},
    "zoneout": {"zoneout": 0.2, "zoneout_cell": 0.4},
    "all": {
        "dropout_input": 0.2,
        "dropout_state": 0.3,
        "dropout_output": 0.3,
        "zoneout": 0.3,
        "zoneout_cell": 0.2,
        "weight_drop": 0.3,
    },
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
    states = [] if state is None else torch.utils._pytree.tree_leaves(state)
    inputs = [x, *module.parameters(), *states]
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


@pytest.mark.parametrize("mode", list(DROP_INS))
def test_eval_mode_runs_fused_with_regularisers_off_and_zoneout_as_expectation(mode):
    torch.manual_seed(0)
    module = DROP_INS[mode](I, H, 2, bidirectional=True, **REGS["all"]).eval()
    x = _x()
    request = module.dispatch_requests(x, LENGTHS["mixed"])[0][1]
    assert request.zoneout and not (request.state_dropout or request.variational)
    assert rnnkit.explain(module, x, lengths=LENGTHS["mixed"]).backend == "cpu"
    assert_same(module, x, initial_state(module), LENGTHS["mixed"])
    with torch.no_grad():  # the inference kernels (nothing saved) too
        with rnnkit.use_backend("reference"):
            want = module(x, lengths=LENGTHS["mixed"])[0]
        with rnnkit.use_backend("cpu"):
            got = module(x, lengths=LENGTHS["mixed"])[0]
    torch.testing.assert_close(got, want, atol=OUT_TOL, rtol=OUT_TOL)
    no_zoneout = {k: v for k, v in REGS["all"].items() if not k.startswith("zoneout")}
    plain = DROP_INS[mode](I, H, 2, bidirectional=True, **no_zoneout).eval()
    request = plain.dispatch_requests(x)[0][1]
    assert not (request.zoneout or request.state_dropout or request.variational)


# -- regularisers through Recurrent, Bidirectional and Stacked ------------------------------------

CELLS = {"lstm": rnnkit.LSTMCell, "gru": rnnkit.GRUCell, "rnn": rnnkit.RNNCell}


def stack(make, regs: dict):
    """A 2-layer stack: a bidirectional layer, then a reverse one, every layer with ``regs``."""
    torch.manual_seed(0)
    return rnnkit.Stacked(
        [
            rnnkit.Bidirectional(
                rnnkit.Recurrent(make(I, H), **regs),
                rnnkit.Recurrent(make(I, H), reverse=True, **regs),
            ),
            rnnkit.Recurrent(make(2 * H, H), reverse=True, **regs),
        ]
    )


@pytest.mark.parametrize("cell", list(CELLS))
def test_weight_drop_masks_weight_hh_once_per_call_on_the_fused_path(cell):
    """DropConnect: the layer hands the kernel weight_hh * mask; autograd differentiates the
    multiply, so dropped weights get exactly zero gradient."""
    torch.manual_seed(0)
    layer = rnnkit.Recurrent(CELLS[cell](I, H), **REGS["weight_drop"]).train()
    x = _x()
    assert rnnkit.explain(layer, x, lengths=LENGTHS["mixed"]).backend == "cpu"
    assert_same(layer, x, None, LENGTHS["mixed"])
    torch.manual_seed(11)
    mask = torch.empty(layer.cell.weight_hh.shape).bernoulli_(0.6)  # the draw the layer makes
    layer.cell.weight_hh.grad = None
    torch.manual_seed(11)
    with rnnkit.use_backend("cpu"):
        out, _ = layer(x, lengths=LENGTHS["mixed"])
    out.sum().backward()
    assert torch.all(layer.cell.weight_hh.grad[mask == 0] == 0)
    assert torch.count_nonzero(layer.cell.weight_hh.grad[mask != 0]) > 0


# -- the peephole LSTM ----------------------------------------------------------------------------


def peephole(input_size: int, hidden_size: int, proj_size: int = 0) -> PeepholeLSTMCell:
    """A peephole cell with weights large enough that the peepholes matter."""
    cell = PeepholeLSTMCell(input_size, hidden_size, proj_size=proj_size)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.7, 0.7)
    return cell


def peephole_stack(regs: dict, proj: int = 0):
    torch.manual_seed(0)
    out = 2 * (proj or H)
    return rnnkit.Stacked(
        [
            rnnkit.Bidirectional(
                rnnkit.Recurrent(peephole(I, H, proj), **regs),
                rnnkit.Recurrent(peephole(I, H, proj), reverse=True, **regs),
            ),
            rnnkit.Recurrent(peephole(out, H, proj), reverse=True, **regs),
        ]
    )


def test_check_accepts_the_peephole_and_declines_what_has_no_kernel():
    backend = CpuBackend()
    request = rnnkit.backends.Request
    for flags in ({}, {"zoneout": True, "state_dropout": True, "gates": True, "proj": True}):
        assert backend.check(request(mode="lstm_peephole", **flags)) is None
    assert "custom cell" in backend.check(request(mode=None))
    # the LayerNorm kernels (layernorm.py) run the in-step regularisers and gates too
    for mode in ("lstm_layernorm", "gru_layernorm"):
        assert backend.check(request(mode=mode, zoneout=True, state_dropout=True)) is None


# -- the custom ops with regularisers, in float64 (masks fixed) ----------------------------------

GC_T, GC_B, GC_I, GC_H, GC_P = 4, 3, 2, 3, 2
GC_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def op_args(mode: str, lengths, proj: bool = False, seed: int = 5):
    """x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths in float64, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    gates = GC_GATES[mode] * GC_H
    state = GC_P if proj else GC_H

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, h0 = rand(GC_T, GC_B, GC_I), rand(GC_B, state)
    c0 = rand(GC_B, GC_H) if mode == "lstm" else None
    w_ih, w_hh, b_ih, b_hh = rand(gates, GC_I), rand(gates, state), rand(gates), rand(gates)
    w_hr = rand(GC_P, GC_H) if proj else None
    lens = None if lengths is None else torch.tensor(lengths)
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens]


def op_regularisers(mode: str, proj: bool, zone: str, seed: int = 6):
    """state_mask, zone_h, zone_c: drawn once (constants), zoneout per step ("train") or as the
    eval-mode probability ("eval")."""
    g = torch.Generator().manual_seed(seed)
    state = GC_P if proj else GC_H
    kw = {"dtype": torch.float64}
    mask = (torch.rand(GC_B, state, generator=g, **kw) < 0.7).double() / 0.7
    sizes = (state, GC_H) if mode == "lstm" else (state,)
    if zone == "train":
        zones = [(torch.rand(GC_T, GC_B, n, generator=g, **kw) < 0.4).double() for n in sizes]
    else:
        zones = [torch.full((n,), p, **kw) for n, p in zip(sizes, (0.3, 0.6), strict=False)]
    return [mask, *zones, *([None] * (2 - len(zones)))]


def _gradcheck(fn, args, slots):
    inputs = [args[k] for k in slots]

    def f(*tensors):
        full = list(args)
        for k, t in zip(slots, tensors, strict=True):
            full[k] = t
        return fn(*full)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("zone", ["train", "eval"])
@pytest.mark.parametrize("lengths", [None, [3, 0, 4]], ids=["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru", "lstm-proj"])
def test_layer_op_gradcheck_float64_with_regularisers(mode, reverse, lengths, zone):
    proj = mode == "lstm-proj"
    mode = "lstm" if proj else mode
    args = op_args(mode, lengths, proj)
    regs = op_regularisers(mode, proj, zone)
    mode_id = ops.MODE_IDS[mode]
    full = [*args, mode_id, reverse, True, *regs]
    slots = [k for k, a in enumerate(args[:8]) if a is not None]

    def fn(*a):
        out, h_n, c_n, *_ = ops.layer_forward(*a)
        return (out, h_n, c_n) if mode == "lstm" else (out, h_n)

    _gradcheck(fn, full, slots)


def test_ops_opcheck_with_regularisers():
    args = op_args("lstm", [3, 0, 4], proj=True)
    regs = op_regularisers("lstm", True, "train")
    torch.library.opcheck(ops.layer_forward, (*args, ops.MODE_IDS["lstm"], True, True, *regs))
    f, b = op_args("gru", [3, 0, 4]), op_args("gru", [3, 0, 4], seed=7)
    x_b = b[0]
    regs_f, regs_b = op_regularisers("gru", False, "train"), op_regularisers("gru", False, "eval")
    pair_args = (f[0], *f[1:8], *b[1:8], f[8], ops.MODE_IDS["gru"], True, x_b, *regs_f[:3],
                 *regs_b[:3])  # fmt: skip
    torch.library.opcheck(ops.pair_forward, pair_args)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_pair_op_gradcheck_float64_with_own_inputs_and_regularisers(mode):
    f, b = op_args(mode, [3, 0, 4]), op_args(mode, [3, 0, 4], seed=7)
    regs_f, regs_b = op_regularisers(mode, False, "train"), op_regularisers(mode, False, "eval", 8)
    full = [f[0], *f[1:8], *b[1:8], f[8], ops.MODE_IDS[mode], True, b[0], *regs_f, *regs_b]
    slots = [k for k, a in enumerate(full[:15]) if a is not None] + [18]  # x_b

    def fn(*a):
        r = ops.pair_forward(*a)
        return tuple(r[k] for k in ((0, 1, 2, 8, 9, 10) if mode == "lstm" else (0, 1, 8, 9)))

    _gradcheck(fn, full, slots)


@pytest.mark.parametrize("zone", ["off", "train"])
@pytest.mark.parametrize("lengths", [None, [3, 0, 4]], ids=["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_peephole_op_gradcheck_float64(proj, reverse, lengths, zone):
    args = op_args("lstm", lengths, proj)
    regs = op_regularisers("lstm", proj, "train") if zone == "train" else [None] * 3
    g = torch.Generator().manual_seed(9)
    peep = torch.randn(3, GC_H, generator=g, dtype=torch.float64).requires_grad_()
    full = [*args, ops.MODE_IDS["lstm"], reverse, True, *regs, peep]
    slots = [k for k, a in enumerate(args[:8]) if a is not None] + [len(full) - 1]

    def fn(*a):
        return ops.layer_forward(*a)[:3]

    _gradcheck(fn, full, slots)
    torch.library.opcheck(ops.layer_forward, tuple(full))


def test_peephole_pair_op_gradcheck_float64():
    f, b = op_args("lstm", [3, 0, 4]), op_args("lstm", [3, 0, 4], seed=7)
    g = torch.Generator().manual_seed(9)
    peeps = [torch.randn(3, GC_H, generator=g, dtype=torch.float64).requires_grad_()
             for _ in range(2)]  # fmt: skip
    full = [f[0], *f[1:8], *b[1:8], f[8], ops.MODE_IDS["lstm"], True, None, *[None] * 6, *peeps]
    slots = [k for k, a in enumerate(full[:15]) if a is not None] + [25, 26]

    def fn(*a):
        r = ops.pair_forward(*a)
        return tuple(r[k] for k in (0, 1, 2, 8, 9, 10))

    _gradcheck(fn, full, slots)
    torch.library.opcheck(ops.pair_forward, tuple(full))


def test_torch_compile_fullgraph_with_zoneout_and_peepholes():
    lstm = rnnkit.LSTM(I, H, 2, bidirectional=True, **REGS["zoneout"]).eval()
    layer = rnnkit.Recurrent(peephole(I, H), reverse=True, **REGS["zoneout"]).eval()
    x = _x()
    for module in (lstm, layer):
        with rnnkit.use_backend("cpu"):
            want = module(x)[0]
            compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
            out = compiled(x)[0]
        torch.testing.assert_close(out, want, atol=OUT_TOL, rtol=OUT_TOL)
        (dx,) = torch.autograd.grad(out.sum(), [x])
        (want_dx,) = torch.autograd.grad(want.sum(), [x])
        torch.testing.assert_close(dx, want_dx, atol=GRAD_TOL, rtol=GRAD_TOL)
