"""Attentional encoder–decoder: an rnnkit encoder, a bridge, an attentional decoder, searches.

The model, for a source ``x_1..x_S`` and a target ``y_1..y_T`` (``y_0`` = BOS, ``y_T`` = EOS):

    h_1..h_S            = encoder(embed(x), lengths)          any rnnkit layer, e.g. a BiLSTM stack
    s_0                 = bridge(final encoder states)        tanh(W_b [h_fwd; h_bwd]) or zeros
    s_t                 = cell([embed(y_{t-1}); h~_{t-1}], s_{t-1})      (h~ fed: "input feeding")
    c_t, a_t            = attention(s_t, h_1..h_S)            (Bahdanau: from s_{t-1}, fed to cell)
    h~_t                = tanh(W_c [s_t; c_t])                 the attentional state
    p(y_t | y_<t, x)    = softmax(W_o h~_t)

:meth:`Seq2Seq.step` computes one decoder step and is the only decoder loop body: the
teacher-forced :meth:`Seq2Seq.forward`, :meth:`Seq2Seq.greedy` and :meth:`Seq2Seq.beam_search`
all run it, and so can a streaming user. One exception makes training fast: with Luong attention
(queried by s_t) and no input feeding, nothing a step's cell reads depends on an earlier context,
so teacher forcing runs each decoder cell over all T steps as one :class:`~rnnkit.Recurrent` call
(dispatched like any layer, e.g. to the fused kernels) and attends from all T states at once; a
test keeps it equal to the step loop::

    state = model.start(src, src_lengths)           # encode once
    token = torch.full((B,), config.bos_id)
    while ...:
        logits, state = model.step(token, state)    # (B, V), the next state
        token = logits.argmax(-1)

Layouts are batch-first: ``src`` (B, S) and ``tgt`` (B, T) int64 token ids, right-padded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import backends
from .. import lengths as L
from ..cells import GRUCell, LSTMCell
from ..layers import Bidirectional, Recurrent, Stacked, top_states
from ..layers.stacked import check_dropout
from .attention import ATTENTIONS, Attention, build_attention, clean, length_mask
from .checks import check_ids, whole
from .classifier import CELLS, average_probabilities, make_encoder

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "EnsembleState",
    "Hypotheses",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Seq2SeqEnsemble",
    "decoder_io",
    "plot_attention",
    "reverse_targets",
    "sequence_loss",
    "summarise_final_state",
]

_DECODER_CELLS = {"lstm": LSTMCell, "gru": GRUCell}
_BRIDGES = ("linear", "zero")


@dataclass
class Seq2SeqConfig:
    """Sizes and choices of a :class:`Seq2Seq` model. Defaults: a 2-layer BiLSTM encoder, an LSTM
    decoder with Bahdanau attention and input feeding, and a linear bridge."""

    src_vocab: int
    tgt_vocab: int
    embed_size: int = 256
    #: Encoder (used unless a layer is passed to Seq2Seq): cell, layers, size per direction.
    encoder_cell: str = "lstm"
    encoder_layers: int = 2
    encoder_hidden: int = 256
    bidirectional: bool = True
    #: Decoder: cell ("lstm" or "gru"), number of stacked cells, hidden size.
    decoder_cell: str = "lstm"
    decoder_layers: int = 1
    decoder_hidden: int = 256
    #: "bahdanau" (additive), or Luong's "dot", "general", "concat".
    attention: str = "bahdanau"
    attention_size: int = 256
    #: Feed the previous attentional state h~_{t-1} into the cell (Luong et al., 2015).
    input_feeding: bool = True
    #: Decoder initial state: "linear" (from the encoder's final states) or "zero".
    bridge: str = "linear"
    dropout: float = 0.2
    #: Share the target embedding with the output layer (needs embed_size == decoder_hidden).
    tie_embeddings: bool = False
    #: In training, run the output layer's matrix product (the largest of a step when the target
    #: vocabulary is large) in bfloat16 under autocast; the softmax and loss stay float32, and
    #: evaluation and search run entirely in float32.
    bf16_output: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    #: Search defaults: maximum output length (EOS included), beam size, length penalty alpha.
    max_decode_len: int = 100
    beam_size: int = 5
    length_penalty: float = 0.6

    def __post_init__(self) -> None:
        for name in (
            "src_vocab", "tgt_vocab", "embed_size", "encoder_layers", "encoder_hidden",
            "decoder_layers", "decoder_hidden", "attention_size", "max_decode_len", "beam_size",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} = {value!r}; expected a positive integer")
        choices = {
            "encoder_cell": tuple(CELLS),
            "decoder_cell": tuple(_DECODER_CELLS),
            "attention": tuple(ATTENTIONS),
            "bridge": _BRIDGES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}; expected one of {allowed}")
        check_dropout(self.dropout)
        _check_length_penalty(self.length_penalty)
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} = {value!r}; expected an integer token id")
        if len(set(ids.values())) != 3:
            raise ValueError(f"special ids {ids} must be distinct")
        for name, value in ids.items():
            if not 0 <= value < min(self.src_vocab, self.tgt_vocab):
                raise ValueError(
                    f"{name} = {value} is outside the vocabularies "
                    f"(src_vocab = {self.src_vocab}, tgt_vocab = {self.tgt_vocab})"
                )
        if self.tie_embeddings and self.embed_size != self.decoder_hidden:
            raise ValueError(
                f"tie_embeddings needs embed_size == decoder_hidden; got {self.embed_size} and "
                f"{self.decoder_hidden}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``Seq2SeqConfig(**d)`` rebuilds the config."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- encoder ----------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """The encoded source: ``memory`` (B, S, M) (exactly 0 at padding), ``mask`` (B, S) (True at
    valid positions), and the summary of the final states, ``h`` (B, F) and ``c`` (B, F_c) or None
    (see :func:`summarise_final_state`)."""

    memory: Tensor
    mask: Tensor
    h: Tensor
    c: Tensor | None


def summarise_final_state(layer: nn.Module, final: Any) -> tuple[Tensor, Tensor | None]:
    """The top layer's final state of an rnnkit layer, every direction concatenated.

    Returns ``(h, c)``: ``h`` (B, D * H), and the LSTM cell state ``c`` likewise (None for other
    cells). Reads any layer's state through :func:`rnnkit.top_states`.
    """
    directions = top_states(layer, final)
    h = torch.cat([d[0] for d in directions], -1)
    has_c = all(len(d) >= 2 for d in directions)
    return h, torch.cat([d[1] for d in directions], -1) if has_c else None


def _batch_first(layer: nn.Module) -> bool:
    if isinstance(layer, Stacked):
        return _batch_first(layer.layers[0])
    if isinstance(layer, Bidirectional):
        return _batch_first(layer.forward_layer)
    return bool(getattr(layer, "batch_first", False))


class Encoder(nn.Module):
    """Embedding + any rnnkit layer run with ``lengths=`` (no packing, no sorting)."""

    def __init__(self, embedding: nn.Embedding, layer: nn.Module, dropout: float) -> None:
        super().__init__()
        if layer.input_size != embedding.embedding_dim:
            raise ValueError(
                f"the encoder layer has input_size = {layer.input_size}; expected embed_size = "
                f"{embedding.embedding_dim}"
            )
        self.embedding = embedding
        self.layer = layer
        self.dropout = nn.Dropout(dropout)
        self.batch_first = _batch_first(layer)
        # Feature sizes of the final-state summary, found by encoding one step of zeros (in eval
        # mode, so that no dropout draws from the random number generator).
        training = layer.training
        layer.eval()
        with torch.no_grad():
            p = next(layer.parameters())
            x = torch.zeros(1, 1, layer.input_size, dtype=p.dtype, device=p.device)
            _, final = layer(x, None, lengths=torch.ones(1, dtype=torch.long, device=p.device))
            h, c = summarise_final_state(layer, final)
        layer.train(training)
        self.summary_sizes = (h.shape[-1], None if c is None else c.shape[-1])

    @property
    def output_size(self) -> int:
        return self.layer.output_size

    def forward(self, src: Tensor, lengths: Tensor) -> EncoderOutput:
        x = self.dropout(self.embedding(src))  # (B, S, E)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (S, B, E)
        out, final = self.layer(x, None, lengths=lengths)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (B, S, M)
        h, c = summarise_final_state(self.layer, final)
        return EncoderOutput(out, length_mask(lengths, src.shape[1]), h, c)


def _default_encoder_layer(config: Seq2SeqConfig) -> nn.Module:
    c = config
    return make_encoder(
        c.encoder_cell, c.embed_size, c.encoder_hidden, c.encoder_layers, c.bidirectional, c.dropout
    )


# -- decoder state ----------------------------------------------------------------------------


def _map(fn: Any, tree: Any) -> Any:
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        return fn(tree)
    return tuple(_map(fn, t) for t in tree)


@dataclass
class DecoderState:
    """Everything the next decoder step needs, each tensor batch-first (B, ...).

    ``cells``: one cell state per decoder layer ((h, c) for LSTM, h for GRU); ``feed``: the last
    attentional state h~ (B, H) (zeros before the first step); ``weights``: the last attention
    weights (B, S); ``memory``, ``keys``, ``mask``: the encoded source, its precomputed attention
    keys and its validity mask.
    """

    cells: tuple[Any, ...]
    feed: Tensor
    weights: Tensor
    memory: Tensor
    keys: Tensor
    mask: Tensor

    def select(self, index: Tensor) -> DecoderState:
        """The states of rows ``index`` (a 1-D int64 tensor): reorder, repeat or drop rows."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return DecoderState(**{f.name: _map(pick, getattr(self, f.name)) for f in fields(self)})

    def reorder(self, index: Tensor) -> DecoderState:
        """Like :meth:`select`, for an ``index`` that moves rows only among rows with the same
        source (a beam's hypotheses): the source's memory, keys and mask stay where they are."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return replace(
            self, cells=_map(pick, self.cells), feed=pick(self.feed), weights=pick(self.weights)
        )

    @property
    def top(self) -> Tensor:
        """The top decoder layer's hidden state h (B, H)."""
        s = self.cells[-1]
        return s if isinstance(s, Tensor) else s[0]


