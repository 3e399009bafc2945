"""Cell variants (LayerNorm, peephole), regularisers and gate introspection, on the reference path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import OUT_TOL, assert_close

import rnnkit
from rnnkit import functional as F
from rnnkit.backends.cpu import build
from rnnkit.cells import LayerNormGRUCell, LayerNormLSTMCell, PeepholeLSTMCell
from rnnkit.layers.regularisers import Regularisers

T, B, I, H = 6, 4, 3, 5
LENGTHS = torch.tensor([6, 0, 2, 5])


def _ln(v: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return norm.weight * (v - mean) / torch.sqrt(var + norm.eps) + norm.bias


def _randomise(cell: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.8, 0.8)


def test_layernorm_lstm_step_by_the_equations() -> None:
    cell = LayerNormLSTMCell(I, H)
    _randomise(cell)
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    pre = _ln(x @ cell.weight_ih.T, cell.ln_ih) + _ln(h @ cell.weight_hh.T, cell.ln_hh)
    pre = pre + cell.bias_ih + cell.bias_hh
    i, f, g, o = pre.chunk(4, 1)
    c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_t = torch.sigmoid(o) * torch.tanh(_ln(c_t, cell.ln_c))
    _out, (h_got, c_got) = cell(x, (h, c))
    assert_close((h_got, c_got), (h_t, c_t), OUT_TOL, "LN-LSTM")


def test_layernorm_gru_step_by_the_equations() -> None:
    cell = LayerNormGRUCell(I, H)
    _randomise(cell)
    x, h = torch.randn(B, I), torch.randn(B, H)
    gi = _ln(x @ cell.weight_ih.T, cell.ln_ih) + cell.bias_ih
    gh = _ln(h @ cell.weight_hh.T, cell.ln_hh) + cell.bias_hh
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
    n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
    assert_close(cell(x, h)[0], (1 - z) * n + z * h, OUT_TOL, "LN-GRU")


def test_peephole_lstm_sees_the_cell_state() -> None:
    cell = PeepholeLSTMCell(I, H)
    plain = rnnkit.LSTMCell(I, H)
    plain.load_state_dict({k: v for k, v in cell.state_dict().items() if "weight_c" not in k})
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    with torch.no_grad():
        for w in (cell.weight_ci, cell.weight_cf, cell.weight_co):
            w.zero_()
    assert_close(cell(x, (h, c))[1], plain(x, (h, c))[1], OUT_TOL, "zero peepholes == LSTM")
    with torch.no_grad():
        cell.weight_co.fill_(2.0)
    _, (h_t, c_t) = cell(x, (h, c))
    pre = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih) + torch.nn.functional.linear(
        h, cell.weight_hh, cell.bias_hh
    )
    o = torch.sigmoid(pre[:, 3 * H :] + 2.0 * c_t)  # the output gate peeks at c_t
    assert_close(h_t, o * torch.tanh(c_t), OUT_TOL, "output peephole on c_t")


VARIANTS = {
    "layernorm_lstm": lambda i: LayerNormLSTMCell(i, H, dtype=torch.float64),
    "layernorm_gru": lambda i: LayerNormGRUCell(i, H, dtype=torch.float64),
    "peephole_lstm": lambda i: PeepholeLSTMCell(i, H, dtype=torch.float64),
    "peephole_lstmp": lambda i: PeepholeLSTMCell(i, H, proj_size=2, dtype=torch.float64),
}


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_variants_gradcheck_through_bidirectional_with_lengths(kind: str) -> None:
    make = VARIANTS[kind]
    layer = rnnkit.Bidirectional(rnnkit.Recurrent(make(I)), rnnkit.Recurrent(make(I), reverse=True))
    for p in layer.parameters():
        p.data.uniform_(-0.7, 0.7)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        out, states = torch.func.functional_call(
            layer, dict(zip(names, ps, strict=True)), (x,), {"lengths": [4, 0, 2]}
        )
        return (out, *torch.utils._pytree.tree_leaves(states))

    assert torch.autograd.gradcheck(f, (x, *layer.parameters()), atol=1e-6)
    fused = (
        kind.startswith(("layernorm", "peephole")) and build.unavailable() is None
    )  # cpu kernels
    assert rnnkit.explain(layer, x).backend == ("cpu" if fused else "reference")


# -- regularisers --------------------------------------------------------------------------------


def _pair(**regs):
    cell = rnnkit.LSTMCell(I, H)
    return rnnkit.Recurrent(cell, **regs), rnnkit.Recurrent(cell)


ALL_REGS = {
    "dropout_input": 0.3,
    "dropout_state": 0.3,
    "dropout_output": 0.3,
    "zoneout": 0.2,
    "zoneout_cell": 0.1,
    "weight_drop": 0.4,
}
#: a GRU has no cell state for zoneout_cell
GRU_REGS = {k: v for k, v in ALL_REGS.items() if k != "zoneout_cell"}


def test_regularisers_are_off_in_eval_mode_and_zoneout_zero_is_the_plain_cell() -> None:
    regs = {k: v for k, v in ALL_REGS.items() if not k.startswith("zoneout")}
    layer, plain = _pair(**regs)
    x = torch.randn(T, B, I)
    layer.eval()
    assert_close(layer(x, lengths=LENGTHS), plain(x, lengths=LENGTHS), 0.0, "eval")
    layer.train()
    assert not torch.allclose(layer(x)[0], plain(x)[0])
    zero, plain = _pair(zoneout=0.0, zoneout_cell=0.0)
    assert_close(zero.train()(x), plain(x), 0.0, "zoneout p=0")


def test_zoneout_eval_uses_the_expectation() -> None:
    layer, _ = _pair(zoneout=0.25, zoneout_cell=0.5)
    layer.eval()
    x = torch.randn(T, B, I)
    out, (h, c) = layer(x)
    hh, cc = torch.zeros(B, H), torch.zeros(B, H)
    for t in range(T):
        _, (h_new, c_new) = layer.cell(x[t], (hh, cc))
        hh, cc = 0.25 * hh + 0.75 * h_new, 0.5 * cc + 0.5 * c_new
        assert_close(out[t], hh, OUT_TOL, f"h at {t}")
    assert_close((h, c), (hh, cc), OUT_TOL, "final")


class _ThreeStates(rnnkit.Cell):
    """A custom cell whose state is three tensors (h, a, b), each new at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size, self.hidden_size = I, H
        self.lin = torch.nn.Linear(I + H, 3 * H)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return (H, H, H)

    def forward(self, x, state):
        h, a, b = state
        new_h, da, db = torch.tanh(self.lin(torch.cat([x, h], 1))).chunk(3, 1)
        return new_h, (new_h, a + da, b - db)


