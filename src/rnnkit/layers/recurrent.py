"""The layer that runs any cell over a sequence (:class:`Recurrent`), the input checks every layer
shares, and how a layer hands its stack to the backends.

The time loop itself is :func:`rnnkit.backends.reference.scan` (re-exported here as
:func:`scan`): every layer describes its stack (layers x directions, see
:class:`rnnkit.backends.Direction`) and the backends run it, the reference backend with that loop.

States
------
What a layer takes and returns as its state has the layer's shape, so that a returned state can
be handed back in (streaming):

* :class:`Recurrent`: the cell's state (a (B, H) tensor, or a tuple such as ``(h, c)``);
* :class:`~rnnkit.Bidirectional`: ``(forward_state, backward_state)``;
* :class:`~rnnkit.Stacked`: a tuple with one state per layer;
* the drop-ins (:class:`~rnnkit.RNN`, :class:`~rnnkit.LSTM`, :class:`~rnnkit.GRU`): torch.nn's
  ``h_n`` (L*D, B, P) (and ``c_n`` (L*D, B, H) for the LSTM).

:func:`top_states` reads any of them the same way: the top layer's final state per direction.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from .. import functional as F
from .. import lengths as L
from ..backends import Direction, StackMasks, StackResult
from ..backends.reference import scan
from ..backends.stack import auto_checkpoint, draw_masks
from ..cells.base import Cell, State
from ..errors import DTypeError, ShapeError
from ..regularisers import PlainPickle, Regularisers

__all__ = [
    "Recurrent",
    "check_dtypes",
    "detach_state",
    "given_state_dtypes",
    "prepare",
    "scan",
    "top_states",
]


def _states(state: Any) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


def cell_state(direction: Direction, tensors: tuple[Tensor, ...]) -> State:
    """Final state tensors of ``direction`` in its cell's layout (a tuple, or one tensor)."""
    return tuple(tensors) if direction.tuple_state else tensors[0]


@dataclass
class Prepared:
    """An input brought to the time-major (T, B, I) layout, and how to restore the output's layout."""

    x: Tensor
    lengths: Tensor | None
    packed: PackedSequence | None
    batch_first: bool
    unbatched: bool
    #: the caller's input dtype, before :func:`check_dtypes` (autocast converts it)
    given_dtype: torch.dtype | None = None

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
        if backends.exporting():
            raise ValueError(
                "a PackedSequence does not export (its batch sizes are values an exported graph "
                "cannot read); export the padded batch with lengths= instead"
            )
        packed = x
        x, lengths = L.from_packed(x)
        batch_first = False
    if not isinstance(x, Tensor):
        raise TypeError(f"input is a {type(x).__name__}; expected a Tensor or a PackedSequence")
    if not x.is_floating_point():
        raise DTypeError(f"input has dtype {x.dtype}; expected a floating-point tensor")
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
        shape = tuple(int(n) for n in x.shape)  # ints also while a model is traced for export
        raise ShapeError(f"input has shape {shape}; expected 3 dimensions {layout}{extra}")
    elif batch_first:
        x = x.transpose(0, 1)
    if x.shape[-1] != input_size:
        raise ShapeError(
            f"input has {x.shape[-1]} features (shape {given}); expected input_size = {input_size}"
        )
    if x.shape[0] == 0:
        raise ShapeError(f"input has T = 0 steps (shape {given}); expected T >= 1")
    given_dtype = x.dtype
    x = check_dtypes(x, weights, layer)
    if lengths is not None:
        lengths = L.as_lengths(lengths, x.shape[1], x.shape[0], x.device)
    return Prepared(x, lengths, packed, batch_first, unbatched, given_dtype)


