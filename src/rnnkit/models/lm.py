"""Character-level language model: embedding -> rnnkit recurrent stack -> next-character logits."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_ids, whole
from .classifier import make_encoder

__all__ = ["CharLM"]


class CharLM(nn.Module):
    """Next-character model: ``forward(x (B, T), state=None) -> (logits (B, T, V), state)``.

    :meth:`sample` generates text after a prompt.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int = 64,
        cell: str = "lstm",
        hidden_size: int = 512,
        num_layers: int = 1,
        dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.encoder = make_encoder(
            cell, embed_size, hidden_size, num_layers, False, dropout, backend
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        check_ids("x", x, self.embedding.num_embeddings)
        out, state = self.encoder(self.embedding(x), state)
        return self.head(self.dropout(out)), state

    def explain(self, x: Tensor) -> Any:
        """Which backend the recurrent stack runs on for this batch, and why."""
        from ..backends import explain

        with torch.no_grad():
            inp = self.embedding(x)
        return explain(self.encoder, inp.requires_grad_(self.training))

    @torch.no_grad()
    def sample(
        self,
        prompt: list[int],
        length: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        banned: Sequence[int] = (),
    ) -> list[int]:
        """``length`` ids drawn one at a time after reading ``prompt`` (at least one id); ids in
        ``banned`` (e.g. a vocabulary's special tokens) are never drawn.

        Temperature divides the logits: below 1 sharpens, above 1 flattens; 0 takes the most
        likely id each step.
        """
        vocab = self.head.out_features
        prompt, banned = _ids(prompt, "prompt", vocab), _ids(banned, "banned", vocab)
        if not prompt:
            raise ValueError("prompt is empty; expected at least one id")
        if whole(length) is None or length < 0:
            raise ValueError(f"length = {length!r}; expected a non-negative integer")
        if isinstance(temperature, Tensor) and temperature.numel() == 1:
            temperature = temperature.item()  # a one-element tensor as its number
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise ValueError(f"temperature = {temperature!r}; expected a number >= 0")
        if not temperature >= 0:  # NaN too
            raise ValueError(f"temperature = {temperature}; expected >= 0")
        temperature = float(temperature)
        if len(set(banned)) == vocab:
            raise ValueError(
                f"banned holds every id of the vocabulary (vocab_size = {vocab}); expected at "
                "least one id that may be drawn"
            )
        was_training = self.training
        self.eval()
        try:
            return self._sample(prompt, length, temperature, generator, banned)
        finally:
            self.train(was_training)

    def _sample(
        self,
        prompt: list[int],
        length: int,
        temperature: float,
        generator: torch.Generator | None,
        banned: list[int],
    ) -> list[int]:
        device = self.head.weight.device
        logits, state = self(torch.tensor([prompt], device=device))
        last = logits[0, -1].float().cpu()  # drawn on the CPU: the same text on every device
        out = []
        for _ in range(length):
            last[banned] = -math.inf
            if temperature == 0:
                nxt = int(last.argmax())
            else:
                # Shifted so that the largest logit is 0 before dividing: a temperature as small
                # as 1e-40 then sharpens towards the most likely id instead of overflowing.
                shifted = last - last.max()
                if float(torch.tensor(temperature, dtype=last.dtype)) in (0.0, math.inf):
                    # A temperature beyond float32's range (1e-320, 1e308, inf) divides in float64,
                    # and a banned id stays at -inf (rather than -inf / inf = NaN).
                    scaled = (shifted.double() / temperature).to(last.dtype)
                    scaled = torch.where(shifted == -math.inf, -math.inf, scaled)
                else:
                    scaled = shifted / temperature
                probs = torch.softmax(scaled, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            out.append(nxt)
            logits, state = self(torch.tensor([[nxt]], device=device), state)
            last = logits[0, -1].float().cpu()
        return out


def _ids(values: Sequence[int], name: str, vocab: int) -> list[int]:
    """``values`` (any iterable: a list, a NumPy array, a 1-D tensor) as a list of ids, or
    ValueError naming the first that is not in [0, vocab)."""
    try:
        ids = list(values)
    except TypeError:
        raise ValueError(
            f"{name} = {values!r}; expected a sequence of ids in [0, {vocab})"
        ) from None
    for k, i in enumerate(ids):
        if whole(i) is None or not 0 <= i < vocab:
            raise ValueError(f"{name}[{k}] = {i!r}; expected an id in [0, {vocab})")
    return [int(i) for i in ids]
