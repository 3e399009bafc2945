"""Hooks shared by the classification recipes (sentiment, speech)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import bucket_batches, pad

__all__ = ["ClassifierHooks", "Examples"]

Examples = tuple[list[Tensor], Tensor]  # (sequences (L_i, ...), labels (N,))


class ClassifierHooks:
    """Batching, loss and evaluation for a model ``(x, lengths) -> logits`` on labelled data."""

    config: Any
    eval_batch_size = 256

    def epoch_batches(self, data: Examples, generator: torch.Generator) -> list[list[int]]:
        seqs, _ = data
        return bucket_batches([len(s) for s in seqs], self.config.batch_size, generator)

    def collate(self, data: Examples, batch: list[int]) -> dict[str, Tensor]:
        seqs, labels = data
        x, lengths = pad([seqs[i] for i in batch])
        return {"x": x, "lengths": lengths, "y": labels[batch]}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        logits = model(batch["x"], batch["lengths"])
        return F.cross_entropy(logits, batch["y"]), len(batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Examples) -> dict[str, float]:
        was_training = model.training
        model.eval()
        seqs, labels = data
        correct, total_loss = 0, 0.0
        for idx in bucket_batches([len(s) for s in seqs], self.eval_batch_size):
            b = self.collate(data, idx)
            logits = model(b["x"], b["lengths"])
            total_loss += float(F.cross_entropy(logits, b["y"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["y"]).sum())
        model.train(was_training)
        n = len(labels)
        return {"accuracy": correct / max(n, 1), "loss": total_loss / max(n, 1), "n": n}

    def explain(self, model: nn.Module, data: Examples) -> Any:
        seqs, _ = data
        b = self.collate(data, list(range(min(len(seqs), self.config.batch_size))))
        return model.explain(b["x"], b["lengths"])

    @torch.no_grad()
    def classify(self, model: nn.Module, seqs: list[Tensor]) -> list[tuple[int, float]]:
        """(predicted class, its probability) for each sequence."""
        model.eval()
        x, lengths = pad(seqs)
        probs = torch.softmax(model(x, lengths), dim=-1)
        best = probs.argmax(-1)
        return [(int(k), float(probs[i, k])) for i, k in enumerate(best)]
