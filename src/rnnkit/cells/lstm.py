"""The LSTM cell (with optional projection, LSTMP)."""

from __future__ import annotations

import torch

from .base import _check_size, _TorchLayoutCell


class LSTMCell(_TorchLayoutCell):
    """LSTM cell: input, forget and output gates over a cell state (see :func:`rnnkit.functional.lstm_step`).

    Parameters are named and initialised as ``torch.nn.LSTMCell``'s (gate order i, f, g, o), so
    state_dicts load both ways. ``proj_size > 0`` adds ``weight_hr`` (P, H) as in torch.nn.LSTM.
    The state is ``(h, c)``; ``forward(x, (h, c)) -> (h_t, (h_t, c_t))``, and with
    ``return_gates=True`` also ``(i, f, g, o, c_t)``.
    """

    mode = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        proj_size: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)  # before it is compared with proj_size
        _check_size("proj_size", proj_size, least=0)
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size = {proj_size} >= hidden_size = {hidden_size}; "
                "expected proj_size < hidden_size"
            )
        super().__init__(input_size, hidden_size, 4, bias, proj_size, device=device, dtype=dtype)

    @property
    def output_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return (self.output_size, self.hidden_size)
