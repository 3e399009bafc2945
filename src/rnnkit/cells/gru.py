"""The GRU cell."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from .base import _TorchLayoutCell


class GRUCell(_TorchLayoutCell):
    """GRU cell: update and reset gates (see :func:`rnnkit.functional.gru_step`).

    Parameters are named and initialised as ``torch.nn.GRUCell``'s (gate order r, z, n), so
    state_dicts load both ways. ``forward(x, h) -> (h_t, h_t)``, and with ``return_gates=True``
    also ``(r, z, n)``.
    """

    mode = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, 3, bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor, return_gates: bool = False):
        out = F.gru_step(
            x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, return_gates
        )
        h, *gates = out if return_gates else (out,)
        return (h, h, *gates)
