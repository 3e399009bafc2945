"""Bad input gets a clear error naming the bad value and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit.cells import PeepholeLSTMCell

T, B, I, H = 5, 3, 4, 6


@pytest.fixture
def lstm() -> rnnkit.LSTM:
    return rnnkit.LSTM(I, H, num_layers=2)


def test_wrong_input_rank(lstm) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 5, 3, 4\); expected 3 dimensions"):
        lstm(torch.randn(2, T, B, I))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        rnnkit.Recurrent(rnnkit.GRUCell(I, H))(torch.randn(T))


def test_wrong_feature_size(lstm) -> None:
    with pytest.raises(ValueError, match="input has 7 features .* expected input_size = 4"):
        lstm(torch.randn(T, B, 7))


def test_non_float_or_non_tensor_input(lstm) -> None:
    with pytest.raises(TypeError, match="dtype torch.int64; expected a floating-point"):
        lstm(torch.zeros(T, B, I, dtype=torch.long))
    with pytest.raises(TypeError, match="input is a list"):
        lstm([[1.0]])


def test_batch_mismatch_between_x_hx_and_lengths(lstm) -> None:
    x = torch.randn(T, B, I)
    h0, c0 = torch.zeros(2, B + 1, H), torch.zeros(2, B, H)
    with pytest.raises(ValueError, match=r"h_0 has shape \(2, 4, 6\); expected \(2, 3, 6\)"):
        lstm(x, (h0, c0))
    with pytest.raises(ValueError, match="lengths has 2 entries; expected one per sequence, B = 3"):
        lstm(x, lengths=[5, 5])


def test_lengths_out_of_range_or_not_integer(lstm) -> None:
    x = torch.randn(T, B, I)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 12 > T = 5"):
        lstm(x, lengths=[5, 12, 1])
    with pytest.raises(ValueError, match=r"lengths\[2\] = -1 < 0"):
        lstm(x, lengths=torch.tensor([5, 2, -1]))
    with pytest.raises(ValueError, match=rf"lengths\[1\] = {2**64} > T = 5"):
        lstm(x, lengths=[5, 2**64, 1])
    with pytest.raises(ValueError, match=rf"lengths\[0\] = {-(2**70)} < 0"):
        lstm(x, lengths=[-(2**70), 2, 1])
    with pytest.raises(TypeError, match="lengths has dtype torch.float32; expected an integer"):
        lstm(x, lengths=torch.tensor([5.0, 2.0, 1.0]))
    with pytest.raises(TypeError, match=r"lengths\[0\] = 2.5; expected an integer"):
        lstm(x, lengths=[2.5, 1, 1])
    with pytest.raises(ValueError, match=r"lengths has shape \(3, 1\); expected a 1-D"):
        lstm(x, lengths=torch.ones(3, 1, dtype=torch.long))


def test_hx_wrong_shape_dtype_device_or_type(lstm) -> None:
    x = torch.randn(T, B, I)
    good = torch.zeros(2, B, H)
    with pytest.raises(TypeError, match="c_0 has dtype torch.float64; expected torch.float32"):
        lstm(x, (good, good.double()))
    with pytest.raises(ValueError, match="h_0 is on meta; expected cpu"):
        lstm(x, (good.to("meta"), good))
    with pytest.raises(TypeError, match=r"hx is a Tensor; expected a tuple \(h_0, c_0\)"):
        lstm(x, good)
    with pytest.raises(ValueError, match=r"state has shape \(3, 5\); expected \(3, 6\)"):
        rnnkit.Recurrent(rnnkit.GRUCell(I, H))(x, torch.zeros(B, 5))


@pytest.mark.parametrize("backend", [None, "reference", "cpu", "native"])
def test_input_and_parameters_on_different_devices(backend) -> None:
    """(meta stands in for another device: a model on the GPU given a CPU batch.)"""
    x = torch.randn(T, B, I)
    on_meta = rnnkit.GRU(I, H, num_layers=2, device="meta", backend=backend)
    with pytest.raises(ValueError, match=r"GRU input is on cpu, but its parameters are on meta"):
        on_meta(x)
    with pytest.raises(ValueError, match=r"input is on meta, but its parameters are on cpu"):
        rnnkit.LSTM(I, H, backend=backend)(x.to("meta"), lengths=[5, 2, 1])
    cell = rnnkit.Recurrent(rnnkit.LSTMCell(I, H, device="meta"), backend=backend)
    with pytest.raises(ValueError, match=r"Recurrent\(LSTMCell\) input is on cpu, but its param"):
        cell(x)
    split = rnnkit.GRU(I, H, num_layers=2, backend=backend)
    split.weight_hh_l1 = torch.nn.Parameter(split.weight_hh_l1.to("meta"))
    with pytest.raises(
        ValueError, match="parameter weight_hh_l1 is on meta, but weight_ih_l0 is on"
    ):
        split(x)


@pytest.mark.parametrize("backend", [None, "reference", "cpu", "native"])
def test_lstm_hx_without_c0_or_with_extra_states(backend) -> None:
    lstm = rnnkit.LSTM(I, H, num_layers=2, backend=backend)
    x, good = torch.randn(T, B, I), torch.zeros(2, B, H)
    with pytest.raises(
        TypeError, match=r"c_0 is a NoneType; expected a Tensor of shape \(2, 3, 6\)"
    ):
        lstm(x, (good, None))
    with pytest.raises(TypeError, match=r"c_0 is a NoneType; expected a Tensor of shape \(2, 6\)"):
        lstm(x[:, 0], (good[:, 0], None))
    with pytest.raises(
        TypeError, match=r"hx is a tuple of length 3; expected a tuple \(h_0, c_0\)"
    ):
        lstm(x, (good, good, good))


def test_unknown_nonlinearity_and_merge_mode() -> None:
    with pytest.raises(ValueError, match="nonlinearity = 'sigmoid'; expected 'tanh' or 'relu'"):
        rnnkit.RNN(I, H, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="nonlinearity = 'gelu'"):
        rnnkit.RNNCell(I, H, nonlinearity="gelu")
    fwd = rnnkit.Recurrent(rnnkit.GRUCell(I, H))
    bwd = rnnkit.Recurrent(rnnkit.GRUCell(I, H), reverse=True)
    with pytest.raises(ValueError, match="merge = 'max' is not a merge mode"):
        rnnkit.Bidirectional(fwd, bwd, merge="max")
    with pytest.raises(ValueError, match="backward layer has reverse=False"):
        rnnkit.Bidirectional(fwd, rnnkit.Recurrent(rnnkit.GRUCell(I, H)))


def test_wrappers_refuse_layers_of_different_layouts() -> None:
    # A batch-first layer beside a time-major one would read time as batch: refused when built.
    def gru(batch_first: bool, reverse: bool = False, i: int = I) -> rnnkit.Recurrent:
        return rnnkit.Recurrent(rnnkit.GRUCell(i, H), reverse=reverse, batch_first=batch_first)

    with pytest.raises(
        ValueError,
        match="the backward layer has batch_first=True, but the forward layer has "
        "batch_first=False; expected every layer to read the same layout",
    ):
        rnnkit.Bidirectional(gru(False), gru(True, reverse=True))
    with pytest.raises(
        ValueError, match=r"layers\[1\] has batch_first=False, but layers\[0\] has batch_first=True"
    ):
        rnnkit.Stacked([gru(True), gru(False, i=H)])
    bi = rnnkit.Bidirectional(gru(True), gru(True, reverse=True))
    assert bi.batch_first is True
    with pytest.raises(ValueError, match=r"layers\[1\] has batch_first=False"):
        rnnkit.Stacked([bi, rnnkit.GRU(2 * H, H)])
    stack = rnnkit.Stacked([bi, rnnkit.GRU(2 * H, H, batch_first=True)])
    assert stack.batch_first is True
    assert stack(torch.randn(B, T, I))[0].shape == (B, T, H)


def test_wrappers_refuse_layers_whose_sizes_do_not_chain() -> None:
    def gru(i: int, h: int = H, reverse: bool = False) -> rnnkit.Recurrent:
        return rnnkit.Recurrent(rnnkit.GRUCell(i, h), reverse=reverse)

    with pytest.raises(
        ValueError,
        match="the backward layer has input_size = 5, but the forward layer has input_size = 4",
    ):
        rnnkit.Bidirectional(gru(I), gru(I + 1, reverse=True))
    with pytest.raises(
        ValueError,
        match="merge = 'sum' combines .* forward layer outputs 6 features and the backward layer 7",
    ):
        rnnkit.Bidirectional(gru(I), gru(I, H + 1, reverse=True), merge="sum")
    with pytest.raises(
        ValueError, match=r"layers\[1\] has input_size = 4, but layers\[0\] outputs 6 features"
    ):
        rnnkit.Stacked([gru(I), gru(I)])
    # concatenated directions of different sizes: output_size is their sum, and a stack reads it
    bi = rnnkit.Bidirectional(gru(I), gru(I, H + 1, reverse=True))
    assert bi.output_size == 2 * H + 1
    stack = rnnkit.Stacked([bi, gru(bi.output_size)])
    assert stack(torch.randn(T, B, I), lengths=[5, 0, 2])[0].shape == (T, B, H)
    with pytest.raises(
        ValueError, match=r"layers\[1\] has input_size = 12, but layers\[0\] outputs 13"
    ):
        rnnkit.Stacked([bi, gru(2 * H)])


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_recurrent_refuses_a_torch_nn_cell_when_built(name) -> None:
    # torch.nn's cells have input_size but no initial_state: refused when built, not at the call
    with pytest.raises(
        TypeError,
        match=rf"cell is a {name}; expected an rnnkit Cell .*; rnnkit.{name} has torch.nn.{name}'s "
        rf"parameters: rnnkit.{name}\(...\).load_state_dict\(cell.state_dict\(\)\)",
    ):
        rnnkit.Recurrent(getattr(torch.nn, name)(I, H))
    with pytest.raises(TypeError, match="cell is a Linear; expected an rnnkit Cell"):
        rnnkit.Recurrent(torch.nn.Linear(I, H))


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.GRU])
def test_proj_size_only_on_lstm(cls) -> None:
    name = cls.__name__
    with pytest.raises(ValueError, match=f"proj_size = 0 given to {name}; only LSTM has a proj"):
        cls(I, H, proj_size=0)
    with pytest.raises(
        TypeError, match=f"{name}\\(\\) got an unexpected keyword argument 'batchfirst'"
    ):
        cls(I, H, batchfirst=True)
    with pytest.raises(TypeError, match="LSTM\\(\\) got an unexpected keyword argument 'proj'"):
        rnnkit.LSTM(I, H, proj=2)


def test_proj_size_not_below_hidden_size() -> None:
    with pytest.raises(ValueError, match="proj_size = 6 >= hidden_size = 6"):
        rnnkit.LSTM(I, H, proj_size=6)
    with pytest.raises(ValueError, match="proj_size = 8 >= hidden_size = 6"):
        rnnkit.LSTMCell(I, H, proj_size=8)


@pytest.mark.parametrize("cls", [rnnkit.LSTMCell, PeepholeLSTMCell])
@pytest.mark.parametrize("hidden", ["6", None, 0])
def test_lstm_cells_name_a_bad_hidden_size(cls, hidden) -> None:
    with pytest.raises(
        ValueError, match=f"^hidden_size = {hidden!r}; expected a positive integer$"
    ):
        cls(I, hidden)


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.2"])  # 1.0 is allowed, as torch.nn allows it
def test_dropout_outside_unit_interval(p) -> None:
    with pytest.raises(ValueError, match=rf"dropout = {p!r}; expected a probability in \[0, 1\]"):
        rnnkit.GRU(I, H, num_layers=2, dropout=p)
    with pytest.raises(ValueError, match="dropout = "):
        rnnkit.Stacked([rnnkit.Recurrent(rnnkit.GRUCell(I, H))], dropout=p)


@pytest.mark.parametrize("p", [np.float32(0.25), np.float64(0.5), np.int64(0)])
def test_numpy_probabilities_are_accepted_as_torch_nn_accepts_them(p) -> None:
    theirs = torch.nn.GRU(I, H, num_layers=2, dropout=p)
    ours = rnnkit.GRU(I, H, num_layers=2, dropout=p, zoneout=p, dropout_input=p)
    assert ours.dropout == theirs.dropout
    assert ours.regularisers.zoneout == ours.regularisers.dropout_input == float(p)
    with pytest.raises(ValueError, match=r"dropout = np.float32\(1.5\); expected a prob"):
        rnnkit.GRU(I, H, num_layers=2, dropout=np.float32(1.5))


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="hidden_size = 0; expected a positive integer"):
        rnnkit.GRU(I, 0)
    with pytest.raises(ValueError, match="num_layers = 0; expected a positive integer"):
        rnnkit.LSTM(I, H, num_layers=0)


def test_invalid_backend_name() -> None:
    with pytest.raises(ValueError, match="backend = 'cuda' is not a backend; expected one of"):
        rnnkit.LSTM(I, H, backend="cuda")
    with pytest.raises(ValueError, match="backend = 'fast'"):
        rnnkit.set_default_backend("fast")


def test_backend_that_cannot_run_the_call() -> None:
    lstm = rnnkit.LSTM(I, H, backend="native")
    with pytest.raises(rnnkit.BackendUnavailable, match="'native' cannot run .* length of 0"):
        lstm(torch.randn(T, B, I), lengths=[5, 0, 2])
    custom = rnnkit.Recurrent(_Custom(), backend="native")
    with pytest.raises(rnnkit.BackendUnavailable, match="torch has no fused op for a custom cell"):
        custom(torch.randn(T, B, I))


def test_packed_sequence_with_lengths_is_refused(lstm) -> None:
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(T, B, I), [5, 4, 3])
    with pytest.raises(ValueError, match="lengths was given with a PackedSequence"):
        lstm(packed, lengths=[5, 4, 3])


def test_nan_propagates_like_torch_nn() -> None:
    mine = rnnkit.GRU(I, H)
    ref = torch.nn.GRU(I, H)
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(T, B, I)
    x[2, 1, 0] = float("nan")
    for backend in ("reference", "auto"):
        mine.backend = backend
        out, h = mine(x)
        want, h_want = ref(x)
        assert torch.equal(out.isnan(), want.isnan())
        assert out[2:, 1].isnan().all() and not out[:, 0].isnan().any()
        assert torch.equal(h.isnan(), h_want.isnan())


class _Custom(rnnkit.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.input_size, self.hidden_size = I, H
        self.lin = torch.nn.Linear(I + H, H)

    def forward(self, x, h):
        h = torch.tanh(self.lin(torch.cat([x, h], 1)))
        return h, h


def test_lengths_accept_numpy_integers_but_not_bools(lstm) -> None:
    x = torch.randn(T, B, I)
    a = lstm(x, lengths=[np.int64(5), np.int32(2), 1])[0]
    assert_equal = torch.testing.assert_close
    assert_equal(a, lstm(x, lengths=[5, 2, 1])[0])
    with pytest.raises(TypeError, match=r"lengths\[1\] = True; expected an integer"):
        lstm(x, lengths=[5, True, 1])


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int16, torch.int32, torch.uint32, torch.uint64]
)
def test_lengths_of_every_integer_dtype_and_an_unsigned_value_past_int64(lstm, dtype) -> None:
    x = torch.randn(T, B, I)
    got = lstm(x, lengths=torch.tensor([5, 2, 0], dtype=dtype))[0]
    torch.testing.assert_close(got, lstm(x, lengths=[5, 2, 0])[0])
    if dtype == torch.uint64:  # named as given, not wrapped round to a negative length
        with pytest.raises(ValueError, match=rf"lengths\[0\] = {2**63 + 5} > T = {T}"):
            lstm(x, lengths=torch.tensor([2**63 + 5, 2, 0], dtype=dtype))


@pytest.mark.parametrize("given", [{5, 2, 0}, frozenset({5, 2, 0}), {5: 0, 2: 1, 0: 2}])
def test_lengths_without_an_order_are_refused(lstm, given) -> None:
    with pytest.raises(TypeError, match=rf"lengths is a {type(given).__name__}; expected"):
        lstm(torch.randn(T, B, I), lengths=given)


def test_return_gates_needs_named_gates() -> None:
    class Gated(_Custom):
        def forward(self, x, h, return_gates=False):
            h, _ = super().forward(x, h)
            return (h, h, (h,)) if return_gates else (h, h)

    layer = rnnkit.Recurrent(Gated())
    with pytest.raises(ValueError, match="Gated has no gates to return"):
        layer(torch.randn(T, B, I), return_gates=True)
    Gated.gate_names = ("a",)
    _, _, gates = layer(torch.randn(T, B, I), return_gates=True)
    assert list(gates) == ["a"] and gates["a"].shape == (T, B, H)


def test_a_composites_state_error_names_the_part_and_direction() -> None:
    x = torch.randn(T, B, I)

    def bi(cell):
        return rnnkit.Bidirectional(
            rnnkit.Recurrent(cell(I, H)), rnnkit.Recurrent(cell(I, H), reverse=True)
        )

    good = torch.zeros(B, H)
    with pytest.raises(ValueError, match=rf"^state\[1\] has shape \(2, {H}\); expected \({B}, "
                       rf"{H}\) in the backward direction$"):  # fmt: skip
        bi(rnnkit.GRUCell)(x, (good, torch.zeros(2, H)))
    with pytest.raises(TypeError, match=r"^state\[0\] is a list; expected a Tensor .* in the "
                       r"forward direction$"):  # fmt: skip
        bi(rnnkit.GRUCell)(x, ([good], good))
    lstm = bi(rnnkit.LSTMCell)
    with pytest.raises(ValueError, match=r"^state\[1\]\[1\] has shape .* backward direction$"):
        lstm(x, ((good, good), (good, good[:, :-1])))
    stack = rnnkit.Stacked([lstm, rnnkit.Recurrent(rnnkit.GRUCell(2 * H, H))])
    with pytest.raises(ValueError, match=r"^state\[0\]\[1\]\[0\] has shape \(2, "):
        stack(x, (((good, good), (good[:2], good)), None))
    with pytest.raises(ValueError, match=r"^state\[1\] has shape \(3, 4\); expected"):
        stack(x, (None, torch.zeros(3, 4)))
    # layers that do not run fused (a custom cell) name the part the same way
    custom = rnnkit.Stacked([rnnkit.Recurrent(Doubling(I, H)), rnnkit.Recurrent(Doubling(H, H))])
    with pytest.raises(ValueError, match=r"^state\[1\] has shape \(3, 4\); expected"):
        custom(x, (None, torch.zeros(3, 4)))


class Doubling(rnnkit.Cell):
    """A custom cell (h' = tanh(W x + 2 h)): runs outside the fused layers."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.lin = torch.nn.Linear(input_size, hidden_size)

    def forward(self, x, state):
        h = torch.tanh(self.lin(x) + 2 * state)
        return h, h


@pytest.mark.parametrize("given", ["list", "meta tensor", "cpu tensor"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: rnnkit.LSTM(I, H, num_layers=2, bidirectional=True),
        lambda: rnnkit.GRU(I, H, batch_first=True),
        lambda: rnnkit.Recurrent(rnnkit.LayerNormLSTMCell(I, H), zoneout=0.1),
        lambda: rnnkit.RNN(I, H, checkpoint=2),
    ],
)
def test_lengths_on_the_meta_device_give_shapes(make, given) -> None:
    """As torch.nn's layers do on the meta device, the output's shape without data, forward and
    backward (lengths on meta have no values to check: their dtype and shape are)."""
    layer = make().to("meta")
    first = getattr(layer, "batch_first", False)
    x = torch.randn(B, T, I) if first else torch.randn(T, B, I)
    values = [T, 2, 0]
    lengths = {
        "list": values,
        "meta tensor": torch.tensor(values, device="meta"),
        "cpu tensor": torch.tensor(values),
    }[given]
    out, _ = layer(x.to("meta").requires_grad_(), lengths=lengths)
    width = 2 * H if getattr(layer, "bidirectional", False) else H
    assert out.device.type == "meta" and out.shape == ((B, T, width) if first else (T, B, width))
    out.sum().backward()
    with pytest.raises(ValueError, match=r"lengths has shape \(3, 1\); expected a 1-D tensor"):
        layer(x.to("meta"), lengths=torch.ones(3, 1, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"lengths\[0\] = 9 > T = 5"):
        layer(x.to("meta"), lengths=[9, 1, 1])
    if given == "meta tensor":  # and on a layer with values, lengths without them are named
        with pytest.raises(ValueError, match="lengths is on the meta device .* input on cpu"):
            make()(x, lengths=lengths)
