"""The one time loop (:func:`scan`) and the layer that runs any cell over a sequence (:class:`Recurrent`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from .. import lengths as L
from ..cells.base import Cell, State
from .regularisers import PlainPickle, Regularisers

__all__ = ["Recurrent", "check_dtypes", "prepare", "scan"]

Step = Callable[..., tuple]


def _where(valid: Tensor, new: Any, old: Any) -> Any:
    if isinstance(new, Tensor):
        return torch.where(valid, new, old)
    return type(new)(_where(valid, n, o) for n, o in zip(new, old, strict=True))


def _states(state: Any) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


def _like(state: Any, tensors: list[Tensor]) -> Any:
    return tensors[0] if isinstance(state, Tensor) else type(state)(tensors)


def _zone(new: Any, old: Any, zoneout: tuple, t: int) -> Any:
    """Zoneout: keep previous units where the step's mask says so (eval: the expectation)."""
    mixed = []
    for z, n, o in zip(zoneout, _states(new), _states(old), strict=True):
        if isinstance(z, Tensor):
            mixed.append(torch.where(z[t], o, n))
        else:
            mixed.append(n if z == 0.0 else z * o + (1 - z) * n)
    return _like(new, mixed)


def scan(
    step: Step,
    x: Tensor,
    state: Any,
    lengths: Tensor | None = None,
    reverse: bool = False,
    *,
    zoneout: tuple | None = None,
    state_mask: Tensor | None = None,
    return_gates: bool = False,
) -> tuple:
    """Run ``step(x_t, state) -> (out_t, state)`` over time-major ``x`` (T, B, I): THE time loop.

    With ``lengths`` (B,), steps at or beyond a sequence's length leave its state unchanged and
    give a zero output, so the final state is the one at the sequence's own last step. With
    ``reverse`` the sequence is read from each sequence's own last valid step back to its first;
    outputs are returned in the original time order.

    Regularisers (see :mod:`rnnkit.layers.regularisers`): ``state_mask`` (B, n) multiplies the
    first state tensor (h_{t-1}) as it enters the step; ``zoneout`` holds, per state tensor, a
    (T, B, n) bool mask (True = keep the previous value at that step) or an eval-mode probability;
    with zoneout the output is the zoned-out h. With ``return_gates`` the step is called with
    ``return_gates=True`` and its gates are returned stacked over time.

    Returns ``(out (T, B, O), final_state)``, plus a tuple of (T, B, n) gates with ``return_gates``.
    """
    steps = x.shape[0]
    masks = list(zoneout) if zoneout is not None and isinstance(zoneout[0], Tensor) else []
    if reverse:
        x = L.reverse_padded(x, lengths)
        masks = [L.reverse_padded(m, lengths) for m in masks]
    if masks:
        zoneout = tuple(masks)
    valid = None
    run = steps
    if lengths is not None:
        valid = L.mask(lengths, steps).unsqueeze(-1)  # (T, B, 1)
        run = int(lengths.max()) if lengths.numel() else 0
    columns: list[tuple[Tensor, ...]] = []  # per step: out, then the gates
    for t in range(max(run, 1)):
        entering = state
        if state_mask is not None:
            first, *rest = _states(state)
            entering = _like(state, [first * state_mask, *rest])
        out, new, *gates = (
            step(x[t], entering, return_gates=True) if return_gates else step(x[t], entering)
        )
        if zoneout is not None:
            new = _zone(new, state, zoneout, t)
            out = _states(new)[0]
        column = (out, *(gates[0] if gates else ()))
        if t >= run:  # every sequence is empty: this step only gave the shapes
            columns.append(tuple(torch.zeros_like(c) for c in column))
            break
        if valid is not None:
            column = tuple(torch.where(valid[t], c, 0.0) for c in column)
            new = _where(valid[t], new, state)
        columns.append(column)
        state = new
    pad = [tuple(torch.zeros_like(c) for c in columns[0])] * (steps - len(columns))
    stacked = [torch.stack(c) for c in zip(*columns, *pad, strict=True)]
    if reverse:
        stacked = [L.reverse_padded(c, lengths) for c in stacked]
    if return_gates:
        return stacked[0], state, tuple(stacked[1:])
    return stacked[0], state


