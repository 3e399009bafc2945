"""What :class:`Bidirectional` and :class:`Stacked` share: a module of several recurrent layers
that runs as one call of layers x directions when its layers agree (see ``fused()``), else part by
part."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backends import StackMasks
from .recurrent import Prepared, draw_stack_masks, prepare


def layout(layer: nn.Module) -> bool | None:
    """Whether ``layer`` reads batch-first input (B, T, ...) (True) or time-major (T, B, ...)
    (False); None for a layer that does not say (no ``batch_first`` attribute)."""
    value = getattr(layer, "batch_first", None)
    return None if value is None else bool(value)


def check_layouts(parts: list[tuple[str, nn.Module]]) -> None:
    """ValueError unless the named ``parts`` that say their layout all read the same one: a
    composite hands every part the same tensor (or one part's output to the next), so a part of
    the other layout would read time as batch and batch as time."""
    known = [(name, layout(part)) for name, part in parts if layout(part) is not None]
    for name, value in known[1:]:
        first, want = known[0]
        if value != want:
            raise ValueError(
                f"{name} has batch_first={value}, but {first} has batch_first={want}; expected "
                "every layer to read the same layout (build them all with the same batch_first)"
            )


class Composite(nn.Module):
    """The shared half of :class:`Bidirectional` and :class:`Stacked`. A subclass gives its parts
    (``_parts``), the layer whose layout the input follows (``_first``), ``fused()``,
    ``directions()`` and, for messages, what fusing needs (``_fusion``)."""

    _fusion = "its layers to run as one call"

    @property
    def batch_first(self) -> bool | None:
        """The layout its parts read (they agree, checked when it is built): True batch-first
        (B, T, ...), False time-major (T, B, ...), None when no part says."""
        return next((v for v in map(layout, self._parts()) if v is not None), None)

    def _parts(self) -> list[nn.Module]:
        raise NotImplementedError

    def _first(self) -> nn.Module:
        raise NotImplementedError

    def fused(self) -> bool:
        raise NotImplementedError

    def directions(self, like: Tensor, state: Any) -> list:
        raise NotImplementedError

    def dtype_weights(self) -> list[tuple[str, Tensor]]:
        return [w for layer in self._parts() for w in layer.dtype_weights()]

    def _prepare(self, x: Any, lengths: Any) -> Prepared:
        return prepare(
            x, lengths, self._first().batch_first, self.input_size,
            weights=self.dtype_weights(), layer=type(self).__name__,
        )  # fmt: skip

    def draw_masks(self, x: Any, lengths: Any = None) -> StackMasks:
        """As :meth:`Recurrent.draw_masks`; the module must run fused (see ``fused()``)."""
        self._need_fused("draw_masks")
        inp = self._prepare(x, lengths)
        dropout = getattr(self, "dropout", 0.0)  # Stacked's, between its layers
        return draw_stack_masks(self, inp, self.directions(inp.x, None), dropout)

    def _need_fused(self, what: str) -> None:
        if not self.fused():
            raise ValueError(f"{what} needs {self._fusion}; these layers run one after the other")
