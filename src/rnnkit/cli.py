"""``rnnkit``: train, evaluate and use the recipes from the command line.

The CLI only maps arguments onto a task's config dataclass and calls :mod:`rnnkit.train`; every
flag of ``rnnkit train TASK`` is a field of that task's config (``--hidden-size`` ->
``hidden_size``). An error prints one line, never a traceback, and exits with status 2 when the
command line, an input or a run directory is wrong, 1 when a sound command could not finish (a full
or read-only disk, a diverging training run); Ctrl-C exits 130 (after ``rnnkit train`` has saved a
checkpoint that ``--resume`` continues from).

``--device`` (train, evaluate, predict) says where the model runs and ``--precision`` in which
dtype (:mod:`rnnkit.devices`); under ``torchrun`` every process runs the same command and rank 0
alone prints the metrics (:mod:`rnnkit.distributed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import sys
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from .backends import BackendUnavailable
from .errors import RecipeError, StorageError
from .tasks.base import flag as _flag

__all__ = ["main"]

PROG = "rnnkit"
COMMANDS = ("tasks", "train", "evaluate", "predict", "export", "calibrate")
DEVICE_HELP = (
    "where the model runs: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps "
    "(default: auto)"
)


class UsageError(RecipeError):
    """A command line that cannot be parsed; the message says what is valid."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` and names the valid options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def option_names(self) -> list[str]:
        return sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            bad = message.split(":", 1)[1].split()
            hints = []
            for arg in bad:
                close = difflib.get_close_matches(arg.split("=")[0], self.option_names(), n=1)
                hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
            message = (
                f"unknown option(s) for `{self.prog}`: {', '.join(hints)}; valid options: "
                f"{' '.join(self.option_names())}"
            )
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_config_options(parser: argparse.ArgumentParser, task_cls: Any) -> None:
    from .backends import eager

    hints = typing.get_type_hints(task_cls.Config)
    presets: dict[str, list[str]] = {}
    for key, table in task_cls.presets.items():
        for value, fields in table.items():
            for f, v in fields.items():
                presets.setdefault(f, []).append(f"{v} with --{key} {value}")
    group = parser.add_argument_group(
        f"{task_cls.name} options (fields of {task_cls.Config.__name__})"
    )
    for f in dataclasses.fields(task_cls.Config):
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = f"default: {f.default}"
        if f.name in presets:
            default += "; " + ", ".join(presets[f.name])
        choices = f.metadata.get("choices")
        if f.name == "backend":
            choices = eager()
        kw: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{help_text} ({default})",
        }
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(
                _flag(f.name),
                type=kind,
                choices=choices,
                metavar=f.name.split("_")[-1].upper(),
                **kw,
            )


def _tasks_epilog() -> str:
    from . import tasks

    lines = ["tasks:"]
    for name, cls in sorted(tasks.TASKS.items()):
        lines.append(f"  {name:<10} {cls.summary}")
    return "\n".join(lines)


def _train_parser(task_cls: Any | None) -> Parser:
    name = task_cls.name if task_cls else "TASK"
    task = task_cls.name if task_cls else "sentiment"
    lines = [task_cls.example if task_cls else f"{PROG} train sentiment --out runs/sentiment"]
    if task_cls:
        lines.append(f"{task_cls.example} --resume   # after an interruption")
    lines += [
        f"{PROG} train {task} --device cuda --precision bf16   # on a GPU, mixed precision",
        f"torchrun --standalone --nproc-per-node=2 $(which {PROG}) train {task}   # 2 processes",
    ]
    example = "example:\n" + "\n".join(f"  {line}" for line in lines)
    if task_cls is None:
        example += "\n\n" + _tasks_epilog()
    parser = Parser(
        prog=f"{PROG} train {name}" if task_cls else f"{PROG} train",
        description=(
            (task_cls.summary + ".\n\n" if task_cls else "")
            + "Train a model, showing progress; leaves in --out the checkpoint (safetensors + JSON "
            "config/vocabulary), metrics.json and curves.png, and prints the test metrics last."
        ),
        epilog=example,
    )
    if task_cls is None:
        parser.add_argument("task", help="the task to train (see `rnnkit tasks`)")
    parser.add_argument(
        "--out", metavar="DIR", help=f"run directory (default: runs/{name.lower()})"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out exactly"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    if task_cls is not None:
        _add_config_options(parser, task_cls)
    return parser


def cmd_tasks(argv: Sequence[str]) -> int:
    from . import tasks
    from .data.packages import package_dir

    Parser(
        prog=f"{PROG} tasks",
        description="List the tasks that `rnnkit train` knows, their metric and data package.",
        epilog="example:\n  rnnkit tasks",
    ).parse_args(argv)
    for name, cls in sorted(tasks.TASKS.items()):
        installed = any(package_dir(m) is not None for m in cls.data_modules)
        data = "data installed" if installed else f"data missing: {cls.data_package}"
        print(f"{name:<10} {cls.summary}\n{'':<10} metric: {cls.metric}; {data}")
    return 0


def cmd_train(argv: Sequence[str]) -> int:
    from . import tasks

    if argv and argv[0] in ("-h", "--help"):
        _train_parser(None).parse_args(argv)  # prints the help and exits
    if not argv or argv[0].startswith("-"):
        named = [a for a in argv if a in tasks.TASKS]
        if named:
            rest = list(argv)
            rest.remove(named[0])
            raise UsageError(
                f"options go after the task name: {shlex.join([PROG, 'train', named[0], *rest])}"
            )
        raise UsageError(
            f"a task is required first (rnnkit train TASK [options]); valid tasks: "
            f"{', '.join(sorted(tasks.TASKS))}"
        )
    name = argv[0]
    try:
        task_cls = tasks.get(name)
    except RecipeError as e:
        raise UsageError(str(e)) from None
    args = vars(_train_parser(task_cls).parse_args(argv[1:]))
    keys = ("out", "resume", "progress", "threads", "device")
    out, resume, progress, threads, device = (args.pop(k) for k in keys)
    _set_threads(threads)
    from .train import format_metrics, train

    metrics = train(name, args, out=out, resume=resume, progress=progress, device=device)
    if not metrics:  # a process other than rank 0 under torchrun: rank 0 prints the metrics
        return 0
    print(format_metrics("valid", metrics["valid"]))
    print(format_metrics("test", metrics["test"]))
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}; expected >= 1")
        import torch

        torch.set_num_threads(threads)


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="fp32, or bf16 / fp16 under torch.autocast (default: the run's)",
    )


def cmd_evaluate(argv: Sequence[str]) -> int:
    from .backends import eager

    parser = Parser(
        prog=f"{PROG} evaluate",
        description="Recompute the validation and test metrics of a trained run (best weights); "
        "prints the test metrics last. Writes nothing.",
        epilog="example:\n  rnnkit evaluate runs/sentiment\n  rnnkit evaluate runs/sentiment --device cpu",
    )
    parser.add_argument("dir", metavar="DIR", help="run directory written by `rnnkit train`")
    parser.add_argument("--backend", choices=eager(), help="rnnkit backend (default: the run's)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    _add_device_options(parser)
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    from .train import evaluate, format_metrics

    metrics = evaluate(args.dir, args.backend, args.device, args.precision)
    print(format_metrics("valid", metrics["valid"]))
    print(format_metrics("test", metrics["test"]))
    return 0


def cmd_predict(argv: Sequence[str]) -> int:
    from . import tasks
    from .backends import eager

    examples = "\n".join(f"  {cls.predict_example}" for _, cls in sorted(tasks.TASKS.items()))
    parser = Parser(
        prog=f"{PROG} predict",
        description="Run a trained model on inputs: sentences (sentiment: label and probability; "
        "translate: French), utterance files (speech: speaker and probability), prompts (charlm: "
        "sampled text) or words (g2p: pronunciations).",
        epilog=f"examples:\n{examples}",
    )
    parser.add_argument("dir", metavar="DIR", help="run directory written by `rnnkit train`")
    parser.add_argument("inputs", metavar="INPUT", nargs="+", help="what to run the model on")
    parser.add_argument("--backend", choices=eager(), help="rnnkit backend (default: the run's)")
    _add_device_options(parser)
    seen: set[str] = set()
    for name, cls in sorted(tasks.TASKS.items()):
        for opt, spec in cls.predict_options.items():
            if opt not in seen:
                seen.add(opt)
                kind: dict[str, Any] = (
                    {"action": "store_true"} if spec.type is bool else {"type": spec.type}
                )
                parser.add_argument(
                    _flag(opt),
                    **kind,
                    default=argparse.SUPPRESS,
                    dest=opt,
                    help=f"{name}: {spec.help} (default: {spec.default})",
                )
    args = vars(parser.parse_args(argv))
    run_dir, inputs, backend = args.pop("dir"), args.pop("inputs"), args.pop("backend")
    device, precision = args.pop("device"), args.pop("precision")
    from .train import predict

    for line in predict(run_dir, inputs, args, backend, device, precision):
        print(line, flush=True)
    return 0


def _rank(variable: str = "RANK") -> int:
    """This process's rank under torchrun (0 without it); ``LOCAL_RANK``: its rank on this
    machine."""
    try:
        return int(os.environ.get(variable) or 0)
    except ValueError:
        return 0


def cmd_export(argv: Sequence[str]) -> int:
    from .backends import eager

    parser = Parser(
        prog=f"{PROG} export",
        description="Export a trained run's model to ONNX (dynamic batch and lengths): a "
        "classifier's encoder and head, the character LM with its state, or an encoder-decoder's "
        "encoder and one decoder step (two files, PATH with .encoder.onnx and "
        ".decoder_step.onnx). onnxruntime runs it on the validation split first and the largest "
        "difference from PyTorch is printed; above --tolerance nothing is written. Needs the "
        'onnx extra: pip install "rnnkit[onnx]".',
        epilog="example:\n  rnnkit export runs/sentiment --onnx sentiment.onnx",
    )
    parser.add_argument("dir", metavar="DIR", help="run directory written by `rnnkit train`")
    parser.add_argument("--onnx", metavar="PATH", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest difference from PyTorch accepted (default: 1e-4)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        metavar="N",
        help="check only the first N validation examples (characters for charlm); 0 = all",
    )
    parser.add_argument(
        "--backend",
        choices=eager(),
        help="rnnkit backend of the PyTorch model it is checked against (default: the run's)",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    from .export.recipes import export_run

    export_run(
        args.dir, args.onnx, tolerance=args.tolerance, limit=args.limit, backend=args.backend
    )
    return 0


#: calibrate's cell names and the dispatch table's
_CALIBRATE_CELLS = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}


def cmd_calibrate(argv: Sequence[str]) -> int:
    parser = Parser(
        prog=f"{PROG} calibrate",
        description="Measure, on this machine, where the cpu backend's kernels are faster than "
        "torch's own fused RNN op: each cell at DESIGN.md's S, M and L shapes, training and "
        "inference, float32 and (where the CPU has bf16 instructions) bfloat16 autocast, plus "
        "the 2-layer bidirectional LSTM with lengths against packing; interleaved medians. "
        "Automatic dispatch then follows this machine's crossovers at this thread count "
        "instead of the shipped table (rnnkit.explain names which decided). Run it on a quiet "
        "machine: about a minute on a fast one, several on a slow one.",
        epilog="example:\n  rnnkit calibrate --threads 2\n  rnnkit calibrate --show",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads to measure at")
    parser.add_argument(
        "--cells", nargs="+", choices=tuple(_CALIBRATE_CELLS), default=list(_CALIBRATE_CELLS)
    )
    parser.add_argument("--shapes", nargs="+", choices=("S", "M", "L"), default=["S", "M", "L"])
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        help="default: fp32, and bf16 where the CPU has bf16 instructions",
    )
    parser.add_argument("--pairs", type=int, metavar="N", help="interleaved pairs per point")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--show", action="store_true", help="print the table in use; measure nothing")
    what.add_argument(
        "--reset", action="store_true", help="forget this machine's table: the shipped one decides"
    )
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    if args.pairs is not None and args.pairs < 1:
        raise UsageError(f"--pairs {args.pairs}; expected >= 1")
    import torch

    from .backends.cpu import build, calibrate, dispatch

    threads = torch.get_num_threads()
    if args.reset:
        had = dispatch.forget_calibration()
        print(
            f"{'forgot' if had else 'there was no'} calibration ({dispatch.calibration_path()}); "
            "the shipped table decides"
        )
        return 0
    if args.show:
        measured = dispatch.calibration(threads)
        if measured is None:
            print(f"the shipped table ({dispatch.MACHINE}); no calibration at {threads} threads")
            table = dispatch.MEASURED
        else:
            print(f"{measured.describe()} ({measured.path})")
            table = measured.table
        for (mode, lengths, precision, training), points in sorted(table.items()):
            kind = "training" if training else "inference"
            ratios = ", ".join(
                f"T{p.steps} B{p.batch} I{p.input_size} H{p.hidden} {p.ratio:.2f}x" for p in points
            )
            print(f"  {mode}{' with lengths' if lengths else ''} {precision} {kind}: {ratios}")
        if measured is not None:
            print(f"anything else: the shipped table ({dispatch.MACHINE})")
        return 0
    why = build.unavailable()
    if why is not None:
        raise RecipeError(f"the cpu kernels are unavailable here ({why}); nothing to calibrate")
    precisions = None if args.precision is None else tuple(dict.fromkeys(args.precision))
    print(f"measuring at {threads} thread{'s' if threads != 1 else ''} (torch.nn / cpu kernels)")
    table = calibrate.measure(
        cells=tuple(_CALIBRATE_CELLS[c] for c in dict.fromkeys(args.cells)),
        shapes=tuple(dict.fromkeys(args.shapes)),
        precisions=precisions,
        pairs=args.pairs,
        progress=lambda line: print(f"  {line}", flush=True),
    )
    try:
        saved = dispatch.save_calibration(table, threads)
    except OSError as e:
        raise StorageError(f"cannot write {dispatch.calibration_path()}: {e}") from e
    slower = [
        f"{mode}{' with lengths' if lengths else ''} {precision} "
        f"{'training' if training else 'inference'} at T{p.steps} B{p.batch} ({p.ratio:.2f}x)"
        for (mode, lengths, precision, training), points in table.items()
        for p in points
        if p.ratio < 1.0
    ]
    print(f"wrote {saved.path}")
    if slower:
        print("automatic dispatch leaves these to torch's op: " + "; ".join(slower))
    else:
        print("the cpu kernels measured faster everywhere: automatic dispatch runs them")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = Parser(
        prog=PROG,
        description="rnnkit recipes: train, evaluate and use recurrent models on real data.",
        epilog=(
            "commands:\n"
            "  tasks      list the tasks\n"
            "  train      train a task's model: rnnkit train TASK [options]\n"
            "  evaluate   recompute a run's metrics: rnnkit evaluate DIR\n"
            "  predict    run a trained model: rnnkit predict DIR INPUT...\n"
            "  export     export a trained model to ONNX: rnnkit export DIR --onnx PATH\n"
            "  calibrate  measure where the cpu kernels beat torch's op on this machine\n\n"
            "example:\n"
            "  rnnkit train sentiment --out runs/sentiment\n"
            '  rnnkit predict runs/sentiment "a gorgeous, witty, seductive movie."\n\n'
            "`rnnkit COMMAND --help` shows a command's options."
        ),
    )
    top.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    try:
        if not argv or argv[0] in ("-h", "--help"):
            top.print_help()
            return 0 if argv else 2
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            close = difflib.get_close_matches(command, COMMANDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"unknown command {command!r}{hint}; valid commands: {', '.join(COMMANDS)}"
            )
        handler = {
            "tasks": cmd_tasks,
            "train": cmd_train,
            "evaluate": cmd_evaluate,
            "predict": cmd_predict,
            "export": cmd_export,
            "calibrate": cmd_calibrate,
        }[command]
        return handler(rest)
    except UsageError as e:
        # Under torchrun every process has the same command line: the first on each machine
        # says what is wrong with it.
        if _rank("LOCAL_RANK") == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except RecipeError as e:
        if not getattr(e, "shared", False):  # under torchrun, one process reports what all hit
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BackendUnavailable as e:  # e.g. a run trained with --backend triton, used on the CPU
        if _rank() == 0:
            print(
                f"{PROG}: error: {e}; choose another with --backend (auto picks one that runs "
                "on this device)",
                file=sys.stderr,
            )
        return 2
    except KeyboardInterrupt as e:
        if _rank() == 0:  # under torchrun every rank stops at the same batch; rank 0 says where
            message = (
                str(e) or "interrupted; `rnnkit train TASK --out DIR --resume` continues a run"
            )
            print(f"{PROG}: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
