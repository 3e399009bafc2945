"""Verification chain, link 2: layers equal the cell stepped by hand, including reversal and lengths."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL, assert_close, grads, weighted_sum
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit.backends.cpu import build
from rnnkit.backends.native import onednn_computes
from rnnkit.cells import Cell

T, B, I, H = 6, 4, 3, 5
LENGTHS = [6, 0, 1, 4]


class MinimalGatedCell(Cell):
    """A user-defined cell following the documented contract."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.lin = torch.nn.Linear(input_size + hidden_size, 2 * hidden_size)

    def forward(self, x, h):
        f, n = self.lin(torch.cat([x, h], 1)).chunk(2, 1)
        h = torch.sigmoid(f) * h + (1 - torch.sigmoid(f)) * torch.tanh(n)
        return h, h


def make_cell(kind: str) -> Cell:
    return {
        "rnn_tanh": lambda: rnnkit.RNNCell(I, H),
        "rnn_relu": lambda: rnnkit.RNNCell(I, H, nonlinearity="relu"),
        "lstm": lambda: rnnkit.LSTMCell(I, H),
        "lstm_proj": lambda: rnnkit.LSTMCell(I, H, proj_size=2),
        "gru": lambda: rnnkit.GRUCell(I, H),
        "custom": lambda: MinimalGatedCell(I, H),
    }[kind]()


KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru", "custom"]


def by_hand(cell, x, state, lengths, reverse):
    """Each sequence on its own, sliced to its length, stepped one step at a time."""
    outs, finals = torch.zeros(T, B, cell.output_size), []
    for b in range(B):
        n = lengths[b]
        s = state if isinstance(state, torch.Tensor) else tuple(state)
        s = s[b : b + 1] if isinstance(s, torch.Tensor) else tuple(t[b : b + 1] for t in s)
        order = range(n - 1, -1, -1) if reverse else range(n)
        for t in order:
            o, s = cell(x[t, b : b + 1], s)
            outs[t, b] = o[0]
        finals.append(s)
    if isinstance(state, torch.Tensor):
        return outs, torch.cat(finals)
    return outs, tuple(torch.cat([f[k] for f in finals]) for k in range(len(state)))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_equals_cell_stepped_by_hand(kind: str, reverse: bool, backend: str) -> None:
    cell = make_cell(kind)
    x = torch.randn(T, B, I)
    state = cell.initial_state(B)
    state = (
        torch.randn_like(state)
        if isinstance(state, torch.Tensor)
        else tuple(torch.randn_like(s) for s in state)
    )
    layer = rnnkit.Recurrent(cell, reverse=reverse, backend=backend)
    for lengths in (LENGTHS, [T] * B):
        out, final = layer(x, state, lengths=torch.tensor(lengths))
        want_out, want_final = by_hand(cell, x, state, lengths, reverse)
        assert_close(out, want_out, OUT_TOL, "output")
        assert_close(final, want_final, OUT_TOL, "final state")
    out_nolen, final_nolen = layer(x, state)
    assert_close(out_nolen, out, OUT_TOL, "no lengths == full lengths")
    assert_close(final_nolen, final, OUT_TOL, "no lengths == full lengths")


@pytest.mark.parametrize("kind", ["lstm", "gru", "custom"])
def test_recurrent_batch_first_and_packed(kind: str) -> None:
    cell = make_cell(kind)
    x = torch.randn(T, B, I)
    lengths = torch.tensor(LENGTHS)
    out, final = rnnkit.Recurrent(cell)(x, lengths=lengths)
    out_bf, final_bf = rnnkit.Recurrent(cell, batch_first=True)(x.transpose(0, 1), lengths=lengths)
    assert_close(out_bf.transpose(0, 1), out, OUT_TOL, "batch_first")
    assert_close(final_bf, final, OUT_TOL, "batch_first")
    full = torch.tensor([T, 1, 4])  # a PackedSequence cannot hold a length-0 sequence
    packed = pack_padded_sequence(x[:, [0, 2, 3]], full, enforce_sorted=False)
    out_p, final_p = rnnkit.Recurrent(cell)(packed)
    out_l, final_l = rnnkit.Recurrent(cell)(x[:, [0, 2, 3]], lengths=full)
    want = pack_padded_sequence(out_l, full, enforce_sorted=False)
    assert torch.equal(out_p.batch_sizes, want.batch_sizes)
    assert torch.equal(out_p.sorted_indices, packed.sorted_indices)
    assert_close(out_p.data, want.data, OUT_TOL, "packed data")
    assert_close(final_p, final_l, OUT_TOL, "packed final")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_layernorm"])
