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
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from .. import functional as F
from ..cells.base import _check_size
from .bidirectional import merge
from .recurrent import Prepared, check_state, needs_grad, prepare, scan
from .regularisers import PlainPickle, Regularisers
from .stacked import check_dropout, dropout

__all__ = ["GRU", "LSTM", "RNN"]


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
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size = {proj_size!r}; expected an integer >= 0")
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
        if self.dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout = {self.dropout} has no effect with num_layers = 1: dropout is applied "
                "between layers",
                stacklevel=3,
            )
        gates = F.gate_count(mode) * hidden_size
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
    def all_weights(self) -> list[list[Tensor]]:
        """Parameters grouped per layer and direction, as torch.nn's ``all_weights``."""
        per = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        flat = self._flat_weights
        return [flat[k : k + per] for k in range(0, len(flat), per)]

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
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)!r}"
        return s

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
                raise TypeError(f"hx is a {type(hx).__name__}; expected a tuple (h_0, c_0)")
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        if inp.unbatched:  # unbatched states are (L*D, H)
            h0 = check_state("h_0", h0, (layers, self.state_size), x).unsqueeze(1)
            c0 = None if c0 is None else check_state("c_0", c0, (layers, self.hidden_size), x)
            c0 = None if c0 is None else c0.unsqueeze(1)
            return h0, c0
        h0 = check_state("h_0", h0, h_shape, x)
        c0 = None if c0 is None else check_state("c_0", c0, c_shape, x)
        return h0, c0

    # -- dispatch ------------------------------------------------------------------------------

    def _request(
        self,
        inp: Prepared,
        h0: Tensor | None = None,
        c0: Tensor | None = None,
        return_gates: bool = False,
    ) -> backends.Request:
        regs = self.regularisers
        return backends.Request(
            mode=self._mode,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            bias=self.bias,
            proj=self.proj_size > 0,
            dropout=self.dropout > 0 and self.training,
            device_type=inp.x.device.type,
            dtype=inp.x.dtype,
            lengths=inp.lengths_kind,
            requires_grad=needs_grad(inp.x, h0, c0, *self._flat_weights),
            zoneout=bool(regs.zoneout or regs.zoneout_cell),
            state_dropout=bool(regs.dropout_state) and self.training,
            variational=bool(regs.dropout_input or regs.dropout_output) and self.training,
            gates=return_gates,
            layer=type(self).__name__,
        )

    def _prepare(self, x: Any, lengths: Any) -> Prepared:
        weights = ((n, getattr(self, n)) for n in self._flat_weights_names)
        return prepare(
            x, lengths, self.batch_first, self.input_size, allow_unbatched=True, weights=weights,
            layer=type(self).__name__,
        )  # fmt: skip

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        inp = self._prepare(x, lengths)
        return [(type(self).__name__, self._request(inp), self.backend)]

    def _step(self, weights: list[Tensor]) -> Any:
        """The one-step function of one layer and direction, over its weights."""
        w_ih, w_hh, *rest = weights
        b_ih, b_hh = (rest[0], rest[1]) if self.bias else (None, None)
        if self._mode == "lstm":
            w_hr = rest[-1] if self.proj_size > 0 else None

            def lstm(x: Tensor, state: tuple[Tensor, Tensor], return_gates: bool = False):
                h, c, *gates = F.lstm_step(x, *state, w_ih, w_hh, b_ih, b_hh, w_hr, return_gates)
                return (h, (h, c), *gates)

            return lstm
        if self._mode == "gru":
            step = partial(F.gru_step, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        else:
            act = self._mode.removeprefix("rnn_")
            step = partial(F.rnn_step, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, nonlinearity=act)

        def single_state(x: Tensor, h: Tensor, return_gates: bool = False) -> tuple:
            if return_gates:  # GRU only: an Elman RNN has no gates (checked in forward)
                h, gates = step(x, h, return_gates=True)
                return h, h, gates
            h = step(x, h)
            return h, h

        return single_state

    def _reference(self, call: backends.Call) -> tuple:
        """The stack computed by the time loop: layer by layer, direction by direction."""
        lstm = self._mode == "lstm"
        x, lengths = call.x, call.lengths
        per = len(call.weights) // (self.num_layers * self.num_directions)
        masks = call.masks or [None] * (self.num_layers * self.num_directions)
        h_n, c_n, gates = [], [], []
        for layer in range(self.num_layers):
            if layer:
                x = dropout(x, call.dropout, call.training)
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                m = masks[k]
                state = (call.h0[k], call.c0[k]) if lstm else call.h0[k]
                out, final, *g = scan(
                    self._step(call.weights[k * per : (k + 1) * per]),
                    x if m is None or m.input is None else x * m.input,
                    state,
                    lengths,
                    reverse=d == 1,
                    zoneout=None if m is None else m.zoneout,
                    state_mask=None if m is None else m.state,
                    return_gates=call.request.gates,
                )
                outs.append(out if m is None or m.output is None else out * m.output)
                h_n.append(final[0] if lstm else final)
                if lstm:
                    c_n.append(final[1])
                gates += g
            x = merge(outs[0], outs[1], "concat") if self.bidirectional else outs[0]
        result = (x, torch.stack(h_n), torch.stack(c_n) if lstm else None)
        return (*result, tuple(gates)) if call.request.gates else result

    def _masks(self, x: Tensor, h_size: int, weights: list[Tensor]) -> list | None:
        """One set of regulariser masks per layer and direction, in that order."""
        if not self.regularisers.any:
            return None
        per = len(weights) // (self.num_layers * self.num_directions)
        sizes = (h_size, self.hidden_size) if self._mode == "lstm" else (h_size,)
        masks = []
        for k in range(self.num_layers * self.num_directions):
            layer_in = self.input_size if k < self.num_directions else self.output_size
            like = x.new_empty(x.shape[0], x.shape[1], layer_in)
            w_hh = weights[k * per + 1] if self.regularisers.weight_drop else None
            masks.append(self.regularisers.draw(self.training, like, h_size, sizes, w_hh))
        return masks

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Any = None,
        lengths: Any = None,
        return_gates: bool = False,
    ) -> tuple:
        if return_gates and self._mode.startswith("rnn"):
            raise ValueError("return_gates=True, but an Elman RNN has no gates; use LSTM or GRU")
        inp = self._prepare(input, lengths)
        h0, c0 = self._initial_states(hx, inp)
        weights = self._flat_weights
        masks = self._masks(inp.x, h0.shape[-1], weights)
        if masks and masks[0].weight_hh is not None:  # DropConnect: one mask per call and weight
            per = len(weights) // len(masks)
            for k, m in enumerate(masks):
                weights[k * per + 1] = weights[k * per + 1] * m.weight_hh
        request = self._request(inp, h0, c0, return_gates)
        backend, _ = backends.select(request, self.backend)
        call = backends.Call(
            request=request,
            x=inp.x,
            h0=h0,
            c0=c0,
            weights=weights,
            lengths=inp.lengths,
            dropout=self.dropout,
            training=self.training,
            reference=lambda: self._reference(call),
            masks=masks,
        )
        out, h_n, c_n, *gates = backend.run(call)
        if inp.unbatched:
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        result = (inp.restore(out), (h_n, c_n) if self._mode == "lstm" else h_n)
        if not return_gates:
            return result
        names = F.GATE_OUTPUTS[self._mode]
        labels = [f"l{k // self.num_directions}{self._suffixes()[k % self.num_directions]}"
                  for k in range(len(gates[0]))]  # fmt: skip
        per_layer = {
            label: {n: inp.restore(g) for n, g in zip(names, layer_gates, strict=True)}
            for label, layer_gates in zip(labels, gates[0], strict=True)
        }
        return (*result, per_layer)


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
            Regularisers(**regularisers),
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
    :mod:`rnnkit.layers.regularisers`): ``dropout_input``, ``dropout_state``, ``dropout_output``
    (variational), ``zoneout``, ``zoneout_cell``, ``weight_drop`` (DropConnect on
    ``weight_hh_l*``). ``return_gates=True`` adds a dict ``{"l0": {"i": ..., "f": ..., "g": ...,
    "o": ..., "c": ...}, "l0_reverse": ..., ...}`` of per-step gate activations (for inspection:
    detached on the fused ``cpu`` backend, differentiable on ``backend="reference"``).
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
            Regularisers(**regularisers),
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
            Regularisers(**regularisers),
        )
