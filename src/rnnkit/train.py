"""The training loop that every recipe shares, and the run directory it leaves.

``train(task, overrides, out)`` trains a task's model and leaves in ``out``:

- ``config.json`` (task, config, versions) and ``vocab.json`` (what was learnt from the training
  split: vocabulary, labels, feature statistics), written once when the run starts;
- ``model.safetensors``: the weights with the best validation metric so far;
- ``resume.safetensors``: everything needed to continue exactly (weights, optimizer state, the
  torch RNG state, the epoch and batch reached, the history), written at the end of every epoch
  and, within an epoch, every ``checkpoint_minutes`` / ``checkpoint_every`` batches;
- ``metrics.json`` and ``curves.png`` (loss and validation metric per epoch), and what the task
  adds (:meth:`Task.artifacts`, e.g. ``attention.png``).

Every file is written to a temporary name and moved into place with ``os.replace``, so a run
killed at any moment leaves each file either as it was or complete. The batch order of an epoch
depends only on (seed, epoch), and dropout draws from the torch RNG saved in the checkpoint, so a
run killed (even by SIGKILL) and resumed with ``resume=True`` ends with the same weights as a run
that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, tasks
from .errors import CheckpointError, RecipeError
from .tasks.base import Task, TrainConfig

__all__ = [
    "CONFIG",
    "METRICS",
    "MODEL",
    "STATE",
    "Progress",
    "evaluate",
    "format_metrics",
    "load_run",
    "predict",
    "train",
]

CONFIG, VOCAB, MODEL, STATE = "config.json", "vocab.json", "model.safetensors", "resume.safetensors"
METRICS, CURVES = "metrics.json", "curves.png"
RUN_FILES = (CONFIG, VOCAB, MODEL, STATE, METRICS)
STATE_FORMAT = "rnnkit-resume-1"
PLOT_SECONDS = 60.0  # redraw curves.png during training at most this often (and at the end)
LOG_SECONDS = 60.0  # without a progress bar (stderr not a terminal), one progress line this often


@dataclass
class Progress:
    """Where a run is: saved in every checkpoint, so that a resumed run continues from here."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps in all
    loss_sum: float = 0.0  # the current epoch's training loss so far (sum over items)
    count: int = 0  # ... and the number of items it sums over
    seconds: float = 0.0  # training time so far, over every process that worked on the run
    wall: float = 0.0  # wall time so far, set-up and evaluation included
    best: float | None = None  # the best validation metric so far
    best_loss: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # why training stopped ("" while it runs)
    finished: bool = False  # the final evaluation is done and metrics.json written


# -- files ---------------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` and ``os.replace``: it is never seen half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; is {path.parent} an rnnkit run directory?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); the file is corrupt") from None


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"{path} is missing; the run has no checkpoint there")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is corrupt or "
            "incomplete"
        ) from None


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:3]
        raise CheckpointError(
            f"{path} does not fit the model that config.json describes: {' '.join(first)}"
        ) from None


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, p: Progress) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": STATE_FORMAT,
        "progress": json.dumps(dataclasses.asdict(p)),
        "optim_groups": json.dumps(opt_state["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    _save_tensors(path, tensors, meta)


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Progress]:
    tensors, meta = _load_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not an rnnkit resume checkpoint (format {meta.get('format')!r}; expected "
            f"{STATE_FORMAT!r})"
        )
    try:
        progress = Progress(**json.loads(meta["progress"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: its progress record is damaged ({e})") from None
    return tensors, meta, progress


def _restore_state(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], model: nn.Module, opt: Any
) -> None:
    _load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, entries in json.loads(meta["optim_scalars"]).items():
            state.setdefault(int(idx), {}).update(entries)
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["optim_groups"])})
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the optimizer or RNG state is damaged ({e})") from None


