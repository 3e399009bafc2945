"""Models built from rnnkit layers: sequence classifiers and language models."""

from .classifier import SequenceClassifier, make_encoder, pool
from .lm import CharLM

__all__ = ["CharLM", "SequenceClassifier", "make_encoder", "pool"]