def check_dtypes(x: Tensor, weights: Iterable[tuple[str, Tensor]], layer: str = "RNN") -> Tensor:
    """The input in the dtype of the layer's weights, or a DTypeError naming the mismatch.

    Every backend reads the input and the weights as one dtype, so a float64 input to a float32
    layer (or the reverse) is refused as torch.nn refuses it, before any backend runs; so is a
    layer whose weights do not share one dtype. Under autocast the input is converted instead,
    as torch.nn's layers accept it there; the backends see the autocast request
    (:attr:`rnnkit.backends.Request.autocast`) and the caller's dtype, run their products in the
    autocast dtype where they can, and return the dtypes torch.nn returns for the same call.
    An input on another device than the weights (or weights on several devices) is refused too.
    """
    weights = list(weights)
    if not weights:
        return x
    first_name, first = weights[0]
    for kind, verb, theirs_verb, fix in (
        ("device", "is on", "is on", f"move the model with model.to({str(first.device)!r})"),
        ("dtype", "has dtype", "has", f"convert the model with model.to({first.dtype})"),
    ):
        for name, w in weights[1:]:
            if getattr(w, kind) != getattr(first, kind):
                raise (DTypeError if kind == "dtype" else ValueError)(
                    f"{layer} parameter {name} {verb} {getattr(w, kind)}, but {first_name} "
                    f"{theirs_verb} {getattr(first, kind)}; expected one {kind} for every "
                    f"parameter ({fix})"
                )
    if x.device != first.device:
        raise ValueError(
            f"{layer} input is on {x.device}, but its parameters are on {first.device}; "
            f"expected one device (move the input: input.to({str(first.device)!r}), or the "
            f"model: model.to({str(x.device)!r}))"
        )
    if x.dtype == first.dtype:
        return x
    if F.autocasting(x.device.type):
        return x.to(first.dtype)
    raise DTypeError.input_of(layer, x.dtype, first.dtype)


def check_state(name: str, value: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Validate one initial-state tensor: type, shape, dtype and device as expected."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is a {type(value).__name__}; expected a Tensor of shape {shape}")
    if tuple(value.shape) != shape:
        raise ShapeError(f"{name} has shape {tuple(value.shape)}; expected {shape}")
    if value.dtype != like.dtype:
        if value.is_floating_point() and F.autocasting(like.device.type):
            return value.to(like.dtype)  # as the input was converted (check_dtypes)
        raise DTypeError(f"{name} has dtype {value.dtype}; expected {like.dtype} like the input")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device}; expected {like.device} like the input")
    return value


@contextlib.contextmanager
def state_part(index: int, where: str = "") -> Iterator[None]:
    """Errors about ``state`` raised inside (by :func:`check_state` and the layers' own checks)
    name the part of a composite's state they concern, ``state[index]``, and ``where`` it
    belongs (e.g. "in the backward direction"); nested composites add their indices in turn."""
    try:
        yield
    except (ValueError, TypeError) as e:
        text = str(e)
        known = (ShapeError, DTypeError, ValueError, TypeError)
        if type(e) not in known or not text.startswith("state"):
            raise
        text = f"state[{index}]{text[len('state') :]}"
        if where and " direction" not in text:
            text += f" {where}"
        raise type(e)(text) from None


def given_state_dtypes(states: Iterable[Any], like: Tensor) -> tuple[torch.dtype, ...] | None:
    """The dtypes of the initial states a caller gave a stack, before :func:`check_state`
    converted them (autocast), for :func:`rnnkit.backends.autocast_dtypes`: what a drop-in's
    ``(h_0, c_0)`` says, position by position (h, c, ...). ``states``: one cell state per
    direction (a tensor, a tuple of them, or None where none was given: the input's dtype
    ``like``); where directions differ, the wider dtype. None when no state was given."""
    states = list(states)
    if all(s is None for s in states):
        return None
    dtypes: list[torch.dtype] = []
    for state in states:
        tensors = () if state is None else _states(state)
        if not all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors):
            return None  # check_state refuses it with the message it deserves
        for k, t in enumerate(tensors):
            if k < len(dtypes):
                dtypes[k] = torch.promote_types(dtypes[k], t.dtype)
            else:
                dtypes.append(t.dtype)
    if any(s is None for s in states):
        dtypes = [torch.promote_types(d, like.dtype) for d in dtypes]
    return tuple(dtypes)


