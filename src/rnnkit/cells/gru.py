"""The GRU cell."""

from __future__ import annotations

import torch

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
