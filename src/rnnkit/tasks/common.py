"""Hooks shared by the classification recipes (sentiment, speech) and the encoder-decoder
recipes (g2p, translate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Vocab, bucket_batches, pad, pad_batch
from ..models.attention import ATTENTIONS
from ..models.classifier import ClassifierEnsemble, SequenceClassifier, make_encoder
from ..models.seq2seq import (
    Seq2Seq,
    Seq2SeqConfig,
    Seq2SeqEnsemble,
    decoder_io,
    plot_attention,
    sequence_loss,
)
from .base import TrainConfig, evaluating, option

__all__ = [
    "ATTENTION",
    "ClassifierHooks",
    "EncoderDecoderConfig",
    "Examples",
    "Pairs",
    "Seq2SeqHooks",
    "ensemble_option",
]

ATTENTION = "attention.png"

Examples = tuple[list[Tensor], Tensor]  # (sequences (L_i, ...), labels (N,))


def ensemble_option(default: int = 1) -> Any:
    """The ``ensemble`` field of the classifier and encoder-decoder recipes, with a recipe's own
    default."""
    return option(
        default,
        "train this many models side by side (each from its own initialisation, on the same "
        "batches) and predict by the mean of their probabilities; 1 = one model",
    )


def right_to_left_option(default: bool = False) -> Any:
    """The ``right_to_left`` field of the encoder-decoder recipes, with a recipe's own default."""
    return option(
        default,
        "with an ensemble, half of its members (rounded down) learn each target right to left, "
        "and a search runs in both directions and keeps the candidate that both score highest",
    )


