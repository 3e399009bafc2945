"""Research variants of the LSTM and GRU cells: layer normalisation and peepholes."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from .base import BuiltinCell, _check_size
from .lstm import LSTMCell
from .table import SPECS


class PeepholeLSTMCell(LSTMCell):
    """LSTM whose gates see the cell state (see :func:`rnnkit.functional.peephole_lstm_step`).

    The parameters of :class:`LSTMCell` plus the diagonal peephole weights ``weight_ci``,
    ``weight_cf`` (seen by the input and forget gates, on c_{t-1}) and ``weight_co`` (seen by the
    output gate, on c_t), each (H,). ``proj_size`` works as in :class:`LSTMCell`.
    """

    mode = "lstm_peephole"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        proj_size: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, proj_size, device, dtype)
        kw = {"device": device, "dtype": dtype}
        self.weight_ci = nn.Parameter(torch.empty(hidden_size, **kw))
        self.weight_cf = nn.Parameter(torch.empty(hidden_size, **kw))
        self.weight_co = nn.Parameter(torch.empty(hidden_size, **kw))
        self.reset_parameters()


class _LayerNormCell(BuiltinCell):
    """Shared set-up: torch-named weights, LayerNorm submodules with gain 1 and bias 0, their
    sizes from the cell table (``ln_ih`` and ``ln_hh`` over the G = gates x H pre-activations,
    ``ln_c`` over the cell state where there is one)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 < eps < math.inf:
            raise ValueError(
                f"eps = {eps!r}; expected a finite number > 0 (added to the variance before its "
                "square root)"
            )
        eps = float(eps)  # a NumPy float from a config or a sweep, as torch.nn.LayerNorm takes it
        self.input_size, self.hidden_size, self.bias, self.eps = input_size, hidden_size, bias, eps
        spec = SPECS[self.mode]
        kw = {"device": device, "dtype": dtype}
        g = len(spec.gates) * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size, **kw))
        self.bias_ih = nn.Parameter(torch.empty(g, **kw)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(g, **kw)) if bias else None
        self.ln_ih = nn.LayerNorm(g, eps=eps, **kw)
        self.ln_hh = nn.LayerNorm(g, eps=eps, **kw)
        if spec.has_cell_state:
            self.ln_c = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases ~ U(-1/sqrt(H), 1/sqrt(H)); LayerNorm gains 1, biases 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("ln_"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class LayerNormLSTMCell(_LayerNormCell):
    """Layer-normalised LSTM (see :func:`rnnkit.functional.layernorm_lstm_step`).

    Parameters: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih``/``bias_hh`` (4H,) and the LayerNorms
    ``ln_ih`` and ``ln_hh`` over the 4H pre-activations and ``ln_c`` over the cell state.
    """

    mode = "lstm_layernorm"

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size, self.hidden_size)


class LayerNormGRUCell(_LayerNormCell):
    """Layer-normalised GRU (see :func:`rnnkit.functional.layernorm_gru_step`).

    Parameters: ``weight_ih`` (3H, I), ``weight_hh`` (3H, H), ``bias_ih``/``bias_hh`` (3H,) and
    the LayerNorms ``ln_ih`` and ``ln_hh`` over the 3H pre-activations.
    """

    mode = "gru_layernorm"
