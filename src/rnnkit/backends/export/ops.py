"""``rnnkit::export_layer``: one recurrent layer (one direction, or both) as one portable op.

Signature (shapes in the single letters of DESIGN.md; D directions, P the output size of h,
H the cell size)::

    export_layer(x (T, B, I), h0 (D, B, P), c0 (D, B, H) | None, weights: Tensor[],
                 lengths (B,) int64 | None, mode: str, direction: str, bias: bool, proj: bool,
                 zoneout: float[], eps: float)
        -> out (T, B, D*P), h_n (D, B, P), c_n (D, B, H) (empty (0,) without a cell state)

``weights``, ``direction`` and ``zoneout`` are laid out as :mod:`rnnkit.backends.export.layout` says;
``eps`` is the LayerNorm cells'. It computes exactly what the stack composer asks of a backend
in eval mode: ``lengths=`` as everywhere in rnnkit (zero outputs at padding, final states at each
sequence's own last step, the reverse direction from each sequence's own end, a length-0
sequence keeps its initial state), zoneout by its expectation.

Its kernel is the reference backend's time loop, so eager calls and tracing work; a fake
kernel gives the shapes to ``torch.export``. It has no backward: it is what an exported
inference graph holds. Its ONNX lowerings: :mod:`rnnkit.backends.export.legacy` (a symbolic for the
TorchScript-based exporter) and :mod:`rnnkit.backends.export.dynamo` (what the layer emits in its place
under ``torch.onnx.export(..., dynamo=True)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...regularisers import Masks
from .. import Direction, LayerCall, Request
from ..reference import ReferenceBackend
from .layout import Layout

__all__ = ["NAME", "export_layer", "fake_export_layer"]

NAME = "rnnkit::export_layer"


def directions_of(
    layout: Layout,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    zoneout: list[float],
    eps: float,
) -> list[Direction]:
    """The op's arguments as the backends' :class:`~rnnkit.backends.Direction` list."""
    lstm = layout.states == 2
    if lstm != (c0 is not None):
        raise ValueError(
            f"{layout.mode} takes {'(h0, c0)' if lstm else 'h0 alone'}; c0 was "
            f"{'missing' if c0 is None else 'given'}"
        )
    count = len(layout.reverses)
    if h0.dim() != 3 or h0.shape[0] != count:
        raise ValueError(f"h0 has shape {tuple(h0.shape)}; expected (D = {count}, B, P)")
    directions = []
    for k, (w, reverse, zone) in enumerate(
        zip(layout.split(weights), layout.reverses, layout.zoneouts(zoneout), strict=True)
    ):
        state = (h0[k], c0[k]) if c0 is not None else (h0[k],)
        masks = None if zone is None else Masks(None, None, None, zone, None)
        directions.append(
            Direction(layout.mode, w, state, reverse, tuple_state=lstm, eps=eps, masks=masks)
        )
    return directions


@torch.library.custom_op(NAME, mutates_args=())
def export_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    lengths: Tensor | None,
    mode: str,
    direction: str,
    bias: bool,
    proj: bool,
    zoneout: list[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, every direction of it: ``(out, h_n, c_n)`` (see the module docstring)."""
    layout = Layout(mode, direction, bias, proj)
    directions = directions_of(layout, h0, c0, weights, zoneout, eps)
    call = LayerCall(Request(mode), [x] * len(directions), directions, lengths, False, False)
    result = ReferenceBackend().run_layer(call)
    h_n = torch.stack([s[0] for s in result.states])
    c_n = torch.stack([s[1] for s in result.states]) if c0 is not None else x.new_empty(0)
    return result.out.clone(), h_n, c_n


@export_layer.register_fake
def fake_export_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    lengths: Tensor | None,
    mode: str,
    direction: str,
    bias: bool,
    proj: bool,
    zoneout: list[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch = x.shape[0], x.shape[1]
    count, size = h0.shape[0], h0.shape[2]
    out = x.new_empty(steps, batch, count * size)
    c_n = c0.new_empty(c0.shape) if c0 is not None else x.new_empty(0)
    return out, h0.new_empty(h0.shape), c_n