def plot_curves(history: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Training and validation loss, and the validation metric, per epoch (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["valid"]["loss"] for h in history], marker="o", label="valid")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [h["valid"][metric] for h in history], marker="o", color="C2")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# -- runs ----------------------------------------------------------------------------------------


def format_metrics(split: str, metrics: dict[str, Any]) -> str:
    """One line, e.g. ``test accuracy=0.8123 loss=0.4321 n=854``."""
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    return f"{split} " + " ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_out(task: str, resume: bool) -> Path:
    """``runs/TASK``, or the first free ``runs/TASK-2``, ``-3``, ... for a new run."""
    base = Path("runs") / task
    if resume or not any((base / f).exists() for f in RUN_FILES):
        return base
    k = 2
    while any((base.with_name(f"{task}-{k}") / f).exists() for f in RUN_FILES):
        k += 1
    return base.with_name(f"{task}-{k}")


def _config_from(task_cls: type[Task], values: Any, source: Path) -> TrainConfig:
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: 'config' is not an object")
    try:
        config = task_cls.Config(**values)
        config.check()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} does not describe a {task_cls.name} config: {e}") from None
    return config


def _saved_run(run_dir: Path) -> tuple[type[Task], TrainConfig, dict[str, Any]]:
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; expected an rnnkit run directory")
    saved = read_json(run_dir / CONFIG)
    if not isinstance(saved, dict) or "task" not in saved:
        raise CheckpointError(f"{run_dir / CONFIG} has no 'task'; the file is corrupt")
    task_cls = tasks.get(saved["task"])
    return task_cls, _config_from(task_cls, saved.get("config"), run_dir / CONFIG), saved


def _check_resume(run_dir: Path, name: str, overrides: dict[str, Any]) -> TrainConfig:
    if not (run_dir / CONFIG).exists():
        raise CheckpointError(
            f"nothing to resume in {run_dir}: it holds no {CONFIG}; start the run without --resume"
        )
    task_cls, config, _ = _saved_run(run_dir)
    if task_cls.name != name:
        raise CheckpointError(
            f"{run_dir} holds a {task_cls.name} run, not {name}; resume it with "
            f"`rnnkit train {task_cls.name} --out {run_dir} --resume`"
        )
    saved = config.to_dict()
    diffs = [
        f"{k} = {saved[k]!r} in the run, {v!r} given"
        for k, v in overrides.items()
        if k not in TrainConfig.RESUMABLE and k in saved and saved[k] != v
    ]
    if diffs:
        allowed = ", ".join(sorted(TrainConfig.RESUMABLE))
        raise CheckpointError(
            f"cannot resume {run_dir} with different options: {'; '.join(diffs)}. Resume without "
            f"them (only {allowed} may change) or start a new run with another --out"
        )
    for k, v in overrides.items():
        if k in TrainConfig.RESUMABLE:
            setattr(config, k, v)
    config.check()
    return config


def _still_stopped(p: Progress, config: TrainConfig) -> bool:
    """Whether a stopped run would stop again at once under ``config`` (its budgets may grow)."""
    out_of_epochs = p.epoch >= config.epochs
    out_of_time = config.max_minutes > 0 and p.seconds >= config.max_minutes * 60
    out_of_patience = config.patience > 0 and p.bad_epochs >= config.patience
    return out_of_epochs or out_of_time or out_of_patience


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _better(task: type[Task], value: float, loss: float, p: Progress) -> bool:
    if p.best is None or math.isnan(p.best):
        return not math.isnan(value)
    if value == p.best:  # a tie on the metric: the lower validation loss wins
        return p.best_loss is not None and loss < p.best_loss
    return value > p.best if task.higher_is_better else value < p.best


