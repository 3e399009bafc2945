"""torch.export of rnnkit's layers: one ``rnnkit::export_layer`` op per layer, dynamic T and B,
``lengths=`` and states as inputs, equal to the eager layers; the export backend's place in the
dispatch (it runs only while exporting, ahead of named backends, and declines what it cannot
export); the op's schema and fake kernel (``torch.library.opcheck``)."""

from __future__ import annotations

import pytest
import torch
from conftest import OUT_TOL
from export_helpers import CELLS, DROP_INS, H, I, check_inputs, example, zoo
from torch.export import Dim

import rnnkit
from rnnkit import backends
from rnnkit.backends.export.backend import NOT_EXPORTING, ExportBackend

OP = torch.ops.rnnkit.export_layer.default
#: The layers exported per cell: one direction, two bidirectional layers, zoneout (the drop-ins:
#: test_drop_ins_export_with_their_torch_nn_signature).
LAYERS = ("rev1", "bi2", "bi1-zoneout")
#: rnnkit::export_layer ops per call of each of those layers (directions run as one op).
OPS = {"rev1": 1, "bi2": 2, "bi1-zoneout": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def dynamic_shapes(module) -> dict:
    steps, batch = Dim("T"), Dim("B")
    return {
        "x": {0: steps, 1: batch},
        "lengths": {0: batch},
        "states": [{axis: batch} for axis in module.state_axes()],
    }


@pytest.mark.parametrize("cell", list(CELLS))
def test_torch_export_has_one_rnnkit_op_per_layer_and_equals_the_layers(cell: str) -> None:
    module = zoo(cell, LAYERS)
    ep = torch.export.export(module, example(module), dynamic_shapes=dynamic_shapes(module))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    rnnkit_ops = [t for t in targets if "rnnkit" in str(t)]
    assert set(rnnkit_ops) <= {OP}, f"unexpected rnnkit ops: {set(rnnkit_ops)}"
    per_call = sum(OPS[label.split()[-1]] for label in module.names)  # labels: "cell layer"
    assert len(rnnkit_ops) == 2 * per_call  # with and without lengths
    inputs = check_inputs(module)  # another T and B, lengths with a 0, a 1 and T
    for got, expected in zip(ep.module()(*inputs), module(*inputs), strict=True):
        torch.testing.assert_close(got, expected, atol=OUT_TOL, rtol=OUT_TOL)


def test_torch_export_strict_traces_without_a_graph_break() -> None:
    lstm = rnnkit.LSTM(I, H, num_layers=2, bidirectional=True).eval()
    x, lengths = torch.randn(5, 3, I), torch.tensor([5, 2, 4])
    shapes = {"input": {0: Dim("T"), 1: Dim("B")}, "lengths": {0: Dim("B")}}
    ep = torch.export.export(
        lstm, (x,), {"lengths": lengths}, dynamic_shapes=shapes, strict=True
    )  # strict: one graph, or an error naming the break
    assert sum(n.target == OP for n in ep.graph.nodes) == 2
    x, lengths = torch.randn(8, 4, I), torch.tensor([8, 0, 1, 6])
    for got, expected in zip(
        ep.module()(x, lengths=lengths), lstm(x, lengths=lengths), strict=True
    ):
        torch.testing.assert_close(got, expected, atol=OUT_TOL, rtol=OUT_TOL)


def test_a_named_backend_gives_way_while_exporting() -> None:
    """The C++ and torch.nn kernels have no ONNX lowering: while exporting, the export op runs
    in their place; outside export they run as named."""
    for name in ("native", "reference"):
        gru = rnnkit.GRU(I, H, backend=name).eval()
        x = torch.randn(4, 2, I)
        assert rnnkit.explain(gru, x).backend == name
        ep = torch.export.export(gru, (x,))
        assert [n.target for n in ep.graph.nodes if "rnnkit" in str(n.target)] == [OP]


def test_outside_export_the_backend_declines_and_is_not_mentioned() -> None:
    gru = rnnkit.GRU(I, H)
    x = torch.randn(4, 2, I)
    assert "export" not in str(rnnkit.explain(gru, x))
    assert "export" in rnnkit.available_backends()
    with (
        rnnkit.use_backend("export"),
        pytest.raises(rnnkit.BackendUnavailable, match="runs only while a model is exported"),
    ):
        gru(x)
    assert ExportBackend().check(backends.Request(mode="gru")) == NOT_EXPORTING


def test_while_exporting_it_declines_what_it_cannot_export(monkeypatch) -> None:
    import rnnkit.backends.export.backend as export_backend

    monkeypatch.setattr(export_backend, "exporting", lambda: True)
    check = ExportBackend().check
    assert check(backends.Request(mode="lstm", zoneout=True)) is None
    assert check(backends.Request(mode="gru", dropout=True)) is None
    assert "custom cell" in check(backends.Request(mode=None))
    assert "return_gates" in check(backends.Request(mode="gru", gates=True))


@pytest.mark.parametrize(
    "regulariser",
    [{"weight_drop": 0.5}, {"zoneout": 0.2}, {"dropout_state": 0.3}, {"dropout_input": 0.2}],
)
def test_regularisers_in_training_mode_are_refused_while_exporting(regulariser: dict) -> None:
    """Their masks are random in training mode; in eval mode dropout is a no-op and zoneout
    its expectation, which the op computes."""
    gru = rnnkit.GRU(I, H, **regulariser)
    (name,) = regulariser
    with pytest.raises(RuntimeError, match=rf"{name}=.*: .*export the model in eval mode"):
        torch.export.export(gru.train(), (torch.randn(4, 2, I),))
    ep = torch.export.export(gru.eval(), (torch.randn(4, 2, I),))
    assert [n.target for n in ep.graph.nodes if "rnnkit" in str(n.target)] == [OP]


@pytest.mark.parametrize(
    "make",
    [
        lambda: rnnkit.GRU(I, H, num_layers=2, dropout=0.3),
        lambda: rnnkit.Stacked(
            [rnnkit.Recurrent(rnnkit.GRUCell(I, H)), rnnkit.Recurrent(rnnkit.LSTMCell(H, H))],
            dropout=0.3,
        ),  # cells that differ: the layers run one by one, the stack drops out between them
    ],
)
def test_dropout_between_layers_in_training_mode_is_refused_while_exporting(make) -> None:
    """Its mask is random: an exported graph would drop a random part of every input."""
    stack = make()
    x = torch.randn(4, 2, I)
    with pytest.raises(RuntimeError, match=r"dropout between layers: .*export the model in eval"):
        torch.export.export(stack.train(), (x,))
    ep = torch.export.export(stack.eval(), (x,))
    torch.testing.assert_close(ep.module()(x), stack(x), atol=OUT_TOL, rtol=OUT_TOL)


def test_directions_of_different_sizes_export_as_one_op_each() -> None:
    layer = rnnkit.Bidirectional(
        rnnkit.Recurrent(rnnkit.GRUCell(I, H)), rnnkit.Recurrent(rnnkit.GRUCell(I, 7), reverse=True)
    ).eval()
    x, lengths = torch.randn(5, 3, I), torch.tensor([5, 1, 3])
    ep = torch.export.export(layer, (x,), {"lengths": lengths})
    assert sum(n.target == OP for n in ep.graph.nodes) == 2
    (out, (h_f, h_b)), expected = ep.module()(x, lengths=lengths), layer(x, lengths=lengths)
    assert out.shape == (5, 3, H + 7)
    torch.testing.assert_close((out, (h_f, h_b)), expected, atol=OUT_TOL, rtol=OUT_TOL)


def _op_args(mode: str, direction: str, lengths: bool, zoneout: list[float], dtype=torch.float64):
    """Arguments of the export op for one layer of ``mode`` (the weights of a cell per
    direction), initial states random."""
    torch.manual_seed(3)
    count = 2 if direction == "bidirectional" else 1
    cells = [CELLS[mode](I).to(dtype) for _ in range(count)]
    weights = [w.detach() for c in cells for w in c.kernel_weights().values()]
    sizes = cells[0].state_sizes
    h0 = torch.randn(count, 3, sizes[0], dtype=dtype)
    c0 = torch.randn(count, 3, sizes[1], dtype=dtype) if len(sizes) == 2 else None
    x = torch.randn(6, 3, I, dtype=dtype)
    proj = "weight_hr" in cells[0].kernel_weights()
    spec_mode = cells[0].kernel_mode()
    return (
        x, h0, c0, weights, torch.tensor([6, 0, 2]) if lengths else None, spec_mode, direction,
        True, proj, zoneout, 1e-5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "mode,direction,lengths,zoneout",
    [
        ("gru", "forward", True, []),
        ("lstm_proj", "bidirectional", True, [0.3, 0.2, 0.0, 0.1]),
        ("lstm_layernorm", "reverse", False, []),
        ("rnn_relu", "bidirectional", False, [0.2, 0.0]),
    ],
)
def test_the_op_passes_opcheck(mode: str, direction: str, lengths: bool, zoneout: list) -> None:
    """Schema, fake kernel and real kernel agree (torch.library.opcheck)."""
    torch.library.opcheck(OP, _op_args(mode, direction, lengths, zoneout))


def test_the_op_equals_the_reference_layers() -> None:
    x, h0, c0, weights, lengths, mode, direction, bias, proj, zoneout, eps = _op_args(
        "lstm", "bidirectional", True, [0.3, 0.2, 0.0, 0.0]
    )
    out, h_n, c_n = OP(x, h0, c0, weights, lengths, mode, direction, bias, proj, zoneout, eps)
    f, b = rnnkit.LSTMCell(I, H).double(), rnnkit.LSTMCell(I, H).double()
    names = list(f.kernel_weights())
    with torch.no_grad():
        for cell, ws in ((f, weights[: len(names)]), (b, weights[len(names) :])):
            for n, w in zip(names, ws, strict=True):
                cell.get_parameter(n).copy_(w)
    layer = rnnkit.Bidirectional(
        rnnkit.Recurrent(f, zoneout=0.3, zoneout_cell=0.2), rnnkit.Recurrent(b, reverse=True)
    ).eval()
    with rnnkit.use_backend("reference"):
        expected, ((hf, cf), (hb, cb)) = layer(x, ((h0[0], c0[0]), (h0[1], c0[1])), lengths=lengths)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n, torch.stack([hf, hb]), atol=1e-12, rtol=0)
    torch.testing.assert_close(c_n, torch.stack([cf, cb]), atol=1e-12, rtol=0)
    assert torch.equal(out[2:, 2], torch.zeros_like(out[2:, 2]))  # padding is exactly 0
    assert torch.equal(h_n[:, 1], h0[:, 1])  # a length-0 sequence keeps its initial state


