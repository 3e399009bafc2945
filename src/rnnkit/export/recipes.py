"""``rnnkit export RUN_DIR --onnx PATH``: a trained recipe's model as ONNX, checked before it is
written.

What is exported, by model (:func:`exporters`):

* a classifier (sentiment, speech): the embedding or feature input, the recurrent encoder and
  the pooling head, ``(x, lengths) -> logits``;
* the character LM (charlm): ``(x, h0[, c0]) -> (logits, h_n[, c_n])``, the state carried
  between calls, so text can be streamed or sampled outside Python;
* an encoder-decoder (g2p, translate): two graphs, so beam search can run outside Python:
  ``PATH`` with ``.encoder.onnx`` (the source -> the decoder's initial state) and
  ``.decoder_step.onnx`` (one decoder step: the previous token and state -> the next token's
  logits and the next state); :class:`rnnkit.models.DecoderState` names the state tensors. An
  ensemble with right-to-left members (``--right-to-left``) adds the same two graphs of those
  members, ``.reverse_encoder.onnx`` and ``.reverse_decoder_step.onnx``, for the search in
  the other direction; rescoring a candidate is stepping its tokens through both.

Every graph has dynamic batch and length axes. Before anything is written, onnxruntime runs
it on the whole validation split (or ``limit`` examples of it) against the PyTorch model: the
largest difference is reported, and above ``tolerance`` nothing is written. The files are
written atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import RecipeError, StorageError
from ..models import CharLM, ClassifierEnsemble, SequenceClassifier
from ..models.seq2seq import DecoderState, EnsembleState, Seq2Seq, Seq2SeqEnsemble

__all__ = ["Check", "ExportMismatch", "Graph", "export_run", "exporters"]

#: The largest difference between onnxruntime and PyTorch that a check accepts (fp32 logits and
#: states after many steps, so looser than the 1e-5 of one layer).
TOLERANCE = 1e-4


class ExportMismatch(RecipeError):
    """onnxruntime does not compute what PyTorch does (within the tolerance): nothing is
    written."""

    exit_code = 1


@dataclass
class Graph:
    """One graph to export: a module, its example arguments (from a validation batch; a list
    argument is a list of tensors), the names of the flat inputs and outputs, and the dynamic
    axes of each argument in the example's structure (torch.export's ``dynamic_shapes``)."""

    suffix: str  # appended to the path's stem, "" for the only graph
    title: str  # what it is, in words
    module: nn.Module
    example: tuple[Any, ...]
    inputs: list[str]
    outputs: list[str]
    dynamic: tuple[Any, ...]


@dataclass
class Check:
    """The comparison of onnxruntime with PyTorch over the validation split."""

    examples: int = 0
    difference: float = 0.0
    worst: str = ""  # the output where the largest difference is
    agree: int = 0  # predictions (argmax of the logits) that agree
    predictions: int = 0
    names: set[str] = field(default_factory=set)

    def add(self, name: str, got: np.ndarray, expected: Tensor) -> None:
        expected_np = expected.detach().cpu().numpy()
        if got.shape != expected_np.shape:
            raise ExportMismatch(
                f"onnxruntime's {name} has shape {got.shape}; PyTorch's {expected_np.shape}"
            )
        if got.size:
            diff = float(np.max(np.abs(got.astype(np.float64) - expected_np.astype(np.float64))))
            diff = diff if math.isfinite(diff) else math.inf
            if diff > self.difference or not self.worst:
                self.difference, self.worst = diff, name
        self.names.add(name)

    def predictions_of(self, got: np.ndarray, expected: Tensor) -> None:
        self.agree += int((got.argmax(-1) == expected.argmax(-1).cpu().numpy()).sum())
        self.predictions += int(np.prod(got.shape[:-1]))


class Exporter:
    """How one kind of model is exported and checked."""

    def graphs(self, model: nn.Module, task: Any, data: Any) -> list[Graph]:
        raise NotImplementedError

    def check(
        self, model: nn.Module, task: Any, data: Any, sessions: list[Any], limit: int
    ) -> Check:
        raise NotImplementedError


def _run(session: Any, names: list[str], tensors: tuple[Tensor, ...]) -> list[np.ndarray]:
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    return session.run(None, feed)


def _batches(sizes: list[int], batch_size: int, limit: int) -> list[list[int]]:
    from ..data import bucket_batches

    count = len(sizes) if limit <= 0 else min(limit, len(sizes))
    return bucket_batches(sizes[:count], batch_size)


def _example_batch(sizes: list[int], batch_size: int) -> list[int]:
    """A batch of at least two sequences of at least two steps (torch.export treats sizes 0
    and 1 as constants, so the example must not have them)."""
    long = [i for i, n in enumerate(sizes) if n >= 2]
    if len(long) < 2:
        raise RecipeError(
            "the validation split has fewer than two sequences of two or more steps; expected "
            "some to export with"
        )
    long.sort(key=lambda i: sizes[i])
    return long[-min(batch_size, 8) :]


# -- classifiers -----------------------------------------------------------------------------


class ClassifierExporter(Exporter):
    """``(x, lengths) -> logits``: x (batch, steps) token ids or (batch, steps, features)."""

    def graphs(self, model: nn.Module, task: Any, data: Any) -> list[Graph]:
        seqs, _ = data
        batch = task.collate(data, _example_batch([len(s) for s in seqs], 8))
        return [
            Graph(
                "",
                "the classifier",
                model,
                (batch["x"], batch["lengths"]),
                ["x", "lengths"],
                ["logits"],
                ({0: "batch", 1: "steps"}, {0: "batch"}),
            )
        ]

    @torch.no_grad()
    def check(
        self, model: nn.Module, task: Any, data: Any, sessions: list[Any], limit: int
    ) -> Check:
        seqs, _ = data
        result = Check()
        for idx in _batches([len(s) for s in seqs], task.eval_batch_size, limit):
            batch = task.collate(data, idx)
            (logits,) = _run(sessions[0], ["x", "lengths"], (batch["x"], batch["lengths"]))
            expected = model(batch["x"], batch["lengths"])
            result.add("logits", logits, expected)
            result.predictions_of(logits, expected)
            result.examples += len(idx)
        return result


# -- the character language model ------------------------------------------------------------


class _Stream(nn.Module):
    """CharLM with its state as flat tensors: ``(x, h0[, c0]) -> (logits, h_n[, c_n])``."""

    def __init__(self, model: CharLM) -> None:
        super().__init__()
        self.model = model
        self.lstm = model.encoder.mode == "LSTM"

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor | None = None) -> tuple[Tensor, ...]:
        logits, state = self.model(x, (h0, c0) if self.lstm else h0)
        return (logits, *state) if self.lstm else (logits, state)


class CharLMExporter(Exporter):
    """``(x, h0[, c0]) -> (logits, h_n[, c_n])``, checked over the validation text in windows,
    the state carried from one window to the next (as ``rnnkit evaluate`` reads it)."""

    def _streams(self, task: Any, data: Tensor) -> tuple[Tensor, int]:
        streams = max(2, min(task.config.eval_streams, (len(data) - 1) // 2))
        per = (len(data) - 1) // streams
        return data[: streams * per].view(streams, per), 4 * task.config.seq_len

    def _state(self, model: CharLM, batch: int) -> tuple[Tensor, ...]:
        enc = model.encoder
        layers = enc.num_layers * enc.num_directions
        h0 = torch.zeros(layers, batch, enc.state_size)
        if enc.mode == "LSTM":
            return h0, torch.zeros(layers, batch, enc.hidden_size)
        return (h0,)

    def graphs(self, model: nn.Module, task: Any, data: Any) -> list[Graph]:
        x, window = self._streams(task, data)
        if x.shape[1] < 2:
            raise RecipeError("the validation text is too short to export with")
        state = self._state(model, x.shape[0])
        names = ["h0", "c0"][: len(state)]
        return [
            Graph(
                "",
                "the language model",
                _Stream(model),
                (x[:, : min(window, x.shape[1])], *state),
                ["x", *names],
                ["logits", "h_n", "c_n"][: 1 + len(state)],
                ({0: "batch", 1: "steps"}, *[{1: "batch"} for _ in names]),
            )
        ]

    @torch.no_grad()
    def check(
        self, model: nn.Module, task: Any, data: Any, sessions: list[Any], limit: int
    ) -> Check:
        x, window = self._streams(task, data)
        stream = _Stream(model)
        state = self._state(model, x.shape[0])
        ort_state = [s.numpy() for s in state]
        names = ["x", "h0", "c0"][: 1 + len(state)]
        result = Check()
        end = x.shape[1] if limit <= 0 else min(x.shape[1], max(1, limit // x.shape[0]))
        for t in range(0, end, window):
            chunk = x[:, t : min(t + window, end)]
            feed = {"x": chunk.numpy()} | dict(zip(names[1:], ort_state, strict=True))
            got = sessions[0].run(None, feed)
            expected = stream(chunk, *state)
            for name, g, e in zip(["logits", "h_n", "c_n"], got, expected, strict=False):
                result.add(name, g, e)
            result.predictions_of(got[0], expected[0])
            state, ort_state = expected[1:], got[1:]  # each carries its own state
            result.examples += chunk.numel()
        return result


# -- encoder-decoders ------------------------------------------------------------------------

_MEMORY = ("memory", "keys", "mask")  # the encoded source: read by every step, never changed


def _directions(model: Seq2Seq | Seq2SeqEnsemble) -> list[tuple[str, Seq2Seq | Seq2SeqEnsemble]]:
    """The model's parts searched on their own, each with the prefix of its graphs' names: the
    model itself, or an ensemble's left-to-right members and (``reverse_``) its right-to-left
    ones, each part one model or an ensemble sharing the members' modules."""
    if not isinstance(model, Seq2SeqEnsemble) or not any(model.reverse):
        return [("", model)]
    return [(p, _together(model.writing(r))) for p, r in (("", False), ("reverse_", True))]


