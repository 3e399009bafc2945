"""Vocabulary (token <-> id, with the special tokens every task uses) and batch padding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["BOS", "EOS", "PAD", "SPECIALS", "UNK", "Vocab", "pad_batch"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
#: Special tokens, at ids 0, 1, 2, 3 of every vocabulary (Seq2SeqConfig's default ids).
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocab:
    """``Vocab(tokens)``: the specials, then ``tokens`` in order. Unknown tokens map to UNK.

    ``Vocab.build(sequences, min_count=1, max_size=None)`` counts tokens and keeps the most
    frequent (ties in first-seen order). ``list(vocab)`` / ``Vocab(list_)`` round-trips through
    JSON.
    """

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
        counts = Counter(t for seq in sequences for t in seq)
        kept = [t for t, n in counts.most_common() if n >= min_count]
        return cls(kept if max_size is None else kept[: max(0, max_size - len(SPECIALS))])

    pad_id, bos_id, eos_id, unk_id = range(4)

    def __len__(self) -> int:
        return len(self.itos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.itos[len(SPECIALS) :])

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``, stopping at EOS; PAD and BOS are skipped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.itos[i])
        return out


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Right-pad id sequences into ``(ids (B, T) int64, lengths (B,) int64)``."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    steps = max(1, int(lengths.max())) if len(sequences) else 1
    ids = torch.full((len(sequences), steps), pad_id, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids.to(device), lengths.to(device)
