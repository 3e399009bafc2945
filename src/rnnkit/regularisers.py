"""Training-time regularisers of a recurrent layer, and the masks they draw for one forward call.

* Variational dropout (Gal & Ghahramani 2016): ONE mask per sequence, the same at every step, on
  the input features (``dropout_input``), on h_{t-1} as it enters the step (``dropout_state``) and
  on the output features (``dropout_output``). A built-in cell reads the masked h_{t-1} in its
  recurrent products only: a GRU's carry ``z * h_{t-1}`` reads the unmasked state, as in Gal &
  Ghahramani's GRU, on every backend. A custom cell is handed the masked state.
* Zoneout (Krueger et al. 2016): at each step each unit of h (``zoneout``) and, for an LSTM, of c
  (``zoneout_cell``, default: same as ``zoneout``) keeps its previous value with probability p;
  a custom cell's state tensors after the first are zoned out with ``zoneout_cell``.
  In eval mode the expectation is used: ``p * previous + (1 - p) * new``.
* DropConnect on the recurrent weights (``weight_drop``, Merity et al. 2017): one mask over the
  cell's ``weight_hh`` per forward call, applied to the weight tensor handed to the step or the
  kernel, with no re-registration of parameters.

Everything is active only in training mode (zoneout then uses its expectation, see above). Masks
are drawn from torch's global generator in a fixed order (input, state, output, zoneout, weights),
so a seed reproduces a run, and every backend sees the same masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["Masks", "PlainPickle", "Regularisers"]


def check_probability(name: str, p: object, one: bool = False) -> float:
    """``p`` as a float, or ValueError naming ``name`` unless it is a probability in [0, 1)
    (in [0, 1] with ``one``: a dropout that may drop everything, as torch.nn's). Any real
    number is taken (a NumPy float from a config or a sweep), as torch.nn takes it."""
    number = not isinstance(p, bool) and isinstance(p, Real)
    if not number or not (0.0 <= p <= 1.0 if one else 0.0 <= p < 1.0):  # type: ignore[operator]
        raise ValueError(f"{name} = {p!r}; expected a probability in [0, {'1]' if one else '1)'}")
    return float(p)


@dataclass(frozen=True)
class Regularisers:
    """Which regularisers a layer applies, and how strongly (all probabilities in [0, 1))."""

    dropout_input: float = 0.0
    dropout_state: float = 0.0
    dropout_output: float = 0.0
    zoneout: float = 0.0
    zoneout_cell: float | None = None
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name != "zoneout_cell":  # None: zoneout_cell = zoneout
                object.__setattr__(self, f.name, check_probability(f.name, value))

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def zoneouts(self, n_states: int) -> tuple[float, ...]:
        """Zoneout probability per state tensor: ``zoneout`` for h, ``zoneout_cell`` for each
        tensor after it (c for an LSTM; any number of them for a custom cell)."""
        cell = self.zoneout if self.zoneout_cell is None else self.zoneout_cell
        return (self.zoneout, *(cell,) * (n_states - 1))

    def check_states(self, n_states: int, owner: str) -> None:
        """ValueError naming ``owner`` when ``zoneout_cell`` is set for a cell of one state
        tensor (h alone: nothing it could zone out)."""
        if self.zoneout_cell and n_states == 1:
            raise ValueError(
                f"zoneout_cell = {self.zoneout_cell} given to {owner}, whose only state is h; "
                "expected zoneout (zoneout_cell zones out a cell state, such as an LSTM's c)"
            )

    def mismatch(
        self,
        masks: Masks | None,
        training: bool,
        like: Tensor,
        out_size: int,
        state_shapes: tuple[tuple[int, ...], ...],
        weight_hh: Tensor | None,
    ) -> str | None:
        """Why ``masks`` (a caller's, from ``draw_masks``) are not masks :meth:`draw` could
        have drawn for this layer over ``like`` (T, B, I: the whole sequence the masks were drawn
        for, with the call's dtype and device), in words; None when they are. ``weight_hh``:
        the recurrent weight DropConnect masks (None without weight_drop)."""
        if not self.any:
            return None if masks is None else "masks of regularisers this layer does not have"
        if masks is None:
            return f"no masks for a layer with regularisers ({self.extra_repr()})"
        steps, batch, inp = like.shape
        zoneouts = self.zoneouts(len(state_shapes))
        dropouts = {
            "dropout_input": (masks.input, self.dropout_input, (batch, inp)),
            "dropout_state": (masks.state, self.dropout_state, (batch, *state_shapes[0])),
            "dropout_output": (masks.output, self.dropout_output, (batch, out_size)),
            "weight_drop": (
                masks.weight_hh,
                self.weight_drop,
                () if weight_hh is None else tuple(weight_hh.shape),
            ),
        }
        for name, (mask, p, shape) in dropouts.items():
            if mask is None and p and training:
                return f"no {name} mask for a layer with {name} = {p}"
            if mask is not None and not (p and training):
                why = f"{name} = {p}" if training else "eval mode"
                return f"a {name} mask for a layer with {why}"
            if mask is not None:
                problem = tensor_mismatch(mask, shape, like.dtype, like.device)
                if problem:
                    return f"the {name} mask {problem}"
        if not any(zoneouts):
            return None if masks.zoneout is None else "zoneout masks for a layer without zoneout"
        if not training:
            if masks.zoneout != zoneouts:
                return f"zoneout {masks.zoneout!r} in eval mode; this layer's is {zoneouts!r}"
            return None
        if masks.zoneout is None or len(masks.zoneout) != len(state_shapes):
            held = 0 if masks.zoneout is None else len(masks.zoneout)
            return f"{held} zoneout masks; this layer zones out {len(state_shapes)} state tensors"
        for k, (z, shape) in enumerate(zip(masks.zoneout, state_shapes, strict=True)):
            problem = tensor_mismatch(z, (steps, batch, *shape), torch.bool, like.device)
            if problem:
                return f"zoneout mask {k} {problem}"
        return None

    def extra_repr(self) -> str:
        return ", ".join(
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)
        )

    def draw(
        self,
        training: bool,
        x: Tensor,
        out_size: int,
        state_shapes: tuple[tuple[int, ...], ...],
        weight_hh: Tensor | None,
    ) -> Masks:
        """The masks for one forward call over time-major ``x`` (T, B, I), for state tensors of
        ``state_shapes`` (each without the batch dimension: (n,), or more dimensions for a
        custom cell's (B, ...) state)."""
        steps, batch, inp = x.shape
        zoneouts = self.zoneouts(len(state_shapes))
        if not training:
            zone = zoneouts if any(zoneouts) else None
            return Masks(None, None, None, zone, None)

        def keep(p: float, *shape: int) -> Tensor | None:
            if p == 0.0:
                return None
            return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p) / (1 - p)

        def hold(p: float, shape: tuple[int, ...]) -> Tensor:  # True = keep the previous value
            return torch.rand(steps, batch, *shape, device=x.device) < p

        return Masks(
            input=keep(self.dropout_input, batch, inp),
            state=keep(self.dropout_state, batch, *state_shapes[0]),
            output=keep(self.dropout_output, batch, out_size),
            zoneout=tuple(hold(p, s) for p, s in zip(zoneouts, state_shapes, strict=True))
            if any(zoneouts)
            else None,
            weight_hh=None if weight_hh is None else keep(self.weight_drop, *weight_hh.shape),
        )


def tensor_mismatch(
    mask: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> str | None:
    """What is wrong with ``mask`` for a tensor of ``shape``, ``dtype`` on ``device``, or None."""
    if not isinstance(mask, Tensor):
        return f"is a {type(mask).__name__}; expected a tensor of shape {shape}"
    if tuple(mask.shape) != shape:
        return f"has shape {tuple(mask.shape)}; expected {shape}"
    if mask.dtype != dtype:
        return f"has dtype {mask.dtype}; expected {dtype}"
    if mask.device != device:
        return f"is on {mask.device}; expected {device}"
    return None


@dataclass
class Masks:
    """The masks of one forward call. Dropout masks are scaled by 1/(1-p); None = not applied.

    input (B, I), state (B, n_h), output (B, O), weight_hh like the weight. ``zoneout`` is None,
    one (T, B, n) bool tensor per state tensor (True = keep the previous value), or in eval mode
    one probability per state tensor. (A custom cell's state tensor of more dimensions, (B, ...),
    has masks of its shape: state (B, ...), zoneout (T, B, ...).)
    """

    input: Tensor | None
    state: Tensor | None
    output: Tensor | None
    zoneout: tuple[Tensor, ...] | tuple[float, ...] | None
    weight_hh: Tensor | None


class PlainPickle:
    """Mixin of the layers that hold a :class:`Regularisers`: it is pickled as a dict of floats.

    So ``torch.save(model, f)`` loads back with ``torch.load(f)`` (``weights_only=True``) when
    only the layer's own public class is allowed (``torch.serialization.safe_globals``), as for
    torch.nn's layers.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        if isinstance(state.get("regularisers"), Regularisers):
            state["regularisers"] = asdict(state["regularisers"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("regularisers"), dict):
            state = {**state, "regularisers": Regularisers(**state["regularisers"])}
        super().__setstate__(state)  # type: ignore[misc]