def train(
    name: str,
    overrides: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    hook: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Train task ``name`` with config ``overrides`` into run directory ``out``; return metrics.

    ``out`` defaults to ``runs/NAME`` (``runs/NAME-2``, ... when that holds a run). A new run
    never overwrites an existing one; ``resume=True`` continues the run in ``out`` exactly where
    its last checkpoint left it (options in ``TrainConfig.RESUMABLE`` may change, others must
    match). ``progress`` shows a progress bar (default: when stderr is a terminal). ``hook`` is
    called with the :class:`Progress` after every batch.
    """
    started = time.perf_counter()
    overrides = dict(overrides or {})
    task_cls = tasks.get(name)
    run_dir = Path(out) if out is not None else default_out(name, resume)
    state = None
    if resume:
        config = _check_resume(run_dir, name, overrides)
        if (run_dir / STATE).exists():
            state = _read_state(run_dir / STATE)
            p_saved = state[2]
            if p_saved.finished and _still_stopped(p_saved, config):
                raise CheckpointError(
                    f"the run in {run_dir} has finished ({p_saved.stopped}); nothing to resume. "
                    "Raise --epochs, --max-minutes or --patience to train it further; "
                    f"`rnnkit evaluate {run_dir}` prints its metrics"
                )
            elif p_saved.stopped and not _still_stopped(p_saved, config):  # a raised budget
                _say(f"{run_dir} stopped ({p_saved.stopped}); the new budget lets it go on")
                p_saved.stopped, p_saved.finished = "", False
    else:
        existing = [f for f in RUN_FILES if (run_dir / f).exists()]
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds a run ({', '.join(existing)}); continue it with --resume "
                "or choose another --out (nothing was overwritten)"
            )
        try:
            config = task_cls.make_config(overrides)
        except (TypeError, ValueError) as e:
            raise RecipeError(str(e)) from None

    task = task_cls(config)
    splits = task.load_splits()
    if resume:
        vocab = read_json(run_dir / VOCAB)
    else:
        vocab = task.fit_vocab(splits["train"])
    try:
        task.set_vocab(vocab)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / VOCAB} is damaged: {e!r}") from None
    data = {k: task.encode(v) for k, v in splits.items()}
    sizes = {k: task.size(v) for k, v in splits.items()}

    torch.manual_seed(config.seed)
    model = task.build_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    p = Progress()
    if state is not None:
        _restore_state(run_dir / STATE, *state[:2], model, opt)
        p = state[2]
        _say(f"resuming {run_dir}: epoch {p.epoch + 1}, batch {p.batch}, step {p.step}")
    elif not resume or not (run_dir / VOCAB).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / VOCAB, vocab)
        write_json(
            run_dir / CONFIG,
            {
                "task": name,
                "config": config.to_dict(),
                "rnnkit": __version__,
                "torch": torch.__version__,
            },
        )
    wall_before = p.wall

    with torch.random.fork_rng(devices=[]):  # explaining must not move the RNG that dropout uses
        choice = task.explain(model, data["train"])
    n_params = sum(t.numel() for t in model.parameters())
    _say(
        f"{name}: training {n_params:,} parameters on {sizes['train']:,} train / "
        f"{sizes['valid']:,} valid / {sizes['test']:,} test -> {run_dir}"
    )
    _say(f"backend: {choice}")

    def save_state() -> None:
        p.wall = wall_before + time.perf_counter() - started
        _save_state(run_dir / STATE, model, opt, p)

    if not p.stopped:
        _train_epochs(task, config, model, opt, data, p, run_dir, save_state, progress, hook)

    # Final evaluation of the best weights.
    weights, _ = _load_tensors(run_dir / MODEL)
    _load_weights(model, weights, run_dir / MODEL)
    valid = task.evaluate(model, data["valid"])
    test = task.evaluate(model, data["test"])
    metrics = {
        "task": name,
        "metric": task.metric,
        "valid": valid,
        "test": test,
        "splits": sizes,
        "seed": config.seed,
        "best_epoch": p.best_epoch,
        "epochs_run": p.epoch,
        "stopped": p.stopped,
        "train_seconds": round(p.seconds, 2),
        "wall_seconds": round(wall_before + time.perf_counter() - started, 2),
        "backend": {"name": choice.backend, "reason": choice.reason},
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "versions": {
            "rnnkit": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "config": config.to_dict(),
        "history": p.history,
    }
    write_json(run_dir / METRICS, metrics)
    task.artifacts(model, data, run_dir)
    p.finished = True
    save_state()
    return metrics


def _train_epochs(
    task: Task,
    config: TrainConfig,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: dict[str, Any],
    p: Progress,
    run_dir: Path,
    save_state: Callable[[], None],
    progress: bool | None,
    hook: Callable[[Progress], None] | None,
) -> None:
    from tqdm import tqdm

    cls = type(task)
    metric = cls.metric
    per_epoch = len(task.epoch_batches(data["train"], _epoch_generator(config.seed, p.epoch)))
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=config.epochs * per_epoch,
        initial=min(p.epoch * per_epoch + p.batch, config.epochs * per_epoch),
        unit="batch",
        dynamic_ncols=True,
        disable=not show,
        file=sys.stderr,
        mininterval=0.5,
    )
    say = bar.write if show else _say
    budget = config.max_minutes * 60
    last_valid = p.history[-1]["valid"][metric] if p.history else None
    out_of_time = False
    # Training time counts everything in the loop (validation and checkpoints too), over resumes.
    start = last_plot = last_log = time.perf_counter()
    base = p.seconds
    done_here, seqs_here = 0, 0  # batches and sequences trained by this process
    try:
        while p.epoch < config.epochs and not out_of_time:
            batches = task.epoch_batches(data["train"], _epoch_generator(config.seed, p.epoch))
            last_save = time.perf_counter()
            model.train()
            for k in range(p.batch, len(batches)):
                batch = task.collate(data["train"], batches[k])
                loss, n = task.loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                opt.step()
                now = time.perf_counter()
                p.seconds = base + now - start
                p.batch, p.step = k + 1, p.step + 1
                p.loss_sum += loss.item() * n
                p.count += n
                done_here += 1
                seqs_here += task.batch_size_of(batches[k])
                bar.update(1)
                shown = {
                    "epoch": f"{p.epoch + 1}/{config.epochs}",
                    "loss": f"{p.loss_sum / p.count:.4f}",
                }
                if last_valid is not None:
                    shown[f"valid_{metric}"] = f"{last_valid:.4f}"
                shown["seq/s"] = f"{seqs_here / max(now - start, 1e-9):.0f}"
                bar.set_postfix(shown, refresh=False)
                if not show and now - last_log >= LOG_SECONDS:
                    last_log = now
                    left = (bar.total - bar.n) * (now - start) / done_here
                    if budget:
                        left = min(left, max(budget - p.seconds, 0.0))
                    say(
                        f"epoch {p.epoch + 1}/{config.epochs} batch {p.batch}/{len(batches)}: "
                        f"loss {p.loss_sum / p.count:.4f}, {seqs_here / (now - start):.0f} seq/s, "
                        f"ETA {_clock(left)}"
                    )
                if hook is not None:
                    hook(p)
                if budget and p.seconds >= budget:
                    out_of_time = True
                    break
                due = (config.checkpoint_every and p.batch % config.checkpoint_every == 0) or (
                    config.checkpoint_minutes and now - last_save >= config.checkpoint_minutes * 60
                )
                if due and p.batch < len(batches):
                    save_state()
                    last_save = time.perf_counter()

            # End of the epoch (or of the time budget): validate, keep the best weights.
            valid = task.validate(model, data["valid"])
            lr = opt.param_groups[0]["lr"]  # the rate this epoch trained with
            p.seconds = base + time.perf_counter() - start
            better = _better(cls, valid[metric], valid["loss"], p)
            if better:
                p.best, p.best_loss, p.best_epoch, p.bad_epochs = (
                    valid[metric],
                    valid["loss"],
                    p.epoch + 1,
                    0,
                )
                _save_tensors(
                    run_dir / MODEL,
                    model.state_dict(),
                    {"epoch": str(p.epoch + 1), metric: repr(valid[metric])},
                )
            else:
                p.bad_epochs += 1
                for group in opt.param_groups:  # kept in the optimiser state: resumes exactly
                    group["lr"] *= config.lr_decay
            p.history.append(
                {
                    "epoch": p.epoch + 1,
                    "batches": p.batch,
                    "train_loss": p.loss_sum / max(p.count, 1),
                    "lr": lr,
                    "valid": valid,
                    "seconds": round(p.seconds, 2),
                }
            )
            train_loss = p.history[-1]["train_loss"]
            say(
                f"epoch {p.epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, "
                f"valid {metric} {valid[metric]:.4f} loss {valid['loss']:.4f}"
                f"{' (best)' if better else ''}, {p.seconds:.0f} s"
            )
            last_valid = valid[metric]
            p.epoch, p.batch, p.loss_sum, p.count = p.epoch + 1, 0, 0.0, 0
            if out_of_time:
                p.stopped = f"time limit (max_minutes = {config.max_minutes:g})"
            elif config.patience and p.bad_epochs >= config.patience:
                p.stopped = f"no better validation {metric} in {config.patience} epochs"
            elif p.epoch >= config.epochs:
                p.stopped = f"{config.epochs} epochs"
            save_state()
            if not p.stopped and time.perf_counter() - last_plot >= PLOT_SECONDS:
                plot_curves(p.history, metric, run_dir / CURVES)
                last_plot = time.perf_counter()
            if p.stopped:
                break
        if not p.stopped:
            p.stopped = f"{config.epochs} epochs"
            save_state()
        if p.history:
            plot_curves(p.history, metric, run_dir / CURVES)
    finally:
        bar.close()
    best = "none" if p.best is None else f"{p.best:.4f} at epoch {p.best_epoch}"
    say(f"stopped: {p.stopped}; best validation {metric}: {best}")


def load_run(run_dir: str | Path, backend: str | None = None) -> tuple[Task, nn.Module]:
    """The task (with its vocabulary) and model (best weights) saved in ``run_dir``."""
    run_dir = Path(run_dir)
    task_cls, config, _ = _saved_run(run_dir)
    if backend is not None:
        config.backend = backend
    task = task_cls(config)
    task.run_dir = run_dir  # where a task's predict may draw (e.g. sentiment's --explain)
    try:
        task.set_vocab(read_json(run_dir / VOCAB))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / VOCAB} is damaged: {e!r}") from None
    model = task.build_model()
    weights, _ = _load_tensors(run_dir / MODEL)
    _load_weights(model, weights, run_dir / MODEL)
    model.eval()
    return task, model


def evaluate(run_dir: str | Path, backend: str | None = None) -> dict[str, Any]:
    """Recompute the validation and test metrics of the best weights in ``run_dir``."""
    task, model = load_run(run_dir, backend)
    splits = task.load_splits()
    return {split: task.evaluate(model, task.encode(splits[split])) for split in ("valid", "test")}


def predict(
    run_dir: str | Path,
    inputs: list[str],
    options: dict[str, Any] | None = None,
    backend: str | None = None,
) -> list[str]:
    """Run the model in ``run_dir`` on ``inputs`` (sentences, files or prompts, by task)."""
    if not inputs:
        raise RecipeError("no input given; expected at least one INPUT")
    task, model = load_run(run_dir, backend)
    options = options or {}
    unknown = sorted(set(options) - set(type(task).predict_options))
    if unknown:
        valid = ", ".join(f"--{o}" for o in type(task).predict_options) or "none"
        raise RecipeError(
            f"option(s) {', '.join('--' + u for u in unknown)} do not apply to a {task.name} "
            f"model; its predict options: {valid}"
        )
    return task.predict(model, inputs, options)
