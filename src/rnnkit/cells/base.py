"""The cell contract: what the time loop needs from a cell, built-in or your own.

A cell is ONE step. Subclass :class:`Cell` (an ``nn.Module``) and provide:

* ``input_size`` and ``hidden_size`` attributes (``output_size`` defaults to ``hidden_size``);
* ``initial_state(batch_size, dtype=..., device=...)`` returning the zero state: a Tensor of shape
  (B, ...) or a tuple of such Tensors (LSTM: ``(h, c)``);
* ``forward(x_t, state) -> (out_t, new_state)`` with ``x_t`` of shape (B, I), ``out_t`` of shape
  (B, output_size) and ``new_state`` shaped like ``state``.

That is all :class:`rnnkit.Recurrent` uses, so a custom cell gets the time loop, ``lengths=``,
reversal, :class:`rnnkit.Bidirectional` and :class:`rnnkit.Stacked` for free. The loop treats
every tensor of the state alike: at a padded position it keeps the old value.

Example::

    class MinimalGatedCell(rnnkit.Cell):
        def __init__(self, input_size, hidden_size):
            super().__init__()
            self.input_size, self.hidden_size = input_size, hidden_size
            self.lin = torch.nn.Linear(input_size + hidden_size, 2 * hidden_size)

        def forward(self, x, h):
            f, n = self.lin(torch.cat([x, h], 1)).chunk(2, 1)
            h = torch.sigmoid(f) * h + (1 - torch.sigmoid(f)) * torch.tanh(n)
            return h, h
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..errors import ArgumentTypeError, DTypeError, ShapeError
from .table import SPECS, CellSpec

#: A cell's recurrent state: one tensor, or a tuple of tensors, each (B, ...).
State = Union[Tensor, tuple[Tensor, ...]]  # noqa: UP007 - a runtime alias, readable in docs


class Cell(nn.Module):
    """Base class of all cells. See the module docstring for the contract."""

    input_size: int
    hidden_size: int
    #: Name of the built-in step this cell computes (a key of the cell table), or None.
    mode: str | None = None
    #: Size of a projected LSTM's output (0: no projection).
    proj_size: int = 0

    @property
    def output_size(self) -> int:
        return self.hidden_size

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Feature size of each state tensor (``(H,)``, or ``(P, H)`` for a projected LSTM)."""
        return (self.hidden_size,)

    def initial_state(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> State:
        zeros = [torch.zeros(batch_size, n, dtype=dtype, device=device) for n in self.state_sizes]
        return zeros[0] if len(zeros) == 1 else tuple(zeros)

    @property
    def gate_names(self) -> tuple[str, ...]:
        """Names of what ``forward(..., return_gates=True)`` returns, in order; () = no gates.

        A custom cell that supports ``return_gates`` overrides this.
        """
        spec = SPECS.get(self.mode or "")
        return spec.gate_outputs if spec else ()

    def kernel_mode(self) -> str | None:
        """The built-in step this cell computes unchanged, or None for a custom step.

        Fused backends run only cells whose ``forward`` is rnnkit's own: a subclass that overrides
        ``forward`` is run by the reference loop.
        """
        owner = next(c for c in type(self).__mro__ if "forward" in c.__dict__)
        return self.mode if owner.__module__.startswith("rnnkit.cells") else None

    @property
    def spec(self) -> CellSpec | None:
        """The cell table's entry for the built-in step this cell computes (None: a custom one)."""
        mode = self.kernel_mode()
        return SPECS[mode] if mode else None

    def kernel_weights(self) -> dict[str, Tensor]:
        """The weights of this cell's built-in step by the cell table's names, in the kernels'
        order (``weight_ih``, ``weight_hh``, the biases, ...). A weight under a parametrization
        (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal) is its value as
        the module computes it, differentiable into the parametrization."""
        spec = SPECS.get(self.mode or "")
        if spec is None:
            raise NotImplementedError(f"{type(self).__name__} has no built-in step")
        names = spec.weight_names(bool(getattr(self, "bias", True)), self.proj_size > 0)
        return {n: _weight(self, n) for n in names}


class BuiltinCell(Cell):
    """A cell whose step is rnnkit's own (:func:`rnnkit.functional.step` of its ``mode``, over
    its :meth:`kernel_weights`): what the fused backends run unchanged."""

    eps: float = 1e-5  # the LayerNorm cells' epsilon

    def forward(self, x: Tensor, state: Any = None, return_gates: bool = False) -> tuple:
        """One step: ``x`` (B, I) and ``state`` (None: zeros) -> ``(out_t, new_state)`` (and the
        gates with ``return_gates``). As torch.nn's cells, an unbatched ``x`` (I,) takes and
        returns unbatched states (n,)."""
        if return_gates and not self.gate_names:
            raise ValueError(
                f"return_gates=True, but {type(self).__name__} has no gates to return; expected "
                "a cell of the LSTM or GRU family"
            )
        x, state, unbatched = self._check_step(x, state)
        out = F.step(self.mode, self.kernel_weights(), x, state, return_gates, self.eps)
        return _squeeze_batch(out) if unbatched else out

    def _check_step(self, x: Any, state: Any) -> tuple[Tensor, Any, bool]:
        """``x`` as (B, I) and ``state`` as the step takes it, each checked against the cell's
        sizes (a ShapeError naming the bad shape) and dtype (a DTypeError: one floating dtype for
        input, state and weights, outside autocast), and whether the call is unbatched."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} input is a {type(x).__name__}; expected a Tensor")
        if x.dim() not in (1, 2) or x.shape[-1] != self.input_size:
            raise ShapeError(
                f"{name} input has shape {tuple(int(n) for n in x.shape)}; expected "
                f"(B, {self.input_size}) or "
                f"unbatched ({self.input_size},)"
            )
        autocast = F.autocasting(x.device.type)
        weight = next(self.parameters(), None)
        if not x.is_floating_point():
            raise DTypeError(f"{name} input has dtype {x.dtype}; expected a floating-point tensor")
        if weight is not None and x.dtype != weight.dtype and not autocast:
            raise DTypeError.input_of(name, x.dtype, weight.dtype)
        unbatched = x.dim() == 1
        batch = 1 if unbatched else x.shape[0]
        sizes = self.state_sizes
        if state is None:
            state = self.initial_state(batch, dtype=x.dtype, device=x.device)
            return (x.unsqueeze(0) if unbatched else x), state, unbatched
        tensors = (state,) if len(sizes) == 1 else state
        if not isinstance(tensors, tuple | list) or len(tensors) != len(sizes):
            raise TypeError(
                f"{name} state is a {type(state).__name__}; expected a tuple of {len(sizes)} "
                "tensors (h, c)"
            )
        checked = []
        for k, (t, n) in enumerate(zip(tensors, sizes, strict=True)):
            label = "state" if len(sizes) == 1 else f"state[{k}]"
            want = (n,) if unbatched else (batch, n)
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} {label} is a {type(t).__name__}; expected a Tensor {want}")
            if tuple(t.shape) != want:
                raise ShapeError(
                    f"{name} {label} has shape {tuple(t.shape)}; expected {want} for an input of "
                    f"shape {tuple(x.shape)}"
                )
            if t.dtype != x.dtype and not (autocast and t.is_floating_point()):
                raise DTypeError(
                    f"{name} {label} has dtype {t.dtype}; expected {x.dtype} like the input"
                )
            checked.append(t.unsqueeze(0) if unbatched else t)
        state = checked[0] if len(sizes) == 1 else tuple(checked)
        return (x.unsqueeze(0) if unbatched else x), state, unbatched


class _TorchLayoutCell(BuiltinCell):
    """Shared parameter set-up of the built-in cells (torch.nn names, shapes and init)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        gates: int,
        bias: bool = True,
        proj_size: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.proj_size = proj_size
        kw = {"device": device, "dtype": dtype}
        h_out = proj_size if proj_size > 0 else hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden_size, h_out, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(gates * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if proj_size > 0:
            self.weight_hr = nn.Parameter(torch.empty(proj_size, hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.proj_size > 0:
            s += f", proj_size={self.proj_size}"
        return s


def _squeeze_batch(tree: Any) -> Any:
    """Every tensor of a step's (nested tuple) result without its batch dimension of 1."""
    if isinstance(tree, Tensor):
        return tree.squeeze(0)
    return tuple(_squeeze_batch(t) for t in tree)


def _weight(module: nn.Module, name: str) -> Tensor:
    """The tensor ``module`` holds under the dotted ``name`` (e.g. ``ln_ih.weight``): a
    parameter, or the value of its parametrization."""
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _check_size(name: str, value: object, least: int = 1) -> None:
    """``value`` is an int >= ``least``: else an ArgumentTypeError (a TypeError, as torch.nn's
    for a size given as a float) or a ValueError naming it."""
    want = "a positive integer" if least == 1 else f"an integer >= {least}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} = {value!r}; expected {want}")
    if value < least:
        raise ValueError(f"{name} = {value!r}; expected {want}")