def test_a_parametrized_weight_runs_as_its_value_and_trains(kind: str, backend: str) -> None:
    # torch.nn.utils.parametrizations.weight_norm keeps the weight's value and trains g and v
    make = {
        "lstm": lambda: rnnkit.LSTMCell(I, H),
        "gru": lambda: rnnkit.GRUCell(I, H),
        "lstm_layernorm": lambda: rnnkit.LayerNormLSTMCell(I, H),
    }[kind]
    if backend == "cpu" and build.unavailable() is not None:
        pytest.skip(f"the C++ kernels are unavailable: {build.unavailable()}")
    plain = make()
    cell = copy.deepcopy(plain)
    torch.nn.utils.parametrizations.weight_norm(cell, "weight_hh")
    x = torch.randn(T, B, I)
    out, final = rnnkit.Recurrent(cell, backend=backend)(x, lengths=LENGTHS)
    want_out, want_final = rnnkit.Recurrent(plain, backend="reference")(x, lengths=LENGTHS)
    assert_close(out, want_out, OUT_TOL, "output")
    assert_close(final, want_final, OUT_TOL, "final state")
    # d loss / d weight_hh, carried into g and v by the parametrization
    g, v = cell.parametrizations.weight_hh.original0, cell.parametrizations.weight_hh.original1
    loss = weighted_sum(out, *rnnkit.top_states(cell, final)[0])
    dg, dv = grads(loss, [g, v])
    dw = grads(weighted_sum(want_out, *rnnkit.top_states(plain, want_final)[0]), [plain.weight_hh])
    want_dg, want_dv = torch.autograd.grad(cell.weight_hh, [g, v], dw)
    assert_close(dg, want_dg, GRAD_TOL, "d g")
    assert_close(dv, want_dv, GRAD_TOL, "d v")


def test_lengths_zero_keeps_initial_state_and_gradient_flows_to_it() -> None:
    cell = rnnkit.LSTMCell(I, H)
    h0 = torch.randn(B, H, requires_grad=True)
    c0 = torch.randn(B, H, requires_grad=True)
    out, (h, c) = rnnkit.Recurrent(cell)(torch.randn(T, B, I), (h0, c0), lengths=LENGTHS)
    assert torch.equal(h[1], h0[1]) and torch.equal(c[1], c0[1])
    assert torch.count_nonzero(out[:, 1]) == 0
    dh0, dc0 = grads(weighted_sum(h, c), [h0, c0])
    assert torch.equal(dh0[1], torch.linspace(-1, 1, B * H).reshape(B, H).cos()[1])
    assert dc0.abs().sum() > 0


@pytest.mark.parametrize("merge", ["concat", "sum", "mul", "ave", None])
def test_bidirectional_and_stacked_equal_hand_composition(merge) -> None:
    fwd, bwd = rnnkit.GRUCell(I, H), rnnkit.GRUCell(I, H)
    bi = rnnkit.Bidirectional(rnnkit.Recurrent(fwd), rnnkit.Recurrent(bwd, reverse=True), merge)
    x, lengths = torch.randn(T, B, I), torch.tensor(LENGTHS)
    out, (s_f, s_b) = bi(x, lengths=lengths)
    of, sf = by_hand(fwd, x, fwd.initial_state(B), LENGTHS, False)
    ob, sb = by_hand(bwd, x, bwd.initial_state(B), LENGTHS, True)
    want = {
        "concat": torch.cat([of, ob], -1),
        "sum": of + ob,
        "mul": of * ob,
        "ave": (of + ob) / 2,
        None: (of, ob),
    }[merge]
    assert_close(out, want, OUT_TOL, f"merge {merge}")
    assert_close((s_f, s_b), (sf, sb), OUT_TOL, "states")

    if merge is None:
        return
    top = rnnkit.Recurrent(rnnkit.LSTMCell(bi.output_size, H))
    stack = rnnkit.Stacked([bi, top], dropout=0.5).eval()
    out2, (st0, st1) = stack(x, lengths=lengths)
    want2, want_top = by_hand(top.cell, out, top.cell.initial_state(B), LENGTHS, False)
    assert_close(out2, want2, OUT_TOL, "stacked output")
    assert_close(st1, want_top, OUT_TOL, "stacked top state")
    assert_close(st0, (s_f, s_b), OUT_TOL, "stacked bottom state")


