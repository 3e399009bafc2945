"""Japanese Vowels speaker identification (UCI; Kudo, Toyama & Shimbo 1999), from sktime's files.

Nine male speakers say the vowels /ae/; each utterance is 7-29 frames of 12 LPC cepstrum
coefficients, and the task is to name the speaker. The official split is 270 training utterances
(30 per speaker) and 370 test utterances. The files are the ``.ts`` files that sktime (or aeon)
ships; they are parsed here, and neither package is imported.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import DataMissing
from .packages import find_data

__all__ = ["load", "parse_ts"]

INSTALL = 'pip install "sktime==1.2.0"'
SPLIT_SEED = 0
VALID_PER_CLASS = 3  # carved from the training split: 27 utterances

Series = list[list[float]]  # (frames, channels)


def data_dir() -> Path:
    return find_data(
        "the Japanese Vowels .ts files",
        [("sktime", "datasets/data/JapaneseVowels"), ("aeon", "datasets/data/JapaneseVowels")],
        INSTALL,
    )


def parse_ts(text: str, source: str = "<ts>") -> tuple[list[Series], list[str], dict[str, str]]:
    """Parse a sktime/aeon ``.ts`` file of multivariate series with class labels.

    Returns (series, labels, header): each series is a list of frames of ``@dimensions`` values;
    a data line holds one ``:``-separated comma list per dimension, then the label, which a file
    with ``@classLabel false`` leaves out (its labels are then empty). Raises ValueError naming
    the line for anything else.
    """
    header: dict[str, str] = {}
    series: list[Series] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.startswith("@"):
                key, _, value = line[1:].partition(" ")
                if key.lower() == "data":
                    in_data = True
                else:
                    header[key.lower()] = value.strip()
                continue
            raise ValueError(
                f"{source}:{number}: expected a @header line before @data; got {line[:40]!r}"
            )
        labelled = header.get("classlabel", "true").lower().split()[:1] != ["false"]
        channels = line.split(":")
        label = channels.pop() if labelled else None
        try:
            dims = int(header.get("dimensions", len(channels)))
        except ValueError:
            raise ValueError(
                f"{source}: @dimensions {header['dimensions']!r}; expected a whole number"
            ) from None
        if len(channels) != dims:
            raise ValueError(
                f"{source}:{number}: {len(channels)} dimensions; expected @dimensions = {dims}"
            )
        values = [
            _numbers(ch, f"{source}:{number}: dimension {d}") for d, ch in enumerate(channels, 1)
        ]
        frames = {len(v) for v in values}
        if len(frames) != 1:
            raise ValueError(f"{source}:{number}: dimensions of different lengths {sorted(frames)}")
        series.append([list(frame) for frame in zip(*values, strict=True)])
        if label is not None:
            labels.append(label.strip())
    if not in_data:
        raise ValueError(f"{source}: no @data section")
    return series, labels, header


def _numbers(text: str, where: str) -> list[float]:
    """The comma-separated numbers of one dimension; ValueError names ``where`` and the value."""
    out = []
    for k, v in enumerate(text.split(","), 1):
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"{where}, value {k}: {v.strip()!r}; expected a number") from None
    return out


def load() -> dict[str, list[tuple[Series, str]]]:
    """``{"train"|"valid"|"test": [(series, speaker), ...]}``: the official 270/370 split, with
    3 utterances per speaker of the training split held out for validation (fixed seed)."""
    root = data_dir()
    out: dict[str, list[tuple[Series, str]]] = {}
    for split in ("TRAIN", "TEST"):
        path = root / f"JapaneseVowels_{split}.ts"
        if not path.exists():
            raise DataMissing(f"{path} is missing; reinstall the package with:\n    {INSTALL}")
        series, labels, _ = parse_ts(path.read_text(encoding="utf-8"), str(path))
        out[split.lower()] = list(zip(series, labels, strict=True))
    rng = random.Random(SPLIT_SEED)
    train, valid = [], []
    for speaker in sorted({label for _, label in out["train"]}, key=int):
        items = [item for item in out["train"] if item[1] == speaker]
        held = set(rng.sample(range(len(items)), VALID_PER_CLASS))
        valid.extend(item for k, item in enumerate(items) if k in held)
        train.extend(item for k, item in enumerate(items) if k not in held)
    test = list(out["test"])
    for split in (train, valid, test):  # speakers interleaved, so that any prefix is a fair slice
        rng.shuffle(split)
    return {"train": train, "valid": valid, "test": test}
