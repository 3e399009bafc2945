"""``rnnkit.RNN``, ``rnnkit.LSTM``, ``rnnkit.GRU``: drop-in replacements for torch.nn's layers.

Same constructor, parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``),
initialisation (the same random draws in the same order, so a seed gives the same weights),
shapes and return values as torch.nn, so state_dicts load both ways. On top: ``lengths=`` on
padded input, the rnnkit dispatch (``backend=``, :func:`rnnkit.explain`), and PackedSequence in
-> PackedSequence out without sorting.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from ..backends import Direction, StackMasks
from ..cells.base import _check_size
from ..cells.table import SPECS
from ..regularisers import PlainPickle, Regularisers
from .recurrent import (
    Prepared,
    check_checkpoint,
    check_state,
    dispatch_request,
    draw_stack_masks,
    prepare,
    run_stack,
)
from .stacked import check_dropout

__all__ = ["GRU", "LSTM", "RNN"]


def _regularisers(layer: str, given: dict[str, Any]) -> Regularisers:
    """A drop-in's keyword-only regularisers; any other keyword is refused naming ``layer``."""
    if "proj_size" in given:  # LSTM takes it by name
        raise ValueError(
            f"proj_size = {given['proj_size']!r} given to {layer}; only LSTM has a projection"
        )
    names = [f.name for f in fields(Regularisers)]
    for key in given:
        if key not in names:
            raise TypeError(
                f"{layer}() got an unexpected keyword argument {key!r}; expected torch.nn.{layer}'s "
                f"arguments, backend, checkpoint or a regulariser ({', '.join(names)})"
            )
    return Regularisers(**given)