def top_states(layer: nn.Module, state: Any) -> tuple[tuple[Tensor, ...], ...]:
    """The top layer's final state per direction (forward first), from the state any rnnkit layer
    returns: one tuple of state tensors per direction, each (B, n); entry ``[d][0]`` is the final
    hidden state of direction d, ``[d][1]`` the LSTM's cell state.

    Works for :class:`Recurrent`, :class:`~rnnkit.Bidirectional`, :class:`~rnnkit.Stacked`, the
    drop-ins, and any other layer whose state is a cell state ((B, H), or a tuple of such).
    """
    read = getattr(layer, "top_states", None)
    if read is not None:
        return read(state)
    tensors = _states(state) if isinstance(state, Tensor | tuple | list) else ()
    if not tensors or not all(isinstance(t, Tensor) and t.dim() == 2 for t in tensors):
        raise TypeError(
            f"cannot read a final state of type {type(state).__name__} from a "
            f"{type(layer).__name__}; expected an rnnkit layer or a (B, H) / (h, c) cell state"
        )
    return (tensors,)


def check_checkpoint(value: Any) -> int | str | None:
    """``checkpoint`` as a layer takes it: None (keep every step), a positive int K (keep the
    state every K steps, recompute the rest in the backward pass) or "auto" (K about sqrt(T))."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"checkpoint = {value!r}; expected None, a positive integer or 'auto'")
    return value


def segment(checkpoint: int | str | None, steps: int) -> int:
    """The segment length of checkpointed BPTT over ``steps`` steps (0: not checkpointed)."""
    if checkpoint is None:
        return 0
    return auto_checkpoint(steps) if checkpoint == "auto" else int(checkpoint)


def run_stack(
    module: nn.Module,
    inp: Prepared,
    layers: list[list[Direction]],
    backend: str | None,
    *,
    dropout: float = 0.0,
    gates: bool = False,
    checkpoint: int | str | None = None,
    masks: StackMasks | None = None,
    state_dtypes: tuple[torch.dtype, ...] | None = None,
) -> StackResult:
    """Hand a layer's stack (``layers``, built by the layer over ``inp``) to the backends.
    ``state_dtypes``: the dtypes of the initial states the caller gave, before
    :func:`check_state` converted them (autocast)."""
    if gates and backends.exporting():
        raise ValueError(
            f"return_gates=True while {type(module).__name__} is exported; expected a call "
            "without it (the gates are for looking into an eager call, and do not export)"
        )
    if masks is not None:
        check_streaming(module, layers, masks, inp.x.shape[0])
    call = backends.make_call(
        inp.x,
        layers,
        inp.lengths,
        dropout=dropout,
        training=module.training,
        gates=gates,
        label=type(module).__name__,
        checkpoint=segment(checkpoint, inp.x.shape[0]),
        masks=masks,
        input_dtype=inp.given_dtype,
        state_dtypes=state_dtypes,
    )
    return backends.run(call, backend)


def check_streaming(
    module: nn.Module, layers: list[list[Direction]], masks: Any, steps: int
) -> None:
    """``masks`` must come from :meth:`draw_masks`; a chunk of a longer sequence cannot be read
    backwards."""
    if not isinstance(masks, StackMasks):
        raise TypeError(
            f"masks is a {type(masks).__name__}; expected what {type(module).__name__}.draw_masks "
            "returns (or its .at(t0) for a chunk)"
        )
    chunk = masks.offset > 0 or steps < masks.steps
    if chunk and any(d.reverse for layer in layers for d in layer):
        raise ValueError(
            f"{type(module).__name__} has a reversed direction, which reads each sequence from its "
            f"end: it cannot run a sequence of {masks.steps} steps chunk by chunk (this chunk: "
            f"steps {masks.offset}..{masks.offset + steps - 1}); run the whole sequence in one call"
        )


def draw_stack_masks(
    module: nn.Module, inp: Prepared, layers: list[list[Direction]], dropout: float = 0.0
) -> StackMasks:
    """The masks ``module`` would draw for a call over ``inp`` (with ``dropout`` between its
    layers), drawn now (see :meth:`draw_masks`)."""
    call = backends.make_call(inp.x, layers, inp.lengths, dropout=dropout, training=module.training)
    return draw_masks(call)


def dispatch_request(
    module: nn.Module, inp: Prepared, layers: list[list[Direction]], dropout: float = 0.0
) -> backends.Request:
    """The request :func:`run_stack` would dispatch (for :func:`rnnkit.explain`; nothing runs)."""
    call = backends.make_call(
        inp.x, layers, inp.lengths, dropout=dropout, training=module.training,
        label=type(module).__name__, input_dtype=inp.given_dtype,
    )  # fmt: skip
    return call.request


def detach_state(state: Any) -> Any:
    """``state`` (any layer's: a tensor, or tuples/lists of them, nested) with every tensor
    detached from the graph: carry it into the next chunk without backpropagating into the
    previous one (truncated BPTT)."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple | list):
        return type(state)(detach_state(s) for s in state)
    if state is None:
        return None
    raise TypeError(f"state is a {type(state).__name__}; expected a tensor or tuples of tensors")


def signature(layer: nn.Module) -> tuple | None:
    """What must agree between the directions of one fused stack, or None when ``layer`` is not
    a :class:`Recurrent` (then a wrapper composes it module by module)."""
    if not isinstance(layer, Recurrent):
        return None
    cell = layer.cell
    mode = cell.kernel_mode() if isinstance(cell, Cell) else None
    weights = tuple(cell.kernel_weights()) if mode else ("custom",)
    return (
        mode, weights, getattr(cell, "eps", 1e-5), layer.batch_first, layer.backend,
        layer.checkpoint,
    )  # fmt: skip


class Recurrent(PlainPickle, nn.Module):
    """Run a cell over a sequence.

    ``Recurrent(cell, reverse=False, batch_first=False, backend=None, **regularisers)``;
    ``forward(x, state=None, lengths=None, return_gates=False) -> (output, final_state[, gates])``.

    ``x`` is (T, B, I) ((B, T, I) with ``batch_first``) or a PackedSequence (then the output is one
    too). ``state`` is the cell's state (None = zeros). With ``lengths``, outputs at padded steps are
    zero and ``final_state`` is each sequence's state at its own last step; ``reverse=True`` reads
    each sequence from its own last valid step back to the first. Every call goes through the
    dispatch: built-in cells run on the fastest backend that supports the call (see
    :func:`rnnkit.explain`); any other cell on the reference backend's time loop.

    Regularisers (keyword arguments, see :mod:`rnnkit.regularisers`): ``dropout_input``,
    ``dropout_state``, ``dropout_output`` (variational, one mask per sequence), ``zoneout`` and
    ``zoneout_cell``, ``weight_drop`` (DropConnect on ``cell.weight_hh``).

    ``checkpoint``: None keeps every step's activations for the backward pass; an int K keeps
    the state every K steps and recomputes each segment of K steps just before the backward pass
    needs it (about sqrt(T) with "auto"), for the same gradients in far less memory.

    Streaming: a state returned by one call goes into the next; :func:`rnnkit.detach_state`
    cuts the graph between them (truncated BPTT); :meth:`draw_masks` draws the regulariser masks
    once for a whole sequence, to be passed (``masks=masks.at(t0)``) with each chunk.

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
        checkpoint: int | str | None = None,
    ) -> None:
        super().__init__()
        needs = ("input_size", "hidden_size", "initial_state")
        if not isinstance(cell, nn.Module) or not all(hasattr(cell, n) for n in needs):
            name = type(cell).__name__
            hint = ""
            if isinstance(cell, nn.RNNCellBase):  # torch.nn's RNNCell, LSTMCell, GRUCell
                hint = (
                    f"; rnnkit.{name} has torch.nn.{name}'s parameters: rnnkit.{name}(...)"
                    ".load_state_dict(cell.state_dict())"
                )
            raise TypeError(
                f"cell is a {name}; expected an rnnkit Cell (an nn.Module with input_size, "
                f"hidden_size, initial_state and forward(x_t, state)){hint}"
            )
        self.cell = cell
        self.reverse = bool(reverse)
        self.batch_first = bool(batch_first)
        self.backend = backends.check_name(backend)
        self.regularisers = Regularisers(
            dropout_input, dropout_state, dropout_output, zoneout, zoneout_cell, weight_drop
        )
        self.checkpoint = check_checkpoint(checkpoint)
        if self.regularisers.zoneout_cell:
            probe = cell.initial_state(1)
            n_states = 1 if isinstance(probe, Tensor) else len(probe)
            self.regularisers.check_states(n_states, type(cell).__name__)
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
        if self.checkpoint is not None:
            flags.append(f"checkpoint={self.checkpoint!r}")
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

    def dtype_weights(self) -> Iterable[tuple[str, Tensor]]:
        """The parameters the input's dtype must match: a built-in cell's (its kernels read them
        in the input's dtype); a custom cell's own operations check what they need."""
        built_in = isinstance(self.cell, Cell) and self.cell.kernel_mode() is not None
        return self.cell.named_parameters() if built_in else ()

    def _prepare(self, x: Any, lengths: Any) -> Prepared:
        layer = f"Recurrent({type(self.cell).__name__})"
        return prepare(
            x, lengths, self.batch_first, self.input_size, weights=self.dtype_weights(),
            layer=layer,
        )  # fmt: skip

    def directions(self, like: Tensor, state: Any) -> list[list[Direction]]:
        """This layer as the backends run it: one layer of one direction, from ``state`` (or
        zeros) for a batch like ``like`` (T, B, I)."""
        state = self._initial_state(state, like)
        cell = self.cell
        mode = cell.kernel_mode() if isinstance(cell, Cell) else None
        if mode is not None:
            weights = cell.kernel_weights()
        else:  # a custom cell runs itself; DropConnect needs its weight_hh
            weights = {"weight_hh": cell.weight_hh} if self.regularisers.weight_drop else {}
            tensors = _states(state)
            zoned = tensors[0].shape[-1]
            if any(self.regularisers.zoneouts(len(tensors))) and self.output_size != zoned:
                raise ValueError(
                    "zoneout makes the output the zoned-out h of "
                    f"{zoned} features, but {type(cell).__name__} outputs {self.output_size}; "
                    "expected a cell whose output is its hidden state (its first state tensor)"
                )
        direction = Direction(
            mode=mode,
            weights=weights,
            state=_states(state),
            reverse=self.reverse,
            tuple_state=not isinstance(state, Tensor),
            cell=None if mode is not None else cell,
            eps=getattr(cell, "eps", 1e-5),
            regularisers=self.regularisers,
        )
        return [[direction]]

    def top_states(self, state: Any) -> tuple[tuple[Tensor, ...], ...]:
        return (_states(state),)

    def direction_states(self, state: Any) -> list[Any]:
        """``state`` as the caller gave it, one cell state per direction (one here)."""
        return [state]

    def dispatch_requests(self, x: Any, lengths: Any = None) -> list:
        inp = self._prepare(x, lengths)
        request = dispatch_request(self, inp, self.directions(inp.x, None))
        return [(type(self.cell).__name__, request, self.backend)]

    def _check_gates(self) -> tuple[str, ...]:
        names = getattr(self.cell, "gate_names", ())
        if not names or "return_gates" not in inspect.signature(self.cell.forward).parameters:
            raise ValueError(
                f"return_gates=True, but {type(self.cell).__name__} has no gates to return; "
                "expected a cell of the LSTM or GRU family, or one with gate_names and a "
                "forward(x, state, return_gates=False)"
            )
        return names

    def draw_masks(self, x: Tensor | PackedSequence, lengths: Any = None) -> StackMasks:
        """The regulariser masks of a call over the whole sequence ``x``, drawn now: pass
        ``masks.at(t0)`` with each chunk that starts at step t0 (and the previous chunk's state),
        and the chunks compute exactly what one call over ``x`` computes (streaming, truncated
        BPTT)."""
        inp = self._prepare(x, lengths)
        return draw_stack_masks(self, inp, self.directions(inp.x, None))

    def forward(
        self,
        x: Tensor | PackedSequence,
        state: State | None = None,
        lengths: Any = None,
        return_gates: bool = False,
        masks: StackMasks | None = None,
    ) -> tuple:
        """``masks``: from :meth:`draw_masks` (for a chunk, ``.at(t0)``); None draws new ones."""
        names = self._check_gates() if return_gates else ()
        inp = self._prepare(x, lengths)
        layers = self.directions(inp.x, state)
        result = run_stack(
            self, inp, layers, self.backend, gates=return_gates, checkpoint=self.checkpoint,
            masks=masks, state_dtypes=given_state_dtypes([state], inp.x),
        )  # fmt: skip
        final = cell_state(layers[0][0], result.states[0][0])
        if not return_gates:
            return inp.restore(result.out), final
        gates = result.gates[0][0]  # type: ignore[index]
        return (
            inp.restore(result.out),
            final,
            {n: inp.restore(g) for n, g in zip(names, gates, strict=True)},
        )