def _together(members: list[Seq2Seq]) -> Seq2Seq | Seq2SeqEnsemble:
    """One member, or an ensemble of several (the same modules, not copies)."""
    if len(members) == 1:
        return members[0]
    it = iter(members)
    return Seq2SeqEnsemble(lambda: next(it), len(members)).train(members[0].training)


def _members(model: Seq2Seq | Seq2SeqEnsemble) -> list[Seq2Seq]:
    return list(model.members) if isinstance(model, Seq2SeqEnsemble) else [model]


def _cell_names(model: Seq2Seq) -> list[str]:
    lstm = model.config.decoder_cell == "lstm"
    return [
        f"{kind}{k}"
        for k in range(model.config.decoder_layers)
        for kind in (("h", "c") if lstm else ("h",))
    ]


def _state_names(model: Seq2Seq | Seq2SeqEnsemble) -> tuple[list[str], list[str]]:
    """The names of the flat decoder state: what a step changes, then what it only reads (an
    ensemble's member k prefixed ``m{k}_``)."""
    members = _members(model)
    prefixes = [f"m{k}_" for k in range(len(members))] if len(members) > 1 else [""]
    changing, fixed = [], []
    for prefix, m in zip(prefixes, members, strict=True):
        changing += [prefix + n for n in (*_cell_names(m), "feed", "weights")]
        fixed += [prefix + n for n in _MEMORY]
    return changing, fixed


