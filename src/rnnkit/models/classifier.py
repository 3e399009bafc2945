"""Sequence classification: embed (or take features), encode with lengths=, pool, classify."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import lengths as L
from ..layers import GRU, LSTM, RNN, top_states

__all__ = ["CELLS", "POOLING", "SequenceClassifier", "make_encoder", "pool"]

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
POOLING = ("max", "mean", "meanmax", "last")


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


def pool(
    out: Tensor, lengths: Tensor, how: str, h_n: Tensor | None = None, directions: int = 1
) -> Tensor:
    """Pool encoder outputs (B, T, F) over each sequence's valid steps only -> (B, F).

    "max" and "mean" never see padding; "meanmax" concatenates both (B, 2F); "last" concatenates
    the last layer's final states (``h_n``, (L*D, B, H), ``directions`` = D), which the layers take
    at each sequence's own last step. A length-0 sequence pools to zeros (or its initial state).
    """
    steps = out.shape[1]
    valid = L.mask(lengths.to(out.device), steps).T.unsqueeze(-1)  # (B, T, 1)
    if how == "last":
        if h_n is None:
            raise ValueError("pooling 'last' needs the final states h_n")
        return torch.cat(list(h_n[-directions:]), dim=-1)  # (B, D*H)
    if how not in POOLING:
        raise ValueError(f"pooling = {how!r}; expected one of {POOLING}")
    count = valid.sum(1).clamp(min=1)  # (B, 1)
    mean = out.masked_fill(~valid, 0.0).sum(1) / count
    if how == "mean":
        return mean
    maxed = out.masked_fill(~valid, float("-inf")).amax(1)
    maxed = torch.where(lengths.to(out.device)[:, None] > 0, maxed, 0.0)
    return maxed if how == "max" else torch.cat([mean, maxed], dim=-1)


class SequenceClassifier(nn.Module):
    """Tokens or feature frames -> rnnkit recurrent encoder (``lengths=``) -> pooling -> logits.

    Give ``vocab_size`` for token ids (B, T) (an embedding of ``embed_size``, id 0 = padding, id 1
    = unknown) or ``input_size`` for feature frames (B, T, input_size).
    ``forward(x, lengths) -> (B, classes)``.
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
    ) -> None:
        super().__init__()
        if (vocab_size is None) == (input_size is None):
            raise ValueError("give exactly one of vocab_size (token ids) or input_size (features)")
        if pooling not in POOLING:
            raise ValueError(f"pooling = {pooling!r}; expected one of {POOLING}")
        self.embedding = None
        if vocab_size is not None:
            self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=0)
            input_size = embed_size
        self.dropout = nn.Dropout(dropout)
        self.encoder = make_encoder(
            cell, input_size, hidden_size, num_layers, bidirectional, dropout, backend
        )
        self.pooling = pooling
        self.token_dropout = token_dropout
        self.directions = 2 if bidirectional else 1
        features = hidden_size * (2 if bidirectional else 1) * (2 if pooling == "meanmax" else 1)
        self.head = nn.Linear(features, num_classes)

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the recurrent encoder reads: embedded tokens or the features, after dropout.

        In training, ``token_dropout`` replaces that fraction of the tokens by the unknown-token id
        1 (padding stays padding), so the model cannot lean on any single word.
        """
        if self.embedding is None:
            return self.dropout(x)
        if self.training and self.token_dropout > 0:
            drop = torch.rand(x.shape, device=x.device) < self.token_dropout
            x = torch.where(drop & (x != 0), 1, x)
        return self.dropout(self.embedding(x))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        out, state = self.encoder(self.encoder_input(x), lengths=lengths)
        top = torch.stack([d[0] for d in top_states(self.encoder, state)])  # (D, B, H)
        return self.head(self.dropout(pool(out, lengths, self.pooling, top, self.directions)))

    def explain(self, x: Tensor, lengths: Tensor) -> Any:
        """Which backend the encoder runs on for this batch, and why (:func:`rnnkit.explain`)."""
        from ..backends import explain

        with torch.no_grad():  # no dropout here: explaining draws nothing from the RNG
            inp = self.embedding(x) if self.embedding is not None else x
        return explain(self.encoder, inp.requires_grad_(self.training), lengths=lengths)
