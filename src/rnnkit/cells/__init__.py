"""Cells: one recurrent step each. See :mod:`rnnkit.cells.base` for the contract."""

from .base import Cell, State
from .gru import GRUCell
from .lstm import LSTMCell
from .rnn import RNNCell
from .variants import LayerNormGRUCell, LayerNormLSTMCell, PeepholeLSTMCell

__all__ = [
    "Cell",
    "GRUCell",
    "LSTMCell",
    "LayerNormGRUCell",
    "LayerNormLSTMCell",
    "PeepholeLSTMCell",
    "RNNCell",
    "State",
]