def _flat(state: DecoderState | EnsembleState) -> tuple[Tensor, ...]:
    """The state's tensors: every member's changing ones, then every member's fixed ones."""
    states = state.members if isinstance(state, EnsembleState) else (state,)
    changing = []
    for s in states:
        changing += [t for c in s.cells for t in ((c,) if isinstance(c, Tensor) else c)]
        changing += [s.feed, s.weights]
    fixed = [t for s in states for t in (s.memory, s.keys, s.mask)]
    return (*changing, *fixed)


def _unflat(
    model: Seq2Seq | Seq2SeqEnsemble, tensors: tuple[Tensor, ...]
) -> DecoderState | EnsembleState:
    members = _members(model)
    changing = list(tensors[: len(tensors) - len(_MEMORY) * len(members)])
    fixed = list(tensors[len(changing) :])
    states = []
    for m in members:
        n = len(_cell_names(m))
        flat, (feed, weights) = changing[:n], changing[n : n + 2]
        memory, keys, mask = fixed[: len(_MEMORY)]
        changing, fixed = changing[n + 2 :], fixed[len(_MEMORY) :]
        lstm = m.config.decoder_cell == "lstm"
        cells = tuple(zip(flat[::2], flat[1::2], strict=True)) if lstm else tuple(flat)
        states.append(DecoderState(cells, feed, weights, memory, keys, mask))
    return EnsembleState(tuple(states)) if isinstance(model, Seq2SeqEnsemble) else states[0]


class _Encode(nn.Module):
    """``(src, src_lengths) -> the decoder's initial state``, flat."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, ...]:
        return _flat(self.model.start(src, src_lengths))


class _Step(nn.Module):
    """``(token, state) -> (logits, *next state)``, ``state`` the flat list of the decoder
    state's tensors; the memory, keys and mask are inputs only (a step does not change them)."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: Tensor, state: list[Tensor]) -> tuple[Tensor, ...]:
        logits, new = self.model.step(token, _unflat(self.model, tuple(state)))
        changing, _ = _state_names(self.model)
        return (logits, *_flat(new)[: len(changing)])


