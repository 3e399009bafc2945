"""Character-level language model: embedding -> rnnkit recurrent stack -> next-character logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

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
        if not prompt:
            raise ValueError("prompt is empty; expected at least one id")
        if temperature < 0:
            raise ValueError(f"temperature = {temperature}; expected >= 0")
        was_training = self.training
        self.eval()
        try:
            return self._sample(prompt, length, temperature, generator, list(banned))
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
                probs = torch.softmax((last - last.max()) / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            out.append(nxt)
            logits, state = self(torch.tensor([[nxt]], device=device), state)
            last = logits[0, -1].float().cpu()
        return out
