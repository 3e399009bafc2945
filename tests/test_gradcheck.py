"""torch.autograd.gradcheck in float64 for each cell through Bidirectional + Stacked with lengths."""

from __future__ import annotations

import pytest
import torch

import rnnkit

T, B, I, H = 4, 3, 2, 3
LENGTHS = torch.tensor([4, 0, 2])

CELLS = {
    "rnn_tanh": lambda i: rnnkit.RNNCell(i, H, dtype=torch.float64),
    "rnn_relu": lambda i: rnnkit.RNNCell(i, H, nonlinearity="relu", dtype=torch.float64),
    "lstm": lambda i: rnnkit.LSTMCell(i, H, dtype=torch.float64),
    "lstm_proj": lambda i: rnnkit.LSTMCell(i, H, proj_size=2, dtype=torch.float64),
    "gru": lambda i: rnnkit.GRUCell(i, H, dtype=torch.float64),
}


@pytest.mark.parametrize("kind", list(CELLS))
def test_gradcheck_bidirectional_stacked_with_lengths(kind: str) -> None:
    make = CELLS[kind]
    bottom = rnnkit.Bidirectional(
        rnnkit.Recurrent(make(I)), rnnkit.Recurrent(make(I), reverse=True), merge="concat"
    )
    top_in = bottom.output_size
    top = rnnkit.Bidirectional(
        rnnkit.Recurrent(make(top_in)), rnnkit.Recurrent(make(top_in), reverse=True), merge="sum"
    )
    stack = rnnkit.Stacked([bottom, top])
    params = list(stack.parameters())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)

    names = [n for n, _ in stack.named_parameters()]

    def f(x, *ps):
        weights = dict(zip(names, ps, strict=True))
        out, states = torch.func.functional_call(stack, weights, (x,), {"lengths": LENGTHS})
        return (out, *torch.utils._pytree.tree_leaves(states))

    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6)


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.LSTM, rnnkit.GRU])
def test_gradcheck_torch_compat_with_lengths_and_initial_state(cls) -> None:
    mod = cls(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0):
        hx = (h0, c0) if cls is rnnkit.LSTM else h0
        out, hn = mod(x, hx, lengths=LENGTHS)
        return (out, *hn) if isinstance(hn, tuple) else (out, hn)

    assert torch.autograd.gradcheck(f, (x, h0, c0), atol=1e-6)
