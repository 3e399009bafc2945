"""The one time loop (:func:`scan`) and the layer that runs any cell over a sequence (:class:`Recurrent`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from .. import lengths as L
from ..cells.base import Cell, State

__all__ = ["Recurrent", "prepare", "scan"]

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]


def _where(valid: Tensor, new: Any, old: Any) -> Any:
    if isinstance(new, Tensor):
        return torch.where(valid, new, old)
    return type(new)(_where(valid, n, o) for n, o in zip(new, old, strict=True))


def scan(
    step: Step, x: Tensor, state: Any, lengths: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Any]:
    """Run ``step(x_t, state) -> (out_t, state)`` over time-major ``x`` (T, B, I).

    With ``lengths`` (B,), steps at or beyond a sequence's length leave its state unchanged and
    give a zero output, so the final state is the one at the sequence's own last step. With
    ``reverse`` the sequence is read from each sequence's own last valid step back to its first;
    outputs are returned in the original time order. Returns ``(out (T, B, O), final_state)``.
    """
    steps = x.shape[0]
    if reverse:
        x = L.reverse_padded(x, lengths)
    valid = None
    run = steps
    if lengths is not None:
        valid = L.mask(lengths, steps).unsqueeze(-1)  # (T, B, 1)
        run = int(lengths.max()) if lengths.numel() else 0
    outs = []
    for t in range(run):
        out, new = step(x[t], state)
        if valid is not None:
            out = torch.where(valid[t], out, 0.0)
            new = _where(valid[t], new, state)
        outs.append(out)
        state = new
    if run < steps:  # every sequence has ended: the rest is padding
        like = outs[0] if outs else step(x[0], state)[0]
        outs.extend([torch.zeros_like(like)] * (steps - run))
    out = torch.stack(outs)
    if reverse:
        out = L.reverse_padded(out, lengths)
    return out, state


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
) -> Prepared:
    """Validate a layer's input and lengths and bring them to the time-major layout."""
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
            f"input has {x.shape[-1]} features (shape {tuple(x.shape)}); expected input_size = "
            f"{input_size}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"input has T = 0 steps (shape {tuple(x.shape)}); expected T >= 1")
    if lengths is not None:
        lengths = L.as_lengths(lengths, x.shape[1], x.shape[0], x.device)
    return Prepared(x, lengths, packed, batch_first, unbatched)


def check_state(name: str, value: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Validate one initial-state tensor: type, shape, dtype and device as expected."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is a {type(value).__name__}; expected a Tensor of shape {shape}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {shape}")
    if value.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {value.dtype}; expected {like.dtype} like the input")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device}; expected {like.device} like the input")
    return value


def needs_grad(x: Tensor, *tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in tensors)


class Recurrent(nn.Module):
    """Run a cell over a sequence: the one time loop of rnnkit.

    ``Recurrent(cell, reverse=False, batch_first=False, backend=None)``;
    ``forward(x, state=None, lengths=None) -> (output, final_state)``.

    ``x`` is (T, B, I) ((B, T, I) with ``batch_first``) or a PackedSequence (then the output is one
    too). ``state`` is the cell's state (None = zeros). With ``lengths``, outputs at padded steps are
    zero and ``final_state`` is each sequence's state at its own last step; ``reverse=True`` reads
    each sequence from its own last valid step back to the first. Built-in cells run on the fastest
    backend that supports the call (see :func:`rnnkit.explain`); any other cell runs the loop here.
    """

    def __init__(
        self,
        cell: Cell,
        reverse: bool = False,
        batch_first: bool = False,
        backend: str | None = None,
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
        return ", ".join(flags)

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

    def _request(self, inp: Prepared) -> backends.Request:
        mode = self.cell.kernel_mode() if isinstance(self.cell, Cell) else None
        weights = self.cell.kernel_weights() if mode else list(self.cell.parameters())
        return backends.Request(
            mode=mode,
            reverse=self.reverse,
            bias=getattr(self.cell, "bias", True),
            proj=getattr(self.cell, "proj_size", 0) > 0,
            device_type=inp.x.device.type,
            dtype=inp.x.dtype,
            lengths=inp.lengths_kind,
            requires_grad=needs_grad(inp.x, *weights),
            layer=type(self.cell).__name__,
        )

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        inp = prepare(x, lengths, self.batch_first, self.input_size)
        return [(type(self.cell).__name__, self._request(inp), self.backend)]

    def forward(
        self, x: Tensor | PackedSequence, state: State | None = None, lengths: Any = None
    ) -> tuple[Tensor | PackedSequence, State]:
        inp = prepare(x, lengths, self.batch_first, self.input_size)
        state = self._initial_state(state, inp.x)
        request = self._request(inp)
        backend, _ = backends.select(request, self.backend)
        if request.mode is None:  # a custom cell: only the reference loop can run it
            out, state = scan(self.cell, inp.x, state, inp.lengths, self.reverse)
            return inp.restore(out), state

        lstm = request.mode == "lstm"
        h0, c0 = (state[0], state[1]) if lstm else (state, None)

        def reference() -> tuple[Tensor, Tensor, Tensor | None]:
            out, final = scan(self.cell, inp.x, state, inp.lengths, self.reverse)
            h, c = (final[0], final[1]) if lstm else (final, None)
            return out, h.unsqueeze(0), None if c is None else c.unsqueeze(0)

        call = backends.Call(
            request=request,
            x=inp.x,
            h0=h0.unsqueeze(0),  # (1, B, P)
            c0=None if c0 is None else c0.unsqueeze(0),  # (1, B, H)
            weights=self.cell.kernel_weights(),
            lengths=inp.lengths,
            dropout=0.0,
            training=self.training,
            reference=reference,
        )
        out, h_n, c_n = backend.run(call)
        final = (h_n[0], c_n[0]) if lstm else h_n[0]
        return inp.restore(out), final
