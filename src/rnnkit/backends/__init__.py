"""The one dispatch point and the backend contract: which implementation runs a recurrent layer,
and why.

A layer describes its whole stack as a :class:`Call` (built by :func:`make_call`): the input and,
per layer and direction, a :class:`Direction` (the cell's mode from the cell table, its weights
by the table's names, the initial state, reading order and regularisers). :func:`select` picks a
backend for the call's :class:`Request`; :func:`run` hands the call to the stack composer
(:mod:`.stack`), which does, once for every backend, what a stack needs around the layers:
dropout between layers, the regulariser masks (drawn once per call; DropConnect applied to the
weights; variational masks on each direction's input and output), the state layout and the
collection of gates.

Adding a backend
----------------
A backend is an object with

* ``name`` and ``priority`` (automatic dispatch tries the highest first; ``reference`` is 0);
* ``check(request) -> str | None``: None if it can run the request, else the reason it cannot;
* ``run_layer(layer: LayerCall) -> LayerResult``: ONE layer, every direction of it (one call
  per direction, or all at once if it fuses them), forward; its backward is whatever autograd
  differentiates (a custom op with a hand-written backward, or plain torch operations);
* optionally ``slower(request) -> str | None`` (a measured reason why automatic dispatch should
  prefer a lower-priority backend that can also run the request), ``why`` (one line for
  :func:`rnnkit.explain`), ``details(request) -> str`` (what :func:`rnnkit.explain` adds about
  the call once the backend is chosen), ``first = True`` (consulted before anything else, even a backend
  named explicitly; automatic dispatch does not list its reasons when it declines) and
  ``eager = False`` (it runs only while a model is exported, never an eager call: training,
  evaluating, predicting; :func:`eager` leaves it out).

:func:`register` adds it beside the built-ins (``reference``: the Python time loop, which runs
everything; ``native``: torch's own fused ops; ``cpu``: rnnkit's C++ kernels; ``export``: while
a model is exported (:func:`exporting`), one portable op per layer that lowers to ONNX, see
:mod:`rnnkit.export`; it is ``first``, so an exported graph never holds an eager kernel).
A registered backend is enrolled in the conformance suite (``tests/test_conformance.py``):
parity with the reference backend in outputs, final states and every gradient, over every cell,
lengths 0/1/T, both directions, stacks, each regulariser, gates, float32/float64 and the error
cases, for every request its ``check`` accepts.

A backend named explicitly (the layer's ``backend=`` argument, :func:`set_default_backend` or
:func:`use_backend`) is used or, if it cannot run the request, raises
:class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .. import functional as F
from ..cells.table import SPECS
from ..regularisers import Masks, Regularisers

__all__ = [
    "AUTO",
    "FUNC_TRANSFORMS",
    "JIT_TRACING",
    "Backend",
    "BackendUnavailable",
    "Call",
    "Choice",
    "Direction",
    "LayerCall",
    "LayerResult",
    "Request",
    "StackMasks",
    "StackResult",
    "accepts",
    "autocast_dtypes",
    "available",
    "eager",
    "exporting",
    "get_default_backend",
    "make_call",
    "register",
    "run",
    "select",
    "set_default_backend",
    "use_backend",
]

AUTO = "auto"


class BackendUnavailable(ValueError):
    """A backend was asked for by name but cannot run the requested configuration."""


@dataclass(frozen=True)
class Request:
    """What a layer asks to run: everything a backend needs to decide whether it can.

    ``mode`` is a key of the cell table (:data:`rnnkit.cells.table.SPECS`) for a built-in cell,
    or None for a custom cell. ``lengths`` is "none", "positive" (all >= 1) or "has_zero".
    ``zoneout`` and ``state_dropout`` ask for the regularisers applied inside the step,
    ``variational`` for dropout masks on each direction's input and output (applied by the
    composer, around the backend), ``dropout`` for dropout between layers (likewise);
    ``gates`` asks for every step's gate activations. ``steps``, ``batch``, ``input_size`` (of
    the first layer) and ``hidden_size`` are T, B, I and H, for choices by shape.

    ``autocast`` is the lower-precision dtype of :func:`torch.autocast` when it is on for the
    device and the layer's dtype (None otherwise; autocast leaves float64 alone): the backends
    may run their matrix products in it, and the composer returns what torch.nn returns for the
    same call (:func:`autocast_dtypes`). ``input_dtype`` is the caller's input dtype where the
    layer converted it to the weights' (``dtype``), else None; ``state_dtypes`` likewise the
    caller's initial-state dtypes (h, c, ...) where the layer converted any of them.
    ``func_transforms``: the :mod:`torch.func` transforms the call runs under, outermost first
    ("grad" (grad and vjp), "jvp", "vmap", "functionalize"; "unknown" where torch does not say
    which), () outside them; they see through plain torch operations only. ``jit_tracing``:
    the call is recorded by :func:`torch.jit.trace`, which records torch's own operations only.
    """

    mode: str | None
    num_layers: int = 1
    bidirectional: bool = False
    reverse: bool = False
    bias: bool = True
    proj: bool = False
    dropout: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32
    lengths: str = "none"
    requires_grad: bool = False
    zoneout: bool = False
    state_dropout: bool = False
    variational: bool = False
    gates: bool = False
    layer: str = ""
    steps: int = 0
    batch: int = 0
    input_size: int = 0
    hidden_size: int = 0
    autocast: torch.dtype | None = None
    input_dtype: torch.dtype | None = None
    state_dtypes: tuple[torch.dtype, ...] | None = None
    func_transforms: tuple[str, ...] = ()
    jit_tracing: bool = False


def autocast_dtypes(request: Request) -> tuple[torch.dtype, torch.dtype] | None:
    """The dtypes torch.nn returns under autocast for the call ``request`` describes: (that of
    the output and h, that of the cell state c), or None without autocast (or for a custom cell,
    whose own operations decide).

    torch.nn, measured (torch 2.13, CPU): the Elman RNN's state is a product, so in the autocast
    dtype; a GRU's and a decomposed LSTM's state mixes the products with the previous state (the
    GRU's h, the LSTM's c), so it is in the wider of the autocast dtype and that initial state's
    (the input's when none is given); torch's fused oneDNN LSTM (no lengths, no projection, a
    float32 input to float32 weights) returns everything in the autocast dtype, and for an
    input of another dtype torch decomposes the LSTM; a projected LSTM's h is the projection's
    product.
    rnnkit's other cells follow their family.
    """
    low = request.autocast
    if low is None or request.mode is None:
        return None
    given = request.input_dtype or request.dtype
    carried = request.state_dtypes[-1] if request.state_dtypes else given  # GRU's h, LSTM's c
    wide = torch.promote_types(low, carried)
    mode = request.mode
    if mode in ("rnn_tanh", "rnn_relu"):
        return low, low
    if mode == "lstm" and request.lengths == "none" and not request.proj:
        # torch hands the call to oneDNN where the input was given in the weights' float32
        fused = request.input_dtype is None and request.dtype == torch.float32
        return (low, low) if fused else (wide, wide)
    if request.proj:
        return low, wide
    return wide, wide


@dataclass
class Direction:
    """One direction of one layer.

    ``mode``: the built-in step (a key of the cell table), or None for a custom ``cell`` (which
    only the reference backend runs). ``weights``: one direction's weights by the cell table's
    names (``weight_ih``, ``weight_hh``, ``bias_ih``, ...; for a custom cell, ``weight_hh`` when
    DropConnect needs it). ``state``: the initial state tensors, (B, n) each (``(h, c)`` for the
    LSTM family); ``tuple_state`` says whether the cell takes them as a tuple or, for one tensor,
    bare. ``regularisers`` is the configuration; the composer draws ``masks`` from it (and
    multiplies DropConnect's mask into ``weights["weight_hh"]``) before a backend sees it.
    """

    mode: str | None
    weights: dict[str, Tensor]
    state: tuple[Tensor, ...]
    reverse: bool = False
    tuple_state: bool = False
    cell: nn.Module | None = field(default=None, repr=False)
    eps: float = 1e-5
    regularisers: Regularisers = field(default_factory=Regularisers)
    masks: Masks | None = None

    @property
    def hidden_size(self) -> int:
        if self.mode is not None:
            return self.weights["weight_hh"].shape[0] // SPECS[self.mode].gate_count
        return int(self.cell.hidden_size)  # type: ignore[union-attr]

    @property
    def output_size(self) -> int:
        """A built-in cell outputs its h; a custom cell says what it outputs (its contract)."""
        if self.cell is not None:
            return int(getattr(self.cell, "output_size", self.cell.hidden_size))
        return self.state[0].shape[-1]


@dataclass(frozen=True)
class StackMasks:
    """The regulariser masks of a whole stack, drawn once for a sequence of ``steps`` steps
    (``masks[layer][direction]``, None where a direction has no regulariser), so that a sequence
    fed in chunks sees the masks one call over all of it would draw. ``between[layer]``: the
    dropout mask (T, B, I) on that layer's input, scaled by 1/(1-p) (None for the first layer and
    where there is no dropout between layers; empty without any). :meth:`at` gives the view for
    the chunk that starts at step ``t0`` (the per-step masks, zoneout's and the dropout between
    layers, are read from there on). ``training``: the mode they were drawn in (eval mode draws
    no dropout masks and keeps zoneout's probabilities); a call in the other mode refuses them."""

    masks: tuple[tuple[Masks | None, ...], ...]
    steps: int
    batch: int
    offset: int = 0
    between: tuple[Tensor | None, ...] = ()
    training: bool = True

    def at(self, t0: int) -> StackMasks:
        """These masks for the chunk that starts at step ``t0`` of the sequence (an integer:
        a NumPy one too, as from ``np.arange``)."""
        whole = not isinstance(t0, bool) and isinstance(t0, numbers.Integral)
        if not whole or not 0 <= t0 < self.steps:  # type: ignore[operator]
            raise ValueError(
                f"t0 = {t0!r}; expected a step of the sequence, 0 <= t0 < {self.steps}"
            )
        return replace(self, offset=int(t0))


@dataclass
class Call:
    """A whole stack, in the backends' time-major layout: ``x`` (T, B, I), ``layers`` (per layer,
    per direction, forward direction first), ``lengths`` (B,) int64 on x's device or None,
    ``dropout`` between layers (in training), and whether to collect ``gates``. ``checkpoint``:
    keep the state every that many steps and recompute each segment in the backward pass (0:
    keep everything). ``masks``: regulariser masks drawn beforehand (streaming), else the
    composer draws them."""

    request: Request
    x: Tensor
    layers: list[list[Direction]]
    lengths: Tensor | None
    dropout: float = 0.0
    training: bool = False
    gates: bool = False
    checkpoint: int = 0
    masks: StackMasks | None = None


@dataclass
class LayerCall:
    """One layer, as :meth:`Backend.run_layer` gets it: ``inputs`` has one (T, B, I) tensor per
    direction (the same tensor object for both unless variational masks differ), ``directions``
    their :class:`Direction` (masks drawn, DropConnect applied): one direction reading forwards
    or reversed (``Direction.reverse``), or two, a forward one then a reversed one. ``lengths``
    as in :class:`Call`.
    """

    request: Request
    inputs: list[Tensor]
    directions: list[Direction]
    lengths: Tensor | None
    training: bool
    gates: bool


class LayerResult(NamedTuple):
    """What :meth:`Backend.run_layer` returns: ``out`` (T, B, D*P) every direction's output
    concatenated (zero at padded steps); ``states`` one tuple of final state tensors (B, n) per
    direction; ``gates`` (with ``LayerCall.gates``) one tuple of (T, B, n) gate activations per
    direction (the cell table's ``gate_outputs``; a fused backend may return them detached)."""

    out: Tensor
    states: list[tuple[Tensor, ...]]
    gates: list[tuple[Tensor, ...]] | None = None


@dataclass
class StackResult:
    """What :func:`run` returns: ``out`` (T, B, D*P) the top layer's output, ``last`` its
    per-direction outputs (views), ``states[layer][direction]`` the final states, and with
    ``gates`` requested ``gates[layer][direction]``."""

    out: Tensor
    last: list[Tensor]
    states: list[list[tuple[Tensor, ...]]]
    gates: list[list[tuple[Tensor, ...]]] | None = None


class Backend(Protocol):
    name: str
    priority: int

    def check(self, request: Request) -> str | None: ...

    def run_layer(self, layer: LayerCall) -> LayerResult: ...


@dataclass(frozen=True)
class Choice:
    """The backend picked for a request, and the reason in words."""

    backend: str
    reason: str


_registry: dict[str, Backend] = {}
_lock = threading.Lock()
_default = AUTO  # set_default_backend: the whole process
_scoped = threading.local()  # use_backend: this thread, within the block (torch.compile traces it)


def register(backend: Backend) -> None:
    """Add (or replace) a backend in the dispatch table, beside the built-in ones.

    A backend registered under a built-in's name replaces it, whenever it is registered. One
    that lacks what the dispatch reads (a ``name`` other than "auto", a numeric ``priority``,
    ``check`` and ``run_layer``) is refused with a TypeError naming what is missing, and the
    table is left as it was.
    """
    problems = _contract_problems(backend)
    if problems:
        raise TypeError(
            f"{type(backend).__name__} cannot be registered as a backend: {'; '.join(problems)}; "
            f"expected a name (a string other than {AUTO!r}), a number priority, "
            "check(request) and run_layer(layer)"
        )
    _ensure_registered()
    with _lock:
        _registry[backend.name] = backend


def _contract_problems(backend: Any) -> list[str]:
    """What ``backend`` lacks of what the dispatch reads (see :class:`Backend`), in words."""
    problems = []
    if not hasattr(backend, "name"):
        problems.append("no name")
    elif not isinstance(backend.name, str) or backend.name in ("", AUTO):
        problems.append(f"name = {backend.name!r}")
    if not hasattr(backend, "priority"):
        problems.append("no priority")
    elif isinstance(backend.priority, bool) or not isinstance(backend.priority, int | float):
        problems.append(f"priority = {backend.priority!r}")
    problems += [
        f"no method {m}()"
        for m in ("check", "run_layer")
        if not callable(getattr(backend, m, None))
    ]
    return problems


def available() -> tuple[str, ...]:
    """Names accepted by ``backend=``: "auto" and every registered backend."""
    _ensure_registered()
    return (AUTO, *sorted(_registry, key=lambda n: -_registry[n].priority))


def accepts(name: str, request: Request) -> bool:
    """Whether the backend registered as ``name`` runs ``request`` (False where none is): what a
    backend's ``slower`` asks before it steps aside for that one."""
    _ensure_registered()
    backend = _registry.get(name)
    return backend is not None and backend.check(request) is None


def eager() -> tuple[str, ...]:
    """The names in :func:`available` that run eager calls (training, evaluating, predicting):
    all but a backend that runs only while a model is exported (``eager = False``: ``export``)."""
    names = available()
    return tuple(n for n in names if n == AUTO or getattr(_registry[n], "eager", True))


def check_name(name: str | None) -> str | None:
    """Validate a backend name (None = follow the global default).

    Every layer checks its ``backend=`` when it is built, which registers the built-in backends
    then, so that a traced forward (torch.compile, torch.export) never takes the registry lock.
    """
    _ensure_registered()
    if name is None:
        return None
    names = available()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"backend = {name!r} is not a backend; expected one of {names}")
    return name


def set_default_backend(name: str) -> None:
    """Set, for the whole process, the backend used when a layer does not name one.

    "auto" restores the automatic choice. :func:`use_backend` overrides it within a block.
    """
    global _default
    _default = check_name(name)


def get_default_backend() -> str:
    return getattr(_scoped, "name", None) or _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block (in this thread), layers that do not name a backend use ``name``."""
    outer = getattr(_scoped, "name", None)
    _scoped.name = check_name(name)
    try:
        yield
    finally:
        _scoped.name = outer


def exporting() -> bool:
    """Whether a model is being exported: traced by ``torch.export.export`` (which
    ``torch.onnx.export(..., dynamo=True)`` uses) or by the TorchScript-based ONNX exporter.

    The values of the tensors are then unknown to the graph (only their shapes), so nothing may
    branch on them: ``lengths=`` is checked by its shape alone.
    """
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def select(request: Request, name: str | None = None) -> tuple[Backend, Choice]:
    """Pick the backend for ``request``; ``name`` (or the global default) forces one.

    A backend marked ``first`` (the export backend) that accepts the request is chosen before
    anything else, even a named backend.
    """
    _ensure_registered()
    for backend in _registry.values():
        if getattr(backend, "first", False) and backend.check(request) is None:
            return backend, Choice(backend.name, getattr(backend, "why", backend.name))
    forced = check_name(name) or get_default_backend()
    if forced != AUTO:
        backend = _registry[forced]
        missing = backend.check(request)
        if missing is not None:
            raise BackendUnavailable(f"backend {forced!r} cannot run this call: {missing}")
        return backend, Choice(forced, f"asked for by name ({forced!r})")
    skipped = []
    for backend in sorted(_registry.values(), key=lambda b: -b.priority):
        if getattr(backend, "first", False):
            continue  # consulted above
        missing = backend.check(request)
        if missing is None and hasattr(backend, "slower"):
            missing = backend.slower(request)
        if missing is None:
            why = getattr(backend, "why", backend.name)
            if skipped:
                why += "; " + "; ".join(skipped)
            return backend, Choice(backend.name, why)
        skipped.append(f"not {backend.name}: {missing}")
    raise AssertionError("the reference backend accepts every request")  # pragma: no cover


_builtins_registered = False


def _ensure_registered() -> None:
    """Add the built-in backends to the table once (importing them builds nothing)."""
    global _builtins_registered
    if _builtins_registered:
        return
    from . import cpu, export, native, reference, triton

    builtins = (
        reference.ReferenceBackend(),
        native.NativeBackend(),
        cpu.CpuBackend(),
        triton.TritonBackend(),
        export.ExportBackend(),
    )
    with _lock:
        if not _builtins_registered:
            for builtin in builtins:
                _registry.setdefault(builtin.name, builtin)
            _builtins_registered = True


# -- describing a call ---------------------------------------------------------------------------


def _lengths_kind(lengths: Tensor | None) -> str:
    if lengths is None:
        return "none"
    # values unknown while a graph is traced (compiled or exported: the graph's input) and on
    # the meta device: any of them may be 0
    if exporting() or torch.compiler.is_compiling() or lengths.is_meta:
        return "has_zero"
    return "has_zero" if bool((lengths == 0).any()) else "positive"


def _autocast(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype of torch.autocast when it is on for ``device_type``."""
    if F.autocasting(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _func_transforms() -> tuple[str, ...]:
    """The :mod:`torch.func` transforms active around this call, outermost first ("grad",
    "jvp", "vmap", "functionalize"; "unknown" where torch does not say which), or () outside
    them, under compilation (which traces through them) and where torch has no such query."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is None or torch.compiler.is_compiling() or not active():
        return ()
    stack = getattr(getattr(torch._C, "_functorch", None), "get_interpreter_stack", None)
    try:
        interpreters = stack() if stack is not None else None
        names = tuple(i.key().name.lower() for i in interpreters or ())
    except (AttributeError, RuntimeError):
        names = ()
    return names or ("unknown",)


#: Why a backend with its own autograd (hand-written backward) declines a call under torch.func.
FUNC_TRANSFORMS = (
    "torch.func's transforms (grad, vjp, jvp, vmap) cannot see through {what} and their "
    "hand-written backward"
)


#: Why a backend whose kernels are not torch operations declines a call that torch.jit.trace records.
JIT_TRACING = (
    "torch.jit.trace records torch's own operations, not {what}: trace with "
    "backend='native' or backend='reference' (automatic dispatch picks one by itself)"
)


def make_call(
    x: Tensor,
    layers: list[list[Direction]],
    lengths: Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = False,
    gates: bool = False,
    label: str = "",
    checkpoint: int = 0,
    masks: StackMasks | None = None,
    input_dtype: torch.dtype | None = None,
    state_dtypes: tuple[torch.dtype, ...] | None = None,
) -> Call:
    """A :class:`Call` for ``layers`` over the time-major ``x``, with its :class:`Request`.
    ``input_dtype``, ``state_dtypes``: the caller's input and initial-state dtypes, when the
    layer converted them (autocast)."""
    directions = [d for layer in layers for d in layer]
    first = directions[0]
    given = input_dtype or x.dtype  # the caller's input dtype
    modes = {d.mode for d in directions}
    regs = [d.regularisers for d in directions]
    grad = torch.is_grad_enabled() and (
        x.requires_grad
        or any(t.requires_grad for d in directions for t in (*d.weights.values(), *d.state))
        or any(
            p.requires_grad for d in directions if d.cell is not None for p in d.cell.parameters()
        )
    )
    request = Request(
        mode=first.mode if len(modes) == 1 else None,
        num_layers=len(layers),
        bidirectional=len(layers[0]) == 2,
        reverse=len(layers[0]) == 1 and first.reverse,
        bias="bias_ih" in first.weights,
        proj="weight_hr" in first.weights,
        dropout=dropout > 0 and training and len(layers) > 1,
        device_type=x.device.type,
        dtype=x.dtype,
        lengths=_lengths_kind(lengths),
        requires_grad=grad,
        zoneout=any(r.zoneout or r.zoneout_cell for r in regs),
        state_dropout=training and any(r.dropout_state for r in regs),
        variational=training and any(r.dropout_input or r.dropout_output for r in regs),
        gates=gates,
        layer=label,
        steps=x.shape[0],
        batch=x.shape[1],
        input_size=x.shape[2],
        hidden_size=first.hidden_size,
        # autocast leaves float64 operations alone: a float64 layer computes and returns float64
        autocast=None if x.dtype == torch.float64 else _autocast(x.device.type),
        input_dtype=input_dtype if input_dtype not in (None, x.dtype) else None,
        state_dtypes=state_dtypes if any(d != given for d in state_dtypes or ()) else None,
        func_transforms=_func_transforms(),
        jit_tracing=torch.jit.is_tracing(),
    )
    return Call(request, x, layers, lengths, dropout, training, gates, checkpoint, masks)


def run(call: Call, name: str | None = None) -> StackResult:
    """Run ``call`` on the backend :func:`select` picks (``name`` forces one)."""
    from .stack import compose

    backend, _ = select(call.request, name)
    if exporting() and any(d.mode is None for layer in call.layers for d in layer):
        warnings.warn(
            f"rnnkit: {call.request.layer or 'a layer'} with a custom cell exports as its Python "
            f"time loop, unrolled over the example's {call.x.shape[0]} steps: the exported graph "
            "runs exactly that many (the built-in cells export as one op with the steps dynamic)",
            stacklevel=2,
        )
    return compose(call, backend)


@dataclass(frozen=True)
class Explanation:
    """What :func:`rnnkit.explain` returns: the backend for the whole module and per layer."""

    backend: str
    reason: str
    layers: tuple[tuple[str, Choice], ...] = ()

    def __str__(self) -> str:
        if len(self.layers) <= 1:
            return f"{self.backend}: {self.reason}"
        return "\n".join(f"{name or 'layer'}: {c.backend}: {c.reason}" for name, c in self.layers)


def _explained(request: Request, name: str | None) -> Choice:
    """select's choice, with what the chosen backend adds about the call (``details``: e.g. the
    cpu backend's GEMM sources)."""
    backend, choice = select(request, name)
    details = getattr(backend, "details", None)
    if details is None:
        return choice
    return Choice(choice.backend, f"{choice.reason}; {details(request)}")


def explain(module: Any, x: Any, lengths: Any = None) -> Explanation:
    """The backend each recurrent layer in ``module`` would use for input ``x`` (nothing runs)."""
    read = getattr(module, "dispatch_requests", None)
    if read is None:
        raise TypeError(
            f"{type(module).__name__} is not an rnnkit recurrent layer; expected a Recurrent, "
            "Bidirectional, Stacked, RNN, LSTM or GRU of rnnkit with its own input (for a model, "
            "explain its recurrent layer, e.g. explain(model.encoder, ...))"
        )
    requests: list[tuple[str, Request, str | None]] = read(x, lengths)
    if not requests:
        raise TypeError(f"{type(module).__name__} contains no rnnkit recurrent layer to explain")
    layers = tuple((label, _explained(req, name)) for label, req, name in requests)
    names = {c.backend for _, c in layers}
    if len(names) == 1:
        return Explanation(layers[0][1].backend, layers[0][1].reason, layers)
    mixed = ", ".join(f"{label}: {c.backend}" for label, c in layers)
    return Explanation("mixed", mixed, layers)
