"""Verification chain, link 1: functional steps equal torch.nn's cells with the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import OUT_TOL, assert_close

from rnnkit import functional as F
from rnnkit.errors import ShapeError


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_rnn_step_equals_torch_cell(act: str) -> None:
    cell = torch.nn.RNNCell(5, 7, nonlinearity=act)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    got = F.rnn_step(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, act)
    assert_close(got, cell(x, h), OUT_TOL, f"rnn {act}")


def test_lstm_step_equals_torch_cell() -> None:
    cell = torch.nn.LSTMCell(5, 7)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    got = F.lstm_step(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    want = cell(x, (h, c))
    assert_close(got[0], want[0], OUT_TOL, "h")
    assert_close(got[1], want[1], OUT_TOL, "c")


def test_lstm_step_with_projection_equals_torch_lstm() -> None:
    lstm = torch.nn.LSTM(5, 7, proj_size=3)
    x, h, c = torch.randn(1, 2, 5), torch.randn(1, 2, 3), torch.randn(1, 2, 7)
    _, (h_want, c_want) = lstm(x, (h, c))
    h_got, c_got = F.lstm_step(x[0], h[0], c[0], *lstm._flat_weights)
    assert_close(h_got, h_want[0], OUT_TOL, "h")
    assert_close(c_got, c_want[0], OUT_TOL, "c")


def test_gru_step_equals_torch_cell() -> None:
    cell = torch.nn.GRUCell(5, 7)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    got = F.gru_step(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert_close(got, cell(x, h), OUT_TOL, "gru")


def test_steps_without_bias_equal_torch_cells() -> None:
    cell = torch.nn.GRUCell(4, 6, bias=False)
    x, h = torch.randn(2, 4), torch.randn(2, 6)
    assert_close(F.gru_step(x, h, cell.weight_ih, cell.weight_hh), cell(x, h), OUT_TOL, "gru")


@pytest.mark.parametrize("which", ["b_ih", "b_hh"])
def test_layernorm_steps_add_a_bias_given_alone(which: str) -> None:
    # one bias given and the other None: the step equals both given with the missing one zero
    x, h, c = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6)
    for gates, step, state in (
        (4, F.layernorm_lstm_step, (h, c)),
        (3, F.layernorm_gru_step, (h,)),
    ):
        w_ih, w_hh, bias = (
            torch.randn(gates * 6, 4),
            torch.randn(gates * 6, 6),
            torch.randn(gates * 6),
        )
        ln = [(torch.rand(gates * 6) + 0.5, torch.randn(gates * 6))] * 2
        if gates == 4:
            ln.append((torch.rand(6) + 0.5, torch.randn(6)))
        alone = (bias, None) if which == "b_ih" else (None, bias)
        zero = (bias, torch.zeros_like(bias)) if which == "b_ih" else (torch.zeros_like(bias), bias)
        got = step(x, *state, w_ih, w_hh, *alone, *ln)
        want = step(x, *state, w_ih, w_hh, *zero, *ln)
        for g, w in zip(
            got if gates == 4 else (got,), want if gates == 4 else (want,), strict=True
        ):
            assert_close(g, w, OUT_TOL, f"{step.__name__} with {which} alone")


def test_gate_layout_and_converters() -> None:
    assert F.GATES["lstm"] == ("i", "f", "g", "o")
    assert F.GATES["gru"] == ("r", "z", "n")
    w = torch.arange(8.0).reshape(4, 2)
    _i, f, _g, _o = F.split_gates(w, "lstm")
    assert torch.equal(f, w[1:2])
    back = F.reorder_gates(F.reorder_gates(w, "ifgo", "igfo"), "igfo", "ifgo")
    assert torch.equal(back, w)
    assert torch.equal(F.reorder_gates(w, "ifgo", "igfo")[1], w[2])
    with pytest.raises(ValueError, match="different gates"):
        F.reorder_gates(w, "ifgo", "ifgx")
    with pytest.raises(ValueError, match=r"\('i', 'i', 'f', 'o'\) names a gate twice"):
        F.reorder_gates(w, "iifo", "ifio")  # the second block would overwrite the first
    with pytest.raises(ValueError, match="'bogus'"):
        F.gate_count("bogus")


def test_gate_converters_refuse_sizes_that_do_not_split_into_equal_blocks() -> None:
    # 10 rows are not 4 gates of H rows each: chunk would give blocks of 3, 3, 3 and 1
    w = torch.arange(10.0).unsqueeze(1)
    with pytest.raises(
        ValueError, match=r"t has size 10 along dim 0, which does not split into the 4 equal"
    ):
        F.reorder_gates(w, "ifgo", "igfo")
    with pytest.raises(ValueError, match=r"size 6 along dim 0, .* lstm's gates"):
        F.split_gates(torch.zeros(6, 2), "lstm")  # would give 3 blocks of 2
    with pytest.raises(ValueError, match=r"size 4 along dim 1, .* gru's gates"):
        F.split_gates(torch.zeros(2, 4), "gru", dim=1)


def test_step_names_an_unknown_mode_before_reading_weights() -> None:
    x, h = torch.zeros(1, 2), torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"mode = 'lstmx' is not a built-in cell; expected one of"):
        F.step("lstmx", {}, x, h)  # no weights at all: the mode is what is wrong


@pytest.mark.parametrize("mode", ["lstm", "lstm_peephole", "lstm_layernorm"])
def test_step_refuses_a_lone_tensor_as_an_lstm_state(mode: str) -> None:
    # A (2, H) tensor unpacks into two rows taken for h and c: a wrong result, not an error.
    torch.manual_seed(0)
    weights = {"weight_ih": torch.randn(16, 3), "weight_hh": torch.randn(16, 4)}
    weights |= {f"weight_c{g}": torch.randn(4) for g in "ifo"}
    weights |= {
        f"{n}.{p}": torch.ones(16 if n != "ln_c" else 4)
        for n in ("ln_ih", "ln_hh", "ln_c")
        for p in ("weight", "bias")
    }
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(
        TypeError,
        match=rf"state for '{mode}' is a tensor of shape \(2, 4\); expected the pair \(h, c\)",
    ):
        F.step(mode, weights, x, h)
    with pytest.raises(TypeError, match=rf"state for '{mode}' is a tuple of 1; expected the pair"):
        F.step(mode, weights, x, (h,))
    assert F.step(mode, weights, x, (h, h))[0].shape == (2, 4)  # the pair is taken


def test_step_refuses_a_pair_as_the_state_of_a_cell_without_c() -> None:
    weights = {"weight_ih": torch.randn(12, 3), "weight_hh": torch.randn(12, 4)}
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"state for 'gru' is a tuple; expected h, a tensor"):
        F.step("gru", weights, x, (h, h))


def test_step_names_a_missing_weight_and_an_input_weight_ih_cannot_read() -> None:
    weights = {"weight_ih": torch.randn(16, 3), "weight_hh": torch.randn(16, 4)}
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"weights for 'lstm' lack weight_hh; expected weight_ih"):
        F.step("lstm", {"weight_ih": weights["weight_ih"]}, x, (h, h))
    with pytest.raises(ValueError, match=r"lack ln_ih.weight, ln_ih.bias, ln_hh.weight"):
        F.step("lstm_layernorm", weights, x, (h, h))
    with pytest.raises(ShapeError, match=r"x has shape \(3,\); expected \(B, I\) with I = 3"):
        F.step("lstm", weights, torch.randn(3), (h, h))  # unbatched: the cells take it, not step
    with pytest.raises(ShapeError, match=r"x has shape \(2, 5\); expected \(B, I\) with I = 3"):
        F.step("lstm", weights, torch.randn(2, 5), (h, h))
    with pytest.raises(TypeError, match=r"x is a list; expected a Tensor"):
        F.step("lstm", weights, [[0.0] * 3] * 2, (h, h))
    assert F.step("lstm", weights, x, (h, h))[0].shape == (2, 4)  # the biases are optional
