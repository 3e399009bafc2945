"""The Elman RNN cell."""

from __future__ import annotations

import torch

from .base import _TorchLayoutCell

_NONLINEARITIES = ("tanh", "relu")


class RNNCell(_TorchLayoutCell):
    """Elman RNN cell: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, act = tanh or relu.

    Parameters are named and initialised as ``torch.nn.RNNCell``'s, so state_dicts load both ways.
    ``forward(x, h) -> (h_t, h_t)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(f"nonlinearity = {nonlinearity!r}; expected 'tanh' or 'relu'")
        super().__init__(input_size, hidden_size, 1, bias, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity
        self.mode = f"rnn_{nonlinearity}"

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"
