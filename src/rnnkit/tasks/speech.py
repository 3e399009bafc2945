"""``rnnkit train speech``: Japanese Vowels speaker identification from LPC cepstrum frames.

The official split (270 training utterances, 370 test) from the ``.ts`` files that sktime ships,
parsed by :mod:`rnnkit.data.japanese_vowels`; 27 training utterances (3 per speaker) are held out
for validation. Each of the 12 channels is standardised with the training split's mean and standard
deviation; utterances of 7-29 frames are batched with ``lengths=``.

The model is a bidirectional GRU with a convolutional branch beside it (LSTM-FCN with a GRU:
three batch-normalised convolutions of 128, 256 and 128 channels over 7, 5 and 3 frames, averaged
over the valid frames); the head reads the GRU's outputs pooled by mean and max over the valid
frames with the branch's average. With the branch, each epoch's batches are drawn at random
rather than by length, so that its batch statistics are like the data's. It trains for a fixed 60
epochs with a learning rate that falls along half a cosine to 0, and the weights of the last
epoch are kept: with 27 validation utterances (one error = 3.7 points), picking the epoch by
validation accuracy picks noise. ``--ensemble N`` trains N such models side by side and averages
their probabilities; ``--conv-channels`` adds a causal convolution over the frames before the
recurrence. The branch was chosen by 5-fold cross-validation on the 270 training utterances, and
one model rather than several by the minute a run may take: RECIPES.md gives the numbers.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..data import japanese_vowels
from ..errors import RecipeError
from ..models import ClassifierEnsemble, SequenceClassifier
from ..models.classifier import CELLS, POOLING
from .base import PredictOption, Task, TrainConfig, keep_option, option, schedule_option
from .common import ClassifierHooks, Examples, ensemble_option

__all__ = ["SpeechConfig", "SpeechTask"]


@dataclass
class SpeechConfig(TrainConfig):
    epochs: int = option(60, "most passes over the training split")
    batch_size: int = option(16, "sequences per batch")
    lr: float = option(3e-3, "learning rate (AdamW)")
    lr_schedule: str = schedule_option("cosine")
    keep: str = keep_option("last")
    patience: int = option(
        0, "stop after this many epochs without a better validation metric; 0 = never"
    )
    max_minutes: float = option(1.5, "stop training after this many minutes; 0 = no limit")
    cell: str = option("gru", "recurrent cell", tuple(CELLS))
    hidden_size: int = option(64, "hidden size per direction")
    num_layers: int = option(1, "stacked recurrent layers")
    bidirectional: bool = option(True, "read each utterance in both directions")
    dropout: float = option(0.2, "dropout on inputs, between layers and before the classifier")
    input_noise: float = option(
        0.0, "in training, add Gaussian noise of this standard deviation to the standardised frames"
    )
    pooling: str = option(
        "meanmax", "how encoder outputs become one vector (valid frames only)", POOLING
    )
    conv_channels: int = option(
        0, "channels of a causal convolution over the frames before the encoder; 0 = none"
    )
    conv_kernel: int = option(3, "frames each convolution output reads (itself and those before)")
    fcn_channels: int = option(
        128,
        "width C of a convolutional branch beside the encoder (LSTM-FCN: convolutions of C, 2C "
        "and C channels over 7, 5 and 3 frames, batch-normalised, averaged over the frames); "
        "0 = none",
    )
    ensemble: int = ensemble_option(1)


class SpeechTask(ClassifierHooks, Task):
    name = "speech"
    summary = (
        "Japanese Vowels: name the speaker (1 of 9) from 12 LPC cepstrum coefficients per frame"
    )
    Config = SpeechConfig
    metric = "accuracy"
    higher_is_better = True
    data_package = japanese_vowels.INSTALL
    data_modules = ("sktime", "aeon")
    example = "rnnkit train speech --out runs/speech"
    predict_example = "rnnkit predict runs/speech utterance.csv  (one frame of 12 numbers per line)"
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "stream": PredictOption(
            bool,
            False,
            "print the running prediction after every frame of one CSV (or - for standard "
            "input) as the frames arrive; a model trained with --no-bidirectional",
        ),
    }

    config: SpeechConfig

    def load_splits(self) -> dict[str, list[tuple[list[list[float]], str]]]:
        splits = japanese_vowels.load()
        if self.config.limit:  # a slice with every speaker: take the utterances round-robin
            speakers = len({label for _, label in splits["train"]})
            if self.config.limit < speakers:
                raise RecipeError(
                    f"limit = {self.config.limit}; expected --limit >= {speakers} (one utterance "
                    "of each speaker in every split), or 0 for all"
                )
            splits = {k: _round_robin(v)[: self.config.limit] for k, v in splits.items()}
        return splits

    def fit_vocab(self, train: list[tuple[list[list[float]], str]]) -> dict[str, Any]:
        frames = torch.tensor([f for series, _ in train for f in series], dtype=torch.float64)
        return {
            "labels": sorted({label for _, label in train}, key=lambda s: (len(s), s)),
            "mean": frames.mean(0).tolist(),
            "std": frames.std(0).clamp(min=1e-6).tolist(),
        }

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        labels = vocab["labels"]
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) for x in labels)
        ):
            raise ValueError(f"labels = {labels!r}; expected a list of the speakers' names")
        self.labels = list(labels)
        self.mean = torch.tensor(vocab["mean"], dtype=torch.float32)
        self.std = torch.tensor(vocab["std"], dtype=torch.float32)
        if self.mean.dim() != 1 or self.mean.numel() == 0 or self.std.shape != self.mean.shape:
            raise ValueError(
                f"mean has shape {tuple(self.mean.shape)} and std {tuple(self.std.shape)}; "
                "expected one number per channel in each, as many in both"
            )
        for name, t in (("mean", self.mean), ("std", self.std)):
            if not bool(torch.isfinite(t).all()) or (name == "std" and bool((t <= 0).any())):
                raise ValueError(f"{name} = {t.tolist()}; expected finite numbers (std > 0)")

    def features(self, series: list[list[float]]) -> torch.Tensor:
        x = torch.tensor(series, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] != len(self.mean) or x.shape[0] == 0:
            raise RecipeError(
                f"an utterance has shape {tuple(x.shape)}; expected (frames >= 1, {len(self.mean)})"
            )
        return (x - self.mean) / self.std

    def encode(self, examples: list[tuple[list[list[float]], str]]) -> Examples:
        index = {label: k for k, label in enumerate(self.labels)}
        unknown = sorted({label for _, label in examples} - set(index))
        if unknown:
            raise RecipeError(f"speakers {unknown} are not among the trained ones {self.labels}")
        seqs = [self.features(series) for series, _ in examples]
        return seqs, torch.tensor([index[label] for _, label in examples], dtype=torch.long)

    def epoch_batches(self, data: Examples, generator: torch.Generator) -> list[list[int]]:
        """With the convolutional branch, batches drawn at random: its batch normalisation learns
        from each batch's statistics, and batches of like lengths (which spare the encoder alone
        padding) are each unlike the data as a whole."""
        if not self.config.fcn_channels:
            return super().epoch_batches(data, generator)
        order = torch.randperm(len(data[0]), generator=generator).tolist()
        size = self.config.batch_size
        return [order[k : k + size] for k in range(0, len(order), size)]

    def build_model(self) -> SequenceClassifier | ClassifierEnsemble:
        c = self.config
        return self.classifier(
            input_size=len(self.mean),
            input_noise=c.input_noise,
            conv_channels=c.conv_channels,
            conv_kernel=c.conv_kernel,
            fcn_channels=c.fcn_channels,
        )

    def read_input(self, path_text: str) -> list[tuple[str, list[list[float]]]]:
        """Utterances in a ``.ts`` file (all of them) or a text/CSV file (one frame per line).

        Every value must be a number that float32 holds (finite, ``|x| <= 3.4e38``); the error
        names the line and column (CSV) or the utterance, frame and channel (``.ts``). A UTF-8
        byte order mark (spreadsheets write one) is not part of the text.
        """
        if not path_text.strip():
            raise RecipeError("an input is empty; expected the path of a .ts or .csv file")
        path = Path(path_text)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise RecipeError(f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                "expected a .ts file or a CSV of numbers, one frame per line"
            ) from None
        if path.suffix.lower() == ".ts":  # "T3.TS" too
            try:
                series, _, header = japanese_vowels.parse_ts(text, str(path))
            except ValueError as e:
                where = "" if str(e).startswith(str(path)) else f"{path}: "
                raise RecipeError(f"{where}{e}") from None
            for k, frames in enumerate(series):
                width = len(frames[0]) if frames else len(self.mean)
                if width != len(self.mean):
                    hint = (
                        " (the file does not say '@classLabel false', so the last field of each "
                        "line was read as its label)"
                        if width == len(self.mean) - 1 and "classlabel" not in header
                        else ""
                    )
                    raise RecipeError(
                        f"{path}#{k + 1} has {width} channels; expected {len(self.mean)}{hint}"
                    )
                for f, frame in enumerate(frames):
                    for c, value in enumerate(frame):
                        _check_value(value, f"{path}#{k + 1} frame {f + 1}, channel {c + 1}")
            if not series:
                raise RecipeError(
                    f"{path} holds no utterances; expected one data line per utterance after @data"
                )
            return [(f"{path}#{k + 1}", s) for k, s in enumerate(series)]
        frames = list(self._csv_frames(text.splitlines(), str(path)))
        if not frames:
            raise RecipeError(f"{path} holds no frames; expected one line of 12 numbers per frame")
        return [(str(path), frames)]

    def _csv_frames(self, lines: Iterable[str], name: str) -> Iterator[list[float]]:
        """The frames of CSV/text ``lines`` (one frame of numbers per line, separated by commas or
        by whitespace; blank lines skipped, an empty field between commas an error),
        each checked as it is read; errors name ``name``, the line and the column. A byte order
        mark opening the first line (a file or standard input) is skipped."""
        width = 0
        first = 0  # the line of the first frame
        for number, line in enumerate(lines, 1):
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            # Comma-separated (spaces around the commas allowed) or whitespace-separated; an
            # empty field between commas is an error, not a column silently dropped.
            fields = [f.strip() for f in line.split(",")] if "," in line else line.split()
            for c, field in enumerate(fields, 1):
                if not field:
                    raise RecipeError(
                        f"{name} line {number}, column {c} is empty; expected one frame of "
                        f"{len(self.mean)} numbers per line, separated by commas or spaces"
                    )
            if not width and len(fields) != len(self.mean):
                raise RecipeError(
                    f"{name} line {number} has {len(fields)} values; expected one frame of "
                    f"{len(self.mean)} numbers per line"
                )
            if width and len(fields) != width:
                raise RecipeError(
                    f"{name} line {number} has {len(fields)} values where line {first} has "
                    f"{width}; expected one frame of {len(self.mean)} numbers per line"
                )
            first, width = first or number, width or len(fields)
            frame = []
            for c, field in enumerate(fields, 1):
                where = f"{name} line {number}, column {c}"
                try:
                    value = float(field)
                except ValueError:
                    raise RecipeError(f"{where}: {field!r}; expected a number") from None
                frame.append(_check_value(value, where))
            yield frame

    def stream(self, model: Any, source: str) -> Iterator[str]:
        """The running prediction after every frame of ``source`` (a CSV/text file, or ``-`` for
        standard input), read line by line as the frames arrive: the encoder reads each frame
        once, from the state it reached (a unidirectional model). A source that ends before its
        first frame is an error, as it is without ``--stream``."""
        if self.config.bidirectional:
            raise RecipeError(
                "--stream needs a unidirectional model (a bidirectional one reads each utterance "
                "from its end too); train one with --no-bidirectional"
            )
        if self.config.fcn_channels:
            raise RecipeError(
                "--stream needs a model without the convolutional branch (it reads each "
                "utterance whole); train one with --fcn-channels 0 --no-bidirectional"
            )
        if source != "-" and Path(source).suffix.lower() == ".ts":
            raise RecipeError(
                f"--stream reads a CSV or text file of frames, one per line; {source} is a .ts "
                "file of whole utterances: predict it without --stream"
            )
        model.eval()
        reader = model.stream()
        if source == "-":
            lines: Iterable[str] = sys.stdin
        else:
            try:
                lines = open(source, encoding="utf-8")  # closed below
            except OSError as e:
                raise RecipeError(f"cannot read {source}: {e.strerror or e}") from None
        k = 0
        try:
            for k, frame in enumerate(self._csv_frames(lines, source), 1):
                x = self.to_device(self.features([frame]).unsqueeze(0))  # (1, 1, channels)
                probs = torch.softmax(reader.push(x).float(), dim=-1)[0]
                best = int(probs.argmax())
                yield f"frame {k}\tspeaker {self.labels[best]}\t{float(probs[best]):.3f}"
            if not k:
                what = "standard input" if source == "-" else source
                raise RecipeError(
                    f"{what} holds no frames; expected one line of {len(self.mean)} numbers per "
                    "frame"
                )
        except UnicodeDecodeError as e:
            raise RecipeError(f"{source} is not UTF-8 text ({e.reason})") from None
        finally:
            if lines is not sys.stdin:
                lines.close()  # type: ignore[union-attr]

    def predict(
        self, model: Any, inputs: list[str], options: dict[str, Any]
    ) -> list[str] | Iterator[str]:
        if options.get("stream"):
            if len(inputs) != 1:
                raise RecipeError(
                    f"--stream reads one source; got {len(inputs)} inputs (a file, or - for "
                    "standard input)"
                )
            return self.stream(model, inputs[0])
        items = [item for text in inputs for item in self.read_input(text)]
        results = self.classify(model, [self.features(series) for _, series in items])
        return [
            f"speaker {self.labels[k]}\t{p:.3f}\t{name}"
            for (k, p), (name, _) in zip(results, items, strict=True)
        ]


#: The largest magnitude a float32 feature can hold.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_value(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise RecipeError(f"{where}: {value}; expected a finite number")
    if abs(value) > FLOAT32_MAX:
        raise RecipeError(f"{where}: {value:g}; expected |x| <= {FLOAT32_MAX:.3g} (float32)")
    return value


def _round_robin(examples: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """The first utterance of each speaker, then the second of each, and so on."""
    by_speaker: dict[str, list[tuple[Any, str]]] = {}
    for example in examples:
        by_speaker.setdefault(example[1], []).append(example)
    rounds = itertools.zip_longest(*by_speaker.values())
    return [example for row in rounds for example in row if example is not None]
