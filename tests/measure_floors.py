"""Measure what each recipe's end-to-end test slice reaches, working and broken.

    python tests/measure_floors.py [TASK ...] [--seeds 0 1 2] [--threads 1]

For each recipe it trains the slice that tests/test_tasks.py trains (``recipe_helpers.SLICE``)
with several seeds, as it is ("working") and deliberately broken:

- ``no-learning``: learning rate 0, so the weights stay at their initialisation;
- ``shuffled``: the training split's targets permuted among its examples (labels, pronunciations,
  translations; for charlm, the training text's characters), so nothing links input to target;
- ``wrong-mask``: every training and evaluation batch claims the padded length for every sequence,
  so the model reads padding as input (the classifiers' pooling and the attention see it).

and prints the test metric of each run, its time, and per variant the worst and best over seeds.
The floors asserted in tests/test_tasks.py sit between the worst working run and the best broken
one; its comments give the numbers this printed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from recipe_helpers import FLOOR_METRIC, SLICE

from rnnkit import tasks
from rnnkit.train import train


def _shuffle_targets(name: str, splits: dict) -> dict:
    rng = random.Random(1)
    train_split = list(splits["train"])
    if name == "charlm":
        chars = list(train_split[0])
        rng.shuffle(chars)
        return {**splits, "train": ["".join(chars)]}
    if name == "translate":
        from rnnkit.data.bible import VersePair

        targets = [p.target for p in train_split]
        rng.shuffle(targets)
        train_split = [
            VersePair(p.book, p.chapter, p.verse, p.source, t)
            for p, t in zip(train_split, targets, strict=True)
        ]
        return {**splits, "train": train_split}
    targets = [t for _, t in train_split]
    rng.shuffle(targets)
    return {**splits, "train": [(x, t) for (x, _), t in zip(train_split, targets, strict=True)]}


def _break(name: str, variant: str) -> list:
    """Patch the task class for ``variant``; returns what to undo."""
    cls = tasks.get(name)
    undo = []
    if variant == "shuffled":
        original = cls.load_splits

        def load_splits(self):
            return _shuffle_targets(name, original(self))

        cls.load_splits = load_splits
        undo.append((cls, "load_splits", original))
    elif variant == "wrong-mask":
        if name == "charlm":
            return undo  # windows of one length: no mask to get wrong
        original_collate = cls.collate

        def collate(self, data, batch):
            b = original_collate(self, data, batch)
            for key in ("lengths", "src_lengths"):
                if key in b:
                    steps = b["x" if key == "lengths" else "src"].shape[1]
                    b[key] = torch.full_like(b[key], steps)
            return b

        cls.collate = collate
        undo.append((cls, "collate", original_collate))
    return undo


def measure(name: str, seeds: list[int]) -> None:
    metric, higher = FLOOR_METRIC[name]
    for variant in ("working", "no-learning", "shuffled", "wrong-mask"):
        values = []
        for seed in seeds:
            overrides = {**SLICE[name], "seed": seed}
            if variant == "no-learning":
                overrides["lr"] = 0.0
            undo = _break(name, variant)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    m = train(name, overrides, out=Path(tmp) / "run", progress=False)
                    seconds = time.perf_counter() - start
            finally:
                for cls, attr, value in undo:
                    setattr(cls, attr, value)
            values.append(m["test"][metric])
            extra = " ".join(f"{k} {v:.4f}" for k, v in m["test"].items() if k not in (metric, "n"))
            print(
                f"{name} {variant:<12} seed {seed}: test {metric} {values[-1]:.4f} ({extra}) "
                f"({seconds:.1f} s)"
            )
        worst, best = (min(values), max(values)) if higher else (max(values), min(values))
        print(f"{name} {variant:<12} worst {worst:.4f} best {best:.4f}  ({metric})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", default=sorted(SLICE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    for name in args.tasks:
        measure(name, args.seeds)


if __name__ == "__main__":
    main()