def test_zoneout_of_a_custom_cell_with_three_state_tensors() -> None:
    layer = rnnkit.Recurrent(_ThreeStates(), zoneout=0.25, zoneout_cell=0.5)
    x = torch.randn(T, B, I)
    out, state = layer.eval()(x)  # the expectation, zoneout_cell for every tensor after h
    s = layer.cell.initial_state(B)
    for t in range(T):
        _, new = layer.cell(x[t], s)
        zoned = zip((0.25, 0.5, 0.5), s, new, strict=True)
        s = tuple(p * old + (1 - p) * n for p, old, n in zoned)
        assert_close(out[t], s[0], OUT_TOL, f"h at {t}")
    assert_close(state, s, OUT_TOL, "final")
    torch.manual_seed(0)
    out, state = layer.train()(x)  # every tensor has its own mask
    assert out.shape == (T, B, H) and len(state) == 3


class _Echo(rnnkit.Cell):
    """out_t = x_t + h_{t-1} as it enters the step; the state becomes x_t + t-dependent noise."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.input_size = self.hidden_size = size

    def forward(self, x, h):
        return x + h, x + torch.rand_like(x) + 1.0


def test_variational_masks_are_one_per_sequence_with_rate_p() -> None:
    p, size, batch = 0.3, 64, 200
    x = torch.ones(T, batch, size)
    layer = rnnkit.Recurrent(_Echo(size), dropout_input=p).train()
    out, _ = layer(x, torch.zeros(batch, size))
    first = out[0]  # x_0 * mask + 0
    for t in range(1, T):  # the same input mask at every step
        dropped = first == 0
        assert torch.all(out[t][dropped] > 0)  # h_{t-1} is still added
    rate = (first == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / first.numel())
    assert abs(rate - p) < 4 * sigma, rate
    assert torch.allclose(first[first != 0], torch.tensor(1 / (1 - p)))


def test_state_dropout_mask_is_shared_over_steps() -> None:
    p, size, batch = 0.5, 32, 100
    layer = rnnkit.Recurrent(_Echo(size), dropout_state=p).train()
    x = torch.zeros(T, batch, size)
    out, _ = layer(x, torch.ones(batch, size))
    zero = out[0] == 0  # h_0 = 1 entering through the mask
    for t in range(1, T):
        assert torch.equal(out[t] == 0, zero)
    rate = zero.float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / zero.numel())


def test_zoneout_keeps_units_with_rate_p() -> None:
    p, size, batch = 0.2, 64, 100
    layer = rnnkit.Recurrent(_Echo(size), zoneout=p).train()
    x = torch.zeros(T, batch, size)
    out, _ = layer(x, torch.zeros(batch, size))
    kept = (out[1:] == out[:-1]).float().mean().item()  # h_t == h_{t-1}
    n = out[1:].numel()
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n), kept


def test_weight_drop_is_one_mask_per_call_on_weight_hh() -> None:
    p = 0.5
    layer = rnnkit.Recurrent(rnnkit.RNNCell(I, H), weight_drop=p).train()
    x = torch.randn(T, B, I)
    torch.manual_seed(7)
    out, _h = layer(x)
    torch.manual_seed(7)
    mask = torch.empty(H, H).bernoulli_(1 - p) / (1 - p)
    cell = layer.cell
    hh = torch.zeros(B, H)
    for t in range(T):
        hh = F.rnn_step(x[t], hh, cell.weight_ih, cell.weight_hh * mask, cell.bias_ih, cell.bias_hh)
        assert_close(out[t], hh, OUT_TOL, f"step {t}")
    torch.manual_seed(7)
    out, _ = layer(x)
    out.sum().backward()
    assert torch.all(cell.weight_hh.grad[mask == 0] == 0)
    assert torch.count_nonzero(cell.weight_hh.grad[mask != 0]) > 0
    assert [n for n, _ in layer.named_parameters()] == [
        "cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh"
    ]  # fmt: skip


def test_all_regularisers_together_seeded_and_with_lengths_in_wrappers() -> None:
    def build():
        torch.manual_seed(0)
        return rnnkit.Stacked(
            [
                rnnkit.Bidirectional(
                    rnnkit.Recurrent(LayerNormLSTMCell(I, H), **ALL_REGS),
                    rnnkit.Recurrent(LayerNormLSTMCell(I, H), reverse=True, **ALL_REGS),
                ),
                rnnkit.Recurrent(rnnkit.GRUCell(2 * H, H), **GRU_REGS),
            ],
            dropout=0.2,
        ).train()

    x = torch.randn(T, B, I)
    runs = []
    for _ in range(2):
        model = build()
        torch.manual_seed(1)
        runs.append(model(x, lengths=LENGTHS))
    assert_close(runs[0], runs[1], 0.0, "same seed, same result")
    out = runs[0][0]
    assert torch.count_nonzero(out[:, 1]) == 0 and torch.count_nonzero(out[2:, 2]) == 0
    torch.manual_seed(2)
    assert not torch.equal(build()(x, lengths=LENGTHS)[0], out)


def test_regulariser_errors() -> None:
    with pytest.raises(ValueError, match=r"zoneout = 1.0; expected a probability in \[0, 1\)"):
        Regularisers(zoneout=1.0)
    with pytest.raises(ValueError, match="dropout_state = -0.5"):
        rnnkit.Recurrent(rnnkit.GRUCell(I, H), dropout_state=-0.5)
    # None means "as zoneout" for zoneout_cell only; elsewhere it is refused when the layer is
    # built, not met as a TypeError in the first training step
    for name in ("dropout_input", "dropout_state", "dropout_output", "zoneout", "weight_drop"):
        with pytest.raises(ValueError, match=rf"{name} = None; expected a probability in \[0, 1\)"):
            rnnkit.Recurrent(rnnkit.GRUCell(I, H), zoneout_cell=0.1, **{name: None})
    assert Regularisers(zoneout=0.2, zoneout_cell=None).zoneouts(2) == (0.2, 0.2)
    with pytest.raises(ValueError, match="weight_drop = 0.5 needs a cell with a recurrent weight"):
        rnnkit.Recurrent(_Echo(3), weight_drop=0.5)


# -- gates -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "make", [rnnkit.LSTMCell, rnnkit.GRUCell, LayerNormLSTMCell, PeepholeLSTMCell, LayerNormGRUCell]
)
def test_returned_gates_equal_the_step_recomputed(make, reverse: bool) -> None:
    cell = make(I, H)
    layer = rnnkit.Recurrent(cell, reverse=reverse, batch_first=True)
    x = torch.randn(B, T, I)
    _out, _final, gates = layer(x, lengths=LENGTHS, return_gates=True)
    names = ("i", "f", "g", "o", "c") if "LSTM" in make.__name__ else ("r", "z", "n")
    assert tuple(gates) == names
    for b, n in enumerate(LENGTHS.tolist()):
        state = cell.initial_state(1)
        for t in reversed(range(n)) if reverse else range(n):
            _, state, want = cell(x[b, t : t + 1], state, return_gates=True)
            for name, w in zip(names, want, strict=True):
                assert_close(gates[name][b, t], w[0], OUT_TOL, f"{name}[{b}, {t}]")
        for name in names:
            assert torch.count_nonzero(gates[name][b, n:]) == 0


def test_gates_are_not_available_for_cells_without_gates() -> None:
    with pytest.raises(ValueError, match="RNNCell has no gates to return"):
        rnnkit.Recurrent(rnnkit.RNNCell(I, H))(torch.randn(T, B, I), return_gates=True)
    for nonlinearity in ("tanh", "relu"):  # the cell too, rather than (h, h) without them
        with pytest.raises(ValueError, match="^return_gates=True, but RNNCell has no gates"):
            rnnkit.RNNCell(I, H, nonlinearity=nonlinearity)(torch.randn(B, I), return_gates=True)


def test_gate_heatmap_png(tmp_path) -> None:
    from rnnkit.plots import gate_heatmap

    tokens = ["the", "cat", "sat", "on", "a", "mat"]
    layer = rnnkit.Recurrent(rnnkit.LSTMCell(I, 16))
    _, _, gates = layer(torch.randn(T, 2, I), return_gates=True)
    path = gate_heatmap(gates, "f", tokens, tmp_path / "forget.png", sequence=1, dpi=50)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (
        int(max(4.0, 0.35 * 6 + 1.5) * 50),
        int(max(2.5, 0.12 * 16 + 1.2) * 50),
    )
    with pytest.raises(KeyError, match="gate = 'q'"):
        gate_heatmap(gates, "q", tokens, tmp_path / "x.png")


def test_gate_heatmap_leaves_the_pyplot_backend_and_figures_alone(tmp_path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    from rnnkit.plots import gate_heatmap

    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # as a notebook's own backend would be
    try:
        mine = plt.figure()
        layer = rnnkit.Recurrent(rnnkit.LSTMCell(I, 16))
        _, _, gates = layer(torch.randn(T, 2, I), return_gates=True)
        gate_heatmap(gates, "i", ["a", "b"], tmp_path / "input.png", dpi=20)
        assert matplotlib.get_backend() == "svg" and plt.fignum_exists(mine.number)
    finally:
        plt.close("all")
        plt.switch_backend(before)


# -- the torch.nn-compatible layers ---------------------------------------------------------------


def _as_stack(mod, cell_cls, regs):
    """The same network built from Recurrent/Bidirectional/Stacked, sharing mod's weights."""
    layers = []
    for layer in range(mod.num_layers):
        dirs = []
        for suffix in ("", "_reverse")[: mod.num_directions]:
            in_size = mod.input_size if layer == 0 else mod.output_size
            cell = cell_cls(in_size, mod.hidden_size)
            cell.load_state_dict(
                {k: getattr(mod, f"{k}_l{layer}{suffix}") for k in cell.state_dict()}
            )
            dirs.append(rnnkit.Recurrent(cell, reverse=bool(suffix), **regs))
        layers.append(rnnkit.Bidirectional(*dirs) if len(dirs) == 2 else dirs[0])
    return rnnkit.Stacked(layers)


