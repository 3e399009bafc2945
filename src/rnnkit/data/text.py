"""Tokenising text into words and punctuation (the vocabulary is :mod:`rnnkit.data.vocab`)."""

from __future__ import annotations

import html
import re

__all__ = ["tokenise"]

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