def test_stacked_dropout_between_layers_not_after_last() -> None:
    layers = [rnnkit.Recurrent(rnnkit.RNNCell(I, H)), rnnkit.Recurrent(rnnkit.RNNCell(H, H))]
    stack = rnnkit.Stacked(layers, dropout=0.9).train()
    x = torch.randn(T, B, I)
    torch.manual_seed(1)
    out, _ = stack(x)
    torch.manual_seed(1)
    mid, _ = layers[0](x)
    want, _ = layers[1](torch.nn.functional.dropout(mid, 0.9, True))
    assert_close(out, want, OUT_TOL, "dropout between layers")
    assert torch.count_nonzero(out) == out.numel()  # no dropout on the last layer's output


def test_wrappers_run_custom_cells_with_gradients() -> None:
    bi = rnnkit.Bidirectional(
        rnnkit.Recurrent(MinimalGatedCell(I, H)),
        rnnkit.Recurrent(MinimalGatedCell(I, H), reverse=True),
    )
    stack = rnnkit.Stacked([bi, rnnkit.Recurrent(MinimalGatedCell(2 * H, H))])
    x = torch.randn(T, B, I, requires_grad=True)
    out, _ = stack(x, lengths=LENGTHS)
    assert out.shape == (T, B, H)
    assert torch.count_nonzero(out[:, 1]) == 0
    (dx,) = grads(out.sum(), [x])
    assert torch.count_nonzero(dx[4:, 3]) == 0  # padding gets no gradient
    assert torch.count_nonzero(dx[:4, 3]) > 0


class TwoSidedCell(MinimalGatedCell):
    """A user-defined cell whose output (h, -h) is wider than its state h."""

    @property
    def output_size(self) -> int:
        return 2 * self.hidden_size

    def forward(self, x, h):
        _, h = super().forward(x, h)
        return torch.cat([h, -h], 1), h


@pytest.mark.parametrize("merge", ["concat", "sum", None])
def test_custom_cell_whose_output_is_not_its_state(merge) -> None:
    fwd, bwd = TwoSidedCell(I, H), TwoSidedCell(I, H)
    p = 0.5
    bi = rnnkit.Bidirectional(
        rnnkit.Recurrent(fwd, dropout_output=p),
        rnnkit.Recurrent(bwd, reverse=True, dropout_output=p),
        merge,
    )
    x, lengths = torch.randn(T, B, I), torch.tensor(LENGTHS)
    of, sf = by_hand(fwd, x, fwd.initial_state(B), LENGTHS, False)
    ob, sb = by_hand(bwd, x, bwd.initial_state(B), LENGTHS, True)
    out, states = bi.eval()(x, lengths=lengths)
    want = {"concat": torch.cat([of, ob], -1), "sum": of + ob, None: (of, ob)}[merge]
    assert_close(out, want, OUT_TOL, f"merge {merge}")
    assert_close(states, (sf, sb), OUT_TOL, "states")
    if merge != "concat":
        return
    # in training, one output mask per sequence over the 2 x 2H features, the same at every step
    out = bi.train()(x, lengths=lengths)[0]
    mask = torch.where(out[0] == 0, 0.0, 1 / (1 - p))  # (B, 4H), read at the first step
    assert_close(out, want * mask, OUT_TOL, "output masks")
    stack = rnnkit.Stacked([bi, rnnkit.Recurrent(TwoSidedCell(4 * H, H), dropout_input=p)])
    assert stack(x, lengths=lengths)[0].shape == (T, B, 2 * H)


def test_zoneout_refuses_a_cell_whose_output_is_not_its_state() -> None:
    layer = rnnkit.Recurrent(TwoSidedCell(I, H), zoneout=0.1)
    with pytest.raises(ValueError, match="zoned-out h of 5 features, but TwoSidedCell outputs 10"):
        layer(torch.randn(T, B, I))


