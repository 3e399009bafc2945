"""What :class:`Bidirectional` and :class:`Stacked` share: a module of several recurrent layers
that runs as one call of layers x directions when its layers agree (see ``fused()``), else part by
part."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backends import StackMasks
from .recurrent import Prepared, draw_stack_masks, prepare


class Composite(nn.Module):
    """The shared half of :class:`Bidirectional` and :class:`Stacked`. A subclass gives its parts
    (``_parts``), the layer whose layout the input follows (``_first``), ``fused()``,
    ``directions()`` and, for messages, what fusing needs (``_fusion``)."""

    _fusion = "its layers to run as one call"

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
