"""What every recipe shares: the training options (:class:`TrainConfig`) and :class:`Task` hooks.

A task is a config dataclass (a subclass of :class:`TrainConfig` with its data and model options)
plus the hooks that :func:`rnnkit.train.train` calls: load the splits, build the vocabulary from
the training split, encode examples, batch them, compute the loss, evaluate, and predict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import backends

__all__ = [
    "KEEP",
    "SCHEDULES",
    "PredictOption",
    "Task",
    "TrainConfig",
    "decay_share_option",
    "flag",
    "keep_option",
    "option",
    "schedule_by_time_option",
    "schedule_option",
]


def option(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A config field with the help text (and choices) that the CLI shows for its flag."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None}
    return field(default=default, metadata=meta)


#: Options, by name in any task's config, that must be > 0 (sizes and counts).
POSITIVE = frozenset(
    {
        "epochs", "batch_size", "embed_size", "hidden_size", "num_layers", "encoder_layers",
        "decoder_hidden", "decoder_layers", "seq_len", "eval_streams", "beam_size",
        "valid_beam_size", "max_decode_len", "max_words", "min_count", "min_freq", "max_vocab",
        "conv_kernel", "ensemble",
    }
)  # fmt: skip
#: Options added after runs had been saved without them, and the value such a run was trained
#: with: a saved config that lacks one reads as this value, not as today's default (a g2p run
#: from before ``ensemble`` is one model, though g2p now trains two by default).
BEFORE_ADDED = {"ensemble": 1, "right_to_left": False, "fcn_channels": 0}
#: Learning-rate schedules (``lr_schedule``) and which weights a run keeps (``keep``).
SCHEDULES = ("plateau", "linear", "cosine")
KEEP = ("best", "last")


def schedule_option(default: str) -> Any:
    """The ``lr_schedule`` field, with a recipe's own default."""
    return option(
        default,
        "plateau: the rate changes only by lr_decay; linear / cosine: it falls after every step "
        "from lr to 0 at the end of the last epoch",
        SCHEDULES,
    )


def schedule_by_time_option(default: bool) -> Any:
    """The ``schedule_by_time`` field, with a recipe's own default."""
    return option(
        default,
        "with a linear / cosine schedule and --max-minutes: the rate falls with the share of the "
        "time limit spent too, whichever of the epochs and the time limit is further along, so it "
        "reaches 0 when the time limit ends the run",
    )


def decay_share_option(default: float) -> Any:
    """The ``decay_share`` field, with a recipe's own default."""
    return option(
        default,
        "the last share of the run over which a linear / cosine schedule falls to 0, the rate "
        "held at lr before it (1 = the whole run; 0.25 = held for the first three quarters)",
    )


def keep_option(default: str) -> Any:
    """The ``keep`` field, with a recipe's own default."""
    return option(
        default,
        "the weights a run keeps and evaluates: best (the best validation metric) or last (those "
        "of the last epoch, for a fixed schedule: no early stopping)",
        KEEP,
    )


#: Options that are probabilities in [0, 1).
PROBABILITIES = frozenset({"dropout", "label_smoothing", "token_dropout", "average"})
#: Options where 0 means "no limit" (what to give instead of infinity).
ZERO_IS_OFF = frozenset({"clip", "max_minutes", "checkpoint_minutes"})