def test_drop_ins_export_with_their_torch_nn_signature() -> None:
    for name, make in DROP_INS.items():
        layer = make(num_layers=2, batch_first=True).eval()
        x = torch.randn(3, 5, I)
        ep = torch.export.export(layer, (x,), {"lengths": torch.tensor([5, 3, 1])})
        assert sum(n.target == OP for n in ep.graph.nodes) == 2, name


def test_rnnkit_export_help_has_an_example(capsys) -> None:
    from rnnkit import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "rnnkit export runs/sentiment --onnx" in out
    assert "export" in cli.COMMANDS


def test_a_checkpointed_layer_exports_as_one_op_per_layer() -> None:
    """checkpoint=K saves memory for a backward pass; the exported graph has none."""
    lstm = rnnkit.LSTM(I, H, num_layers=2, checkpoint=2)
    x, lengths = torch.randn(7, 3, I, requires_grad=True), torch.tensor([7, 2, 5])
    ep = torch.export.export(lstm, (x,), {"lengths": lengths})
    assert sum(n.target == OP for n in ep.graph.nodes) == 2
    with torch.no_grad():
        for got, expected in zip(
            ep.module()(x, lengths=lengths), lstm(x, lengths=lengths), strict=True
        ):
            torch.testing.assert_close(got, expected, atol=OUT_TOL, rtol=OUT_TOL)


