"""Moved to :mod:`rnnkit.regularisers` (the backends draw the masks); kept so that old imports
and old pickles still resolve."""

from ..regularisers import Masks, PlainPickle, Regularisers, check_probability

__all__ = ["Masks", "PlainPickle", "Regularisers", "check_probability"]
