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

    def forward(self, x: Tensor, state: Any, return_gates: bool = False) -> tuple:
        return F.step(self.mode, self.kernel_weights(), x, state, return_gates, self.eps)


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


def _weight(module: nn.Module, name: str) -> Tensor:
    """The tensor ``module`` holds under the dotted ``name`` (e.g. ``ln_ih.weight``): a
    parameter, or the value of its parametrization."""
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} = {value!r}; expected a positive integer")
