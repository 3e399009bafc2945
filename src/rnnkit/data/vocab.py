"""Vocabulary: tokens <-> ids with the special tokens every task uses, and batch padding.

One :class:`Vocab` serves every recipe: the classifiers use PAD and UNK, the encoder-decoders also
BOS and EOS. The specials sit at ids 0-3 of every vocabulary (Seq2SeqConfig's default ids).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["BOS", "EOS", "PAD", "SPECIALS", "UNK", "Vocab", "pad_batch"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
#: Special tokens, at ids 0, 1, 2, 3 of every vocabulary.
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocab:
    """``Vocab(tokens)``: the specials, then ``tokens`` in order. Unknown tokens map to UNK.

    ``Vocab.build(sequences, min_count=1, max_size=None)`` counts tokens and keeps the most
    frequent (ties alphabetical), at most ``max_size`` ids in all. ``vocab.to_json()`` /
    ``Vocab.from_json(list_)`` round-trip through JSON; ``list(vocab)`` is the non-special tokens.
    """

    pad_id, bos_id, eos_id, unk_id = range(4)

    def __init__(self, tokens: Iterable[str]) -> None:
        self.itos: list[str] = list(SPECIALS)
        for t in tokens:
            if t not in SPECIALS:
                self.itos.append(t)
        self.stoi: dict[str, int] = {}
        for i, t in enumerate(self.itos):
            if t in self.stoi:
                raise ValueError(f"token {t!r} appears twice (ids {self.stoi[t]} and {i})")
            self.stoi[t] = i

    @classmethod
    def build(
        cls, sequences: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Tokens seen at least ``min_count`` times, most frequent first (ties alphabetical);
        ``max_size`` counts the specials, so it is at least their number."""
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(
                f"max_size = {max_size!r}; expected None or >= {len(SPECIALS)} (the specials "
                f"{', '.join(SPECIALS)} take ids 0-{len(SPECIALS) - 1})"
            )
        counts = Counter(t for seq in sequences for t in seq)
        kept = sorted(
            (t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t)
        )
        return cls(kept if max_size is None else kept[: max_size - len(SPECIALS)])

    def to_json(self) -> list[str]:
        """Every token by id, the specials first."""
        return list(self.itos)

    @classmethod
    def from_json(cls, tokens: list[str]) -> Vocab:
        """The vocabulary :meth:`to_json` saved; raises ValueError if it does not open with the
        specials (ids would shift)."""
        if list(tokens[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(
                f"a saved vocabulary starts with {list(SPECIALS)}; got {list(tokens[:4])}"
            )
        return cls(tokens[len(SPECIALS) :])

    def __len__(self) -> int:
        return len(self.itos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.itos[len(SPECIALS) :])

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``, stopping at EOS; PAD and BOS are skipped. An id outside the
        vocabulary (negative, or ``>= len(vocab)``) is a ValueError."""
        out = []
        for i in ids:
            i = operator.index(i)
            if i == self.eos_id:
                break
            if not 0 <= i < len(self.itos):
                raise ValueError(f"id {i} is not in the vocabulary; expected 0 <= id < {len(self)}")
            if i not in (self.pad_id, self.bos_id):
                out.append(self.itos[i])
        return out


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Right-pad id sequences into ``(ids (B, T) int64, lengths (B,) int64)``."""
    sizes = [len(s) for s in sequences]
    steps = max([1, *sizes])
    # One tensor from padded lists (a copy per row took 0.7 ms for a batch of 128 short words).
    rows = [[*s, *[pad_id] * (steps - n)] for s, n in zip(sequences, sizes, strict=True)]
    ids = torch.tensor(rows, dtype=torch.long).view(len(rows), steps)
    return ids.to(device), torch.tensor(sizes, dtype=torch.long).to(device)