@pytest.mark.parametrize(
    "cls,cell_cls", [(rnnkit.LSTM, rnnkit.LSTMCell), (rnnkit.GRU, rnnkit.GRUCell)]
)
def test_torch_compat_regularisers_and_gates_equal_the_wrapper_stack(cls, cell_cls) -> None:
    regs = ALL_REGS if cls is rnnkit.LSTM else GRU_REGS
    mod = cls(I, H, num_layers=2, bidirectional=True, **regs).train()
    stack = _as_stack(mod, cell_cls, regs).train()
    x = torch.randn(T, B, I)
    torch.manual_seed(3)
    out, hn, gates = mod(x, lengths=LENGTHS, return_gates=True)
    torch.manual_seed(3)
    want, states = stack(x, lengths=LENGTHS)
    assert_close(out, want, OUT_TOL, "output")
    h_n = hn[0] if isinstance(hn, tuple) else hn
    flat = [s[0] if isinstance(s, tuple) else s for pair in states for s in pair]
    assert_close(h_n, torch.stack(flat), OUT_TOL, "h_n")
    assert list(gates) == ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert tuple(gates["l1_reverse"]) == F.GATE_OUTPUTS[mod._mode]
    mod.eval()
    with rnnkit.use_backend("reference"):
        _, _, g_ref = mod(x, lengths=LENGTHS, return_gates=True)
    layer = stack.layers[1].backward_layer.eval()
    _, _, g_layer = layer(stack.layers[0].eval()(x, lengths=LENGTHS)[0], lengths=LENGTHS,
                          return_gates=True)  # fmt: skip
    for name in g_layer:
        assert_close(g_ref["l1_reverse"][name], g_layer[name], OUT_TOL, name)


def test_torch_compat_regularisers_off_in_eval_and_dispatch() -> None:
    regs = {k: v for k, v in ALL_REGS.items() if not k.startswith("zoneout")}
    mod = rnnkit.LSTM(I, H, num_layers=2, **regs)
    ref = torch.nn.LSTM(I, H, num_layers=2)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(T, B, I)
    mod.eval()
    assert_close(mod(x)[0], ref(x)[0], OUT_TOL, "eval")
    assert rnnkit.explain(mod, x).backend != "reference"
    mod.train()
    assert rnnkit.explain(mod, x).backend in ("reference", "cpu")
    with pytest.raises(ValueError, match="an Elman RNN has no gates"):
        rnnkit.RNN(I, H)(x, return_gates=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zonout'"):
        rnnkit.GRU(I, H, zonout=0.1)


def _gru_backends() -> list[str]:
    from rnnkit import backends

    return [n for n in backends.available() if n not in ("auto", "export", "native")]


@pytest.mark.parametrize("backend", _gru_backends())
@pytest.mark.parametrize("cell", ["gru", "gru_layernorm"])
def test_gru_state_dropout_leaves_the_carry_unmasked(backend: str, cell: str) -> None:
    """State dropout masks h_{t-1} in the recurrent products only: with an update gate of 1 a
    GRU keeps its state exactly, whatever the mask (masking the carry z * h_{t-1} too would zero
    dropped units and double kept ones at every step)."""
    size, steps = 8, 20
    make = rnnkit.GRUCell if cell == "gru" else LayerNormGRUCell
    layer = rnnkit.Recurrent(make(I, size), dropout_state=0.5, backend=backend).train()
    with torch.no_grad():
        layer.cell.bias_hh[size : 2 * size] = 40.0  # z = sigmoid(... + 40) = 1 in float32
    h0 = torch.randn(B, size)
    try:
        out, h_n = layer(torch.randn(steps, B, I), h0)
    except rnnkit.BackendUnavailable as e:  # e.g. triton without a GPU or its interpreter
        pytest.skip(str(e))
    torch.testing.assert_close(h_n, h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[-1], h0, rtol=1e-5, atol=1e-5)


def test_gru_state_dropout_step_by_the_equations() -> None:
    """One GRU step under state dropout: r, z and n read W_hh (h * mask), the carry reads h."""
    cell = rnnkit.GRUCell(I, H)
    _randomise(cell)
    x, h = torch.randn(B, I), torch.randn(B, H)
    mask = (torch.rand(B, H) > 0.5).float() * 2
    weights = dict(cell.named_parameters())
    h_t = F.step("gru", weights, x, h, state_mask=mask)[0]
    gi = x @ cell.weight_ih.T + cell.bias_ih
    gh = (h * mask) @ cell.weight_hh.T + cell.bias_hh
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
    n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
    assert_close(h_t, (1 - z) * n + z * h, OUT_TOL, "GRU step with a state mask")


@pytest.mark.parametrize(
    "make, owner",
    [
        (lambda: rnnkit.Recurrent(rnnkit.GRUCell(I, H), zoneout_cell=0.2), "GRUCell"),
        (lambda: rnnkit.Recurrent(LayerNormGRUCell(I, H), zoneout_cell=0.1), "LayerNormGRUCell"),
        (lambda: rnnkit.GRU(I, H, zoneout_cell=0.2), "GRU"),
        (lambda: rnnkit.RNN(I, H, zoneout=0.1, zoneout_cell=0.2), "RNN"),
    ],
)
def test_zoneout_cell_on_a_cell_without_cell_state_is_refused(make, owner: str) -> None:
    with pytest.raises(ValueError, match=f"zoneout_cell = 0.[12] given to {owner}, whose only"):
        make()


def test_zoneout_cell_where_there_is_a_cell_state() -> None:
    assert rnnkit.LSTM(I, H, zoneout_cell=0.2).regularisers.zoneout_cell == 0.2
    assert rnnkit.Recurrent(rnnkit.GRUCell(I, H), zoneout_cell=0.0).regularisers.zoneout == 0.0
    layer = rnnkit.Recurrent(PeepholeLSTMCell(I, H), zoneout_cell=0.3)
    assert layer.regularisers.zoneouts(2) == (0.0, 0.3)


@pytest.mark.parametrize("cell", ["LayerNormLSTMCell", "LayerNormGRUCell"])
@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan"), float("inf"), "1e-5"])
def test_layernorm_cells_refuse_an_eps_that_is_not_a_positive_number(cell, eps):
    with pytest.raises(ValueError, match=rf"eps = {eps!r}; expected a finite number > 0"):
        getattr(rnnkit, cell)(3, 4, eps=eps)


@pytest.mark.parametrize("cell", [LayerNormLSTMCell, LayerNormGRUCell])
def test_layernorm_cells_take_a_numpy_eps(cell) -> None:
    x = torch.randn(B, I)
    torch.manual_seed(0)
    plain = cell(I, H, eps=1e-3)
    torch.manual_seed(0)
    numpy = cell(I, H, eps=np.float32(1e-3))
    assert type(numpy.eps) is float and numpy.ln_ih.eps == numpy.eps == float(np.float32(1e-3))
    assert_close(numpy(x), plain(x), OUT_TOL, "eps from NumPy")


@pytest.mark.parametrize("cell", [LayerNormLSTMCell, LayerNormGRUCell])
def test_layernorm_cells_repr_shows_bias_false(cell) -> None:
    assert "(\n  3, 5, bias=False\n" in repr(cell(3, 5, bias=False))
    assert "(\n  3, 5\n" in repr(cell(3, 5))
    assert repr(rnnkit.LSTMCell(3, 5, bias=False)) == "LSTMCell(3, 5, bias=False)"