class ClassifierHooks:
    """Batching, loss and evaluation for a model ``(x, lengths) -> logits`` on labelled data.

    With ``config.ensemble`` > 1 the model is a :class:`ClassifierEnsemble` (:meth:`classifier`)
    and the training loss is the mean of its members' losses."""

    config: Any
    labels: Any  # the class names
    device: torch.device
    to_device: Any  # Task.to_device
    eval_batch_size = 256

    def epoch_batches(self, data: Examples, generator: torch.Generator) -> list[list[int]]:
        seqs, _ = data
        return bucket_batches([len(s) for s in seqs], self.config.batch_size, generator)

    def collate(self, data: Examples, batch: list[int]) -> dict[str, Tensor]:
        seqs, labels = data
        x, lengths = pad([seqs[i] for i in batch])
        return {"x": x, "lengths": lengths, "y": labels[batch]}

    def classifier(self, **inputs: Any) -> SequenceClassifier | ClassifierEnsemble:
        """A :class:`SequenceClassifier` over ``labels`` with the config's encoder, pooling and
        backend, and ``inputs`` (what the recipe's inputs need: vocabulary or feature size,
        word vectors, noise, ...); with ``config.ensemble`` > 1 an ensemble of that many."""
        c = self.config

        def build() -> SequenceClassifier:
            return SequenceClassifier(
                len(self.labels),
                cell=c.cell,
                hidden_size=c.hidden_size,
                num_layers=c.num_layers,
                bidirectional=c.bidirectional,
                dropout=c.dropout,
                pooling=c.pooling,
                backend=c.backend,
                **inputs,
            )

        return build() if c.ensemble == 1 else ClassifierEnsemble(build, c.ensemble)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        y = batch["y"]
        if self.config.ensemble > 1:  # each member scored on its own
            logits = model(batch["x"], batch["lengths"], members=True)  # (members, B, classes)
            return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0])), len(y)
        return F.cross_entropy(model(batch["x"], batch["lengths"]), y), len(y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Examples) -> dict[str, float]:
        seqs, labels = data
        correct, total_loss = 0, 0.0
        with evaluating(model):
            for idx in bucket_batches([len(s) for s in seqs], self.eval_batch_size):
                b = self.to_device(self.collate(data, idx))
                logits = model(b["x"], b["lengths"])
                total_loss += float(F.cross_entropy(logits, b["y"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["y"]).sum())
        n = len(labels)
        return {"accuracy": correct / max(n, 1), "loss": total_loss / max(n, 1), "n": n}

    def explain(self, model: nn.Module, data: Examples) -> Any:
        seqs, _ = data
        b = self.collate(data, list(range(min(len(seqs), self.config.batch_size))))
        b = self.to_device(b)
        return model.explain(b["x"], b["lengths"])

    @torch.no_grad()
    def classify(self, model: nn.Module, seqs: list[Tensor]) -> list[tuple[int, float]]:
        """(predicted class, its probability) for each sequence."""
        model.eval()
        x, lengths = self.to_device(pad(seqs))
        probs = torch.softmax(model(x, lengths), dim=-1)
        best = probs.argmax(-1)
        return [(int(k), float(probs[i, k])) for i, k in enumerate(best)]


# -- encoder-decoder recipes (g2p, translate) ----------------------------------------------------


@dataclass
class EncoderDecoderConfig(TrainConfig):
    """The model and search options of the encoder-decoder recipes; each sets its own defaults."""

    cell: str = option("lstm", "encoder and decoder cell", ("lstm", "gru"))
    embed_size: int = option(256, "source and target embedding size")
    hidden_size: int = option(256, "encoder hidden size per direction")
    encoder_layers: int = option(1, "stacked bidirectional encoder layers")
    decoder_hidden: int = option(256, "decoder hidden size (and attention size)")
    decoder_layers: int = option(1, "stacked decoder cells")
    attention: str = option("general", "attention", tuple(ATTENTIONS))
    input_feeding: bool = option(
        False,
        "feed the last attentional state into the decoder cell (Luong); without it, training "
        "runs the decoder over all steps at once",
    )
    dropout: float = option(0.2, "dropout on embeddings, between layers and before the output")
    label_smoothing: float = option(0.0, "label smoothing of the training loss")
    bf16_output: bool = option(
        False,
        "in training, run the output layer's matrix product in bfloat16 (autocast; faster where "
        "the CPU has bfloat16 units; softmax, loss and evaluation stay float32)",
    )
    beam_size: int = option(5, "beam size of the final evaluation and predict; 1 = greedy")
    valid_beam_size: int = option(1, "beam size of the per-epoch validation; 1 = greedy")
    length_penalty: float = option(0.6, "length normalisation alpha of the beam search")
    max_decode_len: int = option(80, "most tokens generated per source")
    ensemble: int = ensemble_option(1)
    right_to_left: bool = right_to_left_option(False)


@dataclass
class Pairs:
    """One split of an encoder-decoder task, encoded.

    ``src``/``tgt``: the training pairs as id lists (one per reference: a word with two
    pronunciations gives two pairs). ``items``: what is decoded for the metrics, each with
    ``refs``, the reference token sequences it is scored against, and ``text``, its source text.
    """

    src: list[list[int]]
    tgt: list[list[int]]
    items: list[list[int]]
    refs: list[list[list[str]]]
    text: list[str]


class Seq2SeqHooks:
    """Batching, teacher-forced loss, beam-search evaluation and the attention heatmap for a
    :class:`~rnnkit.models.Seq2Seq` (with ``config.ensemble`` > 1 a
    :class:`~rnnkit.models.Seq2SeqEnsemble`, whose training loss is the mean of its members') on
    :class:`Pairs`. A task supplies ``src_vocab``,
    ``tgt_vocab``, :meth:`source_tokens` and :meth:`scores` (metrics of decoded token lists)."""

    config: EncoderDecoderConfig
    src_vocab: Vocab
    tgt_vocab: Vocab
    device: torch.device
    to_device: Any  # Task.to_device
    eval_batch_size = 128

    def source_tokens(self, text: str) -> list[str]:
        raise NotImplementedError

    def scores(self, hyps: list[list[str]], refs: list[list[list[str]]]) -> dict[str, float]:
        raise NotImplementedError

    def pairs(self, sources: list[str], targets: list[list[list[str]]]) -> Pairs:
        """Encode sources (texts) with their reference token sequences (one or more each)."""
        unk = [Vocab.unk_id]
        items = [self.src_vocab.encode(self.source_tokens(s)) or unk for s in sources]
        src, tgt = [], []
        for ids, refs in zip(items, targets, strict=True):
            for ref in refs:
                src.append(ids)
                tgt.append(self.tgt_vocab.encode(ref))
        return Pairs(src, tgt, items, targets, list(sources))

    def build_model(self) -> Seq2Seq | Seq2SeqEnsemble:
        c = self.config
        config = Seq2SeqConfig(
            src_vocab=len(self.src_vocab),
            tgt_vocab=len(self.tgt_vocab),
            embed_size=c.embed_size,
            encoder_cell=c.cell,
            encoder_layers=c.encoder_layers,
            encoder_hidden=c.hidden_size,
            decoder_cell=c.cell,
            decoder_layers=c.decoder_layers,
            decoder_hidden=c.decoder_hidden,
            attention=c.attention,
            attention_size=c.decoder_hidden,
            input_feeding=c.input_feeding,
            dropout=c.dropout,
            max_decode_len=c.max_decode_len,
            beam_size=c.beam_size,
            length_penalty=c.length_penalty,
            bf16_output=c.bf16_output,
            pad_id=Vocab.pad_id,
            bos_id=Vocab.bos_id,
            eos_id=Vocab.eos_id,
        )

        def build() -> Seq2Seq:
            encoder = make_encoder(
                c.cell, c.embed_size, c.hidden_size, c.encoder_layers, True, c.dropout, c.backend
            )
            return Seq2Seq(config, encoder=encoder, backend=c.backend)

        if c.ensemble == 1:
            return build()
        return Seq2SeqEnsemble(build, c.ensemble, c.ensemble // 2 if c.right_to_left else 0)

    def epoch_batches(self, data: Pairs, generator: torch.Generator) -> list[list[int]]:
        lengths = [len(s) + len(t) for s, t in zip(data.src, data.tgt, strict=True)]
        return bucket_batches(lengths, self.config.batch_size, generator)

    def collate(self, data: Pairs, batch: list[int]) -> dict[str, Tensor]:
        src, src_lengths = pad_batch([data.src[i] for i in batch], Vocab.pad_id)
        tgt, tgt_lengths = pad_batch([data.tgt[i] for i in batch], Vocab.pad_id)
        return {"src": src, "src_lengths": src_lengths, "tgt": tgt, "tgt_lengths": tgt_lengths}

    def _logits(
        self, model: Seq2Seq | Seq2SeqEnsemble, batch: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        tgt_in, tgt_out = decoder_io(batch["tgt"], batch["tgt_lengths"], model.config)
        return model(batch["src"], batch["src_lengths"], tgt_in), tgt_out

    def loss(
        self, model: Seq2Seq | Seq2SeqEnsemble, batch: dict[str, Tensor]
    ) -> tuple[Tensor, int]:
        tgt_in, tgt_out = decoder_io(batch["tgt"], batch["tgt_lengths"], model.config)
        src, lengths = batch["src"], batch["src_lengths"]
        loss = model.loss(src, lengths, tgt_in, tgt_out, self.config.label_smoothing)
        return loss, int((tgt_out != Vocab.pad_id).sum())

    @torch.no_grad()
    def decode(
        self, model: Seq2Seq | Seq2SeqEnsemble, items: list[list[int]], beam_size: int | None = None
    ) -> list[list[str]]:
        """Output tokens of each source by beam search (``beam_size``, default the config's;
        1: greedy)."""
        c = self.config
        beam = c.beam_size if beam_size is None else beam_size
        out: list[list[str]] = [[] for _ in items]
        with evaluating(model):
            for idx in bucket_batches([len(s) for s in items], self.eval_batch_size):
                src, lengths = pad_batch([items[i] for i in idx], Vocab.pad_id, self.device)
                # each source's own limit: a result never depends on the batch it was decoded in
                max_len = (2 * lengths + 10).clamp(max=c.max_decode_len)
                if beam > 1:
                    hyp = model.beam_search(src, lengths, beam_size=beam, max_len=max_len)
                else:
                    hyp = model.greedy(src, lengths, max_len=max_len)
                for i, ids in zip(idx, hyp.to_lists(Vocab.eos_id), strict=True):
                    out[i] = self.tgt_vocab.decode(ids)
        return out

    def validate(self, model: Seq2Seq | Seq2SeqEnsemble, data: Pairs) -> dict[str, float]:
        """Per-epoch validation decodes greedily (``valid_beam_size``): beam search over the whole
        validation split each epoch would cost more than the training steps it guides."""
        return self.evaluate(model, data, beam_size=self.config.valid_beam_size)

    @torch.no_grad()
    def evaluate(
        self, model: Seq2Seq | Seq2SeqEnsemble, data: Pairs, beam_size: int | None = None
    ) -> dict[str, float]:
        total, tokens = 0.0, 0
        with evaluating(model):
            for idx in bucket_batches([len(s) for s in data.src], self.eval_batch_size):
                logits, tgt_out = self._logits(model, self.to_device(self.collate(data, idx)))
                n = int((tgt_out != Vocab.pad_id).sum())
                total += float(sequence_loss(logits, tgt_out, Vocab.pad_id)) * n
                tokens += n
        metrics = self.scores(self.decode(model, data.items, beam_size), data.refs)
        return {**metrics, "loss": total / max(tokens, 1), "n": len(data.items)}

    def explain(self, model: Seq2Seq | Seq2SeqEnsemble, data: Pairs) -> Any:
        from ..backends import explain

        b = self.collate(data, list(range(min(len(data.src), self.config.batch_size))))
        b = self.to_device(b)
        with torch.no_grad():
            x = model.encoder.embedding(b["src"])
        return explain(model.encoder.layer, x.requires_grad_(True), lengths=b["src_lengths"])

    @torch.no_grad()
    def artifacts(
        self, model: Seq2Seq | Seq2SeqEnsemble, data: dict[str, Pairs], run_dir: Path
    ) -> None:
        """``attention.png``: the attention weights of the model's output for one test example."""
        test = data["test"]
        if not test.items:
            return
        k = min(range(len(test.items)), key=lambda i: abs(len(test.items[i]) - 8))
        model.eval()
        (hyp,) = self.decode(model, [test.items[k]])
        src, lengths = pad_batch([test.items[k]], Vocab.pad_id, self.device)
        tgt, tgt_lengths = pad_batch([self.tgt_vocab.encode(hyp)], Vocab.pad_id, self.device)
        tgt_in, _ = decoder_io(tgt, tgt_lengths, model.config)
        _, weights = model(src, lengths, tgt_in, return_attention=True)
        source = [self.src_vocab.itos[i] for i in test.items[k]]
        plot_attention(
            weights[0], source, [*hyp, "</s>"], run_dir / ATTENTION, title=test.text[k][:80]
        )