#: A config field's type: the values it takes and how a message names them.
_KINDS: dict[type, tuple[type | tuple[type, ...], str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
}
#: Seeds are below this in magnitude: the seeds derived from them (per epoch, per process) fit
#: torch's 64-bit generator seed.
SEED_LIMIT = 2**32


def flag(name: str) -> str:
    """The command-line flag of a config field or predict option: ``beam_size`` -> ``--beam-size``."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Options of the shared training loop; every task's config extends it."""

    seed: int = option(0, "seed of the weights' initialisation, batch order and dropout")
    epochs: int = option(10, "most passes over the training split")
    batch_size: int = option(64, "sequences per batch (per process under torchrun)")
    lr: float = option(2e-3, "learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_decay: float = option(
        1.0,
        "multiply the learning rate by this after each epoch without a better validation "
        "metric; 1 = constant",
    )
    lr_schedule: str = schedule_option("plateau")
    schedule_by_time: bool = schedule_by_time_option(False)
    decay_share: float = decay_share_option(1.0)
    keep: str = keep_option("best")
    clip: float = option(1.0, "largest gradient norm; 0 = no clipping")
    average: float = option(
        0.0,
        "keep an exponential moving average of the weights, updated after every step with this "
        "decay (e.g. 0.999), and validate, keep and evaluate the averaged weights; 0 = off",
    )
    patience: int = option(3, "stop after this many epochs without a better validation metric")
    max_minutes: float = option(0.0, "stop training after this many minutes; 0 = no limit")
    backend: str = option("auto", "rnnkit backend for the recurrent layers (see rnnkit.explain)")
    precision: str = option(
        "fp32",
        "fp32, or bf16 / fp16 mixed precision (torch.autocast; fp16 with loss scaling)",
        ("fp32", "bf16", "fp16"),
    )
    flush_denormals: bool = option(
        True,
        "on the CPU, treat subnormal floats (below 1.2e-38) as zero on every thread while "
        "training and evaluating: a confident model's softmaxes produce them, and computing on "
        "them made a late training step up to 1.9x slower",
    )
    limit: int = option(0, "use only the first N examples of each split (quick checks); 0 = all")
    checkpoint_minutes: float = option(
        5.0, "also save a resumable checkpoint within an epoch after this many minutes"
    )
    checkpoint_every: int = option(0, "also save one every N batches within an epoch; 0 = off")

    # Options that may change when a run is resumed; any other difference is a mismatch.
    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {
            "epochs",
            "max_minutes",
            "patience",
            "backend",
            "precision",
            "flush_denormals",
            "checkpoint_minutes",
            "checkpoint_every",
        }
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise ValueError naming the first option of the wrong type or out of range (before any
        data is loaded)."""
        kinds = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = kinds[f.name]
            if kind in _KINDS and (
                isinstance(value, bool) != (kind is bool) or not isinstance(value, _KINDS[kind][0])
            ):
                raise ValueError(f"{f.name} = {value!r}; expected {_KINDS[kind][1]}")
            if f.name == "seed" and not -SEED_LIMIT < value < SEED_LIMIT:
                raise ValueError(f"seed = {value}; expected -{SEED_LIMIT} < seed < {SEED_LIMIT}")
            if f.name == "backend":
                backends.check_name(value)  # "backend = 'x' is not a backend; expected one of ..."
                if value not in backends.eager():  # export: runs only while a model is exported
                    raise ValueError(
                        f"backend = {value!r} runs only while a model is exported, it cannot "
                        f"train; expected one of {backends.eager()}"
                    )
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{f.name} = {value!r}; expected one of {list(choices)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                off = " (0 = no limit)" if f.name in ZERO_IS_OFF else ""
                raise ValueError(f"{f.name} = {value}; expected a finite number{off}")
            if f.name in POSITIVE and value <= 0:
                raise ValueError(f"{f.name} = {value}; expected > 0")
            if f.name == "lr_decay" and not 0 < value <= 1:
                raise ValueError(f"lr_decay = {value}; expected a factor in (0, 1]")
            if f.name == "decay_share" and not 0 < value <= 1:
                raise ValueError(f"decay_share = {value}; expected a share of the run in (0, 1]")
            if f.name in PROBABILITIES and not 0 <= value < 1:
                raise ValueError(f"{f.name} = {value}; expected a probability in [0, 1)")
            if value < 0 and f.name != "seed":
                raise ValueError(f"{f.name} = {value}; expected >= 0")


@dataclass(frozen=True)
class PredictOption:
    """An option of ``rnnkit predict`` for one task (e.g. charlm's ``--temperature``): a number
    of ``type``, finite and at least ``minimum`` and at most ``maximum`` when those are set."""

    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None

    def check(self, name: str, value: Any) -> None:
        """Raise ValueError naming the flag when ``value`` is not a usable setting."""
        if isinstance(value, float) and not math.isfinite(value):
            low = f" >= {self.minimum:g}" if self.minimum is not None else ""
            raise ValueError(f"{flag(name)} {value}; expected a finite number{low}")
        if self.maximum is not None and (
            value > self.maximum or (self.minimum is not None and value < self.minimum)
        ):
            low = "" if self.minimum is None else f"{_bound(self.minimum)} <= "
            raise ValueError(
                f"{flag(name)} {value}; expected {low}{name} <= {_bound(self.maximum)}"
            )
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{flag(name)} {value}; expected >= {self.minimum:g}")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; its training mode comes back afterwards, also when
    the block raises (a failed evaluation must not leave a model training without dropout)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _bound(value: float) -> str:
    """A bound as a message shows it: an integer in full, a float as ``%g``."""
    return str(value) if isinstance(value, int) else f"{value:g}"


class Task:
    """The hooks of one recipe. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[TrainConfig]]
    metric: ClassVar[str]  # the validation metric that early stopping and best-model selection use
    higher_is_better: ClassVar[bool]
    data_package: ClassVar[str]  # the install command of its data
    data_modules: ClassVar[tuple[str, ...]]  # packages that can provide the data (any one)
    example: ClassVar[str]  # an example `rnnkit train` command line
    predict_example: ClassVar[str]
    predict_options: ClassVar[dict[str, PredictOption]] = {}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}  # {option: {value: {field: v}}}
    #: The run directory of a loaded model (set by :func:`rnnkit.train.load_run`), where
    #: :meth:`predict` may write pictures; None while training.
    run_dir: Path | None = None
    #: Whether the model that :meth:`build_model` makes next starts training from its initial
    #: weights (set by :mod:`rnnkit.train`: a new run, or a resumed run that had no checkpoint
    #: and starts over), so that it may begin from pretrained data (sentiment's word vectors);
    #: False when saved weights replace them (a resume from a checkpoint, a loaded run).
    fresh: bool = False

    #: How many processes train together (set by :mod:`rnnkit.train`; torchrun's WORLD_SIZE):
    #: every optimizer step's global batch holds ``world_size`` x ``batch_size`` items (streams).
    world_size: int = 1

    #: Where the model is (set by :mod:`rnnkit.train`): the hooks that build tensors for the
    #: model (evaluation, prediction) put them here with :meth:`to_device`.
    device: torch.device = torch.device("cpu")

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def to_device(self, batch: Any) -> Any:
        """``batch`` (a tensor, or a dict/list/tuple of them) on :attr:`device`."""
        from ..devices import to_device

        return to_device(batch, self.device)

    @classmethod
    def make_config(cls, overrides: dict[str, Any]) -> TrainConfig:
        """The config with ``overrides`` applied over the presets they select over the defaults.

        A preset is picked by an option's value (e.g. sentiment's ``dataset = "imdb"`` sets longer
        inputs and a larger vocabulary); options given explicitly win over the preset.
        """
        values: dict[str, Any] = {}
        for key, table in cls.presets.items():
            chosen = overrides.get(key, getattr(cls.Config, key, None))
            values.update(table.get(chosen, {}))
        values.update(overrides)
        config = cls.Config(**values)
        config.check()
        return config

    # -- data ------------------------------------------------------------------------------------

    def load_splits(self) -> dict[str, list[Any]]:
        """``{"train", "valid", "test"}`` -> raw examples (each split cut to ``limit`` if set)."""
        raise NotImplementedError

    def fit_vocab(self, train: list[Any]) -> dict[str, Any]:
        """What is learnt from the training split alone (vocabulary, labels, feature statistics),
        as JSON-able data; it is saved with the checkpoint and given back to :meth:`set_vocab`."""
        raise NotImplementedError

    def set_vocab(self, vocab: dict[str, Any]) -> None:
        raise NotImplementedError

    def encode(self, examples: list[Any]) -> Any:
        """Raw examples of one split -> the tensors that batches are cut from."""
        raise NotImplementedError

    def size(self, examples: list[Any]) -> int:
        """The size of a split as metrics.json reports it (examples; characters for charlm)."""
        return len(examples)

    def epoch_batches(self, data: Any, generator: torch.Generator) -> list[Any]:
        """One epoch's training batches, as light descriptions (e.g. index lists); the order
        depends only on ``generator``, so an interrupted epoch can be replayed exactly."""
        raise NotImplementedError

    def collate(self, data: Any, batch: Any) -> dict[str, Tensor]:
        """The tensors of one batch, on the CPU (the training loop moves them to the device)."""
        raise NotImplementedError

    def shard(self, batch: Any, rank: int, world_size: int) -> Any:
        """Process ``rank``'s part of a batch when ``world_size`` processes train together: the
        batch cut into ``world_size`` contiguous parts as equal as possible (may be empty)."""
        base, extra = divmod(len(batch), world_size)
        start = rank * base + min(rank, extra)
        return batch[start : start + base + (rank < extra)]

    def batch_size_of(self, batch: Any) -> int:
        return len(batch)

    # -- state carried from batch to batch --------------------------------------------------------

    def start_epoch(self) -> None:
        """Called before an epoch's first batch (not when a run resumes within an epoch): a task
        that carries state from one batch to the next (:meth:`carry_state`) starts it afresh."""

    def carry_state(self) -> dict[str, Tensor]:
        """What this process carries from one training batch to the next (e.g. a language
        model's recurrent state over consecutive windows of its text streams), by name (letters,
        digits and underscores): saved in every resume checkpoint, so a resumed run continues
        exactly. Empty for tasks whose batches are independent."""
        return {}

    def load_carry(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`carry_state` returned, when a run resumes within an epoch."""

    # -- model -----------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean loss over the batch and the number of items it averages over. The forward pass
        is one call ``model(...)`` (under torchrun, ``model`` is a DistributedDataParallel
        wrapper whose call synchronises the gradients; its attributes are the model's)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any) -> dict[str, float]:
        """Metrics on a split: the task's ``metric``, ``loss`` and ``n`` at least."""
        raise NotImplementedError

    def validate(self, model: nn.Module, data: Any) -> dict[str, float]:
        """The metrics that early stopping reads after each epoch; by default :meth:`evaluate`
        (a task may make it cheaper, e.g. greedy decoding instead of beam search)."""
        return self.evaluate(model, data)

    def explain(self, model: nn.Module, data: Any) -> Any:
        """:func:`rnnkit.explain` for a training batch: which backend runs, and why."""
        raise NotImplementedError

    def artifacts(self, model: nn.Module, data: dict[str, Any], run_dir: Path) -> None:
        """Write task-specific files (e.g. an attention heatmap) into ``run_dir`` after the final
        evaluation of the best weights; by default nothing."""

    def predict(
        self, model: nn.Module, inputs: list[str], options: dict[str, Any]
    ) -> list[str] | Iterator[str]:
        """Lines to print for ``rnnkit predict`` (a list, or an iterator that gives each line as
        it is ready, e.g. a running prediction); raises RecipeError for unusable input.
        ``options`` hold only this task's :attr:`predict_options`, each checked by its
        :meth:`PredictOption.check`."""
        raise NotImplementedError