class Seq2SeqExporter(Exporter):
    """The encoder and one decoder step, checked along the greedy path of every validation
    source for ``steps`` steps, each graph fed its own previous outputs."""

    steps = 8

    def _example(
        self, model: Seq2Seq | Seq2SeqEnsemble, task: Any, data: Any
    ) -> tuple[Tensor, Tensor]:
        from ..data import pad_batch

        idx = _example_batch([len(s) for s in data.items], 8)
        return pad_batch([data.items[i] for i in idx], model.config.pad_id)

    def graphs(self, model: nn.Module, task: Any, data: Any) -> list[Graph]:
        src, lengths = self._example(model, task, data)
        graphs = []
        for prefix, part in _directions(model):
            graphs += self._graphs(part, src, lengths, prefix)
        return graphs

    def _graphs(
        self, model: Seq2Seq | Seq2SeqEnsemble, src: Tensor, lengths: Tensor, prefix: str
    ) -> list[Graph]:
        # a tensor of its own per input: the zero bridge gives h and c one tensor, which
        # torch.export would take for one input (the step then reading h0 where c0 is)
        state = tuple(t.clone() for t in _flat(model.start(src, lengths)))
        changing, fixed = _state_names(model)
        state_names = [*changing, *fixed]
        token = torch.full((src.shape[0],), model.config.bos_id)
        by_source = [n for n in state_names if n.endswith(("weights", *_MEMORY))]  # (B, S, ...)
        axes = [
            {0: "batch", 1: "source_steps"} if n in by_source else {0: "batch"} for n in state_names
        ]
        return [
            Graph(
                f".{prefix}encoder",
                "the encoder" if not prefix else "the right-to-left members' encoder",
                _Encode(model),
                (src, lengths),
                ["src", "src_lengths"],
                state_names,
                ({0: "batch", 1: "source_steps"}, {0: "batch"}),
            ),
            Graph(
                f".{prefix}decoder_step",
                "one decoder step" if not prefix else "the right-to-left members' decoder step",
                _Step(model),
                (token, list(state)),
                ["token", *state_names],
                ["logits", *[f"next_{n}" for n in changing]],
                ({0: "batch"}, axes),
            ),
        ]

    @torch.no_grad()
    def check(
        self, model: nn.Module, task: Any, data: Any, sessions: list[Any], limit: int
    ) -> Check:
        result = Check()
        parts = _directions(model)
        for k, (prefix, part) in enumerate(parts):
            encoder, step = sessions[2 * k : 2 * k + 2]
            self._check(part, task, data, (encoder, step), limit, prefix, result)
        result.examples //= len(parts)  # each direction ran every example
        return result

    def _check(
        self,
        model: Seq2Seq | Seq2SeqEnsemble,
        task: Any,
        data: Any,
        sessions: tuple[Any, Any],
        limit: int,
        prefix: str,
        result: Check,
    ) -> None:
        """Run one direction's graphs against its members along their greedy path."""
        from ..data import pad_batch

        encoder, step = sessions
        changing, fixed = _state_names(model)
        state_names = [*changing, *fixed]
        for idx in _batches([len(s) for s in data.items], task.eval_batch_size, limit):
            src, lengths = pad_batch([data.items[i] for i in idx], model.config.pad_id)
            state = model.start(src, lengths)
            got = encoder.run(None, {"src": src.numpy(), "src_lengths": lengths.numpy()})
            for name, g, e in zip(state_names, got, _flat(state), strict=True):
                result.add(prefix + name, g, e)
            memory = got[len(changing) :]
            token = torch.full((len(idx),), model.config.bos_id)
            for _ in range(self.steps):
                feed = dict(zip(state_names, [*got[: len(changing)], *memory], strict=True))
                got = step.run(None, {"token": token.numpy()} | feed)
                logits, state = model.step(token, state)
                result.add(f"{prefix}logits", got[0], logits)
                result.predictions_of(got[0], logits)
                for name, g, e in zip(state_names, got[1:], _flat(state), strict=False):
                    result.add(f"next {prefix}{name}", g, e)
                got = got[1:] + memory
                token = logits.argmax(-1)  # both follow PyTorch's greedy path
            result.examples += len(idx)


def exporters() -> list[tuple[type[nn.Module], Callable[[], Exporter]]]:
    """The model classes a run can hold, and how each is exported."""
    return [
        (SequenceClassifier, ClassifierExporter),
        (ClassifierEnsemble, ClassifierExporter),
        (CharLM, CharLMExporter),
        (Seq2Seq, Seq2SeqExporter),
        (Seq2SeqEnsemble, Seq2SeqExporter),
    ]