class _RNNBase(PlainPickle, nn.Module):
    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        regularisers: Regularisers | None = None,
        checkpoint: int | str | None = None,
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        _check_size("proj_size", proj_size, least=0)
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size = {proj_size} >= hidden_size = {hidden_size}; "
                "expected proj_size < hidden_size"
            )
        self._mode = mode  # the backends' name of the step, e.g. "lstm"
        self.mode = mode.upper()  # torch.nn's, e.g. "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = check_dropout(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        self.backend = backends.check_name(backend)
        self.regularisers = regularisers or Regularisers()
        self.regularisers.check_states(len(SPECS[mode].states), type(self).__name__)
        self.checkpoint = check_checkpoint(checkpoint)
        if self.dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout = {self.dropout} has no effect with num_layers = 1: dropout is applied "
                "between layers",
                stacklevel=3,
            )
        gates = SPECS[mode].gate_count * hidden_size
        kw = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            for suffix in self._suffixes():
                layer_in = input_size if layer == 0 else self.output_size
                shapes = {"weight_ih": (gates, layer_in), "weight_hh": (gates, self.state_size)}
                if bias:
                    shapes |= {"bias_ih": (gates,), "bias_hh": (gates,)}
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_size(self) -> int:
        """Size of h (the projection size for a projected LSTM)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    @property
    def output_size(self) -> int:
        """Feature size of the output: directions * state_size."""
        return self.num_directions * self.state_size

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def _all_weights(self) -> list[list[str]]:
        """Parameter names grouped per layer and direction, as torch.nn's ``_all_weights``."""
        per = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        names = self._flat_weights_names
        return [names[k : k + per] for k in range(0, len(names), per)]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """Parameters grouped per layer and direction, as torch.nn's ``all_weights``."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)), in order."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """Accepted for torch.nn compatibility; rnnkit keeps no flattened copy, so nothing to do."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "proj_size": 0,
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
            "backend": None,
            "checkpoint": None,
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)!r}"
        regularisers = self.regularisers.extra_repr()  # those switched on
        return f"{s}, {regularisers}" if regularisers else s

    # -- states --------------------------------------------------------------------------------

    def _initial_states(self, hx: Any, inp: Prepared) -> tuple[Tensor, Tensor | None]:
        x = inp.x
        batch, layers = x.shape[1], self.num_layers * self.num_directions
        h_shape = (layers, batch, self.state_size)
        c_shape = (layers, batch, self.hidden_size)
        lstm = self._mode == "lstm"
        if hx is None:
            h0 = x.new_zeros(h_shape)
            return h0, x.new_zeros(c_shape) if lstm else None
        if lstm:
            if not isinstance(hx, tuple | list) or len(hx) != 2:
                given = f" of length {len(hx)}" if isinstance(hx, tuple | list) else ""
                raise TypeError(f"hx is a {type(hx).__name__}{given}; expected a tuple (h_0, c_0)")
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        if inp.unbatched:  # unbatched states are (L*D, H): (layers, batch, n) without batch
            h_shape, c_shape = h_shape[::2], c_shape[::2]
        h0 = check_state("h_0", h0, h_shape, x)
        c0 = check_state("c_0", c0, c_shape, x) if lstm else None  # an LSTM needs c_0 too
        if inp.unbatched:
            return h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
        return h0, c0

    # -- dispatch ------------------------------------------------------------------------------

    def _prepare(self, x: Any, lengths: Any) -> Prepared:
        weights = ((n, getattr(self, n)) for n in self._flat_weights_names)
        return prepare(
            x, lengths, self.batch_first, self.input_size, allow_unbatched=True, weights=weights,
            layer=type(self).__name__,
        )  # fmt: skip

    def directions(self, like: Tensor, h0: Tensor, c0: Tensor | None) -> list[list[Direction]]:
        """The stack as the backends run it: per layer, per direction (forward first), the cell
        table's weights (``weight_ih_l{k}{suffix}`` ... under the table's names) and states."""
        names = SPECS[self._mode].weight_names(self.bias, self.proj_size > 0)
        layers = []
        for layer in range(self.num_layers):
            directions = []
            for d, suffix in enumerate(self._suffixes()):
                k = layer * self.num_directions + d
                directions.append(
                    Direction(
                        mode=self._mode,
                        weights={n: getattr(self, f"{n}_l{layer}{suffix}") for n in names},
                        state=(h0[k], c0[k]) if c0 is not None else (h0[k],),
                        reverse=d == 1,
                        tuple_state=c0 is not None,
                        regularisers=self.regularisers,
                    )
                )
            layers.append(directions)
        return layers

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        inp = self._prepare(x, lengths)
        h0, c0 = self._initial_states(None, inp)
        request = dispatch_request(self, inp, self.directions(inp.x, h0, c0), self.dropout)
        return [(type(self).__name__, request, self.backend)]

    def top_states(self, state: Any) -> tuple[tuple[Tensor, ...], ...]:
        h_n, c_n = state if self._mode == "lstm" else (state, None)
        top = range(len(h_n) - self.num_directions, len(h_n))
        return tuple((h_n[k], c_n[k]) if c_n is not None else (h_n[k],) for k in top)

    def draw_masks(self, input: Tensor | PackedSequence, lengths: Any = None) -> StackMasks:
        """The regulariser masks of a call over the whole sequence ``input``, drawn now: pass
        ``masks.at(t0)`` with each chunk that starts at step t0 (and the previous chunk's state)
        to compute what one call over ``input`` computes. A bidirectional layer cannot stream."""
        inp = self._prepare(input, lengths)
        h0, c0 = self._initial_states(None, inp)
        return draw_stack_masks(self, inp, self.directions(inp.x, h0, c0), self.dropout)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Any = None,
        lengths: Any = None,
        return_gates: bool = False,
        masks: StackMasks | None = None,
    ) -> tuple:
        if return_gates and self._mode.startswith("rnn"):
            raise ValueError("return_gates=True, but an Elman RNN has no gates; use LSTM or GRU")
        inp = self._prepare(input, lengths)
        h0, c0 = self._initial_states(hx, inp)
        given = None if hx is None else hx if isinstance(hx, tuple | list) else (hx,)
        layers = self.directions(inp.x, h0, c0)
        result = run_stack(
            self, inp, layers, self.backend, dropout=self.dropout, gates=return_gates,
            checkpoint=self.checkpoint, masks=masks,
            state_dtypes=None if given is None else tuple(s.dtype for s in given),
        )  # fmt: skip
        finals = [s for layer in result.states for s in layer]
        h_n = torch.stack([s[0] for s in finals])  # (L*D, B, P)
        c_n = torch.stack([s[1] for s in finals]) if c0 is not None else None  # (L*D, B, H)
        if inp.unbatched:
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        out = (inp.restore(result.out), (h_n, c_n) if self._mode == "lstm" else h_n)
        if not return_gates:
            return out
        names = SPECS[self._mode].gate_outputs
        labels = [f"l{k}{suffix}" for k in range(self.num_layers) for suffix in self._suffixes()]
        flat = [g for layer in result.gates or [] for g in layer]
        per_layer = {
            label: {n: inp.restore(g) for n, g in zip(names, layer_gates, strict=True)}
            for label, layer_gates in zip(labels, flat, strict=True)
        }
        return (*out, per_layer)


