"""Stacked: layers applied one after another, with dropout between them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ..backends import Direction, StackMasks, exporting
from ..regularisers import check_probability
from .bidirectional import Bidirectional, merge
from .composite import Composite, check_layouts
from .recurrent import (
    cell_state,
    dispatch_request,
    given_state_dtypes,
    run_stack,
    signature,
    state_part,
    top_states,
)

__all__ = ["Stacked", "check_dropout", "dropout"]


def check_dropout(p: Any) -> float:
    """The dropout between layers: a probability in [0, 1], as torch.nn's (1 zeroes every
    layer's input but the first's)."""
    return check_probability("dropout", p, one=True)


def dropout(x: Any, p: float, training: bool) -> Any:
    """Dropout on a Tensor or on a PackedSequence's data (padding stays zero); refused while a
    model is exported (its mask is random), as the export backend refuses it in a fused stack."""
    if p == 0.0 or not training:
        return x
    if exporting():
        from ..backends.export.backend import DROPOUT_BETWEEN

        raise RuntimeError(DROPOUT_BETWEEN)
    if isinstance(x, PackedSequence):
        return x._replace(data=F.dropout(x.data, p, True))
    return F.dropout(x, p, True)


class Stacked(Composite):
    """``Stacked(layers, dropout=0.0)``: a deep stack; layer k+1 reads layer k's output.

    A stack of :class:`Recurrent` and :class:`Bidirectional` layers over agreeing cells runs as
    one call of layers x directions (as the drop-ins do), so a backend runs it layer by layer
    with the regulariser masks of every layer drawn once; other layers run one after the other.

    Dropout (in training mode) is applied between layers, not after the last. ``lengths`` is
    passed to every layer unchanged. ``forward(x, state=None, lengths=None)`` takes and returns a
    tuple with one state per layer.
    """

    _fusion = (
        "the stack to run as one call (Recurrent and Bidirectional layers over agreeing cells)"
    )

    def __init__(self, layers: Iterable[nn.Module], dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("layers is empty; expected at least one layer")
        check_layouts([(f"layers[{k}]", layer) for k, layer in enumerate(self.layers)])
        for k in range(1, len(self.layers)):
            below = getattr(self.layers[k - 1], "output_size", None)
            reads = getattr(self.layers[k], "input_size", None)
            if None not in (below, reads) and below != reads:
                raise ValueError(
                    f"layers[{k}] has input_size = {reads}, but layers[{k - 1}] outputs {below} "
                    f"features; expected each layer to read the output of the one below it"
                )
        self.dropout = check_dropout(dropout)

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}" if self.dropout else ""

    def fused(self) -> bool:
        """Whether the stack runs as one call of layers x directions: every layer a
        :class:`Recurrent` or a fused :class:`Bidirectional` (concatenating, except the top one),
        all over agreeing cells. Else each layer runs on its own, dropout between them."""
        signatures = []
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Bidirectional):
                if not layer.fused() or (layer.merge != "concat" and k < len(self.layers) - 1):
                    return False
                layer = layer.forward_layer
            sig = signature(layer)
            if sig is None:
                return False
            signatures.append(sig)
        return len(set(signatures)) == 1

    def directions(self, like: Tensor, state: Any) -> list[list[Direction]]:
        """Every layer's directions, from ``state`` (one entry per layer, or None)."""
        state = self._check_state(state)
        out = []
        for k, (layer, s) in enumerate(zip(self.layers, state, strict=True)):
            with state_part(k):
                out += layer.directions(like, s)
        return out

    def _parts(self) -> list[nn.Module]:
        return list(self.layers)

    def _check_state(self, state: Any) -> tuple[Any, ...]:
        n = len(self.layers)
        if state is None:
            return (None,) * n
        if not isinstance(state, tuple | list) or len(state) != n:
            got = len(state) if isinstance(state, tuple | list) else type(state).__name__
            raise ValueError(f"state has {got} entries; expected one per layer, {n}")
        return tuple(state)

    def _first(self) -> nn.Module:
        first = self.layers[0]
        return first.forward_layer if isinstance(first, Bidirectional) else first

    def direction_states(self, state: Any) -> list[Any]:
        """``state`` as the caller gave it, one cell state per direction of every layer (when
        :meth:`fused`)."""
        out = []
        for k, (layer, s) in enumerate(zip(self.layers, self._check_state(state), strict=True)):
            with state_part(k):
                out += layer.direction_states(s)
        return out

    def top_states(self, state: Any) -> tuple[tuple[Tensor, ...], ...]:
        with state_part(len(self.layers) - 1):
            return top_states(self.layers[-1], self._check_state(state)[-1])

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        if self.fused():
            inp = self._prepare(x, lengths)
            request = dispatch_request(self, inp, self.directions(inp.x, None), self.dropout)
            return [("Stacked", request, self._first().backend)]
        requests = []
        for k, layer in enumerate(self.layers):
            if k:
                x = _like_input(x, layer)
            requests += [
                (f"{k}.{label}", r, n) for label, r, n in layer.dispatch_requests(x, lengths)
            ]
        return requests

    def forward(
        self, x: Any, state: Any = None, lengths: Any = None, masks: StackMasks | None = None
    ) -> tuple[Any, tuple[Any, ...]]:
        if self.fused():
            return self._forward_fused(x, state, lengths, masks)
        if masks is not None:
            self._need_fused("masks=")
        state = self._check_state(state)
        finals = []
        for k, layer in enumerate(self.layers):
            if k:
                x = dropout(x, self.dropout, self.training)
            with state_part(k):
                x, s = layer(x, state[k], lengths=lengths)
            finals.append(s)
        return x, tuple(finals)

    def _forward_fused(
        self, x: Any, state: Any, lengths: Any, masks: StackMasks | None
    ) -> tuple[Any, tuple[Any, ...]]:
        inp = self._prepare(x, lengths)
        layers = self.directions(inp.x, state)
        first = self._first()
        result = run_stack(
            self, inp, layers, first.backend, dropout=self.dropout, checkpoint=first.checkpoint,
            masks=masks, state_dtypes=given_state_dtypes(self.direction_states(state), inp.x),
        )  # fmt: skip
        top = self.layers[-1]
        if isinstance(top, Bidirectional) and top.merge != "concat":
            out = merge(*(inp.restore(o) for o in result.last), top.merge)
        else:
            out = inp.restore(result.out)
        finals = []
        for layer, directions, states in zip(self.layers, layers, result.states, strict=True):
            cells = tuple(cell_state(d, s) for d, s in zip(directions, states, strict=True))
            finals.append(cells if isinstance(layer, Bidirectional) else cells[0])
        return out, tuple(finals)


def _like_input(x: Any, layer: nn.Module) -> Any:
    """An input of the right feature size for ``layer``, for explaining without running."""
    if isinstance(x, PackedSequence):
        return x._replace(data=x.data.new_empty(x.data.shape[0], layer.input_size))
    assert isinstance(x, Tensor)
    return x.new_empty(*x.shape[:-1], layer.input_size).requires_grad_(x.requires_grad)
