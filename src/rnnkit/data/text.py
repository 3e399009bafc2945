"""Tokenising text and mapping tokens to ids with a vocabulary built from a training split."""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["PAD", "UNK", "Vocab", "tokenise"]

PAD, UNK = "<pad>", "<unk>"

_TAGS = re.compile(r"<[^>]{0,40}>")
# Clitics split off as in the Penn Treebank ("isn't" -> "is", "n't"; "film's" -> "film", "'s"),
# then words (with inner hyphens: "well-made"), numbers, or one punctuation mark.
_TOKEN = re.compile(
    r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b"  # clitics
    r"|[a-z0-9]+(?:-[a-z0-9]+)*"  # words and numbers
    r"|[^\sa-z0-9]"  # one punctuation mark
)


def tokenise(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens; HTML line breaks and entities are removed first.

    >>> tokenise("A well-made film.<br />Isn't it?")
    ['a', 'well-made', 'film', '.', 'is', "n't", 'it', '?']
    """
    text = _TAGS.sub(" ", html.unescape(text)).lower().replace("’", "'")
    return _TOKEN.findall(text)


@dataclass
class Vocab:
    """Tokens <-> ids. Id 0 is padding and id 1 stands for every token not in the vocabulary."""

    tokens: list[str]

    def __post_init__(self) -> None:
        if self.tokens[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {[PAD, UNK]}; got {self.tokens[:2]}")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(
        cls, texts: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Tokens seen at least ``min_freq`` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for toks in texts for tok in toks)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            ranked = ranked[: max(0, max_size - 2)]
        return cls([PAD, UNK, *ranked])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.index.get(t, 1) for t in tokens]

    def to_json(self) -> list[str]:
        return list(self.tokens)

    @classmethod
    def from_json(cls, tokens: list[str]) -> Vocab:
        return cls(list(tokens))
