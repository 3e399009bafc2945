"""Stacked: layers applied one after another, with dropout between them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .regularisers import check_probability

__all__ = ["Stacked", "check_dropout", "dropout"]


def check_dropout(p: Any) -> float:
    return check_probability("dropout", p)


def dropout(x: Any, p: float, training: bool) -> Any:
    """Dropout on a Tensor or on a PackedSequence's data (padding stays zero)."""
    if p == 0.0 or not training:
        return x
    if isinstance(x, PackedSequence):
        return x._replace(data=F.dropout(x.data, p, True))
    return F.dropout(x, p, True)


class Stacked(nn.Module):
    """``Stacked(layers, dropout=0.0)``: a deep stack; layer k+1 reads layer k's output.

    Dropout (in training mode) is applied between layers, not after the last. ``lengths`` is
    passed to every layer unchanged. ``forward(x, state=None, lengths=None)`` takes and returns a
    tuple with one state per layer.
    """

    def __init__(self, layers: Iterable[nn.Module], dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("layers is empty; expected at least one layer")
        self.dropout = check_dropout(dropout)

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}" if self.dropout else ""

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        requests = []
        for k, layer in enumerate(self.layers):
            if k:
                x = _like_input(x, layer)
            requests += [
                (f"{k}.{label}", r, n) for label, r, n in layer.dispatch_requests(x, lengths)
            ]
        return requests

    def forward(
        self, x: Any, state: Any = None, lengths: Any = None
    ) -> tuple[Any, tuple[Any, ...]]:
        n = len(self.layers)
        if state is None:
            state = (None,) * n
        elif not isinstance(state, tuple | list) or len(state) != n:
            got = len(state) if isinstance(state, tuple | list) else type(state).__name__
            raise ValueError(f"state has {got} entries; expected one per layer, {n}")
        finals = []
        for k, layer in enumerate(self.layers):
            if k:
                x = dropout(x, self.dropout, self.training)
            x, s = layer(x, state[k], lengths=lengths)
            finals.append(s)
        return x, tuple(finals)


def _like_input(x: Any, layer: nn.Module) -> Any:
    """An input of the right feature size for ``layer``, for explaining without running."""
    if isinstance(x, PackedSequence):
        return x._replace(data=x.data.new_empty(x.data.shape[0], layer.input_size))
    assert isinstance(x, Tensor)
    return x.new_empty(*x.shape[:-1], layer.input_size).requires_grad_(x.requires_grad)