@dataclass
class Prepared:
    """An input brought to the time-major (T, B, I) layout, and how to restore the output's layout."""

    x: Tensor
    lengths: Tensor | None
    packed: PackedSequence | None
    batch_first: bool
    unbatched: bool

    @property
    def lengths_kind(self) -> str:
        if self.lengths is None:
            return "none"
        return "has_zero" if bool((self.lengths == 0).any()) else "positive"

    def restore(self, out: Tensor) -> Tensor | PackedSequence:
        """Give a time-major result the caller's layout (packed, batch-first or unbatched)."""
        if self.packed is not None:
            return L.to_packed(out, self.packed)
        if self.unbatched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out


def prepare(
    x: Tensor | PackedSequence,
    lengths: Any,
    batch_first: bool,
    input_size: int,
    allow_unbatched: bool = False,
    weights: Iterable[tuple[str, Tensor]] = (),
    layer: str = "RNN",
) -> Prepared:
    """Validate a layer's input and lengths and bring them to the time-major layout.

    ``weights`` (name, tensor) are the layer's parameters that its kernels read in the input's
    dtype: the input must have their dtype (see :func:`check_dtypes`).
    """
    packed = None
    if isinstance(x, PackedSequence):
        if lengths is not None:
            raise ValueError(
                "lengths was given with a PackedSequence, which carries its own lengths"
            )
        packed = x
        x, lengths = L.from_packed(x)
        batch_first = False
    if not isinstance(x, Tensor):
        raise TypeError(f"input is a {type(x).__name__}; expected a Tensor or a PackedSequence")
    if not x.is_floating_point():
        raise TypeError(f"input has dtype {x.dtype}; expected a floating-point tensor")
    given = tuple(x.shape)  # as the caller passed it, for the messages below
    unbatched = allow_unbatched and x.dim() == 2
    if unbatched:
        if lengths is not None:
            raise ValueError(
                "lengths was given for an unbatched (T, I) input; add a batch dimension"
            )
        x = x.unsqueeze(1)
    elif x.dim() != 3:
        layout = "(B, T, I)" if batch_first else "(T, B, I)"
        extra = " or (T, I)" if allow_unbatched else ""
        raise ValueError(f"input has shape {tuple(x.shape)}; expected 3 dimensions {layout}{extra}")
    elif batch_first:
        x = x.transpose(0, 1)
    if x.shape[-1] != input_size:
        raise ValueError(
            f"input has {x.shape[-1]} features (shape {given}); expected input_size = {input_size}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"input has T = 0 steps (shape {given}); expected T >= 1")
    x = check_dtypes(x, weights, layer)
    if lengths is not None:
        lengths = L.as_lengths(lengths, x.shape[1], x.shape[0], x.device)
    return Prepared(x, lengths, packed, batch_first, unbatched)


def check_dtypes(x: Tensor, weights: Iterable[tuple[str, Tensor]], layer: str = "RNN") -> Tensor:
    """The input in the dtype of the layer's weights, or ValueError naming the mismatch.

    Every backend reads the input and the weights as one dtype, so a float64 input to a float32
    layer (or the reverse) is refused as torch.nn refuses it, before any backend runs; so is a
    layer whose weights do not share one dtype. Under autocast the input is converted instead,
    as torch.nn's layers accept it there.
    """
    weights = list(weights)
    if not weights:
        return x
    first_name, first = weights[0]
    for name, w in weights[1:]:
        if w.dtype != first.dtype:
            raise ValueError(
                f"{layer} parameter {name} has dtype {w.dtype}, but {first_name} has "
                f"{first.dtype}; expected one dtype for every parameter (convert the model with "
                f"model.to({first.dtype}))"
            )
    if x.dtype == first.dtype:
        return x
    if torch.is_autocast_enabled(x.device.type):
        return x.to(first.dtype)
    raise ValueError(
        f"{layer} input dtype ({x.dtype}) does not match weight dtype ({first.dtype}). Convert "
        f"input: input.to({first.dtype}), or convert model: model.to({x.dtype})"
    )


def check_state(name: str, value: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Validate one initial-state tensor: type, shape, dtype and device as expected."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is a {type(value).__name__}; expected a Tensor of shape {shape}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {shape}")
    if value.dtype != like.dtype:
        if value.is_floating_point() and torch.is_autocast_enabled(like.device.type):
            return value.to(like.dtype)  # as the input was converted (check_dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; expected {like.dtype} like the input")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device}; expected {like.device} like the input")
    return value


def needs_grad(x: Tensor, *tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in tensors)


class Recurrent(PlainPickle, nn.Module):
    """Run a cell over a sequence: the one time loop of rnnkit.

    ``Recurrent(cell, reverse=False, batch_first=False, backend=None, **regularisers)``;
    ``forward(x, state=None, lengths=None, return_gates=False) -> (output, final_state[, gates])``.

    ``x`` is (T, B, I) ((B, T, I) with ``batch_first``) or a PackedSequence (then the output is one
    too). ``state`` is the cell's state (None = zeros). With ``lengths``, outputs at padded steps are
    zero and ``final_state`` is each sequence's state at its own last step; ``reverse=True`` reads
    each sequence from its own last valid step back to the first. Built-in cells run on the fastest
    backend that supports the call (see :func:`rnnkit.explain`); any other cell runs the loop here.

    Regularisers (keyword arguments, see :mod:`rnnkit.layers.regularisers`): ``dropout_input``,
    ``dropout_state``, ``dropout_output`` (variational, one mask per sequence), ``zoneout`` and
    ``zoneout_cell``, ``weight_drop`` (DropConnect on ``cell.weight_hh``).

    ``return_gates=True`` (LSTM and GRU families) also returns the gate activations of every step
    as a dict of tensors in the output's layout, e.g. LSTM ``{"i", "f", "g", "o", "c"}``, zero at
    padded steps. They are for inspection: the fused ``cpu`` backend returns them detached (no
    gradient flows through them); ``backend="reference"`` returns differentiable ones.
    """

    def __init__(
        self,
        cell: Cell,
        reverse: bool = False,
        batch_first: bool = False,
        backend: str | None = None,
        *,
        dropout_input: float = 0.0,
        dropout_state: float = 0.0,
        dropout_output: float = 0.0,
        zoneout: float = 0.0,
        zoneout_cell: float | None = None,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(cell, nn.Module) or not hasattr(cell, "input_size"):
            raise TypeError(
                f"cell is a {type(cell).__name__}; expected an rnnkit Cell (an nn.Module with "
                "input_size, hidden_size, initial_state and forward(x_t, state))"
            )
        self.cell = cell
        self.reverse = bool(reverse)
        self.batch_first = bool(batch_first)
        self.backend = backends.check_name(backend)
        self.regularisers = Regularisers(
            dropout_input, dropout_state, dropout_output, zoneout, zoneout_cell, weight_drop
        )
        if weight_drop and not isinstance(getattr(cell, "weight_hh", None), Tensor):
            raise ValueError(
                f"weight_drop = {weight_drop} needs a cell with a recurrent weight named "
                f"weight_hh; {type(cell).__name__} has none"
            )

    @property
    def input_size(self) -> int:
        return self.cell.input_size

    @property
    def output_size(self) -> int:
        return getattr(self.cell, "output_size", self.cell.hidden_size)

    def extra_repr(self) -> str:
        flags = [f"{k}=True" for k in ("reverse", "batch_first") if getattr(self, k)]
        if self.backend is not None:
            flags.append(f"backend={self.backend!r}")
        regs = self.regularisers.extra_repr()
        return ", ".join(flags + ([regs] if regs else []))

    def _initial_state(self, state: State | None, x: Tensor) -> State:
        batch = x.shape[1]
        zeros = self.cell.initial_state(batch, dtype=x.dtype, device=x.device)
        if state is None:
            return zeros
        if isinstance(zeros, Tensor):
            return check_state("state", state, tuple(zeros.shape), x)
        if not isinstance(state, tuple | list) or len(state) != len(zeros):
            raise TypeError(
                f"state is a {type(state).__name__}; expected a tuple of {len(zeros)} tensors"
            )
        return tuple(
            check_state(f"state[{k}]", s, tuple(z.shape), x)
            for k, (s, z) in enumerate(zip(state, zeros, strict=True))
        )

    def _request(self, inp: Prepared, return_gates: bool = False) -> backends.Request:
        mode = self.cell.kernel_mode() if isinstance(self.cell, Cell) else None
        weights = self.cell.kernel_weights() if mode else list(self.cell.parameters())
        regs = self.regularisers
        return backends.Request(
            mode=mode,
            reverse=self.reverse,
            bias=bool(getattr(self.cell, "bias", True)),
            proj=getattr(self.cell, "proj_size", 0) > 0,
            device_type=inp.x.device.type,
            dtype=inp.x.dtype,
            lengths=inp.lengths_kind,
            requires_grad=needs_grad(inp.x, *weights),
            zoneout=bool(regs.zoneout or regs.zoneout_cell),
            state_dropout=bool(regs.dropout_state) and self.training,
            gates=return_gates,
            layer=type(self.cell).__name__,
        )

    def _prepare(self, x: Any, lengths: Any) -> Prepared:
        # a built-in cell's kernels read its weights in the input's dtype; a custom cell's own
        # operations check what they need
        built_in = isinstance(self.cell, Cell) and self.cell.kernel_mode() is not None
        weights = self.cell.named_parameters() if built_in else ()
        layer = f"Recurrent({type(self.cell).__name__})"
        return prepare(x, lengths, self.batch_first, self.input_size, weights=weights, layer=layer)

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        inp = self._prepare(x, lengths)
        return [(type(self.cell).__name__, self._request(inp), self.backend)]

    def _check_gates(self) -> tuple[str, ...]:
        names = getattr(self.cell, "gate_names", ())
        if not names or "return_gates" not in inspect.signature(self.cell.forward).parameters:
            raise ValueError(
                f"return_gates=True, but {type(self.cell).__name__} has no gates to return; "
                "expected a cell of the LSTM or GRU family, or one with gate_names and a "
                "forward(x, state, return_gates=False)"
            )
        return names

    def forward(
        self,
        x: Tensor | PackedSequence,
        state: State | None = None,
        lengths: Any = None,
        return_gates: bool = False,
    ) -> tuple:
        names = self._check_gates() if return_gates else ()
        inp = self._prepare(x, lengths)
        state = self._initial_state(state, inp.x)
        sizes = tuple(s.shape[-1] for s in _states(state))
        weight_hh = self.cell.weight_hh if self.regularisers.weight_drop else None
        masks = self.regularisers.draw(self.training, inp.x, self.output_size, sizes, weight_hh)
        x = inp.x if masks.input is None else inp.x * masks.input
        overrides = {} if masks.weight_hh is None else {"weight_hh": weight_hh * masks.weight_hh}

        def step(x_t: Tensor, s: Any, **kw: Any) -> tuple:
            return torch.func.functional_call(self.cell, overrides, (x_t, s), kw)

        def loop() -> tuple:
            return scan(
                step if overrides else self.cell, x, state, inp.lengths, self.reverse,
                zoneout=masks.zoneout, state_mask=masks.state, return_gates=return_gates,
            )  # fmt: skip

        request = self._request(inp, return_gates)
        backend, _ = backends.select(request, self.backend)
        if request.mode is None:  # a custom cell: only the reference loop can run it
            out, state, *gates = loop()
        else:
            out, state, *gates = self._run_kernel(backend, request, x, state, inp, masks, loop)
        if masks.output is not None:
            out = out * masks.output
        if not return_gates:
            return inp.restore(out), state
        return (
            inp.restore(out),
            state,
            {n: inp.restore(g) for n, g in zip(names, gates[0], strict=True)},
        )

    def _run_kernel(self, backend, request, x, state, inp, masks, loop) -> tuple:
        """Run a built-in cell on ``backend`` in the backends' (L*D, B, ...) state layout."""
        lstm = not isinstance(state, Tensor)
        h0, c0 = (state[0], state[1]) if lstm else (state, None)

        def reference() -> tuple:  # gates, if any, as backends return them: one tuple per layer
            out, final, *gates = loop()
            h, c = (final[0], final[1]) if lstm else (final, None)
            result = (out, h.unsqueeze(0), None if c is None else c.unsqueeze(0))
            return (*result, tuple(gates)) if gates else result

        weights = self.cell.kernel_weights()
        if masks.weight_hh is not None:
            weights[1] = weights[1] * masks.weight_hh
        call = backends.Call(
            request=request,
            x=x,
            h0=h0.unsqueeze(0),  # (1, B, P)
            c0=None if c0 is None else c0.unsqueeze(0),  # (1, B, H)
            weights=weights,
            lengths=inp.lengths,
            dropout=0.0,
            training=self.training,
            reference=reference,
            masks=masks,
            eps=getattr(self.cell, "eps", 1e-5),
        )
        out, h_n, c_n, *gates = backend.run(call)
        return (out, (h_n[0], c_n[0]) if lstm else h_n[0], *(g[0] for g in gates))
