"""Sequence lengths: validation, masks, length-aware reversal, and PackedSequence conversion.

The contract (every layer honours it): ``lengths`` is a 1-D integer tensor (any device) or a list,
one entry per sequence, ``0 <= len <= T``; sequences are right-padded; outputs at padded positions
are exactly zero; final states are those at each sequence's own last valid step (a length-0
sequence returns its initial state); a reversed direction starts at each sequence's own end.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence, Set

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .errors import DTypeError

__all__ = [
    "as_lengths",
    "from_packed",
    "mask",
    "reverse_padded",
    "to_packed",
]

LengthsLike = Tensor | Sequence[int]


def as_lengths(lengths: LengthsLike, batch: int, steps: int, device: torch.device) -> Tensor:
    """Validate ``lengths`` against a batch of ``batch`` sequences of ``steps`` steps.

    Returns an int64 tensor of shape (B,) on ``device``. Raises ``ValueError``/``TypeError`` that
    names the offending entry, e.g. ``lengths[3] = 12 > T = 10``.

    While a model is exported (:func:`rnnkit.backends.exporting`) a tensor's values are the
    graph's input, unknown when it is traced, and a meta tensor has none: its dtype and shape
    are checked, not its values. Under torch.compile the values are checked when the graph runs
    (an assertion in the graph, which cannot name the entry), so that the trace reads none.
    """
    if isinstance(lengths, Tensor):
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
            raise DTypeError(f"lengths has dtype {lengths.dtype}; expected an integer tensor")
        if lengths.dim() != 1:
            raise ValueError(
                f"lengths has shape {tuple(lengths.shape)}; expected a 1-D tensor of B = {batch}"
            )
        if lengths.is_meta and device.type != "meta":
            raise ValueError(
                f"lengths is on the meta device (no values) and the input on {device}; expected "
                "lengths with values (a list, or a tensor on the cpu or the input's device)"
            )
        unknown = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or lengths.is_meta
        if unknown or torch.compiler.is_compiling():
            # torch.export (B may be symbolic), the TorchScript-based exporter (it traces sizes),
            # a meta tensor (shapes without data), or torch.compile's trace (values known when
            # the graph runs: checked there, so that no value is read while tracing)
            if lengths.shape[0] != batch:
                raise ValueError(
                    f"lengths has {lengths.shape[0]} entries; expected one per sequence, "
                    f"B = {batch}"
                )
            values = lengths.to(device, torch.int64)
            if not unknown:
                torch._assert_async(
                    ((values >= 0) & (values <= steps)).all(),
                    "lengths has an entry outside 0 <= length <= T (the input's steps); under "
                    "torch.compile the entry is not named: call the layer eagerly to see which",
                )
            return values
        if lengths.dtype == torch.uint64:  # values past int64's range would wrap to negatives
            return as_lengths(lengths.tolist(), batch, steps, device)
        values = lengths.detach().to("cpu", torch.int64)
    else:
        if isinstance(lengths, (Set, Mapping)):  # no order of its own to match the batch's
            raise TypeError(
                f"lengths is a {type(lengths).__name__}; expected a 1-D integer tensor or a list "
                "of ints in the batch's order"
            )
        try:
            items = list(lengths)
        except TypeError:
            raise TypeError(
                f"lengths = {lengths!r}; expected a 1-D integer tensor or a list of ints"
            ) from None
        ints = []
        for k, v in enumerate(items):
            try:  # ints, numpy integers and 0-d integer tensors; not bools, not floats
                if isinstance(v, bool):
                    raise TypeError
                ints.append(operator.index(v))
            except TypeError:
                raise TypeError(f"lengths[{k}] = {v!r}; expected an integer") from None
        for k, v in enumerate(ints):  # beyond int64 (so beyond any T): named before converting
            if not -(2**63) <= v < 2**63:
                bound = f"> T = {steps}" if v > 0 else "< 0; expected 0 <= length <= T"
                raise ValueError(f"lengths[{k}] = {v} {bound}")
        # checked as Python ints (no tensor is read, so torch.compile traces the list as
        # constants), then made a tensor on the device
        _check_values(len(ints), batch, steps, lambda: _extremes(ints))
        return torch.tensor(ints, dtype=torch.int64, device=device)

    def extremes() -> tuple[int, int, int, int]:
        lo, hi = int(values.argmin()), int(values.argmax())
        return lo, int(values[lo]), hi, int(values[hi])

    _check_values(values.numel(), batch, steps, extremes)
    return values.to(device)


def _extremes(ints: list[int]) -> tuple[int, int, int, int]:
    lo = min(range(len(ints)), key=ints.__getitem__)
    hi = max(range(len(ints)), key=ints.__getitem__)
    return lo, ints[lo], hi, ints[hi]


def _check_values(
    count: int, batch: int, steps: int, extremes: Callable[[], tuple[int, int, int, int]]
) -> None:
    """One entry per sequence, each in [0, T]; ``extremes`` gives the smallest entry's index and
    value, then the largest's."""
    if count != batch:
        raise ValueError(f"lengths has {count} entries; expected one per sequence, B = {batch}")
    if batch:
        lo, low, hi, high = extremes()
        if low < 0:
            raise ValueError(f"lengths[{lo}] = {low} < 0; expected 0 <= length <= T")
        if high > steps:
            raise ValueError(f"lengths[{hi}] = {high} > T = {steps}")


def mask(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) bool mask, True at valid steps ``t < lengths[b]``."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)
    return t < lengths.unsqueeze(0)


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each time-major sequence (T, B, ...) within its own length; padding stays put.

    ``y[t, b] = x[len_b - 1 - t, b]`` for ``t < len_b`` and ``y[t, b] = x[t, b]`` otherwise. It is
    its own inverse. Without lengths it is a plain flip along time.
    """
    if lengths is None:
        return x.flip(0)
    steps = x.shape[0]
    t = torch.arange(steps, device=x.device).unsqueeze(1)  # (T, 1)
    n = lengths.to(x.device).unsqueeze(0)  # (1, B)
    idx = torch.where(t < n, n - 1 - t, t)  # (T, B)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, idx)


def from_packed(packed: PackedSequence) -> tuple[Tensor, Tensor]:
    """PackedSequence -> (padded time-major (T, B, ...), lengths (B,)) in the original batch order."""
    padded, lengths = pad_packed_sequence(packed)
    return padded, lengths.to(padded.device)


def to_packed(padded: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a time-major (T, B, ...) result with exactly the layout of the input ``like``.

    The returned PackedSequence shares ``like``'s batch_sizes and sorting indices, as torch.nn's
    recurrent layers return it.
    """
    batch_sizes = like.batch_sizes  # (T,) on cpu, non-increasing
    if like.sorted_indices is not None:
        padded = padded.index_select(1, like.sorted_indices)
    steps, batch = len(batch_sizes), padded.shape[1]
    rows = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B), time-major order
    data = padded[:steps][rows.to(padded.device)]  # (sum(lengths), ...)
    return PackedSequence(data, batch_sizes, like.sorted_indices, like.unsorted_indices)
