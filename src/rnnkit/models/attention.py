"""Attention over an encoder's outputs: Bahdanau (additive) and Luong (dot, general, concat).

Every attention here computes, for a decoder query ``q`` (B, Q) and the encoder outputs (the
"memory") ``h_s`` (B, S, M) of S source positions:

    e_s = score(q, h_s)                         one score per source position
    a_s = exp(e_s) / sum_{s' valid} exp(e_s')   softmax over the valid positions only
    c   = sum_s a_s h_s                         the context vector, (B, M)

and returns ``(c, a)``. A query may also hold every decoder step at once, ``q`` (B, T, Q): then
``c`` is (B, T, M) and ``a`` (B, T, S), all steps scored in one batched product (a teacher-forced
decoder whose queries do not depend on earlier contexts uses this). Positions at or beyond a
source's length get weight exactly 0 (not a small number) and whatever they hold (even NaN or inf)
is ignored, so padding never leaks into the context or the gradients; a length-0 source gets
all-zero weights and a zero context. The variants differ only in ``score``.

The part of a score that depends on the memory alone (``W_k h_s``, ``W_a h_s``) is the same at
every decoder step: :meth:`Attention.keys` computes it once per source, and a decoder passes it to
every step (``keys=``) instead of recomputing it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import lengths as L
from ..cells.base import _check_size

__all__ = [
    "ATTENTIONS",
    "Attention",
    "BahdanauAttention",
    "LuongConcatAttention",
    "LuongDotAttention",
    "LuongGeneralAttention",
    "build_attention",
    "length_mask",
    "masked_softmax",
]


def length_mask(lengths: Tensor, steps: int) -> Tensor:
    """(B, S) bool mask, True at valid positions ``s < lengths[b]``."""
    return L.mask(lengths, steps).T


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dimension of ``scores`` (B, S) (or (B, T, S)), restricted to
    ``mask`` (B, S) (or one that broadcasts, e.g. (B, 1, S)).

    Masked positions get weight exactly 0; a row with no valid position is all zeros (no NaN, in
    the forward pass or the gradient).
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    # The lowest finite value rather than -inf: exp(lowest - max) is exactly 0 whenever the row has
    # a valid score, and a fully masked row stays finite; torch.where then zeroes masked positions.
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.where(mask, torch.softmax(filled, dim=-1), 0.0)


class Attention(nn.Module):
    """Base class: ``forward(query, memory, mask=None, keys=None) -> (context, weights)``.

    ``query`` (B, Q) or, for T steps at once, (B, T, Q); ``memory`` (B, S, M), ``mask`` (B, S)
    bool (True = valid; see :func:`length_mask`), ``keys`` = ``self.keys(memory)`` if
    precomputed. Returns ``context`` (B, M) and ``weights`` (B, S) ((B, T, M) and (B, T, S) for
    T steps). Subclasses define :meth:`score` (and :meth:`keys` when part of the score depends on
    the memory alone).

    ``query_source`` says which decoder state the attention reads: ``"current"`` (Luong: the state
    after this step's recurrent update) or ``"previous"`` (Bahdanau: the state before it).
    """

    query_source: str = "current"

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.query_size = query_size
        self.memory_size = memory_size

    def keys(self, memory: Tensor) -> Tensor:
        """The memory-only part of the score, computed once per source: (B, S, K)."""
        return memory

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unnormalised scores (B, T, S) of ``query`` (B, T, Q) against ``keys`` (B, S, K)."""
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        mask: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if memory.dim() != 3 or memory.shape[2] != self.memory_size:
            raise ValueError(
                f"memory has shape {tuple(memory.shape)}; expected (B, S, M) with M = "
                f"memory_size = {self.memory_size}"
            )
        if (
            query.dim() not in (2, 3)
            or query.shape[0] != memory.shape[0]
            or query.shape[-1] != self.query_size
        ):
            raise ValueError(
                f"query has shape {tuple(query.shape)}; expected (B, Q) or (B, T, Q) with "
                f"B = {memory.shape[0]} and Q = query_size = {self.query_size}"
            )
        if mask is not None and tuple(mask.shape) != tuple(memory.shape[:2]):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected (B, S) = {tuple(memory.shape[:2])}"
            )
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"mask has dtype {mask.dtype}; expected torch.bool (True = valid)")
        if keys is not None and (keys.dim() != 3 or keys.shape[:2] != memory.shape[:2]):
            raise ValueError(
                f"keys has shape {tuple(keys.shape)}; expected (B, S, K) with (B, S) = "
                f"{tuple(memory.shape[:2])}, as self.keys(memory) gives"
            )
        if mask is not None:
            # Padded positions may hold anything (NaN, inf): a zero weight times inf or NaN is
            # NaN, so they are zeroed before they meet the weights, in the context and the keys.
            memory, keys = clean(memory, mask), None if keys is None else clean(keys, mask)
        return self.attend(query, memory, mask, keys)

    def attend(
        self,
        query: Tensor,
        memory: Tensor,
        mask: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` without its checks, for a caller whose ``memory`` and ``keys`` hold
        finite values at padded positions (:func:`clean` once per source): a decoder that
        attends at every step pays for neither again."""
        if keys is None:
            keys = self.keys(memory)
        one_step = query.dim() == 2
        queries = query.unsqueeze(1) if one_step else query  # (B, T, Q)
        scores = self.score(queries, keys)  # (B, T, S)
        weights = masked_softmax(scores, None if mask is None else mask.unsqueeze(1))
        context = torch.bmm(weights, memory)  # (B, T, S) @ (B, S, M)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights

    def extra_repr(self) -> str:
        return f"query_size={self.query_size}, memory_size={self.memory_size}"


def clean(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` (B, S, n) with the positions where ``mask`` (B, S) is False set to 0."""
    return values.masked_fill(~mask.unsqueeze(-1), 0.0)


class _Additive(Attention):
    """Shared by Bahdanau and Luong-concat: ``e_s = v^T tanh(W_q q + W_k h_s + b)``."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int) -> None:
        super().__init__(query_size, memory_size)
        self.attention_size = attention_size
        self.query_proj = nn.Linear(query_size, attention_size, bias=False)  # W_q
        self.key_proj = nn.Linear(memory_size, attention_size, bias=True)  # W_k, b
        self.v = nn.Linear(attention_size, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        return self.key_proj(memory)  # (B, S, A)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        q = self.query_proj(query).unsqueeze(2)  # (B, T, 1, A)
        return self.v(torch.tanh(q + keys.unsqueeze(1))).squeeze(-1)  # (B, T, S, A) -> (B, T, S)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", attention_size={self.attention_size}"


class BahdanauAttention(_Additive):
    """Additive attention (Bahdanau, Cho and Bengio, 2015).

        e_s = v^T tanh(W_q s_{t-1} + W_k h_s + b)
        a   = softmax(e) over valid s;   c_t = sum_s a_s h_s

    The query is the decoder state *before* this step's update (``query_source = "previous"``);
    the context then enters the recurrent cell's input.
    """

    query_source = "previous"


class LuongConcatAttention(_Additive):
    """Luong et al. (2015) "concat" score.

        e_s = v^T tanh(W_a [h_t; h_s])  =  v^T tanh(W_q h_t + W_k h_s + b)
        a   = softmax(e) over valid s;   c_t = sum_s a_s h_s

    ``W_a`` is kept as its two blocks so that ``W_k h_s`` is computed once per source. The query
    is the decoder state after this step's update.
    """


class LuongDotAttention(Attention):
    """Luong et al. (2015) "dot" score.

        e_s = h_t^T h_s
        a   = softmax(e) over valid s;   c_t = sum_s a_s h_s

    No parameters; needs ``query_size == memory_size``.
    """

    def __init__(self, query_size: int, memory_size: int, attention_size: int = 0) -> None:
        if query_size != memory_size:
            raise ValueError(
                f"dot attention needs query_size == memory_size; got {query_size} and "
                f"{memory_size} (use 'general' to score states of different sizes)"
            )
        super().__init__(query_size, memory_size)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, T, M) @ (B, M, S)


class LuongGeneralAttention(Attention):
    """Luong et al. (2015) "general" (bilinear) score.

        e_s = h_t^T W_a h_s
        a   = softmax(e) over valid s;   c_t = sum_s a_s h_s

    ``W_a h_s`` is computed once per source.
    """

    def __init__(self, query_size: int, memory_size: int, attention_size: int = 0) -> None:
        super().__init__(query_size, memory_size)
        self.key_proj = nn.Linear(memory_size, query_size, bias=False)  # W_a

    def keys(self, memory: Tensor) -> Tensor:
        return self.key_proj(memory)  # (B, S, Q)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, T, Q) @ (B, Q, S)


#: Attention variants by name, as :class:`rnnkit.models.seq2seq.Seq2SeqConfig` names them.
ATTENTIONS: dict[str, type[Attention]] = {
    "bahdanau": BahdanauAttention,
    "dot": LuongDotAttention,
    "general": LuongGeneralAttention,
    "concat": LuongConcatAttention,
}


def build_attention(name: str, query_size: int, memory_size: int, attention_size: int) -> Attention:
    """Build the attention called ``name`` (a key of :data:`ATTENTIONS`)."""
    try:
        cls = ATTENTIONS[name]
    except KeyError:
        raise ValueError(
            f"attention = {name!r} is not an attention; expected one of {tuple(ATTENTIONS)}"
        ) from None
    _check_size("query_size", query_size)
    _check_size("memory_size", memory_size)
    _check_size("attention_size", attention_size)
    return cls(query_size, memory_size, attention_size)
