"""Batching by length: sequences of similar length share a batch, so little time goes to padding."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

__all__ = ["bucket_batches", "pad"]


def bucket_batches(
    lengths: Sequence[int],
    batch_size: int,
    generator: torch.Generator | None = None,
    pool: int = 50,
) -> list[list[int]]:
    """Split indices ``0..N-1`` into batches of at most ``batch_size`` with similar lengths.

    With a ``generator`` (training) the indices are shuffled, cut into pools of ``pool`` batches,
    each pool sorted by length and cut into batches, and the batches shuffled: the order depends
    only on the generator's seed. Without one (evaluation) the batches are the indices sorted by
    length, longest first.
    """
    for name, value in (("batch_size", batch_size), ("pool", pool)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} = {value!r}; expected an integer >= 1")
    n = len(lengths)
    if generator is None:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[k : k + batch_size] for k in range(0, n, batch_size)]
    perm = torch.randperm(n, generator=generator).tolist()
    batches = []
    step = batch_size * pool
    for start in range(0, n, step):
        chunk = sorted(perm[start : start + step], key=lambda i: lengths[i])
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def pad(seqs: Sequence[Tensor], value: float = 0) -> tuple[Tensor, Tensor]:
    """Right-pad sequences (L_i, ...) to one (B, T, ...) tensor; returns it and the lengths (B,).

    At least one sequence is needed: the padded tensor takes its dtype, device and trailing
    dimensions from them."""
    if len(seqs) == 0:
        raise ValueError("pad got no sequences; expected at least one (L, ...) tensor")
    trailing = tuple(seqs[0].shape[1:]) if isinstance(seqs[0], Tensor) else ()
    for i, s in enumerate(seqs):
        if not isinstance(s, Tensor) or s.dim() == 0:
            what = "a 0-d tensor" if isinstance(s, Tensor) else f"a {type(s).__name__}"
            raise TypeError(f"seqs[{i}] is {what}; expected a tensor (L, ...)")
        if tuple(s.shape[1:]) != trailing:
            want = ", ".join(["L", *map(str, trailing)])
            raise ValueError(f"seqs[{i}] has shape {tuple(s.shape)}; expected ({want}) as seqs[0]")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    steps = max(1, int(lengths.max()))
    out = seqs[0].new_full((len(seqs), steps, *seqs[0].shape[1:]), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths
