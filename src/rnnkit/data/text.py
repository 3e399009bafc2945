"""Tokenising text into words and punctuation (the vocabulary is :mod:`rnnkit.data.vocab`)."""

from __future__ import annotations

import html
import re
import unicodedata

__all__ = ["tokenise"]

_TAGS = re.compile(r"<[^>]{0,40}>")
# Clitics split off as in the Penn Treebank ("isn't" -> "is", "n't"; "film's" -> "film", "'s"),
# then words (with inner hyphens: "well-made"), numbers, or one punctuation mark. A word is a run of
# letters and digits of any script ([^\W_]), so "cliché" stays one word, as GloVe has it.
_TOKEN = re.compile(
    r"[^\W_]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b"  # clitics
    r"|[^\W_]+(?:-[^\W_]+)*"  # words and numbers
    r"|[^\s\w]|_"  # one punctuation mark
)


def tokenise(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens; HTML line breaks and entities are removed first,
    and accents are composed (Unicode NFC), so "café" typed as "e" + a combining accent is the
    same one token as the precomposed "é".

    >>> tokenise("A well-made film.<br />Isn't it?")
    ['a', 'well-made', 'film', '.', 'is', "n't", 'it', '?']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenise takes a str; got a {type(text).__name__} ({text!r})")
    text = unicodedata.normalize("NFC", _TAGS.sub(" ", html.unescape(text)))
    text = text.lower().replace("’", "'")
    return _TOKEN.findall(text)