# -- the command ------------------------------------------------------------------------------


def _needs() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RecipeError(
            f"exporting to ONNX needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
            'pip install "rnnkit[onnx]"'
        ) from None
    return onnxruntime


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings and its step-by-step progress lines stay out of the way."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(graph: Graph, path: Path) -> None:
    with _quiet():
        program = torch.onnx.export(
            graph.module,
            graph.example,
            input_names=graph.inputs,
            output_names=graph.outputs,
            dynamic_shapes=graph.dynamic,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def _target(path: Path, suffix: str) -> Path:
    if not suffix:
        return path
    stem = path.name.removesuffix(".onnx")
    return path.with_name(f"{stem}{suffix}.onnx")


def export_run(
    run_dir: str | Path,
    path: str | Path,
    *,
    tolerance: float = TOLERANCE,
    limit: int = 0,
    say: Callable[[str], None] = print,
    backend: str | None = None,
) -> list[Path]:
    """Export the model of ``run_dir`` to ``path`` (see the module docstring); returns the
    files written. ``limit`` > 0 checks only that many validation examples (characters for
    charlm); ``backend`` replaces the run's for the PyTorch model it is checked against."""
    ort = _needs()
    from ..train import load_run

    path = Path(path)
    if path.suffix != ".onnx":
        raise RecipeError(f"--onnx {path}: expected a file name ending in .onnx")
    if not path.parent.is_dir():
        raise RecipeError(f"--onnx {path}: the directory {path.parent} does not exist")
    try:  # before the model is loaded and exported: a directory that takes no file
        fd, probe = tempfile.mkstemp(prefix=".rnnkit-probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageError(
            f"--onnx {path}: cannot create files in {path.parent} ({e.strerror or e}); expected "
            "a writable directory"
        ) from None
    if not math.isfinite(tolerance) or tolerance <= 0:
        raise RecipeError(f"--tolerance {tolerance}; expected a positive number")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise RecipeError(f"--limit {limit!r}; expected a number of examples >= 0 (0 = all)")
    task, model = load_run(run_dir, backend)
    model.eval()
    kind = next((make for cls, make in exporters() if isinstance(model, cls)), None)
    if kind is None:
        raise RecipeError(f"{run_dir} holds a {type(model).__name__}, which has no ONNX export")
    exporter = kind()
    data = task.encode(task.load_splits()["valid"])
    graphs = exporter.graphs(model, task, data)
    for graph in graphs:  # before exporting: a file name taken by a directory
        target = _target(path, graph.suffix)
        if target.is_dir():
            raise RecipeError(
                f"--onnx {path}: {target} is a directory; expected a file name to write "
                f"{graph.title} to (nothing was written)"
            )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".rnnkit-export-") as tmp:
        drafts = []
        for graph in graphs:
            draft = Path(tmp) / f"{len(drafts)}.onnx"
            say(f"exporting {graph.title} ...")
            try:
                _export(graph, draft)
            except OSError as e:  # a full disk: the drafts go with the temporary directory
                raise StorageError(
                    f"cannot write {_target(path, graph.suffix)}: {e.strerror or e}; nothing "
                    "was written"
                ) from None
            drafts.append(draft)
        sessions = [
            ort.InferenceSession(str(d), providers=["CPUExecutionProvider"]) for d in drafts
        ]
        check = exporter.check(model, task, data, sessions, limit)
        agree = (
            f"; the same prediction for {check.agree}/{check.predictions}"
            if check.predictions
            else ""
        )
        say(
            f"onnxruntime vs PyTorch on {check.examples} validation "
            f"{'characters' if isinstance(model, CharLM) else 'examples'}: max |difference| "
            f"{check.difference:.3g} (in {check.worst}; {len(check.names)} "
            f"output{'s' if len(check.names) != 1 else ''} compared)"
            f"{agree}"
        )
        if not check.difference <= tolerance:
            raise ExportMismatch(
                f"onnxruntime differs from PyTorch by {check.difference:.3g} > --tolerance "
                f"{tolerance:g}; nothing was written"
            )
        written = []
        for graph, draft in zip(graphs, drafts, strict=True):
            target = _target(path, graph.suffix)
            try:
                os.replace(draft, target)
            except OSError as e:
                raise StorageError(f"cannot write {target}: {e.strerror or e}") from None
            written.append(target)
    for target in written:
        say(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return written
