"""Verification chain, link 4: rnnkit.RNN/LSTM/GRU equal torch.nn modules with the same state_dict."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL, assert_close, grads, weighted_sum
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit

T, B, I, H, P = 5, 3, 4, 6, 3

# (name, rnnkit class, torch class, extra constructor kwargs)
MODES = [
    ("rnn_tanh", rnnkit.RNN, torch.nn.RNN, {}),
    ("rnn_relu", rnnkit.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    ("lstm", rnnkit.LSTM, torch.nn.LSTM, {}),
    ("lstm_proj", rnnkit.LSTM, torch.nn.LSTM, {"proj_size": P}),
    ("gru", rnnkit.GRU, torch.nn.GRU, {}),
]
MODE_IDS = [m[0] for m in MODES]


def pair(mode, **kw):
    _, ours, theirs, extra = mode
    ref = theirs(I, H, **extra, **kw)
    mine = ours(I, H, **extra, **kw)
    mine.load_state_dict(ref.state_dict())
    return mine, ref


def initial_states(mod, batch, lstm):
    n = mod.num_layers * (2 if mod.bidirectional else 1)
    h_size = mod.proj_size if getattr(mod, "proj_size", 0) else mod.hidden_size
    h0 = torch.randn(n, batch, h_size, requires_grad=True)
    if lstm:
        return h0, torch.randn(n, batch, mod.hidden_size, requires_grad=True)
    return h0, None


def run(mod, x, h0, c0, **kw):
    hx = None if h0 is None else ((h0, c0) if c0 is not None else h0)
    out, hn = mod(x, hx, **kw)
    return out, hn if isinstance(hn, tuple) else (hn,)


def compare(mine, ref, x, h0, c0, mine_kw=None, ref_input=None, unpack=None):
    out_m, st_m = run(mine, x, h0, c0, **(mine_kw or {}))
    out_r, st_r = run(ref, x if ref_input is None else ref_input, h0, c0)
    if unpack is not None:
        out_r = unpack(out_r)
    assert_close(out_m, out_r, OUT_TOL, "output")
    for k, (a, b) in enumerate(zip(st_m, st_r, strict=True)):
        assert_close(a, b, OUT_TOL, f"state {k}")
    leaves = [x] + [t for t in (h0, c0) if t is not None]
    g_m = grads(weighted_sum(out_m, *st_m), leaves + list(mine.parameters()))
    g_r = grads(weighted_sum(out_r, *st_r), leaves + list(ref.parameters()))
    names = ["x", "h0", "c0"][: len(leaves)] + [n for n, _ in mine.named_parameters()]
    for name, a, b in zip(names, g_m, g_r, strict=True):
        assert_close(a, b, GRAD_TOL, f"d{name}")


GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,with_h0", GRID)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_parity_with_torch_nn(mode, layers, bidirectional, batch_first, with_h0, backend) -> None:
    mine, ref = pair(mode, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    mine.backend = backend
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, requires_grad=True)
    h0, c0 = initial_states(ref, B, mode[0].startswith("lstm")) if with_h0 else (None, None)
    compare(mine, ref, x, h0, c0)


@pytest.mark.parametrize("lengths", [[5, 3, 1], [1, 5, 5], [5, 5, 5], [2, 1, 4]])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (1, True), (3, True)])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_lengths_equal_torch_nn_on_packed_input(mode, layers, bidirectional, lengths) -> None:
    """lengths= on padded input == torch.nn on pack_padded_sequence(enforce_sorted=False)."""
    for backend in ("reference", "auto"):
        mine, ref = pair(mode, num_layers=layers, bidirectional=bidirectional)
        mine.backend = backend
        x = torch.randn(T, B, I)
        for b, n in enumerate(lengths):
            x.data[n:, b] = 0.0  # padding
        x.requires_grad_(True)
        h0, c0 = initial_states(ref, B, mode[0].startswith("lstm"))
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)

        def unpack(out):
            return pad_packed_sequence(out, total_length=T)[0]

        compare(mine, ref, x, h0, c0, {"lengths": torch.tensor(lengths)}, packed, unpack)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_length_zero_returns_initial_state(mode) -> None:
    mine, ref = pair(mode, num_layers=2, bidirectional=True)
    lstm = mode[0].startswith("lstm")
    x = torch.randn(T, B, I)
    h0, c0 = initial_states(ref, B, lstm)
    out, st = run(mine, x, h0, c0, lengths=[0, 5, 2])
    assert torch.count_nonzero(out[:, 0]) == 0
    assert torch.equal(st[0][:, 0], h0[:, 0])
    if lstm:
        assert torch.equal(st[1][:, 0], c0[:, 0])
    # the other sequences equal torch.nn run on them alone
    keep = [1, 2]
    packed = pack_padded_sequence(x[:, keep], torch.tensor([5, 2]), enforce_sorted=False)
    hx = (h0[:, keep], c0[:, keep]) if lstm else h0[:, keep]
    out_r, st_r = ref(packed, hx)
    assert_close(out[:, keep], pad_packed_sequence(out_r, total_length=T)[0], OUT_TOL, "output")
    st_r = st_r if isinstance(st_r, tuple) else (st_r,)
    for a, b in zip(st, st_r, strict=True):
        assert_close(a[:, keep], b, OUT_TOL, "state")


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_packed_sequence_in_packed_sequence_out(mode) -> None:
    mine, ref = pair(mode, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False)
    for backend in ("reference", "auto"):
        mine.backend = backend
        out_m, st_m = mine(packed)
        out_r, st_r = ref(packed)
        assert isinstance(out_m, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out_m.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_m.sorted_indices, out_r.sorted_indices)
        assert torch.equal(out_m.unsorted_indices, out_r.unsorted_indices)
        assert_close(out_m.data, out_r.data, OUT_TOL, "packed data")
        assert_close(st_m, st_r, OUT_TOL, "states")


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_state_dict_round_trips_and_same_seed_same_weights(mode) -> None:
    _, ours, theirs, extra = mode
    torch.manual_seed(3)
    mine = ours(I, H, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(3)
    ref = theirs(I, H, num_layers=2, bidirectional=True, **extra)
    assert list(mine.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(mine.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    fresh_ref = theirs(I, H, num_layers=2, bidirectional=True, **extra)
    fresh_ref.load_state_dict(mine.state_dict())  # rnnkit -> torch.nn
    fresh_mine = ours(I, H, num_layers=2, bidirectional=True, **extra)
    fresh_mine.load_state_dict(fresh_ref.state_dict())  # torch.nn -> rnnkit
    for a, b in zip(fresh_mine.state_dict().values(), mine.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [p.shape for p in mine.parameters()] == [p.shape for p in ref.parameters()]
    assert [[w.shape for w in g] for g in mine.all_weights] == [
        [w.shape for w in g] for g in ref.all_weights
    ]


def test_unbatched_input_and_no_bias() -> None:
    mine, ref = pair(MODES[2], num_layers=2, bias=False)
    x = torch.randn(T, I)
    out_m, (h_m, c_m) = mine(x)
    out_r, (h_r, c_r) = ref(x)
    assert out_m.shape == out_r.shape == (T, H)
    assert_close(out_m, out_r, OUT_TOL, "output")
    assert_close((h_m, c_m), (h_r, c_r), OUT_TOL, "state")
    h0 = torch.randn(2, H)
    assert_close(mine(x, (h0, h0))[0], ref(x, (h0, h0))[0], OUT_TOL, "with h0")


def test_dropout_between_layers_only_in_training() -> None:
    mine, ref = pair(MODES[4], num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I)
    mine.eval(), ref.eval()
    assert_close(mine(x)[0], ref(x)[0], OUT_TOL, "eval: no dropout")
    mine.train()
    mine.backend = "reference"
    torch.manual_seed(0)
    a = mine(x)[0]
    torch.manual_seed(0)
    b = mine(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, mine.eval()(x)[0])


def test_drop_in_attributes() -> None:
    mine, ref = pair(MODES[3], num_layers=2, bidirectional=True, batch_first=True)
    for attr in (
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
        "mode",
    ):
        assert getattr(mine, attr) == getattr(ref, attr), attr
    assert repr(mine) == repr(ref)
    assert mine._all_weights == ref._all_weights
    assert [[p.data_ptr() for p in ps] for ps in mine.all_weights] == [
        [getattr(mine, n).data_ptr() for n in names] for names in ref._all_weights
    ]
    mine.flatten_parameters()
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("mode", [MODES[2], MODES[4]], ids=["lstm", "gru"])
def test_torch_func_transforms_equal_torch_nn(mode) -> None:
    mine, ref = pair(mode, num_layers=2, bidirectional=True)
    x, tangent = torch.randn(T, B, I), torch.randn(T, B, I)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(mod):
        return lambda p, x: weighted_sum(torch.func.functional_call(mod, p, (x,))[0])

    def jvp(mod):
        return torch.func.jvp(lambda x: mod(x)[0], (x,), (tangent,))[1]

    def grad_of_grad(mod):
        dx = torch.func.grad(loss(mod), argnums=1)
        return torch.func.grad(lambda x: dx(params, x).pow(2).sum())(x)

    for argnums in (0, 1):
        dm = torch.func.grad(loss(mine), argnums=argnums)(params, x)
        assert_close(dm, torch.func.grad(loss(ref), argnums=argnums)(params, x), GRAD_TOL)
    if mode[0] == "gru":  # torch's oneDNN LSTM has no forward-mode AD, on either side
        assert_close(jvp(mine), jvp(ref), GRAD_TOL, "jvp")
    assert_close(grad_of_grad(mine), grad_of_grad(ref), GRAD_TOL, "grad of grad")
    mine.backend = "cpu"
    with pytest.raises(rnnkit.BackendUnavailable, match="torch.func's transforms"):
        torch.func.grad(loss(mine))(params, x)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_torch_func_transforms_with_lengths_and_vmap_under_automatic_dispatch(mode) -> None:
    """grad, vjp and jvp with lengths=, and vmap, which torch's fused op cannot run: automatic
    dispatch passes over it, and the results equal the reference backend's (or, for vmap, the
    layer called on each sequence)."""
    mine, _ = pair(mode, num_layers=2, bidirectional=True)
    lengths = [5, 2, 4]
    x, tangent = torch.randn(T, B, I), torch.randn(T, B, I)

    def out(x):
        return mine(x, lengths=lengths)[0]

    def transforms():
        dx = torch.func.grad(lambda x: weighted_sum(out(x)))(x)
        y, pullback = torch.func.vjp(out, x)
        padded = torch.func.jvp(lambda x: mine(x)[0], (x,), (tangent,))[1]  # torch's LSTM: none
        return dx, pullback(torch.cos(y))[0], torch.func.jvp(out, (x,), (tangent,))[1], padded

    with rnnkit.use_backend("reference"):
        want = transforms()
    names = ("grad with lengths", "vjp with lengths", "jvp with lengths", "jvp")
    for name, a, b in zip(names, transforms(), want, strict=True):
        assert_close(a, b, GRAD_TOL, name)
    xs = torch.randn(2, T, I)  # two unbatched sequences, mapped over
    got = torch.func.vmap(lambda x: mine(x)[0])(xs)
    assert_close(got, torch.stack([mine(x)[0] for x in xs]), OUT_TOL, "vmap")
    xs = torch.randn(T, 2, B, I)  # two batches, mapped over
    got = torch.func.vmap(out, in_dims=1, out_dims=1)(xs)
    assert_close(got, torch.stack([out(xs[:, k]) for k in range(2)], 1), OUT_TOL, "vmap lengths")


@pytest.mark.parametrize("mode", [MODES[2], MODES[4]], ids=["lstm", "gru"])
def test_jit_trace_under_automatic_dispatch_passes_over_the_kernels(mode) -> None:
    """torch.jit.trace records torch's operations only: automatic dispatch runs the traced call
    on torch's op (or the reference loop, for a cell torch has no op for), and the traced module
    computes what the layer computes; the C++ kernels, asked for by name, say why they cannot."""
    mine, _ = pair(mode, num_layers=2, bidirectional=True)
    ln = rnnkit.Recurrent(rnnkit.LayerNormLSTMCell(I, H))
    x = torch.randn(T, B, I)
    for module in (mine, ln):
        traced = torch.jit.trace(module, (x,), check_trace=False)
        with rnnkit.use_backend("reference"):
            want = module(x)
        assert_close(traced(x), want, OUT_TOL, f"traced {type(module).__name__}")
    mine.backend = "cpu"
    with pytest.raises(rnnkit.BackendUnavailable, match="torch.jit.trace records torch's own"):
        torch.jit.trace(mine, (x,), check_trace=False)


@pytest.mark.parametrize("mode", [MODES[2], MODES[4]], ids=["lstm", "gru"])
def test_second_derivatives_raise_on_the_kernels_and_equal_torch_nn_on_reference(mode) -> None:
    mine, ref = pair(mode, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, requires_grad=True)

    def penalty(mod):  # a gradient penalty: the input gradient's norm, differentiated
        (dx,) = torch.autograd.grad(weighted_sum(mod(x)[0]), x, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), [x, *mod.parameters()])

    mine.backend = "cpu"
    with pytest.raises(RuntimeError, match="^a second derivative through .* backend='reference'"):
        penalty(mine)
    mine.backend = "reference"
    for a, b in zip(penalty(mine), penalty(ref), strict=True):
        assert_close(a, b, GRAD_TOL)


def test_repr_names_the_regularisers_switched_on() -> None:
    assert repr(rnnkit.LSTM(4, 6)) == repr(torch.nn.LSTM(4, 6))
    lstm = rnnkit.LSTM(4, 6, 2, zoneout=0.1, weight_drop=0.25)
    assert repr(lstm) == "LSTM(4, 6, num_layers=2, zoneout=0.1, weight_drop=0.25)"
    gru = rnnkit.GRU(4, 6, dropout_state=0.2)
    assert repr(gru) == "GRU(4, 6, dropout_state=0.2)"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dropout_of_one_drops_every_input_but_the_first_layers(backend: str) -> None:
    """torch.nn takes dropout in [0, 1]: with 1 the second layer reads zeros in training."""
    torch.manual_seed(0)
    ours = rnnkit.GRU(3, 5, num_layers=2, dropout=1.0, backend=backend).train()
    assert ours.dropout == 1.0
    theirs = torch.nn.GRU(3, 5, num_layers=2, dropout=1.0).train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 2, 3)
    out, h_n = ours(x)
    expected, expected_h = theirs(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h_n, expected_h)
    with pytest.raises(ValueError, match=r"dropout = 1.5; expected a probability in \[0, 1\]"):
        rnnkit.LSTM(3, 5, num_layers=2, dropout=1.5)


LENGTHS_UNDER_COMPILE = {
    "tensor": lambda: torch.tensor([T, 2, 0]),
    "list": lambda: [T, 2, 0],
}


@pytest.mark.parametrize("given", list(LENGTHS_UNDER_COMPILE))
@pytest.mark.parametrize(
    "backend", [None, pytest.param("reference", marks=pytest.mark.slow), "cpu"]
)  # the reference's Python time loop takes seconds to trace
def test_lengths_under_torch_compile_fullgraph(backend, given):
    """torch.compile(fullgraph=True) traces a call with lengths= whole (no value is read while
    tracing: a tensor's values are checked when the graph runs), with the eager call's outputs
    and gradients; a length outside [0, T] is an error there too."""
    if backend == "cpu":
        from rnnkit.backends.cpu import build

        if build.unavailable() is not None:
            pytest.skip(build.unavailable())
    torch.manual_seed(0)
    module = rnnkit.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    x = torch.randn(B, T, I, requires_grad=True)
    lengths = LENGTHS_UNDER_COMPILE[given]()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out, (h, c) = compiled(x, lengths=lengths)
    want, (wh, wc) = module(x, lengths=lengths)
    for got, expected in ((out, want), (h, wh), (c, wc)):
        assert_close(got, expected, OUT_TOL, "compiled")
    got_dx = grads(weighted_sum(out, h, c), [x])
    want_dx = grads(weighted_sum(want, wh, wc), [x])
    assert_close(got_dx[0], want_dx[0], GRAD_TOL, "dx")
    if given == "tensor":
        for bad in ([T + 4, 2, 0], [T, -1, 0]):
            with pytest.raises(RuntimeError, match="lengths has an entry outside 0 <= length <= T"):
                compiled(x, lengths=torch.tensor(bad))


def _hx(mode, layers, batch):
    """An initial state of ``layers`` x ``batch`` for ``mode`` (LSTMs: (h_0, c_0))."""
    h_size = P if mode[0] == "lstm_proj" else H
    h0 = torch.zeros(layers, batch, h_size)
    return (h0, torch.zeros(layers, batch, H)) if mode[0].startswith("lstm") else h0


# (what is wrong, the call on a layer of `mode`); each with torch.nn's error type below
SHAPE_MISTAKES = {
    "initial state of another batch": lambda mod, mode: mod(torch.randn(T, B, I), _hx(mode, 1, 2)),
    "initial state of other layers": lambda mod, mode: mod(torch.randn(T, B, I), _hx(mode, 2, B)),
    "another feature count": lambda mod, mode: mod(torch.randn(T, B, I + 1)),
    "no time steps": lambda mod, mode: mod(torch.randn(0, B, I)),
    "four dimensions": lambda mod, mode: mod(torch.randn(T, B, I, 1)),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("mistake", list(SHAPE_MISTAKES))
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_shape_mistake_raises_what_torch_nn_raises_and_a_shape_error(mode, mistake, backend):
    """Code written around torch.nn's layers catches rnnkit's error for the same mistake (a
    RuntimeError for most, a ValueError for the input's dimensions); the message is rnnkit's."""
    ours = _raises_as_torch_nn(mode, backend, SHAPE_MISTAKES[mistake], rnnkit.errors.ShapeError)
    assert isinstance(ours, ValueError)
    assert "shape" in str(ours) and "\n" not in str(ours)


def _raises_as_torch_nn(mode, backend: str, call, error: type) -> Exception:
    """What ``call`` raises on rnnkit's layer of ``mode`` on ``backend``: an ``error`` that is
    also the type of what torch.nn's raises for it."""
    mine, ref = pair(mode)
    mine.backend = None if backend == "auto" else backend
    with pytest.raises(Exception) as theirs:
        call(ref, mode)
    with pytest.raises(error) as ours:
        call(mine, mode)
    assert isinstance(ours.value, type(theirs.value)), (type(theirs.value), str(ours.value))
    return ours.value


CELLS = [
    (rnnkit.RNNCell, torch.nn.RNNCell, lambda b: torch.zeros(b, H)),
    (rnnkit.GRUCell, torch.nn.GRUCell, lambda b: torch.zeros(b, H)),
    (rnnkit.LSTMCell, torch.nn.LSTMCell, lambda b: (torch.zeros(b, H), torch.zeros(b, H))),
]


@pytest.mark.parametrize(
    "call",
    [
        lambda cell, hx: cell(torch.randn(B, I + 1)),
        lambda cell, hx: cell(torch.randn(B, I), hx(B + 1)),
        lambda cell, hx: cell(torch.randn(B, I, 1)),
    ],
    ids=["another feature count", "state of another batch", "three dimensions"],
)
@pytest.mark.parametrize("cells", CELLS, ids=["rnn", "gru", "lstm"])
def test_a_cells_shape_mistake_raises_what_torch_nn_raises(cells, call):
    ours, theirs, hx = cells
    with pytest.raises(Exception) as expected:
        call(theirs(I, H), hx)
    with pytest.raises(rnnkit.errors.ShapeError) as got:
        call(ours(I, H), hx)
    assert isinstance(got.value, type(expected.value)), (type(expected.value), str(got.value))


def _hx_of(mode, layers, batch, dtype):
    """``_hx`` in ``dtype``."""
    hx = _hx(mode, layers, batch)
    return tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)


# (what is wrong, the call on a layer of `mode`); each with torch.nn's error type below
DTYPE_MISTAKES = {
    "integer input": lambda mod, mode: mod(torch.ones(T, B, I, dtype=torch.long)),
    "float64 input": lambda mod, mode: mod(torch.randn(T, B, I, dtype=torch.float64)),
    "float64 initial state": lambda mod, mode: mod(
        torch.randn(T, B, I), _hx_of(mode, 1, B, torch.float64)
    ),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("mistake", list(DTYPE_MISTAKES))
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_dtype_mistake_raises_what_torch_nn_raises_and_a_dtype_error(mode, mistake, backend):
    """torch.nn raises a ValueError for the input's dtype and a RuntimeError (from inside its
    op) for the state's; rnnkit's DTypeError is both, and a TypeError, with one line naming the
    dtype given and the one expected."""
    ours = _raises_as_torch_nn(mode, backend, DTYPE_MISTAKES[mistake], rnnkit.errors.DTypeError)
    assert isinstance(ours, TypeError)
    text = str(ours)
    given = "torch.int64" if mistake == "integer input" else "torch.float64"
    assert given in text and ("torch.float32" in text or "floating-point" in text)
    assert "\n" not in text


CELL_DTYPE_MISTAKES = {
    "integer input": lambda cell, hx: cell(torch.ones(B, I, dtype=torch.long)),
    "float64 input": lambda cell, hx: cell(torch.randn(B, I, dtype=torch.float64)),
    "float64 state": lambda cell, hx: cell(
        torch.randn(B, I),
        tuple(h.double() for h in hx(B)) if isinstance(hx(B), tuple) else hx(B).double(),
    ),
}


@pytest.mark.parametrize("mistake", list(CELL_DTYPE_MISTAKES))
@pytest.mark.parametrize("cells", CELLS, ids=["rnn", "gru", "lstm"])
def test_a_cells_dtype_mistake_names_the_dtypes_and_raises_what_torch_nn_raises(cells, mistake):
    """torch.nn's cells fail inside their matmul ("mat1 and mat2 must have the same dtype"); a
    cell of rnnkit says which tensor has which dtype, as the same RuntimeError."""
    ours, theirs, hx = cells
    call = CELL_DTYPE_MISTAKES[mistake]
    with pytest.raises(Exception) as expected:
        call(theirs(I, H), hx)
    with pytest.raises(rnnkit.errors.DTypeError) as got:
        call(ours(I, H), hx)
    assert isinstance(got.value, type(expected.value)), (type(expected.value), str(got.value))
    text = str(got.value)
    given = "torch.int64" if mistake == "integer input" else "torch.float64"
    assert ours.__name__ in text and given in text and "\n" not in text
    assert "torch.float32" in text or "floating-point" in text


@pytest.mark.parametrize("cells", CELLS, ids=["rnn", "gru", "lstm"])
def test_a_cell_under_autocast_takes_mixed_dtypes_as_torch_nn_does(cells):
    ours, theirs, hx = cells
    torch.manual_seed(0)
    ref = theirs(I, H)
    mine = ours(I, H)
    mine.load_state_dict(ref.state_dict())
    x, state = torch.randn(B, I).bfloat16(), hx(B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x, state)
        got = mine(x, state)[1]  # (out, state)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert_close(g.float(), w.float(), 2e-2, "autocast cell")


# (the argument, the value): a size of the wrong type, as torch.nn's TypeError
ARGUMENT_TYPE_MISTAKES = [("hidden_size", 4.0), ("input_size", 4.5), ("num_layers", 1.5)]


@pytest.mark.parametrize(("name", "value"), ARGUMENT_TYPE_MISTAKES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_size_of_the_wrong_type_raises_torch_nns_type_error(mode, name, value):
    _, ours, theirs, extra = mode
    args = {"input_size": I, "hidden_size": H, "num_layers": 1, **extra, name: value}
    with pytest.raises(Exception) as expected:
        theirs(**args)
    with pytest.raises(rnnkit.errors.ArgumentTypeError, match=f"^{name} = {value!r}; expected"):
        ours(**args)
    assert isinstance(expected.value, TypeError), expected.value
    with pytest.raises(ValueError):  # still the ValueError of rnnkit's other argument checks
        ours(**args)


@pytest.mark.parametrize("cells", CELLS, ids=["rnn", "gru", "lstm"])
def test_a_cells_size_of_the_wrong_type_is_a_type_error(cells):
    ours, theirs, _ = cells
    with pytest.raises(TypeError):
        theirs(I, 4.0)
    with pytest.raises(rnnkit.errors.ArgumentTypeError, match=r"^hidden_size = 4\.0; expected"):
        ours(I, 4.0)