class RNN(_RNNBase):
    """Elman RNN layer, a drop-in for ``torch.nn.RNN`` (plus ``lengths=`` and ``backend=``).

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False)``;
    ``forward(input, h_0=None, lengths=None) -> (output, h_n)``. Keyword-only regularisers as
    in :class:`LSTM`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        checkpoint: int | str | None = None,
        **regularisers: Any,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity = {nonlinearity!r}; expected 'tanh' or 'relu'")
        super().__init__(
            f"rnn_{nonlinearity}",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            backend,
            _regularisers("RNN", regularisers),
            checkpoint,
        )
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"


class LSTM(_RNNBase):
    """LSTM layer, a drop-in for ``torch.nn.LSTM`` (plus ``lengths=`` and ``backend=``).

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0)``; ``forward(input, (h_0, c_0)=None, lengths=None,
    return_gates=False) -> (output, (h_n, c_n)[, gates])``.

    Keyword-only regularisers, active in training mode on every layer and direction (see
    :mod:`rnnkit.regularisers`): ``dropout_input``, ``dropout_state``, ``dropout_output``
    (variational), ``zoneout``, ``zoneout_cell``, ``weight_drop`` (DropConnect on
    ``weight_hh_l*``). ``return_gates=True`` adds a dict ``{"l0": {"i": ..., "f": ..., "g": ...,
    "o": ..., "c": ...}, "l0_reverse": ..., ...}`` of per-step gate activations (for inspection:
    detached on the fused ``cpu`` backend, differentiable on ``backend="reference"``).

    ``checkpoint`` (keyword-only; every drop-in takes it): None keeps every step's activations
    for the backward pass; an int K keeps the state every K steps and recomputes each segment
    when the backward pass needs it ("auto": K about sqrt(T)), same gradients, far less memory.
    ``forward(..., masks=layer.draw_masks(x).at(t0))`` runs a chunk of a longer sequence with the
    masks one call over all of it would use (see :meth:`draw_masks`).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        checkpoint: int | str | None = None,
        **regularisers: Any,
    ) -> None:
        super().__init__(
            "lstm",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            backend,
            _regularisers("LSTM", regularisers),
            checkpoint,
        )


class GRU(_RNNBase):
    """GRU layer, a drop-in for ``torch.nn.GRU`` (plus ``lengths=`` and ``backend=``).

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False)``; ``forward(input, h_0=None, lengths=None, return_gates=False) ->
    (output, h_n[, gates])``, gates ``r, z, n`` per layer and direction. Keyword-only
    regularisers as in :class:`LSTM`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        checkpoint: int | str | None = None,
        **regularisers: Any,
    ) -> None:
        super().__init__(
            "gru",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            backend,
            _regularisers("GRU", regularisers),
            checkpoint,
        )