class _Elman(rnnkit.Cell):
    """A custom cell: h' = tanh(W [x, h] + b)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.lin = torch.nn.Linear(input_size + hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(torch.cat([x, h], dim=-1)))
        return h, h


@pytest.mark.parametrize("reverse", [False, True])
def test_a_custom_cell_exports_with_lengths_as_an_input(reverse: bool) -> None:
    """A custom cell's loop is traced over the example's steps (which a warning says: the graph
    runs that many steps, whatever the steps the exporter was told are dynamic); ``lengths=``
    stays an input of the graph (not the example's longest length baked in): the graph equals
    the layer at lengths other than the example's, longer ones among them."""
    layer = rnnkit.Recurrent(_Elman(I, H), reverse=reverse).eval()
    x = torch.randn(5, 3, I)
    unrolled = "custom cell exports as its Python time loop, unrolled over the example's 5 steps"
    with pytest.warns(UserWarning, match=unrolled):
        ep = torch.export.export(layer, (x,), {"lengths": torch.tensor([3, 2, 1])})
    for lengths in ([5, 4, 2], [0, 5, 1]):
        lengths = torch.tensor(lengths)
        torch.testing.assert_close(
            ep.module()(x, lengths=lengths), layer(x, lengths=lengths), atol=OUT_TOL, rtol=OUT_TOL
        )


class _PackedLSTM(torch.nn.Module):
    """The torch.nn idiom: pack the padded batch, run the layer, pad its output."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = rnnkit.LSTM(I, H, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out, (h_n, _) = self.rnn(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return out, h_n


#: What a layer says when a PackedSequence reaches it while exporting.
PACKED = r"^a PackedSequence does not export .*lengths="


class _Gates(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, return_gates=True)[0]


@pytest.mark.parametrize(
    "layer",
    [lambda: rnnkit.LSTM(I, H), lambda: rnnkit.Recurrent(rnnkit.LayerNormGRUCell(I, H))],
    ids=["drop-in", "recurrent"],
)
def test_return_gates_is_refused_while_exporting_in_one_line(layer) -> None:
    """The gates are for looking into an eager call; an exported call that asks for them is
    refused by the layer, naming it, on either exporter (not by a backend's op, late)."""
    import io

    model = _Gates(layer()).eval()
    x = torch.randn(4, 2, I)
    message = r"^return_gates=True while \w+ is exported; expected a call without it"
    with pytest.raises(ValueError, match=message):
        torch.export.export(model, (x,))
    with pytest.raises(ValueError, match=message):
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)
    model(x)  # outside export it runs


def test_a_packed_sequence_is_refused_while_exporting_with_the_way_that_exports() -> None:
    """A PackedSequence's batch sizes are values the exported graph cannot read: the layer says
    so in one line and names what exports (the padded batch with lengths=)."""
    model = _PackedLSTM().eval()
    x, lengths = torch.randn(3, 5, I), torch.tensor([5, 2, 4])
    with pytest.raises(ValueError, match=PACKED):
        torch.export.export(model, (x, lengths))
    model(x, lengths)  # outside export it runs


def test_an_input_of_two_dimensions_is_named_in_numbers_while_exported() -> None:
    """The one-line error gives the input's shape as numbers under the TorchScript-based exporter
    too, which traces sizes as tensors."""
    import io

    from rnnkit.cells import GRUCell
    from rnnkit.layers import Recurrent

    model = Recurrent(GRUCell(3, 4)).eval()
    with pytest.raises(ValueError, match=r"^input has shape \(5, 3\); expected 3 dimensions"):
        torch.onnx.export(model, (torch.randn(5, 3),), io.BytesIO(), dynamo=False)
