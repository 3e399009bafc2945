"""Layers: the time loop over any cell, wrappers, and torch.nn-compatible RNN/LSTM/GRU."""

from .bidirectional import Bidirectional
from .recurrent import Recurrent, detach_state, scan, top_states
from .stacked import Stacked
from .torch_compat import GRU, LSTM, RNN

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Bidirectional",
    "Recurrent",
    "Stacked",
    "detach_state",
    "scan",
    "top_states",
]
