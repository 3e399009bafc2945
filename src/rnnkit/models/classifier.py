"""Sequence classification: embed (or take features), encode with lengths=, pool, classify."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import lengths as L
from ..layers import GRU, LSTM, RNN, top_states
from ..regularisers import check_probability
from .attention import masked_softmax
from .checks import check_ids, whole

__all__ = [
    "CELLS",
    "POOLING",
    "ClassifierEnsemble",
    "ClassifierStream",
    "ConvBranch",
    "ConvFront",
    "EnsembleStream",
    "SelfAttentionPool",
    "SequenceClassifier",
    "make_encoder",
    "pool",
]

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
#: Poolings that need no parameters (:func:`pool`).
SIMPLE_POOLING = ("max", "mean", "meanmax", "last")
#: Every pooling of :class:`SequenceClassifier`: the simple ones, additive self-attention, and
#: self-attention concatenated with max pooling.
POOLING = (*SIMPLE_POOLING, "attention", "attention-max")


def make_encoder(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    backend: str | None = None,
) -> nn.Module:
    """A batch-first rnnkit ``LSTM``/``GRU``/``RNN`` (torch.nn's interface plus ``lengths=``)."""
    if cell not in CELLS:
        raise ValueError(f"cell = {cell!r}; expected one of {sorted(CELLS)}")
    return CELLS[cell](
        input_size,
        hidden_size,
        num_layers=num_layers,
        batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0,
        bidirectional=bidirectional,
        backend=None if backend == "auto" else backend,
    )


def _lengths_of(lengths: L.LengthsLike, x: Tensor) -> Tensor:
    """The lengths of the batch ``x`` (B, T, ...): a tensor or a list (or NumPy array),
    validated as every layer's ``lengths=`` is (before a pooling or front end reads them)."""
    return L.as_lengths(lengths, x.shape[0], x.shape[1], x.device)


def pool(
    out: Tensor, lengths: L.LengthsLike, how: str, h_n: Tensor | None = None, directions: int = 1
) -> Tensor:
    """Pool encoder outputs (B, T, F) over each sequence's valid steps only -> (B, F).

    "max" and "mean" never see padding; "meanmax" concatenates both (B, 2F); "last" concatenates
    the last layer's final states (``h_n``, (L*D, B, H), ``directions`` = D), which the layers take
    at each sequence's own last step. A length-0 sequence pools to zeros (or its initial state).
    ``lengths`` is a tensor or a list, as everywhere in rnnkit.
    """
    steps = out.shape[1]
    lengths = _lengths_of(lengths, out)
    valid = L.mask(lengths.to(out.device), steps).T.unsqueeze(-1)  # (B, T, 1)
    if how == "last":
        if h_n is None:
            raise ValueError("pooling 'last' needs the final states h_n")
        return torch.cat(list(h_n[-directions:]), dim=-1)  # (B, D*H)
    if how not in SIMPLE_POOLING:
        raise ValueError(f"pooling = {how!r}; expected one of {SIMPLE_POOLING}")
    count = valid.sum(1).clamp(min=1)  # (B, 1)
    mean = out.masked_fill(~valid, 0.0).sum(1) / count
    if how == "mean":
        return mean
    maxed = out.masked_fill(~valid, float("-inf")).amax(1)
    maxed = torch.where(lengths.to(out.device)[:, None] > 0, maxed, 0.0)
    return maxed if how == "max" else torch.cat([mean, maxed], dim=-1)


class SelfAttentionPool(nn.Module):
    """Additive self-attention over the valid steps of encoder outputs (Bahdanau-style scoring with
    a learnt query, as in Yang et al. 2016 and Lin et al. 2017):

        u_t = tanh(W h_t + b)                 (B, T, A)
        e_t = v^T u_t                         one score per step
        a   = softmax(e) over valid t only    padded steps get weight exactly 0
        c   = sum_t a_t h_t                   (B, F)

    ``forward(out (B, T, F), lengths (B,)) -> (c (B, F), a (B, T))``, ``lengths`` a tensor or
    a list. A length-0 sequence gets all-zero weights and a zero vector.
    """

    def __init__(self, features: int, attention_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, attention_size)  # W, b
        self.v = nn.Linear(attention_size, 1, bias=False)

    def scores(self, out: Tensor) -> Tensor:
        """The score e_t = v^T tanh(W h_t + b) of each step of ``out`` (B, T, F) -> (B, T)."""
        return self.v(torch.tanh(self.proj(out))).squeeze(-1)

    def forward(self, out: Tensor, lengths: L.LengthsLike) -> tuple[Tensor, Tensor]:
        lengths = _lengths_of(lengths, out)
        valid = L.mask(lengths.to(out.device), out.shape[1]).T  # (B, T)
        out = out.masked_fill(~valid.unsqueeze(-1), 0.0)  # padding may hold NaN or inf
        scores = self.scores(out)  # (B, T)
        weights = masked_softmax(scores, valid)  # (B, T)
        return torch.bmm(weights.unsqueeze(1), out).squeeze(1), weights  # (B, 1, T) @ (B, T, F)


class ConvFront(nn.Module):
    """A causal convolution over the steps before the recurrent encoder (the convolutional view
    of LSTM-FCN, Karim et al. 2018, here feeding the recurrence): for each step t,

        y_t = relu(b + sum_{j=0}^{k-1} W_j x_{t-j})     x_{t-j} = 0 before the first step

    ``forward(x (B, T, I), lengths (B,)) -> y (B, T, C)``: padded steps are zeroed before the
    convolution (so a sequence's outputs do not depend on its batch) and after it (outputs at
    padded steps are exactly 0). Causal, so a sequence read piece by piece gives the same outputs
    when each piece is preceded by the k-1 inputs before it (:meth:`step`).
    """

    def __init__(self, input_size: int, channels: int, kernel: int = 3) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError(f"kernel = {kernel}; expected >= 1")
        self.kernel = kernel
        self.conv = nn.Conv1d(input_size, channels, kernel)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        valid = L.mask(lengths.to(x.device), x.shape[1]).T.unsqueeze(-1)  # (B, T, 1)
        x = x.masked_fill(~valid, 0.0).transpose(1, 2)  # (B, I, T)
        y = torch.relu(self.conv(nn.functional.pad(x, (self.kernel - 1, 0))))  # (B, C, T)
        return y.transpose(1, 2).masked_fill(~valid, 0.0)

    def step(self, x: Tensor, before: Tensor | None) -> tuple[Tensor, Tensor]:
        """The outputs (B, n, C) of the next ``n`` steps ``x`` (B, n, I) of unpadded sequences,
        given the ``k - 1`` inputs ``before`` them (B, k-1, I; None at the start: zeros); returns
        them and the ``k - 1`` inputs to give with the next piece."""
        if before is None:
            before = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        seen = torch.cat([before, x], dim=1)  # (B, k-1+n, I)
        y = torch.relu(self.conv(seen.transpose(1, 2))).transpose(1, 2)  # (B, n, C)
        return y, seen[:, seen.shape[1] - (self.kernel - 1) :]


class ConvBranch(nn.Module):
    """The fully convolutional branch of LSTM-FCN, beside the recurrent encoder: three
    convolutions over the steps, of ``channels``, 2 x ``channels`` and ``channels`` outputs, each
    reading the 7, 5 and 3 steps centred on its own, batch-normalised and through a ReLU; the mean
    over the valid steps is the branch's summary (B, ``channels``), which the classifier's head
    reads beside the encoder's pooled outputs.

    Padding never reaches a valid step: the steps past each sequence's length are zeroed before
    every convolution (so in evaluation a sequence's summary does not depend on its batch), and in
    training the normalisation's batch statistics count the valid steps only. Under torchrun each
    process normalises by the statistics of its own part of the batch, as ``nn.BatchNorm1d`` does
    without ``SyncBatchNorm``; the running statistics are rank 0's, which DistributedDataParallel
    hands to the others.
    """

    KERNELS = (7, 5, 3)

    def __init__(self, input_size: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        size = input_size
        for width, kernel in zip((channels, 2 * channels, channels), self.KERNELS, strict=True):
            self.convs.append(nn.Conv1d(size, width, kernel, padding=kernel // 2))
            self.norms.append(nn.BatchNorm1d(width))
            size = width

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x (B, T, I) and lengths (B,) -> (B, channels)."""
        valid = L.mask(lengths.to(x.device), x.shape[1]).T.unsqueeze(1).to(x.dtype)  # (B, 1, T)
        y = x.transpose(1, 2) * valid
        for conv, norm in zip(self.convs, self.norms, strict=True):
            y = torch.relu(_masked_batch_norm(norm, conv(y), valid)) * valid
        return y.sum(-1) / valid.sum(-1).clamp(min=1)


def _masked_batch_norm(norm: nn.BatchNorm1d, y: Tensor, valid: Tensor) -> Tensor:
    """``norm`` applied to y (B, C, T) with the statistics of its valid steps (``valid``
    (B, 1, T), 1 where a step is one) in training; the running statistics in evaluation."""
    if norm.training:
        n = valid.sum()
        count = n.clamp(min=1)
        mean = (y * valid).sum((0, 2)) / count
        var = ((y - mean[:, None]).square() * valid).sum((0, 2)) / count
        with torch.no_grad():  # a batch of length-0 sequences leaves them as they were
            seen = n > 0
            unbiased = var * (count / (count - 1).clamp(min=1))
            running_mean, running_var, m = norm.running_mean, norm.running_var, norm.momentum
            assert running_mean is not None and running_var is not None and m is not None
            running_mean.copy_(
                torch.where(seen, running_mean.lerp(mean.to(running_mean), m), running_mean)
            )
            running_var.copy_(
                torch.where(seen, running_var.lerp(unbiased.to(running_var), m), running_var)
            )
    else:
        mean, var = norm.running_mean, norm.running_var
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    return (y - mean[:, None]) * scale[:, None] + norm.bias[:, None]


def _check_count(name: str, value: Any, least: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} = {value!r}; expected an integer >= {least}")


class SequenceClassifier(nn.Module):
    """Tokens or feature frames -> rnnkit recurrent encoder (``lengths=``) -> pooling -> logits.

    Give ``vocab_size`` for token ids (B, T) (an embedding of ``embed_size``, id 0 = padding,
    ``unk_id`` = unknown) or ``input_size`` for feature frames (B, T, input_size).
    ``forward(x, lengths) -> (B, classes)``; ``forward(x, lengths, return_attention=True)`` also
    returns the attention weights (B, T) of the attention poolings (None for the others).

    ``pooling``: "max", "mean", "meanmax" (both concatenated), "last" (final states), "attention"
    (:class:`SelfAttentionPool`) or "attention-max" (attention and max pooling concatenated); each
    reads the valid steps only. ``conv_channels`` > 0 puts a :class:`ConvFront` of that many
    channels (kernel ``conv_kernel``) between the input and the encoder; ``fcn_channels`` > 0 puts
    a :class:`ConvBranch` of that width beside the encoder (LSTM-FCN), its summary read by the
    head with the pooled outputs. ``vectors`` (vocab_size,
    embed_size) initialises the embedding
    (pretrained word vectors); ``frozen`` (vocab_size,) bool marks rows that training leaves as
    they are (their gradient is zeroed), e.g. the words that have a pretrained vector.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        vocab_size: int | None = None,
        input_size: int | None = None,
        embed_size: int = 128,
        cell: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        pooling: str = "max",
        token_dropout: float = 0.0,
        backend: str | None = None,
        attention_size: int | None = None,
        unk_id: int = 1,
        input_noise: float = 0.0,
        vectors: Tensor | None = None,
        frozen: Tensor | None = None,
        conv_channels: int = 0,
        conv_kernel: int = 3,
        fcn_channels: int = 0,
    ) -> None:
        super().__init__()
        if (vocab_size is None) == (input_size is None):
            raise ValueError("give exactly one of vocab_size (token ids) or input_size (features)")
        _check_count("num_classes", num_classes, 1)
        for name, size in (("vocab_size", vocab_size), ("input_size", input_size)):
            if size is not None:
                _check_count(name, size, 1)
        _check_count("conv_channels", conv_channels, 0)
        _check_count("fcn_channels", fcn_channels, 0)
        check_probability("token_dropout", token_dropout, one=True)
        noise_ok = isinstance(input_noise, int | float) and not isinstance(input_noise, bool)
        if not noise_ok or not 0 <= input_noise < math.inf:
            raise ValueError(f"input_noise = {input_noise!r}; expected a finite number >= 0")
        if vocab_size is not None and token_dropout > 0 and not 0 <= unk_id < vocab_size:
            raise ValueError(f"unk_id = {unk_id!r}; expected an id in [0, {vocab_size})")
        if pooling not in POOLING:
            raise ValueError(f"pooling = {pooling!r}; expected one of {POOLING}")
        self.embedding = None
        self.register_buffer("frozen_rows", None, persistent=False)
        if vocab_size is not None:
            self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=0)
            input_size = embed_size
            if vectors is not None:
                if tuple(vectors.shape) != (vocab_size, embed_size):
                    raise ValueError(
                        f"vectors have shape {tuple(vectors.shape)}; expected (vocab_size, "
                        f"embed_size) = ({vocab_size}, {embed_size})"
                    )
                with torch.no_grad():
                    self.embedding.weight.copy_(vectors)
                    self.embedding.weight[0] = 0.0  # padding
            if frozen is not None:
                if tuple(frozen.shape) != (vocab_size,):
                    raise ValueError(
                        f"frozen has shape {tuple(frozen.shape)}; expected (vocab_size,) = "
                        f"({vocab_size},)"
                    )
                # Applied in :meth:`inputs` rather than as a gradient hook on the weight, which
                # a copy of the model (deepcopy, pickle, torch.save) would not carry.
                self.frozen_rows = frozen.to(torch.bool, copy=True)
        elif vectors is not None or frozen is not None:
            raise ValueError("vectors and frozen need vocab_size (token ids)")
        self.branch = None
        if fcn_channels:
            self.branch = ConvBranch(input_size, fcn_channels)
        self.front = None
        if conv_channels:
            self.front = ConvFront(input_size, conv_channels, conv_kernel)
            input_size = conv_channels
        self.dropout = nn.Dropout(dropout)
        self.encoder = make_encoder(
            cell, input_size, hidden_size, num_layers, bidirectional, dropout, backend
        )
        self.pooling = pooling
        self.token_dropout = token_dropout
        self.unk_id = unk_id
        self.input_noise = input_noise
        self.directions = 2 if bidirectional else 1
        width = hidden_size * self.directions  # the encoder's output features F
        self.attention = None
        if pooling.startswith("attention"):
            self.attention = SelfAttentionPool(width, attention_size or width)
        features = width * (2 if pooling in ("meanmax", "attention-max") else 1) + fcn_channels
        self.head = nn.Linear(features, num_classes)

    def check_input(self, x: Any) -> None:
        """ValueError (or TypeError) unless ``x`` is what the model reads: token ids (B, T) in
        ``[0, vocab_size)``, or feature frames (B, T, input_size)."""
        tokens = self.embedding is not None
        expected = "(B, T) token ids" if tokens else "(B, T, features) frames"
        if not isinstance(x, Tensor) or x.dim() != (2 if tokens else 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x has shape {shape}; expected {expected}")
        if tokens:
            check_ids("x", x, self.embedding.num_embeddings)

    def inputs(self, x: Tensor) -> Tensor:
        """Embedded tokens or the features (B, T, I), before the convolution and dropout.

        In training, ``token_dropout`` replaces that fraction of the tokens by the unknown-token id
        ``unk_id`` (padding stays padding), so the model cannot lean on any single word; features
        get Gaussian noise of standard deviation ``input_noise`` added.
        """
        if self.embedding is None:
            if self.training and self.input_noise > 0:
                x = x + self.input_noise * torch.randn_like(x)
            return x
        if self.training and self.token_dropout > 0:
            drop = torch.rand(x.shape, device=x.device) < self.token_dropout
            x = torch.where(drop & (x != 0), self.unk_id, x)
        embedded = self.embedding(x)
        if self.frozen_rows is not None and embedded.requires_grad:
            # The same values, but no gradient reaches the frozen rows of the weight.
            frozen = self.frozen_rows[x].unsqueeze(-1)  # (B, T, 1)
            embedded = torch.where(frozen, embedded.detach(), embedded)
        return embedded

    def encoder_input(self, inp: Tensor, lengths: Tensor) -> Tensor:
        """What the recurrent encoder reads of :meth:`inputs`' ``inp``: it through the
        convolution (if any), after dropout."""
        if self.front is not None:
            inp = self.front(inp, lengths)
        return self.dropout(inp)

    def forward(
        self, x: Tensor, lengths: L.LengthsLike, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        self.check_input(x)
        lengths = _lengths_of(lengths, x)
        inp = self.inputs(x)
        summary = self.branch(inp, lengths) if self.branch is not None else None
        out, state = self.encoder(self.encoder_input(inp, lengths), lengths=lengths)
        return self.classify(out, lengths, state, return_attention, summary)

    def classify(
        self,
        out: Tensor,
        lengths: Tensor,
        state: Any,
        return_attention: bool = False,
        summary: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits (B, classes) from the encoder's outputs (B, T, F) and final state, and the
        :class:`ConvBranch`'s ``summary`` (B, fcn_channels) when the model has one."""
        weights = None
        if self.attention is not None:
            pooled, weights = self.attention(out, lengths)
            if self.pooling == "attention-max":
                pooled = torch.cat([pooled, pool(out, lengths, "max")], dim=-1)
        else:
            top = torch.stack([d[0] for d in top_states(self.encoder, state)])  # (D, B, H)
            pooled = pool(out, lengths, self.pooling, top, self.directions)
        if summary is not None:
            pooled = torch.cat([pooled, summary.to(pooled.dtype)], dim=-1)
        logits = self.head(self.dropout(pooled))
        return (logits, weights) if return_attention else logits

    def stream(self) -> ClassifierStream:
        """A classifier that reads its sequences a few steps at a time: :meth:`ClassifierStream.push`
        returns the logits of everything read so far (a unidirectional encoder only)."""
        if self.directions != 1:
            raise ValueError(
                "a bidirectional encoder reads each sequence from its end too, so it cannot "
                "classify a sequence while it arrives; train a unidirectional model"
            )
        if self.branch is not None:
            raise ValueError(
                "the convolutional branch (fcn_channels) reads each sequence whole, so it cannot "
                "classify a sequence while it arrives; train a model without it"
            )
        return ClassifierStream(self)

    def explain(self, x: Tensor, lengths: L.LengthsLike) -> Any:
        """Which backend the encoder runs on for this batch, and why (:func:`rnnkit.explain`)."""
        from ..backends import explain

        lengths = _lengths_of(lengths, x)
        with torch.no_grad():  # no dropout here: explaining draws nothing from the RNG
            inp = self.embedding(x) if self.embedding is not None else x
            if self.front is not None:
                inp = self.front(inp, lengths)
        return explain(self.encoder, inp.requires_grad_(self.training), lengths=lengths)


class ClassifierStream:
    """A :class:`SequenceClassifier` over sequences that arrive a few steps at a time: the encoder
    reads each new piece once, from the state it reached (streaming inference), and the pooling
    keeps running totals of the outputs so far (their sum, their maximum, and for attention the
    softmax's running normaliser), so :meth:`push` gives the logits the model gives for the
    sequences read so far (to rounding) at a cost per piece that does not grow with the steps
    already read."""

    def __init__(self, model: SequenceClassifier) -> None:
        self.model = model
        self.state: Any = None
        self.before: Tensor | None = None  # the convolution's last k-1 inputs
        self.steps = 0
        self.total: Tensor | None = None  # (B, F) the sum of the outputs so far
        self.peak: Tensor | None = None  # (B, F) their maximum
        # Attention: the largest score so far (B, 1), and the sums of exp(score - largest)
        # (B, 1) and of exp(score - largest) * output (B, F).
        self.top_score: Tensor | None = None
        self.norm: Tensor | None = None
        self.weighted: Tensor | None = None

    @torch.no_grad()
    def push(self, x: Tensor) -> Tensor:
        """Read the next steps ``x`` (B, n) token ids or (B, n, features) of every sequence;
        returns the logits (B, classes) of the sequences read so far."""
        model = self.model
        model.check_input(x)
        inp = model.inputs(x)
        if model.front is not None:
            inp, self.before = model.front.step(inp, self.before)
        out, self.state = model.encoder(model.dropout(inp), self.state)  # (B, n, F)
        if model.pooling == "last":  # the final states alone
            lengths = torch.full((out.shape[0],), out.shape[1], device=out.device)
            return model.classify(out, lengths, self.state)
        self._add(out)
        parts = []
        if model.attention is not None:
            parts.append(self.weighted / self.norm)  # type: ignore[operator]
        if model.pooling in ("mean", "meanmax"):
            parts.append(self.total / self.steps)  # type: ignore[operator]
        if model.pooling in ("max", "meanmax", "attention-max"):
            parts.append(self.peak)
        return model.head(model.dropout(torch.cat(parts, dim=-1)))  # type: ignore[arg-type]

    def _add(self, out: Tensor) -> None:
        """Fold the outputs ``out`` (B, n, F) of the next n steps into the running totals."""
        self.steps += out.shape[1]
        total, peak = out.sum(1), out.amax(1)
        self.total = total if self.total is None else self.total + total
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        attention = self.model.attention
        if attention is None:
            return
        scores = attention.scores(out).unsqueeze(-1)  # (B, n, 1)
        top = scores.amax(1)  # (B, 1)
        if self.top_score is not None:
            top = torch.maximum(top, self.top_score)
        e = torch.exp(scores - top.unsqueeze(1))  # (B, n, 1)
        norm, weighted = e.sum(1), (e * out).sum(1)
        if self.top_score is not None:  # the earlier sums, rescaled to the new largest score
            rescale = torch.exp(self.top_score - top)
            norm, weighted = norm + self.norm * rescale, weighted + self.weighted * rescale
        self.top_score, self.norm, self.weighted = top, norm, weighted


class ClassifierEnsemble(nn.Module):
    """``size`` classifiers from ``build()``, each from its own initialisation, trained side by
    side on the same batches; the ensemble predicts the mean of their class probabilities.

    ``forward(x, lengths)`` returns the log of that mean, logits (B, classes) whose softmax is
    the mean probability; ``forward(x, lengths, members=True)`` returns each member's own logits
    (size, B, classes), which training scores one by one (the mean of the members' losses), so
    each member learns as it would alone. With ``return_attention=True`` the attention weights
    (None for poolings without attention) come second: the members' mean (B, T), or with
    ``members=True`` each member's own (size, B, T). :meth:`stream` and :meth:`explain` work as
    on one member.
    """

    def __init__(self, build: Callable[[], SequenceClassifier], size: int) -> None:
        super().__init__()
        if whole(size) is None or size < 1:  # an int or a NumPy integer, not a bool
            raise ValueError(f"size = {size!r}; expected at least 1 member, an integer")
        self.members = nn.ModuleList(build() for _ in range(int(size)))

    @property
    def pooling(self) -> str:
        return self.members[0].pooling

    @property
    def attention(self) -> SelfAttentionPool | None:
        return self.members[0].attention

    def forward(
        self, x: Tensor, lengths: Tensor, return_attention: bool = False, members: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        outs = [m(x, lengths, return_attention=True) for m in self.members]
        weights = [w for _, w in outs if w is not None]
        if members:
            logits = torch.stack([logits for logits, _ in outs])  # (size, B, classes)
            if not return_attention:
                return logits
            return logits, (torch.stack(weights) if weights else None)  # (size, B, T)
        logits = average_probabilities([logits for logits, _ in outs])
        if not return_attention:
            return logits
        return logits, (torch.stack(weights).mean(0) if weights else None)

    def stream(self) -> EnsembleStream:
        """Every member read as a :class:`ClassifierStream` (a unidirectional encoder only)."""
        return EnsembleStream([m.stream() for m in self.members])

    def explain(self, x: Tensor, lengths: Tensor) -> Any:
        """Which backend the members' encoders run on (they are alike), and why."""
        return self.members[0].explain(x, lengths)


class EnsembleStream:
    """A :class:`ClassifierEnsemble` over sequences that arrive a few steps at a time:
    :meth:`push` gives the logits the ensemble gives for the sequences read so far."""

    def __init__(self, members: list[ClassifierStream]) -> None:
        self.members = members

    @torch.no_grad()
    def push(self, x: Tensor) -> Tensor:
        return average_probabilities([m.push(x) for m in self.members])


def average_probabilities(logits: list[Tensor]) -> Tensor:
    """Logits whose softmax is the mean of the softmaxes of ``logits`` (each (..., classes)), in
    float32 or the logits' own wider dtype."""
    if len(logits) == 1:
        return logits[0]
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    logp = torch.stack([torch.log_softmax(z.to(dtype), dim=-1) for z in logits])
    return torch.logsumexp(logp, dim=0) - math.log(len(logits))