@dataclass
class Hypotheses:
    """Decoded sequences: ``tokens`` (B, T) (EOS included where produced, ``pad_id`` after it),
    ``lengths`` (B,) (tokens up to and including EOS) and ``scores`` (B,) (the sum of the
    tokens' log-probabilities)."""

    tokens: Tensor
    lengths: Tensor
    scores: Tensor

    def to_lists(self, eos_id: int) -> list[list[int]]:
        """Each hypothesis as a list of token ids, EOS and padding removed."""
        out = []
        for row, n in zip(self.tokens.tolist(), self.lengths.tolist(), strict=True):
            row = row[:n]
            out.append(row[:-1] if row and row[-1] == eos_id else row)
        return out


# -- searches -------------------------------------------------------------------------------


class _Searches:
    """Greedy decoding and beam search over any decoder with ``config``, ``start(src,
    src_lengths) -> state`` and ``step(token, state) -> (logits, state)``, whose state has
    ``select``, ``reorder`` and ``feed``: a :class:`Seq2Seq`, or a :class:`Seq2SeqEnsemble`."""

    config: Seq2SeqConfig
    start: Any
    step: Any

    def _log_probs(self, logits: Tensor) -> Tensor:
        """Next-token log-probabilities; PAD and BOS are never generated."""
        logp = F.log_softmax(logits, dim=-1)
        logp[:, [self.config.pad_id, self.config.bos_id]] = -math.inf
        return logp

    @torch.no_grad()
    def greedy(
        self, src: Tensor, src_lengths: Any, max_len: int | Tensor | None = None
    ) -> Hypotheses:
        """Greedy decoding: the most probable token at each step, until EOS or ``max_len`` (one
        limit for all, or a (B,) tensor of one per source)."""
        c = self.config
        batch = src.shape[0]
        limits = _check_max_len(c.max_decode_len if max_len is None else max_len, batch, src.device)
        state = self.start(src, src_lengths)
        token = src.new_full((batch,), c.bos_id)
        done = torch.zeros(batch, dtype=torch.bool, device=src.device)
        scores = state.feed.new_zeros(batch)
        lengths = torch.zeros(batch, dtype=torch.long, device=src.device)
        out = []
        for t in range(int(limits.max()) if batch else 0):
            logits, state = self.step(token, state)
            best, token = self._log_probs(logits).max(-1)
            token = torch.where(done, c.pad_id, token)
            scores += torch.where(done, 0.0, best)
            lengths += ~done
            out.append(token)
            done |= (token == c.eos_id) | (limits <= t + 1)
            if bool(done.all()):
                break
        tokens = torch.stack(out, 1) if out else src.new_empty(batch, 0)
        return Hypotheses(tokens, lengths, scores)

    @torch.no_grad()
    def beam_search(
        self,
        src: Tensor,
        src_lengths: Any,
        beam_size: int | None = None,
        max_len: int | Tensor | None = None,
        length_penalty: float | None = None,
    ) -> Hypotheses:
        """Batched beam search; returns the best hypothesis of each source.

        Each source keeps ``beam_size`` hypotheses, ranked by the length-normalised score
        ``log p(y | x) / lp(|y|)``, ``lp(n) = ((5 + n) / 6) ** alpha`` (Wu et al., 2016; alpha =
        ``length_penalty``, 0 = no normalisation; |y| counts the EOS). At each step every live
        hypothesis is extended by every token, and a finished one (ended by EOS) competes
        unchanged with them for a place in the beam. The best finished hypothesis seen is kept
        even after longer ones push it out of the beam. The search ends when all hypotheses of
        all sources have finished, or after ``max_len`` tokens (one limit for all, or a (B,)
        tensor of one per source; then an unfinished hypothesis can win). All sources run as one
        batch of B * k rows; each source's result equals a search over it alone (with its own
        limit). With ``beam_size = 1`` it is greedy decoding.
        """
        k, limits, alpha = self._search_args(src, beam_size, max_len, length_penalty)
        return self._search(src, src_lengths, k, limits, alpha)

    def _search(
        self, src: Tensor, src_lengths: Any, k: int, limits: Tensor, alpha: float
    ) -> Hypotheses:
        """:meth:`beam_search` with its arguments checked."""
        return self._beam(src, src_lengths, k, limits, alpha).best

    def _search_args(
        self, src: Tensor, beam_size: Any, max_len: Any, length_penalty: Any
    ) -> tuple[int, Tensor, float]:
        """:meth:`beam_search`'s arguments checked, the config's where None: the beam size, the
        (B,) limits and the length penalty."""
        c = self.config
        k = c.beam_size if beam_size is None else beam_size
        alpha = _check_length_penalty(
            c.length_penalty if length_penalty is None else length_penalty
        )
        if isinstance(k, Tensor) or whole(k) is None or k <= 0:
            raise ValueError(f"beam_size = {k!r}; expected a positive integer")
        limit = c.max_decode_len if max_len is None else max_len
        return int(k), _check_max_len(limit, src.shape[0], src.device), alpha

    def _beam(self, src: Tensor, src_lengths: Any, k: int, limits: Tensor, alpha: float) -> _Beams:
        """The search of :meth:`beam_search` (checked arguments): its best hypotheses and the
        final beams."""
        c = self.config
        batch, vocab, device = src.shape[0], c.tgt_vocab, src.device

        def normalised(score: Tensor, length: Tensor) -> Tensor:
            return _normalised(score, length, alpha)

        rows = torch.arange(batch, device=device)
        state = self.start(src, src_lengths).select(rows.repeat_interleave(k))  # B * k rows
        token = src.new_full((batch * k,), c.bos_id)
        scores = state.feed.new_full((batch, k), -math.inf)
        scores[:, 0] = 0.0  # one live hypothesis to start with; the others are empty slots
        lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
        done = scores == -math.inf
        history = src.new_empty(batch, k, 0)
        # The best finished hypothesis of each source so far.
        none = scores.new_full((batch,), -math.inf)
        best = Hypotheses(src.new_empty(batch, 0), lengths[:, 0].clone(), none)
        best_ranked = none  # (B,) its normalised score, -inf = none yet
        for t in range(int(limits.max()) if batch else 0):
            logits, state = self.step(token, state)
            cand = scores.unsqueeze(-1) + self._log_probs(logits).view(batch, k, vocab)
            # A finished hypothesis has one continuation: itself, padded, its score unchanged.
            stay = torch.full_like(cand, -math.inf)
            stay[..., c.pad_id] = scores
            cand = torch.where(done.unsqueeze(-1), stay, cand)  # (B, k, V)
            new_lengths = lengths + (~done).long()
            ranked = normalised(cand, new_lengths.unsqueeze(-1)).view(batch, k * vocab)
            # (B, k), best first; one hypothesis as greedy decoding picks it (the first on a tie)
            top = ranked.max(1, keepdim=True).indices if k == 1 else ranked.topk(k, dim=1).indices
            beam, token = top // vocab, top % vocab
            scores = cand.view(batch, k * vocab).gather(1, top)
            lengths = new_lengths.gather(1, beam)
            was_done = done.gather(1, beam)
            done = was_done | (token == c.eos_id) | (scores == -math.inf)
            history = history.gather(1, beam.unsqueeze(-1).expand(-1, -1, history.shape[2]))
            history = torch.cat([history, token.unsqueeze(-1)], -1)  # (B, k, t + 1)
            state = state.reorder((beam + rows.unsqueeze(1) * k).view(-1))  # within each source
            token = token.view(-1)

            # Record hypotheses that finished at this step if they beat the best so far.
            just_done = (token.view(batch, k) == c.eos_id) & ~was_done
            ranked_done = torch.where(just_done, normalised(scores, lengths), -math.inf)
            value, slot = ranked_done.max(1)  # the first slot on a tie: the higher ranked
            better = value > best_ranked
            pick = slot.unsqueeze(1)
            padded = torch.cat([best.tokens, best.tokens.new_full((batch, 1), c.pad_id)], 1)
            best = Hypotheses(
                torch.where(better.unsqueeze(1), history[rows, slot], padded),
                torch.where(better, lengths.gather(1, pick).squeeze(1), best.lengths),
                torch.where(better, scores.gather(1, pick).squeeze(1), best.scores),
            )
            best_ranked = torch.where(better, value, best_ranked)
            done |= (limits <= t + 1).unsqueeze(1)  # a source at its limit: its beam stops
            if bool(done.all()):
                break
        # topk sorted the beams: slot 0 is the best hypothesis still in each beam (finished, or
        # cut at max_len). A recorded finished one wins ties: slot 0 may be that very one.
        top_ranked = normalised(scores[:, 0], lengths[:, 0])
        keep = (best_ranked >= top_ranked).unsqueeze(1)
        chosen = Hypotheses(
            torch.where(keep, best.tokens, history[:, 0]),
            torch.where(keep.squeeze(1), best.lengths, lengths[:, 0]),
            torch.where(keep.squeeze(1), best.scores, scores[:, 0]),
        )
        return _Beams(chosen, history, lengths, scores)