class GridCell(Cell):
    """A user-defined cell whose state is (B, C, H): the contract allows any (B, ...) state."""

    def __init__(self, input_size: int, hidden_size: int, channels: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.channels = input_size, hidden_size, channels
        self.lin = torch.nn.Linear(input_size, channels * hidden_size)

    @property
    def output_size(self) -> int:
        return self.channels * self.hidden_size

    def initial_state(self, batch_size, *, dtype=None, device=None):
        return torch.zeros(batch_size, self.channels, self.hidden_size, dtype=dtype, device=device)

    def forward(self, x, h):
        h = torch.tanh(self.lin(x).view_as(h) + 0.5 * h)
        return h.flatten(1), h


@pytest.mark.parametrize("channels", [B, 2])  # as many channels as sequences, and fewer
@pytest.mark.parametrize("reverse", [False, True])
def test_a_state_of_more_dimensions_with_lengths(channels: int, reverse: bool) -> None:
    cell = GridCell(I, H, channels)
    x, state = torch.randn(T, B, I), torch.rand(B, channels, H) + 0.5  # away from 0
    out, final = rnnkit.Recurrent(cell, reverse=reverse)(x, state, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS):
        h = state[b : b + 1]
        for t in range(n - 1, -1, -1) if reverse else range(n):
            o, h = cell(x[t, b : b + 1], h)
            assert_close(out[t, b], o[0], OUT_TOL, f"output [{t}, {b}]")
        assert_close(final[b], h[0], OUT_TOL, f"final state of sequence {b}")
    assert torch.count_nonzero(out[:, 1]) == 0
    # state dropout's mask has the state's shape, one per sequence, the same at every step
    layer = rnnkit.Recurrent(cell, dropout_state=0.5).train()
    out, final = layer(x, state, lengths=LENGTHS)
    with torch.no_grad():
        pre = cell.lin(x[0]).view_as(state)
        mask = ((out[0].view_as(state).atanh() - pre) / (0.5 * state)).round()
    assert set(mask[[0, 2, 3]].unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1/(1-p)
    for b, n in enumerate(LENGTHS):
        h = state[b : b + 1]
        for t in range(n):
            o, h = cell(x[t, b : b + 1], h * mask[b])
            assert_close(out[t, b], o[0], OUT_TOL, f"output [{t}, {b}] with state dropout")
        assert_close(final[b], h[0], OUT_TOL, f"final state of sequence {b} with state dropout")


# -- initial states of another dtype under autocast ----------------------------------------------

#: the drop-in and the cell of the same step: (drop-in class, cell factory, drop-in keywords)
DROP_IN_CELLS = {
    "rnn": (rnnkit.RNN, lambda i: rnnkit.RNNCell(i, H), {}),
    "gru": (rnnkit.GRU, lambda i: rnnkit.GRUCell(i, H), {}),
    "lstm": (rnnkit.LSTM, lambda i: rnnkit.LSTMCell(i, H), {}),
    "lstm_proj": (rnnkit.LSTM, lambda i: rnnkit.LSTMCell(i, H, proj_size=3), {"proj_size": 3}),
}


def _generic(name: str, structure: str, backend: str) -> torch.nn.Module:
    make = DROP_IN_CELLS[name][1]

    def recurrent(i: int, reverse: bool = False) -> rnnkit.Recurrent:
        return rnnkit.Recurrent(make(i), reverse=reverse, backend=backend)

    def bidirectional(i: int) -> rnnkit.Bidirectional:
        return rnnkit.Bidirectional(recurrent(i), recurrent(i, reverse=True))

    if structure == "recurrent":
        return recurrent(I)
    if structure == "bidirectional":
        return bidirectional(I)
    first = bidirectional(I)
    return rnnkit.Stacked([first, bidirectional(first.output_size)])


def _leaf_dtypes(state) -> list[torch.dtype]:
    if isinstance(state, torch.Tensor):
        return [state.dtype]
    return [d for s in state for d in _leaf_dtypes(s)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("given", [torch.float32, torch.bfloat16], ids=["fp32 x", "bf16 x"])
@pytest.mark.parametrize("structure", ["recurrent", "bidirectional", "stacked"])
@pytest.mark.parametrize("name", list(DROP_IN_CELLS))
def test_generic_layers_give_the_drop_ins_dtypes_for_initial_states_of_another_dtype(
    name, structure, given, with_lengths, backend
):
    """Under bf16 autocast, Recurrent, Bidirectional and Stacked return the dtypes the drop-in
    (and torch.nn) returns for the same cell, input and initial state of another dtype: a GRU's
    h_0 and an LSTM's c_0 carry their dtype into the states and the output."""
    if backend == "cpu" and build.unavailable() is not None:
        pytest.skip(f"the C++ kernels are unavailable: {build.unavailable()}")
    drop_cls, _, kw = DROP_IN_CELLS[name]
    torch.manual_seed(0)
    layers, directions = {"recurrent": (1, 1), "bidirectional": (1, 2), "stacked": (2, 2)}[
        structure
    ]
    drop_in = drop_cls(
        I, H, num_layers=layers, bidirectional=directions == 2, backend=backend, **kw
    )
    generic = _generic(name, structure, backend)
    other = torch.bfloat16 if given == torch.float32 else torch.float32
    x = torch.randn(T, B, I, dtype=given)
    h0 = torch.randn(layers * directions, B, kw.get("proj_size", H), dtype=other)
    c0 = torch.randn(layers * directions, B, H, dtype=other) if drop_cls is rnnkit.LSTM else None
    hx = h0 if c0 is None else (h0, c0)
    cells = [h0[k] if c0 is None else (h0[k], c0[k]) for k in range(layers * directions)]
    if structure == "recurrent":
        state = cells[0]
    elif structure == "bidirectional":
        state = (cells[0], cells[1])
    else:
        state = ((cells[0], cells[1]), (cells[2], cells[3]))
    lengths = torch.tensor(LENGTHS) if with_lengths else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out, want_state = drop_in(x, hx, lengths=lengths)
        got_out, got_state = generic(x, state, lengths=lengths)
        # the drop-in's dtypes are torch.nn's, where torch.nn.LSTM runs: it hands a float32
        # input to oneDNN, which fails without bf16 (tests/test_cpu_bf16.py), and decomposes
        # the LSTM for an input of another dtype than its weights', on any CPU
        lstm_in_onednn = name == "lstm" and given == torch.float32
        if not with_lengths and (not lstm_in_onednn or onednn_computes(torch.bfloat16)):
            ref = getattr(torch.nn, drop_cls.__name__)(
                I, H, num_layers=layers, bidirectional=directions == 2, **kw
            )
            ref_out, ref_state = ref(x, hx)
            assert [want_out.dtype, *_leaf_dtypes(want_state)] == [
                ref_out.dtype,
                *_leaf_dtypes(ref_state),
            ]
    want_h = want_state[0].dtype if c0 is not None else want_state.dtype
    want_c = want_state[1].dtype if c0 is not None else want_h
    per_direction = [want_h, want_c] if c0 is not None else [want_h]
    assert got_out.dtype == want_out.dtype, (got_out.dtype, want_out.dtype)
    assert _leaf_dtypes(got_state) == per_direction * (layers * directions), (
        _leaf_dtypes(got_state),
        per_direction,
    )


@pytest.mark.parametrize("lengths", [None, [6, 2, 1, 4]], ids=["full", "lengths"])
@pytest.mark.parametrize("backend", ["native", "cpu"])
@pytest.mark.parametrize("cell", ["GRUCell", "LSTMCell"])
def test_bidirectional_of_two_sizes_on_every_backend(cell, backend, lengths) -> None:
    # the directions fuse into one layer though their sizes differ; torch's op takes one size
    if backend == "cpu" and build.unavailable():
        pytest.skip("the cpu kernels are not built here")
    torch.manual_seed(0)
    make = getattr(rnnkit, cell)
    bi = rnnkit.Bidirectional(
        rnnkit.Recurrent(make(I, H)), rnnkit.Recurrent(make(I, H - 1), reverse=True)
    ).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)

    def run(name):
        for layer in (bi.forward_layer, bi.backward_layer):
            layer.backend = name
        out, state = bi(x, lengths=lengths)
        values = [out, *torch.utils._pytree.tree_leaves(state)]
        loss = sum((v * v.detach().cos()).sum() for v in values)
        return values + list(torch.autograd.grad(loss, [x, *bi.parameters()]))

    want = run("reference")
    for got, expected in zip(run(backend), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
