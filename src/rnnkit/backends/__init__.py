"""The one dispatch point: which implementation runs a recurrent layer, and why.

A layer describes its call as a :class:`Request` and hands a :class:`Call` to the backend that
:func:`select` picks. Backends are tried in order of ``priority`` (highest first); the first whose
``check`` finds nothing missing runs it. ``reference`` (the layer's own Python time loop, with
autograd) supports everything and comes last. A backend named explicitly (the layer's
``backend=`` argument, :func:`set_default_backend` or :func:`use_backend`) is used or, if it cannot
run the request, raises :class:`BackendUnavailable` with the reason.

A new kernel plugs in by :func:`register`-ing an object with ``name``, ``priority``,
``check(request) -> str | None`` (None = can run; otherwise the reason it cannot) and
``run(call) -> (output, h_n, c_n)``. It may also have ``slower(request) -> str | None``: a reason
why automatic dispatch should prefer a lower-priority backend for a request it can run (from
measurements); a backend named explicitly still runs it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "AUTO",
    "Backend",
    "BackendUnavailable",
    "Call",
    "Choice",
    "Request",
    "available",
    "get_default_backend",
    "register",
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

    ``mode`` is a key of ``functional.GATES`` for a built-in cell, or None for a custom cell.
    ``lengths`` is "none", "positive" (all >= 1) or "has_zero". ``zoneout`` and
    ``state_dropout`` ask for the regularisers applied inside the step, ``variational`` for
    dropout masks on each layer's input and output inside a stack (their masks come in
    ``Call.masks``); ``gates`` asks for every step's gate activations.
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


@dataclass
class Call:
    """One run of a stack of recurrent layers, in the backends' layout (time-major).

    x: (T, B, I). h0: (L*D, B, P); c0: (L*D, B, H) for LSTM, else None. weights: per layer, per
    direction, ``w_ih, w_hh[, b_ih, b_hh][, w_hr]`` (torch.nn's flat order). lengths: (B,) int64 on
    x's device, or None. ``masks`` holds the regulariser masks (``layers.regularisers.Masks``; for
    a stack, a list with one per layer and direction) when the request asks for them. ``reference``
    runs the layer's own loop. Backends return ``(output (T, B, D*P), h_n (L*D, B, P), c_n or
    None)``, followed, when ``request.gates``, by a tuple with one tuple of (T, B, n) gate
    activations per layer and direction (h_n's order). A fused backend may return them detached.
    ``eps``: the LayerNorm cells' epsilon.
    """

    request: Request
    x: Tensor
    h0: Tensor
    c0: Tensor | None
    weights: list[Tensor]
    lengths: Tensor | None
    dropout: float
    training: bool
    reference: Callable[[], tuple] = field(repr=False)
    masks: Any = None
    eps: float = 1e-5


class Backend(Protocol):
    name: str
    priority: int

    def check(self, request: Request) -> str | None: ...

    def run(self, call: Call) -> tuple[Tensor, Tensor, Tensor | None]: ...


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

    A backend registered under a built-in's name replaces it, whenever it is registered.
    """
    _ensure_registered()
    with _lock:
        _registry[backend.name] = backend


def available() -> tuple[str, ...]:
    """Names accepted by ``backend=``: "auto" and every registered backend."""
    _ensure_registered()
    return (AUTO, *sorted(_registry, key=lambda n: -_registry[n].priority))


def check_name(name: str | None) -> str | None:
    """Validate a backend name (None = follow the global default)."""
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


def select(request: Request, name: str | None = None) -> tuple[Backend, Choice]:
    """Pick the backend for ``request``; ``name`` (or the global default) forces one."""
    _ensure_registered()
    forced = check_name(name) or get_default_backend()
    if forced != AUTO:
        backend = _registry[forced]
        missing = backend.check(request)
        if missing is not None:
            raise BackendUnavailable(f"backend {forced!r} cannot run this call: {missing}")
        return backend, Choice(forced, f"asked for by name ({forced!r})")
    skipped = []
    for backend in sorted(_registry.values(), key=lambda b: -b.priority):
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
    from . import cpu, native, reference

    with _lock:
        if not _builtins_registered:
            for builtin in (reference.ReferenceBackend(), native.NativeBackend(), cpu.CpuBackend()):
                _registry.setdefault(builtin.name, builtin)
            _builtins_registered = True


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


def explain(module: Any, x: Any, lengths: Any = None) -> Explanation:
    """The backend each recurrent layer in ``module`` would use for input ``x`` (nothing runs)."""
    requests: list[tuple[str, Request, str | None]] = module.dispatch_requests(x, lengths)
    if not requests:
        raise TypeError(f"{type(module).__name__} contains no rnnkit recurrent layer to explain")
    layers = tuple((label, select(req, name)[1]) for label, req, name in requests)
    names = {c.backend for _, c in layers}
    if len(names) == 1:
        return Explanation(layers[0][1].backend, layers[0][1].reason, layers)
    mixed = ", ".join(f"{label}: {c.backend}" for label, c in layers)
    return Explanation("mixed", mixed, layers)