@dataclass
class _Beams:
    """A beam search's result: ``best`` (what :meth:`_Searches.beam_search` returns) and the final
    beams, ``tokens`` (B, k, T) with their ``lengths`` and ``scores`` (B, k) (-inf: an empty
    slot)."""

    best: Hypotheses
    tokens: Tensor
    lengths: Tensor
    scores: Tensor


def _normalised(score: Tensor, length: Tensor, alpha: float) -> Tensor:
    """``score / lp(length)``, ``lp(n) = ((5 + n) / 6) ** alpha``: the beam search's ranking."""
    return score / ((5.0 + length.to(score.dtype)) / 6.0) ** alpha


# -- the model --------------------------------------------------------------------------------


class Seq2Seq(_Searches, nn.Module):
    """Attentional encoder–decoder (see the module docstring for the equations).

    ``Seq2Seq(config, encoder=None, backend=None)``: ``encoder`` is any rnnkit layer reading
    ``embed_size`` features (default: ``rnnkit.LSTM`` with the config's sizes, bidirectional);
    ``backend`` names the backend of the decoder's whole-sequence runs (see
    :attr:`parallel_decoder`; None: the default). Call ``model.eval()`` before searching: dropout
    stays on in training mode.
    """

    def __init__(
        self, config: Seq2SeqConfig, encoder: nn.Module | None = None, backend: str | None = None
    ) -> None:
        super().__init__()
        self.config = c = config
        self.backend = backends.check_name(None if backend == backends.AUTO else backend)
        src_embed = nn.Embedding(c.src_vocab, c.embed_size, padding_idx=c.pad_id)
        layer = encoder if encoder is not None else _default_encoder_layer(c)
        self.encoder = Encoder(src_embed, layer, c.dropout)
        memory_size = self.encoder.output_size
        hidden = c.decoder_hidden

        self.attention: Attention = build_attention(
            c.attention, hidden, memory_size, c.attention_size
        )
        self.attend_before = self.attention.query_source == "previous"
        input_size = c.embed_size + (hidden if c.input_feeding else 0)
        input_size += memory_size if self.attend_before else 0
        cell = _DECODER_CELLS[c.decoder_cell]
        self.cells = nn.ModuleList(
            cell(input_size if k == 0 else hidden, hidden) for k in range(c.decoder_layers)
        )
        self.tgt_embedding = nn.Embedding(c.tgt_vocab, c.embed_size, padding_idx=c.pad_id)
        self.combine = nn.Linear(hidden + memory_size, hidden, bias=False)  # W_c
        self.generator = nn.Linear(hidden, c.tgt_vocab)  # W_o
        if c.tie_embeddings:
            self.generator.weight = self.tgt_embedding.weight
        self.dropout = nn.Dropout(c.dropout)

        if c.bridge == "linear":
            h_size, c_size = self.encoder.summary_sizes
            self.bridge_h = nn.Linear(h_size, c.decoder_layers * hidden)
            if c.decoder_cell == "lstm":
                self.bridge_c = nn.Linear(c_size or h_size, c.decoder_layers * hidden)

    # -- encoding and the initial state --------------------------------------------------------

    def encode(self, src: Tensor, src_lengths: Any) -> EncoderOutput:
        """Encode ``src`` (B, S) of lengths ``src_lengths`` (B,) (a tensor or a list)."""
        if src.dim() != 2:
            raise ValueError(f"src has shape {tuple(src.shape)}; expected (B, S) token ids")
        check_ids("src", src, self.config.src_vocab)
        lengths = L.as_lengths(src_lengths, src.shape[0], src.shape[1], src.device)
        return self.encoder(src, lengths)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """The decoder state before the first step: the bridge applied to the encoder's states."""
        c = self.config
        batch, hidden, layers = enc.memory.shape[0], c.decoder_hidden, c.decoder_layers
        if c.bridge == "linear":
            h0 = torch.tanh(self.bridge_h(enc.h)).view(batch, layers, hidden).unbind(1)
            if c.decoder_cell == "lstm":
                src_c = enc.c if enc.c is not None else enc.h
                c0 = self.bridge_c(src_c).view(batch, layers, hidden).unbind(1)
        else:
            h0 = (enc.memory.new_zeros(batch, hidden),) * layers
            c0 = h0
        cells = tuple(zip(h0, c0, strict=True)) if c.decoder_cell == "lstm" else tuple(h0)
        # zero at padded positions once per source (an encoder of rnnkit's makes them 0
        # already), so that each step attends without cleaning them again
        memory = clean(enc.memory, enc.mask)
        return DecoderState(
            cells=cells,
            feed=enc.memory.new_zeros(batch, hidden),
            weights=enc.memory.new_zeros(batch, enc.memory.shape[1]),
            memory=memory,
            keys=clean(self.attention.keys(memory), enc.mask),
            mask=enc.mask,
        )

    def start(self, src: Tensor, src_lengths: Any) -> DecoderState:
        """Encode the source and return the decoder's initial state (the streaming entry point)."""
        return self.init_state(self.encode(src, src_lengths))

    # -- one decoder step: the body of every decode loop ----------------------------------------

    def _advance(self, token: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """One step up to the attentional state h~_t (B, H), before the output layer."""
        parts = [self.dropout(self.tgt_embedding(token))]  # embed(y_{t-1})
        if self.config.input_feeding:
            parts.append(state.feed)  # h~_{t-1}
        if self.attend_before:  # Bahdanau: attend from s_{t-1}, feed c_t to the cell
            context, weights = self.attention.attend(
                state.top, state.memory, state.mask, state.keys
            )
            parts.append(context)
        x = torch.cat(parts, -1)
        cells = []
        for k, cell in enumerate(self.cells):
            if k:
                x = self.dropout(x)
            x, s = cell(x, state.cells[k])
            cells.append(s)
        if not self.attend_before:  # Luong: attend from s_t
            context, weights = self.attention.attend(x, state.memory, state.mask, state.keys)
        h_tilde = torch.tanh(self.combine(torch.cat([x, context], -1)))
        return h_tilde, replace(state, cells=tuple(cells), feed=h_tilde, weights=weights)

    def step(self, token: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """Feed ``token`` (B,) (the previous output; BOS first) -> (logits (B, V), next state).

        The attention weights of this step are ``next_state.weights`` (B, S).
        """
        batch = state.feed.shape[0]
        if not isinstance(token, Tensor) or token.dim() != 1 or token.shape[0] != batch:
            shape = tuple(token.shape) if isinstance(token, Tensor) else type(token).__name__
            raise ValueError(
                f"token has shape {shape}; expected (B,) = ({batch},), one previous token per "
                "row of the state"
            )
        check_ids("token", token, self.config.tgt_vocab)
        h_tilde, state = self._advance(token, state)
        return self.generator(self.dropout(h_tilde)), state

    # -- teacher forcing -------------------------------------------------------------------------

    @property
    def parallel_decoder(self) -> bool:
        """Whether teacher forcing runs the decoder over all steps at once (Luong attention
        without input feeding), rather than step by step."""
        return not self.config.input_feeding and not self.attend_before

    def _decode_all(self, state: DecoderState, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """h~ (B, T, H) and the attention weights (B, T, S) of all T steps of ``tgt_in`` at once:
        what T calls of :meth:`_advance` compute, when no step's cell input needs a context."""
        x = self.dropout(self.tgt_embedding(tgt_in))  # (B, T, E)
        for k, cell in enumerate(self.cells):
            if k:
                x = self.dropout(x)
            layer = Recurrent(cell, batch_first=True, backend=self.backend)  # shares the cell
            x, _ = layer.train(self.training)(x, state.cells[k])  # (B, T, H)
        context, weights = self.attention.attend(x, state.memory, state.mask, state.keys)  # all T
        return torch.tanh(self.combine(torch.cat([x, context], -1))), weights

    def forward(
        self,
        src: Tensor,
        src_lengths: Any,
        tgt_in: Tensor,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits (B, T, V) for decoder inputs ``tgt_in`` (B, T): BOS, y_1, ...

        With ``return_attention`` also the attention weights (B, T, S).
        """
        h_tilde, weights = self._attentional_states(src, src_lengths, tgt_in)
        # The output layer once over all steps: (B, T, H) -> (B, T, V).
        logits = self._output(self.dropout(h_tilde))
        return (logits, weights) if return_attention else logits

    def _attentional_states(
        self, src: Tensor, src_lengths: Any, tgt_in: Tensor
    ) -> tuple[Tensor, Tensor]:
        """h~ (B, T, H) and the attention weights (B, T, S) of teacher forcing ``tgt_in``."""
        if tgt_in.dim() != 2 or tgt_in.shape[0] != src.shape[0] or tgt_in.shape[1] == 0:
            raise ValueError(
                f"tgt_in has shape {tuple(tgt_in.shape)}; expected (B, T) token ids with "
                f"B = {src.shape[0]} and T >= 1"
            )
        check_ids("tgt_in", tgt_in, self.config.tgt_vocab)
        state = self.start(src, src_lengths)
        if self.parallel_decoder:
            return self._decode_all(state, tgt_in)
        h_tildes, steps = [], []
        for t in range(tgt_in.shape[1]):
            h_t, state = self._advance(tgt_in[:, t], state)
            h_tildes.append(h_t)
            steps.append(state.weights)
        return torch.stack(h_tildes, 1), torch.stack(steps, 1)

    def _output(self, h: Tensor) -> Tensor:
        """The output layer ``W_o h`` (float32 logits; bfloat16 products with ``bf16_output`` in
        training)."""
        if self.config.bf16_output and self.training:
            with torch.autocast(h.device.type, dtype=torch.bfloat16):
                return self.generator(h).float()
        return self.generator(h)

    def loss(
        self,
        src: Tensor,
        src_lengths: Any,
        tgt_in: Tensor,
        tgt_out: Tensor,
        label_smoothing: float = 0.0,
    ) -> Tensor:
        """Teacher-forced mean cross-entropy over the non-padding tokens of ``tgt_out`` (B, T).

        Equals ``sequence_loss(model(src, src_lengths, tgt_in), tgt_out, pad_id)``, but the output
        layer and softmax run on the non-padding positions only.
        """
        if tgt_out.shape != tgt_in.shape:
            raise ValueError(
                f"tgt_out has shape {tuple(tgt_out.shape)}; expected tgt_in's shape "
                f"{tuple(tgt_in.shape)}, one target per decoder input"
            )
        check_ids("tgt_out", tgt_out, self.config.tgt_vocab)
        h_tilde, _ = self._attentional_states(src, src_lengths, tgt_in)
        valid = tgt_out != self.config.pad_id  # (B, T)
        logits = self._output(self.dropout(h_tilde[valid]))  # (N, H) -> (N, V)
        if logits.shape[0] == 0:  # no target token: nothing to learn (not the mean of none, NaN)
            return logits.sum()
        return F.cross_entropy(logits, tgt_out[valid], label_smoothing=label_smoothing)


# -- ensembles ----------------------------------------------------------------------------------


@dataclass
class EnsembleState:
    """The decoder states of a :class:`Seq2SeqEnsemble`'s members, one per member, rows alike."""

    members: tuple[DecoderState, ...]

    def select(self, index: Tensor) -> EnsembleState:
        """Every member's :meth:`DecoderState.select`."""
        return EnsembleState(tuple(s.select(index) for s in self.members))

    def reorder(self, index: Tensor) -> EnsembleState:
        """Every member's :meth:`DecoderState.reorder`."""
        return EnsembleState(tuple(s.reorder(index) for s in self.members))

    @property
    def feed(self) -> Tensor:
        """The first member's last attentional state (B, H): its rows, dtype and device."""
        return self.members[0].feed

    @property
    def weights(self) -> Tensor:
        """The members' mean attention weights of the last step (B, S)."""
        return torch.stack([s.weights for s in self.members]).mean(0)


#: Candidates are rescored in slices of at most this many logits (or one candidate).
_RESCORE_LOGITS = 2**24


class _Group(_Searches):
    """Members searched together by the mean of their next-token probabilities."""

    def __init__(self, members: Sequence[Seq2Seq]) -> None:
        self.members = list(members)
        self.config = self.members[0].config

    def start(self, src: Tensor, src_lengths: Any) -> EnsembleState:
        return EnsembleState(tuple(m.start(src, src_lengths) for m in self.members))

    def step(self, token: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        if not isinstance(state, EnsembleState) or len(state.members) != len(self.members):
            raise ValueError(
                f"state is {type(state).__name__}; expected an EnsembleState of "
                f"{len(self.members)} members, from this ensemble's start()"
            )
        outs = [m.step(token, s) for m, s in zip(self.members, state.members, strict=True)]
        logits = average_probabilities([logits for logits, _ in outs])
        return logits, EnsembleState(tuple(s for _, s in outs))

    def forward(self, src: Tensor, src_lengths: Any, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        outs = [m(src, src_lengths, tgt_in, return_attention=True) for m in self.members]
        logits = average_probabilities([logits for logits, _ in outs])
        return logits, torch.stack([w for _, w in outs]).mean(0)


class Seq2SeqEnsemble(_Searches, nn.Module):
    """``size`` encoder–decoders from ``build()``, each from its own initialisation, trained side
    by side on the same batches; the ensemble decodes by the mean of their next-token
    probabilities.

    :meth:`step` returns the log of that mean (logits whose softmax is the mean probability), so
    :meth:`greedy` and :meth:`beam_search` search the ensemble as they search one model; the
    members are alike in their vocabularies, ids and search defaults (``config`` is the first
    member's). :meth:`loss` is the mean of the members' losses, so each member learns as it would
    alone; :meth:`forward` gives the teacher-forced logits of the mean probabilities (and the
    members' mean attention weights).

    With ``right_to_left = r`` > 0 the last r members learn every target reversed (``y_n ..
    y_1``, then EOS), and a search runs in both directions: each direction's members search
    together (a beam search by their mean probabilities), the hypotheses of every final beam
    (with each search's best) become candidates, and the candidate with the highest sum of the
    two directions' log-probabilities (each from its members' mean probabilities, EOS included),
    normalised by length as the beam search ranks (``length_penalty``), wins. Greedy decoding is
    that with beams of 1. :meth:`start`, :meth:`step` and :meth:`forward` then cover the
    left-to-right members only (a right-to-left member's probability at a step conditions on the
    tokens after it), and at least one member writes left to right.
    """

    def __init__(self, build: Callable[[], Seq2Seq], size: int, right_to_left: int = 0) -> None:
        super().__init__()
        if whole(size) is None or size < 1:
            raise ValueError(f"size = {size!r}; expected at least 1 member, an integer")
        r = whole(right_to_left)
        if r is None or not 0 <= r < size:
            raise ValueError(
                f"right_to_left = {right_to_left!r}; expected an integer from 0 to {size - 1}: "
                "at least one member writes left to right"
            )
        self.members = nn.ModuleList(build() for _ in range(int(size)))
        #: Whether each member writes its output right to left.
        self.reverse = tuple(k >= size - r for k in range(int(size)))
        first = self.members[0].config
        for k, m in enumerate(self.members):
            for name in ("src_vocab", "tgt_vocab", "pad_id", "bos_id", "eos_id"):
                if getattr(m.config, name) != getattr(first, name):
                    raise ValueError(
                        f"member {k} has {name} = {getattr(m.config, name)}; expected "
                        f"{getattr(first, name)}, as member 0: members decode one vocabulary"
                    )

    @property
    def config(self) -> Seq2SeqConfig:  # type: ignore[override]
        return self.members[0].config

    @property
    def encoder(self) -> Encoder:
        """The first member's encoder (the members' are alike but for their weights)."""
        return self.members[0].encoder

    def writing(self, reverse: bool) -> list[Seq2Seq]:
        """The members that write right to left (``reverse``) or left to right."""
        return [m for m, r in zip(self.members, self.reverse, strict=True) if r == reverse]

    def _group(self, reverse: bool) -> _Group:
        return _Group(self.writing(reverse))

    def start(self, src: Tensor, src_lengths: Any) -> EnsembleState:
        """Every (left-to-right) member's initial decoder state for ``src``."""
        return self._group(False).start(src, src_lengths)

    def step(self, token: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        """Feed ``token`` (B,) to every (left-to-right) member -> (log of the mean next-token
        probabilities (B, V), the next states)."""
        return self._group(False).step(token, state)

    def forward(
        self, src: Tensor, src_lengths: Any, tgt_in: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits (B, T, V) of the (left-to-right) members' mean probabilities;
        with ``return_attention`` also their mean attention weights (B, T, S)."""
        logits, weights = self._group(False).forward(src, src_lengths, tgt_in)
        return (logits, weights) if return_attention else logits

    def loss(
        self,
        src: Tensor,
        src_lengths: Any,
        tgt_in: Tensor,
        tgt_out: Tensor,
        label_smoothing: float = 0.0,
    ) -> Tensor:
        """The mean of the members' :meth:`Seq2Seq.loss` (a right-to-left member's on the
        targets reversed): each member learns as it would alone."""
        forward = (tgt_in, tgt_out)
        backward = reverse_targets(tgt_out, self.config) if any(self.reverse) else forward
        losses = []
        for m, r in zip(self.members, self.reverse, strict=True):
            inputs, targets = backward if r else forward
            losses.append(m.loss(src, src_lengths, inputs, targets, label_smoothing))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def greedy(
        self, src: Tensor, src_lengths: Any, max_len: int | Tensor | None = None
    ) -> Hypotheses:
        """Greedy decoding (with right-to-left members: of each direction, then rescored)."""
        if not any(self.reverse):
            return super().greedy(src, src_lengths, max_len)
        return self.beam_search(src, src_lengths, beam_size=1, max_len=max_len)

    def _search(
        self, src: Tensor, src_lengths: Any, k: int, limits: Tensor, alpha: float
    ) -> Hypotheses:
        """The beam search of :meth:`beam_search`; with right-to-left members, both directions'
        beams rescored (see the class docstring)."""
        if not any(self.reverse):
            return super()._search(src, src_lengths, k, limits, alpha)
        return self._rescored(src, src_lengths, k, limits, alpha)

    def _rescored(
        self, src: Tensor, src_lengths: Any, k: int, limits: Tensor, alpha: float
    ) -> Hypotheses:
        c = self.config
        batch, device = src.shape[0], src.device
        groups = [(self._group(r), r) for r in (False, True)]
        # Each source's candidates, left to right without EOS -> whether a search finished it.
        found: list[dict[tuple[int, ...], bool]] = [{} for _ in range(batch)]
        for group, reverse in groups:
            beams = group._beam(src, src_lengths, k, limits, alpha)
            best = beams.best
            tokens = torch.cat([best.tokens.unsqueeze(1), beams.tokens], 1).tolist()
            lengths = torch.cat([best.lengths.unsqueeze(1), beams.lengths], 1).tolist()
            live = torch.cat([best.scores.unsqueeze(1), beams.scores], 1) > -math.inf
            for b, j in live.nonzero().tolist():
                ids = tokens[b][j][: lengths[b][j]]
                finished = bool(ids) and ids[-1] == c.eos_id
                ids = ids[:-1] if finished else ids
                key = tuple(reversed(ids)) if reverse else tuple(ids)
                found[b][key] = found[b].get(key, False) or finished
        flat = [(b, ids) for b in range(batch) for ids in found[b]]
        if not flat:
            empty = src.new_empty(batch, 0)
            return Hypotheses(empty, src.new_zeros(batch), src.new_zeros(batch, dtype=torch.float))
        rows = torch.tensor([b for b, _ in flat], device=device)
        n = torch.tensor([len(ids) for _, ids in flat], device=device)
        width = max(1, int(n.max()))
        tgt = src.new_full((len(flat), width), c.pad_id)
        for j, (_, ids) in enumerate(flat):
            tgt[j, : len(ids)] = torch.tensor(ids, dtype=tgt.dtype)
        lengths = L.as_lengths(src_lengths, batch, src.shape[1], device)
        sub_src, sub_lengths = src[rows], lengths[rows]
        tgt_in, tgt_out = decoder_io(tgt, n, c)
        chunk = max(1, _RESCORE_LOGITS // ((width + 1) * c.tgt_vocab))
        parts = []
        for i in range(0, len(flat), chunk):
            part = slice(i, i + chunk)
            score = 0.0
            for group, reverse in groups:
                inputs, targets = tgt_in[part], tgt_out[part]
                if reverse:
                    inputs, targets = reverse_targets(targets, c)
                logits, _ = group.forward(sub_src[part], sub_lengths[part], inputs)
                wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
                logp = F.log_softmax(wide, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                score = score + logp.masked_fill(targets == c.pad_id, 0.0).sum(1)
            parts.append(score)
        total = torch.cat(parts)
        ranked = _normalised(total, n + 1, alpha).tolist()
        pick: dict[int, int] = {}
        for j, (b, _) in enumerate(flat):
            if b not in pick or ranked[j] > ranked[pick[b]]:
                pick[b] = j
        out = src.new_full((batch, width + 1), c.pad_id)
        out_lengths = src.new_zeros(batch)
        scores = total.new_zeros(batch)
        for b, j in pick.items():
            ids = list(flat[j][1]) + ([c.eos_id] if found[b][flat[j][1]] else [])
            out[b, : len(ids)] = torch.tensor(ids, dtype=out.dtype)
            out_lengths[b] = len(ids)
            scores[b] = total[j]
        return Hypotheses(out, out_lengths, scores)


def reverse_targets(tgt_out: Tensor, config: Seq2SeqConfig) -> tuple[Tensor, Tensor]:
    """A right-to-left decoder's teacher-forcing inputs and targets from a left-to-right
    ``tgt_out`` = [y_1 .. y_n, EOS] (B, T), padded with ``pad_id``: [BOS, y_n .. y_1] and
    [y_n .. y_1, EOS], both (B, T)."""
    held = (tgt_out != config.pad_id).sum(1)
    lengths = (held - 1).clamp(min=0)
    body = tgt_out[:, :-1]
    index = lengths.unsqueeze(1) - 1 - torch.arange(body.shape[1], device=body.device)
    tgt_in, out = decoder_io(body.gather(1, index.clamp(min=0)), lengths, config)
    # a row of padding alone (no target) stays one: nothing to learn there in either direction
    return tgt_in, out.masked_fill((held == 0).unsqueeze(1), config.pad_id)


def _check_length_penalty(alpha: Any) -> float:
    """``length_penalty`` (a finite number >= 0) as a float."""
    real = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not real or not 0 <= alpha < math.inf:
        raise ValueError(f"length_penalty = {alpha!r}; expected a finite number >= 0")
    return float(alpha)


def _check_max_len(max_len: Any, batch: int, device: torch.device) -> Tensor:
    """``max_len`` (a positive int, or a (B,) integer tensor of positive limits) as (B,) int64."""
    if isinstance(max_len, Tensor) and max_len.dim() == 0 and whole(max_len) is not None:
        max_len = whole(max_len)  # a 0-d integer tensor: one limit for every source
    if isinstance(max_len, Tensor):
        if (
            max_len.shape != (batch,)
            or max_len.dtype == torch.bool
            or max_len.dtype.is_floating_point
            or max_len.is_complex()
        ):
            raise ValueError(
                f"max_len has shape {tuple(max_len.shape)} and dtype {max_len.dtype}; expected "
                f"a positive integer or an integer tensor of shape ({batch},), one per source"
            )
        if batch and int(max_len.min()) <= 0:
            raise ValueError(f"max_len = {max_len.tolist()}; expected positive limits")
        return max_len.to(device, torch.long)
    limit = whole(max_len)
    if limit is None or limit <= 0:
        raise ValueError(f"max_len = {max_len!r}; expected a positive integer")
    return torch.full((batch,), limit, dtype=torch.long, device=device)


# -- training and inspection helpers --------------------------------------------------------------


def decoder_io(tgt: Tensor, tgt_lengths: Any, config: Seq2SeqConfig) -> tuple[Tensor, Tensor]:
    """Decoder inputs and targets for teacher forcing from right-padded targets ``tgt`` (B, T).

    Returns ``tgt_in`` = [BOS, y_1 .. y_n] and ``tgt_out`` = [y_1 .. y_n, EOS], both (B, T + 1)
    and padded with ``pad_id``.
    """
    lengths = L.as_lengths(tgt_lengths, tgt.shape[0], tgt.shape[1], tgt.device)
    valid = length_mask(lengths, tgt.shape[1])
    body = torch.where(valid, tgt, config.pad_id)
    tgt_in = torch.cat([body.new_full((tgt.shape[0], 1), config.bos_id), body], 1)
    tgt_out = torch.cat([body, body.new_full((tgt.shape[0], 1), config.pad_id)], 1)
    tgt_out.scatter_(1, lengths.unsqueeze(1), config.eos_id)
    return tgt_in, tgt_out


def sequence_loss(
    logits: Tensor, target: Tensor, pad_id: int, label_smoothing: float = 0.0
) -> Tensor:
    """Mean cross-entropy over the non-padding tokens of ``target`` (B, T); ``logits`` (B, T, V).
    0 where every token is padding (not the mean of none, NaN)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / (target != pad_id).sum().clamp(min=1)


def plot_attention(
    weights: Tensor,
    source: Sequence[str],
    target: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Save the attention weights of one example as a heatmap PNG; returns the path.

    ``weights`` (T, S) (e.g. ``model(src, lengths, tgt_in, return_attention=True)[1][b]``) is
    cropped to ``len(target)`` rows and ``len(source)`` columns, which label the axes.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot_attention needs matplotlib; install it with: pip install matplotlib"
        ) from None
    data = weights.detach().float().cpu()[: len(target), : len(source)].numpy()
    rows, cols = data.shape
    fig = Figure(figsize=(max(4.0, 0.35 * cols + 2.0), max(3.0, 0.35 * rows + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), list(source)[:cols], rotation=90)
    ax.set_yticks(range(rows), list(target)[:rows])
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)  # Figure renders with Agg; no pyplot state
    return path
