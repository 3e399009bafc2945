"""The training loop that every recipe shares, and the run directory it leaves.

``train(task, overrides, out)`` trains a task's model and leaves in ``out``:

- ``config.json`` (task, config, versions) and ``vocab.json`` (what was learnt from the training
  split: vocabulary, labels, feature statistics), written once when the run starts;
- ``model.safetensors``: the weights with the best validation metric so far (with
  ``keep = "last"``: those of the last epoch);
- ``resume.safetensors``: everything needed to continue exactly (weights, optimizer state, the
  torch RNG state, the epoch and batch reached, the history), written at the end of every epoch
  and, within an epoch, every ``checkpoint_minutes`` / ``checkpoint_every`` batches;
- ``metrics.json`` and ``curves.png`` (loss and validation metric per epoch), and what the task
  adds (:meth:`Task.artifacts`, e.g. ``attention.png``).

Every file is written to a temporary name and moved into place with ``os.replace``, so a run
killed at any moment leaves each file either as it was or complete. The batch order of an epoch
depends only on (seed, epoch), and dropout draws from the torch RNG saved in the checkpoint, so a
run killed (even by SIGKILL) and resumed with ``resume=True`` ends with the same weights as a run
that was never interrupted. Ctrl-C (SIGINT) lets the batch at hand finish, saves a resumable
checkpoint of that batch, then raises :class:`Interrupted`.

While a run trains, its process holds a lock in ``out`` (``.rnnkit.lock``, removed at the end):
runs started side by side never share a directory (with the default ``out`` the later one takes
``runs/TASK-2``; a named ``out`` in use, or a ``--resume`` of it, is refused).

Devices and precision: ``train(..., device="auto")`` (``--device``) puts the model, its batches
and its optimizer state on a device (:mod:`rnnkit.devices`); the config's ``precision`` runs the
forward passes under autocast (fp16 with a gradient scaler). Checkpoints hold CPU copies, so a run
continues or is evaluated on any device. Under torchrun (:mod:`rnnkit.distributed`) each process
trains on its shard of every global batch with DistributedDataParallel, and rank 0 alone reads
and writes the run directory.

What a run refuses, on one line each: an ``out`` that cannot hold a run (checked before any data
is loaded); a NaN or infinite training loss or gradient norm (:class:`TrainingDiverged`, naming
the epoch and batch; nothing is written after the last good checkpoint); a checkpoint with a
non-finite tensor or a damaged progress record (:class:`CheckpointError`); a disk that refuses a
write (:class:`StorageError`; the files already there are left as they were).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, tasks
from .backends.cpu import denormals_flushed
from .devices import (
    autocast,
    check_precision,
    describe,
    grad_scaler,
    resolve_device,
    rng_state,
    set_rng_state,
    to_device,
)
from .distributed import World
from .errors import CheckpointError, ProcessLost, RecipeError, StorageError, TrainingDiverged
from .tasks.base import BEFORE_ADDED, Task, TrainConfig, flag

__all__ = [
    "CONFIG",
    "METRICS",
    "MODEL",
    "STATE",
    "Interrupted",
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
#: Held (flock) by the process that trains into a run directory, while it does.
LOCK = ".rnnkit.lock"
STATE_FORMAT = "rnnkit-resume-1"
#: The metadata entry of a checkpoint's checksums: JSON {tensor name: the first 16 hex digits of
#: the SHA-256 of its dtype, shape and bytes}, checked when the file is read (files written
#: before it have none and are read as before).
CHECKSUMS = "rnnkit.sha256"
#: fp16 only: this many optimizer steps in a row skipped for overflowing gradients is divergence.
MAX_OVERFLOWS = 50
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
    seconds: float = 0.0  # training time so far (rank 0's clock), over every resumed part
    wall: float = 0.0  # wall time so far, set-up and evaluation included
    best: float | None = None  # the best validation metric so far
    best_loss: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # why training stopped ("" while it runs)
    finished: bool = False  # the final evaluation is done and metrics.json written


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a resumable checkpoint was saved; the message says where."""


#: Progress fields that are counts (integers >= 0) and amounts (finite numbers).
_COUNTS = ("epoch", "batch", "step", "count", "best_epoch", "bad_epochs")
_AMOUNTS = ("loss_sum", "seconds", "wall")
_HISTORY = {"epoch": int, "batches": int, "train_loss": float, "lr": float, "seconds": float}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _progress_from(text: str, metric: str) -> Progress:
    """The :class:`Progress` saved as JSON by a task whose validation ``metric`` each epoch's
    record holds; ValueError naming the first field out of place."""
    values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{type(values).__name__} found; expected an object")
    names = [f.name for f in dataclasses.fields(Progress)]
    missing = [n for n in sorted(names) if n not in values]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise ValueError("; ".join(parts))
    for name in _COUNTS:
        v = values[name]
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name} = {v!r}; expected an integer >= 0")
    for name in (*_AMOUNTS, "best", "best_loss"):
        v = values[name]
        if not (_number(v) or (v is None and name.startswith("best"))):
            raise ValueError(f"{name} = {v!r}; expected a finite number")
    if not isinstance(values["stopped"], str) or not isinstance(values["finished"], bool):
        raise ValueError(f"stopped = {values['stopped']!r}, finished = {values['finished']!r}")
    history = values["history"]
    if not isinstance(history, list):
        raise ValueError(f"history = {history!r}; expected a list")
    for k, h in enumerate(history):
        if not isinstance(h, dict):
            raise ValueError(f"history[{k}] = {h!r}; expected an object")
        for key, kind in _HISTORY.items():
            ok = _number(h.get(key)) and (kind is float or isinstance(h[key], int))
            if not ok:
                raise ValueError(f"history[{k}].{key} = {h.get(key)!r}; expected a {kind.__name__}")
        if not isinstance(h.get("valid"), dict) or "loss" not in h["valid"]:
            raise ValueError(f"history[{k}].valid = {h.get('valid')!r}; expected the metrics")
        value = h["valid"].get(metric)  # NaN is a metric a diverged epoch may have
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"history[{k}].valid has no {metric!r}: {h['valid']!r}; expected the task's metrics"
            )
    return Progress(**values)


# -- files ---------------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` and ``os.replace``: it is never seen half-written.

    An OSError (disk full, read-only, permission) is a :class:`StorageError`; ``path`` is then
    as it was, and no temporary file is left.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(
            f"cannot write {path}: {e.strerror or e}; the files already in {path.parent} are "
            "unchanged"
        ) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


_DRAFT = re.compile(r"\.(" + "|".join(re.escape(f) for f in (*RUN_FILES, CURVES)) + r")\.\d+\.tmp")


def _remove_drafts(run_dir: Path) -> None:
    """Remove the temporary files of :func:`_atomic` that a process killed mid-write (SIGKILL,
    a power cut) left in ``run_dir``; called while this process holds the directory's lock, so
    no other process is writing them."""
    with contextlib.suppress(OSError):
        for entry in run_dir.iterdir():
            if _DRAFT.fullmatch(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()


def check_out(run_dir: Path) -> None:
    """Refuse a run directory that cannot hold a run: an existing file, a path under a file, a
    place where no file can be created. Cheap, and done before any data is loaded."""
    existing = run_dir
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise RecipeError(
                f"--out {run_dir} is a file; expected a directory (new, empty or holding a run)"
            )
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise RecipeError(f"--out {run_dir}: {existing} is a file, not a directory")
        fd, probe = tempfile.mkstemp(prefix=".rnnkit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageError(
            f"--out {run_dir}: cannot create files in {existing} ({e.strerror or e}); expected a "
            "writable directory"
        ) from None


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


class _NonFinite(ValueError):
    """A tensor about to be saved holds NaN or infinity (it is never written)."""


def _non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, description) of the first floating-point tensor with a NaN or infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            kind = "NaN" if bool(torch.isnan(t).any()) else "infinity"
            return name, f"holds {kind} ({bad} of {t.numel()} values not finite)"
    return None


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    import safetensors.torch

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    bad = _non_finite(flat)
    if bad is not None:
        raise _NonFinite(f"tensor {bad[0]!r} {bad[1]}")
    meta = {**meta, CHECKSUMS: json.dumps({k: _checksum(v) for k, v in flat.items()})}
    _atomic(path, lambda tmp: safetensors.torch.save_file(flat, str(tmp), metadata=meta))


def _checksum(t: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of a (CPU, contiguous) tensor's dtype, shape and
    bytes."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} ".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _check_sums(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """CheckpointError naming the first tensor that does not match the checksum written with it
    (a flipped bit or sector, a file changed since): what safetensors' own checks cannot see."""
    if CHECKSUMS not in meta:
        return
    try:
        sums = json.loads(meta[CHECKSUMS])
        if not isinstance(sums, dict):
            raise ValueError(f"a {type(sums).__name__}")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path}: its record of checksums is damaged ({e}); expected an object of one "
            "checksum per tensor"
        ) from None
    for name, t in tensors.items():
        got = _checksum(t.contiguous())
        if sums.get(name) != got:
            raise CheckpointError(
                f"{path}: tensor {name!r} does not match the checksum written with it (expected "
                f"{sums.get(name)}, read {got}); the file is damaged, or was changed after "
                "rnnkit wrote it"
            )


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"{path} is missing; the run has no checkpoint there")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is corrupt or "
            "incomplete"
        ) from None
    _check_sums(path, tensors, meta)
    bad = _non_finite(tensors)
    if bad is not None:
        raise CheckpointError(
            f"{path}: tensor {bad[0]!r} {bad[1]}; the checkpoint is damaged (expected finite "
            "numbers)"
        )
    return tensors, meta


def _epoch_of(path: Path) -> int | None:
    """The epoch whose weights ``path`` (model.safetensors) holds, from its metadata; None when
    the file cannot be read or does not say."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("epoch", ""))
    except Exception:  # safetensors' own errors for a damaged file; no epoch or not a number
        return None


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:3]
        raise CheckpointError(
            f"{path} does not fit the model that config.json and vocab.json describe (one of "
            f"the three does not belong to the run): {' '.join(first)}"
        ) from None


RNG = dict[str, torch.Tensor]  # one process's random generators: "torch" (CPU), "device"


def _rng_states(device: torch.device) -> RNG:
    """This process's generator states: the CPU's and, on a GPU, the device's (dropout there)."""
    states = {"torch": torch.get_rng_state()}
    on_device = rng_state(device)
    if on_device is not None:
        states["device"] = on_device
    return states


AVERAGE = "average."  # the names of the averaged weights in a resume checkpoint
CARRY = "carry_"  # the names of a task's carried state among a process's saved states


def _carry_of(task: Task) -> dict[str, torch.Tensor]:
    """The task's state carried between batches, named as it is saved beside the generators."""
    return {CARRY + k: v.detach().cpu() for k, v in task.carry_state().items()}


def _save_state(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    p: Progress,
    rngs: list[RNG],
    scaler: torch.amp.GradScaler,
    device: torch.device,
    averaged: nn.Module | None = None,
) -> None:
    """The resume checkpoint: weights (and their moving average, ``average.*``), optimizer and
    loss-scaler state, progress, and every process's random generators and the state its task
    carries between batches (``rngs[rank]``; rank 0's as ``rng.torch``, ``rng.carry_h``...,
    rank r's with the suffix ``.r``)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if averaged is not None:
        tensors.update({f"{AVERAGE}{k}": v for k, v in averaged.state_dict().items()})
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    for rank, states in enumerate(rngs):
        for kind, state in states.items():
            tensors[f"rng.{kind}" + (f".{rank}" if rank else "")] = state
    meta = {
        "format": STATE_FORMAT,
        "progress": json.dumps(dataclasses.asdict(p)),
        "optim_groups": json.dumps(opt_state["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "world_size": str(len(rngs)),
        "device_type": device.type,
    }
    if scaler.is_enabled():
        meta["scaler"] = json.dumps(scaler.state_dict())
    _save_tensors(path, tensors, meta)


def _read_state(
    path: Path, metric: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], Progress]:
    tensors, meta = _load_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not an rnnkit resume checkpoint (format {meta.get('format')!r}; expected "
            f"{STATE_FORMAT!r})"
        )
    try:
        progress = _progress_from(meta["progress"], metric)
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: its progress record is damaged ({e})") from None
    return tensors, meta, progress


def _saved_world_size(meta: dict[str, str], path: Path) -> int:
    """How many processes trained the checkpoint at ``path`` (1 for checkpoints before torchrun
    support); a :class:`CheckpointError` when the record is not a whole number >= 1."""
    text = meta.get("world_size", "1")
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise CheckpointError(
            f"{path}: its record of the processes that trained it is damaged (world_size = "
            f"{text!r}; expected a whole number >= 1)"
        )
    return size


def _restore_state(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    model: nn.Module,
    opt: Any,
    scaler: torch.amp.GradScaler,
    world: World,
    device: torch.device,
    averaged: nn.Module | None = None,
) -> list[RNG]:
    """Load a resume checkpoint into the model (and the weights' moving average), the optimizer
    (its state follows the parameters onto their device), the loss scaler and this rank's random
    generators; returns every rank's generator states as saved."""
    _load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    if averaged is not None:
        average = {k[len(AVERAGE) :]: v for k, v in tensors.items() if k.startswith(AVERAGE)}
        if not average:
            raise CheckpointError(f"{path} holds no averaged weights (average.*)")
        _load_weights(averaged, average, path)
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, entries in json.loads(meta["optim_scalars"]).items():
            state.setdefault(int(idx), {}).update(entries)
        groups = json.loads(meta["optim_groups"])
        for saved, group in zip(groups, opt.param_groups, strict=False):
            # how the step is computed (fused or not) is this process's choice, not the run's
            saved.update({k: group[k] for k in ("fused", "foreach") if k in group})
        opt.load_state_dict({"state": state, "param_groups": groups})
        _check_optimizer(opt)
        rngs: list[RNG] = [{} for _ in range(world.size)]
        for key, value in tensors.items():  # rng.KIND (rank 0) or rng.KIND.RANK
            if key.startswith("rng."):
                _, kind, *rank = key.split(".")
                rngs[int(rank[0]) if rank else 0][kind] = value
        for rank, states in enumerate(rngs):
            if "torch" not in states:
                raise KeyError(f"rng.torch{f'.{rank}' if rank else ''}")
        torch.set_rng_state(rngs[world.rank]["torch"])
        # A GPU's generator continues only on the same kind of device (another device's numbers
        # differ anyway); the CPU generator always continues.
        if "device" in rngs[world.rank] and meta.get("device_type") == device.type:
            set_rng_state(device, rngs[world.rank]["device"])
        if scaler.is_enabled() and "scaler" in meta:
            scaler.load_state_dict(json.loads(meta["scaler"]))
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the optimizer or RNG state is damaged ({e})") from None
    return rngs


def _check_optimizer(opt: torch.optim.Optimizer) -> None:
    """ValueError naming the first setting or state of a loaded AdamW that its next step could
    not use: torch checks none of them when they are loaded, and the step then fails deep inside
    (a moment of the wrong shape) or silently misbehaves (betas outside [0, 1))."""
    for g, group in enumerate(opt.param_groups):
        for key in ("lr", "initial_lr", "eps", "weight_decay"):
            value = group.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"param_groups[{g}].{key} = {value!r}; expected a number >= 0")
        betas = group.get("betas")
        if not (
            isinstance(betas, list | tuple)
            and len(betas) == 2
            and all(_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"param_groups[{g}].betas = {betas!r}; expected two numbers in [0, 1)")
    for k, param in enumerate(p for group in opt.param_groups for p in group["params"]):
        entries = opt.state.get(param, {})
        for name in ("exp_avg", "exp_avg_sq"):
            t = entries.get(name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != param.shape):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"state[{k}].{name} has shape {shape}; expected {tuple(param.shape)}, its "
                    "parameter's"
                )
        step = entries.get("step")
        if step is not None and (
            not isinstance(step, torch.Tensor) or step.numel() != 1 or not bool(step >= 0)
        ):
            raise ValueError(f"state[{k}].step = {step!r}; expected one number >= 0")


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


def _eta(batches_left: int, seconds: float, batches_done: int) -> float:
    """Seconds left at the rate so far; never negative (the bar counts every epoch at the first
    epoch's length, and a later epoch of charlm's may hold one batch more)."""
    return max(batches_left, 0) * seconds / max(batches_done, 1)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_out(task: str, resume: bool, busy: Callable[[Path], bool] | None = None) -> Path:
    """``runs/TASK``, or the first free ``runs/TASK-2``, ``-3``, ... for a new run: free means
    holding no run's files, and not ``busy`` (another process is starting a run there)."""
    base = Path("runs") / task
    if resume:
        return base
    k = 1
    while True:
        candidate = base if k == 1 else base.with_name(f"{task}-{k}")
        if not any((candidate / f).exists() for f in RUN_FILES) and not (
            busy is not None and busy(candidate)
        ):
            return candidate
        k += 1


def _lock(run_dir: Path) -> Callable[[], None] | None:
    """Make ``run_dir`` if needed and take its lock (:data:`LOCK`), which this process then holds
    until the returned release is called (or it exits, even killed): None when another process
    holds it, i.e. is training into ``run_dir``. The release removes the lock file, and the
    directories made here if nothing else was written into them. Where the file system (or the
    platform) has no locks, the run goes on without one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return lambda: None
    made, d = [], run_dir
    while not d.exists() and d != d.parent:
        made.append(d)
        d = d.parent
    path = run_dir / LOCK
    fd: int | None = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError:  # a file system without locks (some network mounts)
                os.close(fd)
                fd = None
                break
            try:  # the file this process locked is still the lock (not one released and removed)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot create {path}: {e.strerror or e}") from None

    def release() -> None:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
        for directory in made:  # the deepest first; stops at the first that holds anything
            try:
                directory.rmdir()
            except OSError:
                break

    return release


def _config_from(task_cls: type[Task], values: Any, source: Path) -> TrainConfig:
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: 'config' is not an object")
    names = {f.name for f in dataclasses.fields(task_cls.Config)}
    values = {k: v for k, v in BEFORE_ADDED.items() if k in names} | values
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
    if not isinstance(saved, dict) or not isinstance(saved.get("task"), str):
        raise CheckpointError(f"{run_dir / CONFIG} has no 'task' name; the file is corrupt")
    try:
        task_cls = tasks.get(saved["task"])
    except RecipeError as e:
        raise CheckpointError(f"{run_dir / CONFIG} names a task this rnnkit lacks: {e}") from None
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
    unknown = sorted(set(overrides) - set(saved))
    if unknown:
        raise RecipeError(
            f"{', '.join(unknown)}: not an option of {name}; expected fields of "
            f"{task_cls.Config.__name__}"
        )
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
    try:
        config.check()  # the values a resume changes, as a new run checks them
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e)) from None
    return config


def _record_config(run_dir: Path, config: TrainConfig) -> None:
    """A resume's config in ``config.json`` when it changed options of ``TrainConfig.RESUMABLE``
    (e.g. raised ``epochs``): a later resume of the run goes on under them, not the first ones."""
    saved = read_json(run_dir / CONFIG)
    if saved.get("config") != config.to_dict():
        write_json(run_dir / CONFIG, {**saved, "config": config.to_dict()})


def resume_command(task: str, run_dir: Path, world_size: int = 1, alone: bool = False) -> str:
    """The command that continues a run of ``world_size`` processes, in backquotes (``alone``:
    say that one process means no torchrun)."""
    command = f"rnnkit train {task} --out {shlex.quote(str(run_dir))} --resume"
    if world_size == 1:
        return f"`{command}`" + (" (one process, without torchrun)" if alone else "")
    return (
        f"`torchrun --standalone --nproc-per-node={world_size} $(which rnnkit) {command[7:]}` (or "
        f"{world_size} processes in all over several machines)"
    )


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


def lr_factor(
    schedule: str,
    step: int,
    total: int,
    seconds: float = 0.0,
    budget: float = 0.0,
    decay_share: float = 1.0,
) -> float:
    """The share of its initial learning rate that optimizer step ``step`` (0, 1, ...) of
    ``total`` takes: 1 under "plateau"; falling from 1 towards 0 at ``total`` along a line
    ("linear") or half a cosine ("cosine"). With a time ``budget`` > 0 (seconds), the schedule
    stands at the share of it already spent (``seconds``) when that is further along than the
    share of the steps, so it ends at the budget if that comes first. With ``decay_share`` < 1
    the rate holds at 1 until that last share of the run, then falls over it."""
    done = step / max(total, 1)
    if budget > 0:
        done = max(done, seconds / budget)
    done = min(max(done - (1.0 - decay_share), 0.0) / decay_share, 1.0)
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


def _global_batches(task: Task, data: Any, generator: torch.Generator, world_size: int) -> list:
    """One epoch's batches for ``world_size`` processes together: the batches one process with a
    ``world_size`` times larger ``batch_size`` would train on, in the same order."""
    if world_size == 1:
        return task.epoch_batches(data, generator)
    wide = copy.copy(task)
    wide.config = dataclasses.replace(task.config, batch_size=task.config.batch_size * world_size)
    return wide.epoch_batches(data, generator)


class _Calls(nn.Module):
    """``model``, whose call can run one of its methods instead of its forward:
    ``calls(*args, method="loss")`` is ``model.loss(*args)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, method: str = "forward", **kwargs: Any) -> Any:
        if method == "forward":
            return self.model(*args, **kwargs)
        return getattr(self.model, method)(*args, **kwargs)


#: Methods of a model that the tasks' losses call instead of the model itself (the
#: encoder-decoders' ``loss``); on a replicated model they run through DistributedDataParallel's
#: call like the model's own, so the backward pass after them averages the gradients too.
_LOSS_METHODS = ("loss",)


def _replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (its call, and its loss methods', synchronises
    the gradients of the backward pass that follows); the model's own attributes (``config``,
    other methods) stay visible through the wrapper, so the tasks' hooks read it as the model."""
    from torch.nn.parallel import DistributedDataParallel

    class Replicated(DistributedDataParallel):
        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                inner = self.module.model
                if name in _LOSS_METHODS and callable(getattr(inner, name, None)):
                    return lambda *args, **kwargs: self(*args, method=name, **kwargs)
                return getattr(inner, name)

    ids = [device.index] if device.type == "cuda" else None
    return Replicated(_Calls(model), device_ids=ids)


def _flushing(dev: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager:
    """Subnormals flushed on every CPU thread while a run on the CPU trains or evaluates, unless
    its config says otherwise (:func:`rnnkit.backends.cpu.flush_denormals`)."""
    if dev.type == "cpu" and config.flush_denormals:
        return denormals_flushed()
    return contextlib.nullcontext()


def train(
    name: str,
    overrides: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    hook: Callable[[Progress], None] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Train task ``name`` with config ``overrides`` into run directory ``out``; return metrics.

    ``out`` defaults to ``runs/NAME`` (``runs/NAME-2``, ... when that holds a run). A new run
    never overwrites an existing one; ``resume=True`` continues the run in ``out`` exactly where
    its last checkpoint left it (options in ``TrainConfig.RESUMABLE`` may change, others must
    match). ``progress`` shows a progress bar (default: when stderr is a terminal). ``hook`` is
    called with the :class:`Progress` after every batch. ``device``: ``auto``, ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps`` (:func:`rnnkit.devices.resolve_device`).

    Started by torchrun (``WORLD_SIZE`` > 1), every process calls this; each trains on its shard
    of every batch, rank 0 alone reads and writes ``out`` and returns the metrics, the others
    return an empty dict when training ends (before the final evaluation, which rank 0 does).
    """
    started = time.perf_counter()
    overrides = dict(overrides or {})
    task_cls = tasks.get(name)
    world = World.from_env()
    try:
        dev = resolve_device(device, world.local_rank if world.distributed else None)
    except RecipeError as e:
        # Before the processes join they cannot agree: the first on each machine (LOCAL_RANK 0)
        # says what every process on it hits; one whose own GPU is missing says so itself.
        if world.local_rank and _fails(lambda: resolve_device(device, 0)):
            e.shared = True  # type: ignore[attr-defined]
        raise
    world.start(dev)
    try:
        with contextlib.ExitStack() as undo:
            return _train(
                task_cls, overrides, out, resume, progress, hook, world, dev, started, undo
            )
    except BaseException as e:
        if world.distributed:
            _release_frames(e)
        raise
    finally:
        world.close()


def _release_frames(error: BaseException) -> None:
    """Free the locals of the finished frames ``error`` (and the errors it chains) holds, so that
    the model's DistributedDataParallel wrapper goes before the process group does, as it does
    when training ends normally.

    Its reducer holds the process group and is freed with the GIL held: were it the last owner,
    the group's destructor would wait, GIL held, for a gloo worker thread that may still be
    releasing the last all-reduce's tensors and needs the GIL to do so (a process that never
    exits). Freed before :meth:`World.close`, the group outlives it, and leaving the group
    releases the GIL while it waits. The traceback keeps its lines (what a report prints)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            traceback.clear_frames(e.__traceback__)
            todo += [e.__cause__, e.__context__]
    gc.collect()


@contextlib.contextmanager
def _lost_peer_resumes(world: World, task: str, run_dir: Path) -> Iterator[None]:
    """Training, where another process lost in a collective (:class:`ProcessLost`, from the
    world's own collectives or DistributedDataParallel's gradient all-reduce) stops this one
    with how the run goes on."""
    try:
        with world.collective("the gradients' all-reduce"):
            yield
    except ProcessLost as e:
        again = resume_command(task, run_dir, world.size)
        if not world.is_main:
            goes_on = f"{again} continues it from rank 0's last checkpoint in {run_dir}"
        elif (run_dir / STATE).exists():
            goes_on = f"{again} continues it from the last checkpoint in {run_dir}"
        else:
            goes_on = f"no checkpoint had been saved in {run_dir}: start it again"
        e.args = (f"{e}; {goes_on}",)
        raise


def _fails(step: Callable[[], object]) -> bool:
    """Whether ``step()`` raises a :class:`RecipeError`."""
    try:
        step()
    except RecipeError:
        return True
    return False


def _setup(
    task_cls: type[Task],
    overrides: dict[str, Any],
    out: str | Path | None,
    resume: bool,
    world: World,
    undo: contextlib.ExitStack,
) -> tuple[Path, TrainConfig, Any]:
    """Rank 0's look at the run directory: where it is, the config, the checkpoint to resume.

    The run directory is claimed first (its lock, held until the run ends), so that runs started
    side by side never train into one directory: a new run with the default ``out`` takes the
    next free one, any other is refused while another process trains there."""
    name = task_cls.name

    def busy(candidate: Path) -> bool:
        check_out(candidate)
        release = _lock(candidate)
        if release is None:
            return True
        if out is None and not resume and any((candidate / f).exists() for f in RUN_FILES):
            release()  # a run that started and wrote its files since default_out looked
            return True
        undo.callback(release)
        return False

    if out is None and not resume:
        run_dir = default_out(name, resume, busy)
    else:
        run_dir = Path(out) if out is not None else default_out(name, resume)
        if busy(run_dir):
            raise CheckpointError(
                f"{run_dir} is in use by another rnnkit process, which is training into it "
                f"(it holds {run_dir / LOCK}); wait for it to end, or choose another --out"
            )
    _remove_drafts(run_dir)
    state = None
    if resume:
        config = _check_resume(run_dir, name, overrides)
        if (run_dir / STATE).exists():
            state = _read_state(run_dir / STATE, task_cls.metric)
            p_saved = state[2]
            saved_world = _saved_world_size(state[1], run_dir / STATE)
            same_world = saved_world == world.size
            again = resume_command(name, run_dir, saved_world, alone=True)
            if p_saved.finished and _still_stopped(p_saved, config):
                # Whatever the number of processes: a finished run has nothing to resume.
                further = "" if same_world else f" with {saved_world} process(es), as in {again}"
                raise CheckpointError(
                    f"the run in {run_dir} has finished ({p_saved.stopped}); nothing to resume. "
                    f"Raise --epochs, --max-minutes or --patience to train it further{further}; "
                    f"`rnnkit evaluate {run_dir}` prints its metrics"
                )
            if not same_world:
                many = f"{world.size} processes are" if world.distributed else "1 process is"
                raise CheckpointError(
                    f"{run_dir / STATE} holds a run of {saved_world} process(es) and {many} "
                    f"running; the batch order needs the same number: {again}"
                )
            elif p_saved.stopped and not _still_stopped(p_saved, config):  # a raised budget
                _say(f"{run_dir} stopped ({p_saved.stopped}); the new budget lets it go on")
                p_saved.stopped, p_saved.finished = "", False
        else:
            # No checkpoint: the run stopped before its first one and starts over, unless it
            # left weights or metrics behind, which starting over would overwrite. Weights of
            # the first epoch alone are what stopping at its checkpoint (a full disk, a kill)
            # leaves: starting over writes them again.
            left = [f for f in (MODEL, METRICS) if (run_dir / f).exists()]
            if left == [MODEL] and _epoch_of(run_dir / MODEL) == 1:
                _say(
                    f"{run_dir} holds the weights of its first epoch but not its checkpoint; "
                    "starting the run over"
                )
                left = []
            if left:
                raise CheckpointError(
                    f"{run_dir} holds {' and '.join(left)} but no {STATE} to continue from; "
                    "resuming would start over and overwrite them. Choose another --out "
                    "(nothing was overwritten)"
                )
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
    return run_dir, config, state


def _train(
    task_cls: type[Task],
    overrides: dict[str, Any],
    out: str | Path | None,
    resume: bool,
    progress: bool | None,
    hook: Callable[[Progress], None] | None,
    world: World,
    dev: torch.device,
    started: float,
    undo: contextlib.ExitStack,
) -> dict[str, Any]:
    name = task_cls.name
    run_dir, config, state = world.on_main(
        lambda: _setup(task_cls, overrides, out, resume, world, undo)
    )
    say = _say if world.is_main else _quiet
    # What every rank does on its own before training (the device's precision, the data, the
    # model, the checkpoint) fails alike on every rank: rank 0 alone reports it.
    with world.together():
        check_precision(dev, config.precision)
        undo.enter_context(_flushing(dev, config))
        task = task_cls(config)
        task.device = dev
        task.world_size = world.size
        splits = task.load_splits()

    def vocabulary() -> dict[str, Any]:
        # A run that stopped before its first checkpoint starts over: it learns its vocabulary
        # again if it never wrote it (config.json is written first).
        if resume and (state is not None or (run_dir / VOCAB).exists()):
            return read_json(run_dir / VOCAB)
        return task.fit_vocab(splits["train"])

    vocab = world.on_main(vocabulary)
    with world.together():
        try:
            task.set_vocab(vocab)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{run_dir / VOCAB} is damaged: {e!r}") from None
        data = {k: task.encode(v) for k, v in splits.items()}
        sizes = {k: task.size(v) for k, v in splits.items()}

        # A run without a checkpoint (new, or started over by a resume that found none, with the
        # vocabulary it saved) builds its initial weights as a new run does, pretrained parts
        # included.
        task.fresh = state is None
        torch.manual_seed(config.seed)
        model = task.build_model()  # on the CPU: the same initial weights on every device
        model.to(dev)
        model.train()

    def explain() -> Any:
        # explaining must not move dropout's RNG; under the run's precision, as training runs
        with torch.random.fork_rng(devices=[]), autocast(dev, config.precision):
            return task.explain(model, data["train"])

    # Before anything is written: a backend that cannot run here (BackendUnavailable) leaves
    # the run directory as it was.
    choice = world.on_main(explain)
    p = Progress()
    rngs: list[RNG] = []
    with world.together():
        opt = adamw(model.parameters(), config.lr, config.weight_decay, dev)
        for group in opt.param_groups:  # what a schedule scales (lr_decay lowers it); resumed
            group["initial_lr"] = group["lr"]
        averaged = average_of(model) if config.average else None
        scaler = grad_scaler(dev, config.precision)
        if world.rank:  # dropout: the other ranks draw their own masks (rank 0 as one process)
            torch.manual_seed(config.seed * 1_000_003 + 7919 * world.rank)
        if state is not None:
            rngs = _restore_state(
                run_dir / STATE, *state[:2], model, opt, scaler, world, dev, averaged
            )
            p = state[2]
            carried = {
                k[len(CARRY) :]: v for k, v in rngs[world.rank].items() if k.startswith(CARRY)
            }
            if carried and p.batch:
                task.load_carry(to_device(carried, dev))
    if state is not None:
        say(f"resuming {run_dir}: epoch {p.epoch + 1}, batch {p.batch}, step {p.step}")
    else:

        def start_files() -> None:
            if resume and (run_dir / VOCAB).exists():
                return
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {run_dir}: {e.strerror or e}") from None
            write_json(
                run_dir / CONFIG,
                {
                    "task": name,
                    "config": config.to_dict(),
                    "rnnkit": __version__,
                    "torch": torch.__version__,
                },
            )
            write_json(run_dir / VOCAB, vocab)

        world.on_main(start_files)
    if resume:
        world.on_main(lambda: _record_config(run_dir, config))
    wall_before = p.wall

    n_params = sum(t.numel() for t in model.parameters())
    procs = f" x {world.size} processes" if world.distributed else ""
    say(
        f"{name}: training {n_params:,} parameters on {sizes['train']:,} train / "
        f"{sizes['valid']:,} valid / {sizes['test']:,} test -> {run_dir}"
    )
    say(f"device: {dev} ({describe(dev)}){procs}, precision {config.precision}")
    say(f"backend: {choice}")

    def save_state(final: bool = False) -> None:
        """Write the resume checkpoint on rank 0 with every rank's generators (``final``: after
        training, when the other ranks have left; their generators are as last gathered)."""
        p.wall = wall_before + time.perf_counter() - started
        if final:
            mine = {**_rng_states(dev), **_carry_of(task)}
            rngs[:] = [mine, *rngs[1:]] if rngs else [mine]
            _save_state(run_dir / STATE, model, opt, p, rngs, scaler, dev, averaged)
            return
        gathered = world.gather({**_rng_states(dev), **_carry_of(task)})
        if gathered is not None:
            rngs[:] = gathered
        world.on_main(
            lambda: _save_state(run_dir / STATE, model, opt, p, rngs, scaler, dev, averaged)
        )

    if not p.stopped:
        trained = _replicate(model, dev) if world.distributed else model
        with _lost_peer_resumes(world, name, run_dir), _CtrlC() as ctrl_c:
            _train_epochs(
                task,
                config,
                model,
                opt,
                data,
                p,
                run_dir,
                save_state,
                progress,
                hook,
                ctrl_c,
                world=world,
                device=dev,
                scaler=scaler,
                trained=trained,
                averaged=averaged,
            )
    if not world.is_main:
        return {}  # rank 0 evaluates and writes metrics.json

    # Final evaluation of the best weights (or the average), in the model: the weights training
    # reached come back before the last checkpoint, so that more epochs go on from them.
    reached = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    weights, _ = _load_tensors(run_dir / MODEL)
    _load_weights(model, weights, run_dir / MODEL)
    with autocast(dev, config.precision):
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
        "device": str(dev),
        "device_name": describe(dev),
        "precision": config.precision,
        "world_size": world.size,
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
    try:
        with autocast(dev, config.precision):
            task.artifacts(model, data, run_dir)
    except OSError as e:
        raise StorageError(f"cannot write the plots of {task.name} into {run_dir}: {e}") from None
    model.load_state_dict(reached)
    p.finished = True
    save_state(final=True)
    return metrics


def _quiet(message: str) -> None:
    """What ranks other than 0 say: nothing (rank 0 speaks for the run)."""


class _CtrlC:
    """SIGINT while training: the batch at hand finishes and :func:`_train_epochs` saves a
    checkpoint of it before stopping (``pending``). While ``at_once`` is set (validation, which a
    resumed run repeats) it stops at once, as a second Ctrl-C always does. Installed only in the
    main thread and where SIGINT is not ignored; the previous handler comes back on exit."""

    def __init__(self) -> None:
        self.pending = False
        self.at_once = False
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None and previous != signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at_once or self.pending:
            raise KeyboardInterrupt
        self.pending = True


#: Devices whose parameters AdamW updates with torch's fused kernel.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(
    params: Iterable[nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """The recipes' optimizer: AdamW with torch's fused kernel (``fused=True``) on the devices
    that have one, which reads and writes each parameter, gradient and moment once a step where
    the default (``foreach``) makes a pass over all of them per arithmetic operation: 3x faster
    for g2p's default pair (3.2M parameters) on 2 CPU cores, its whole training step 1.03x
    (``benchmarks/bench_optimizer.py``, BENCHMARKS.md); the same steps to rounding.

    A resumed run steps as this function chooses, whatever the checkpoint's run used: a run that
    trained fused continues exactly, one saved before fused steps continues to rounding.
    """
    fused = device.type in FUSED_ADAMW_DEVICES or None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def average_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that holds the moving average of its weights (no gradients)."""
    averaged = copy.deepcopy(model)
    averaged.requires_grad_(False)
    return averaged


@torch.no_grad()
def update_average(averaged: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """After optimizer step ``step`` (1, 2, ...): ``avg <- d * avg + (1 - d) * w`` for every
    weight, with ``d = min(decay, (1 + step) / (10 + step))`` so that the first steps' weights,
    far from trained, fade quickly; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for a, w in zip(averaged.parameters(), model.parameters(), strict=True):
        a.lerp_(w.detach(), 1.0 - d)
    for a, w in zip(averaged.buffers(), model.buffers(), strict=True):
        a.copy_(w)


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
    ctrl_c: _CtrlC | None = None,
    *,
    world: World | None = None,
    device: torch.device | None = None,
    scaler: torch.amp.GradScaler | None = None,
    trained: nn.Module | None = None,
    averaged: nn.Module | None = None,
) -> None:
    """The epochs of a run. ``trained`` is what the loss calls (``model``, or its
    DistributedDataParallel wrapper under torchrun); ``model`` is validated and saved, or
    ``averaged``, the moving average of its weights (``--average``), when there is one."""
    from tqdm import tqdm

    cls = type(task)
    metric = cls.metric
    ctrl_c = ctrl_c or _CtrlC()
    world = world or World()
    device = device or torch.device("cpu")
    scaler = scaler or grad_scaler(device, "fp32")
    trained = trained or model
    kept = averaged if averaged is not None else model  # what is validated and saved
    precision = config.precision

    def batches_of(epoch: int) -> list[Any]:
        generator = _epoch_generator(config.seed, epoch)
        return _global_batches(task, data["train"], generator, world.size)

    # The epochs' length that the schedule's total steps and the progress bar count with: the
    # first epoch's, whichever epoch a run resumes in (charlm's epochs may differ by a batch).
    per_epoch = len(batches_of(0))
    in_epoch = per_epoch if p.epoch == 0 else len(batches_of(p.epoch))
    if p.batch > in_epoch:
        raise CheckpointError(
            f"{run_dir / STATE}: its progress record is damaged (batch = {p.batch}; the epoch "
            f"has only {in_epoch} batches)"
        )
    show = (sys.stderr.isatty() if progress is None else progress) and world.is_main
    bar = tqdm(
        total=config.epochs * per_epoch,
        initial=min(p.epoch * per_epoch + p.batch, config.epochs * per_epoch),
        unit="batch",
        dynamic_ncols=True,
        disable=not show,
        file=sys.stderr,
        mininterval=0.5,
    )
    say = bar.write if show else _say if world.is_main else _quiet
    budget = config.max_minutes * 60
    last_valid = p.history[-1]["valid"][metric] if p.history else None
    out_of_time = False
    # Training time counts everything in the loop (validation and checkpoints too), over resumes.
    start = last_plot = last_log = time.perf_counter()
    base = p.seconds
    # Seconds since ``start`` by rank 0's clock, as every rank knows it (each batch agrees on it):
    # the time limit and the checkpoint schedule follow it, so all ranks stop at the same batch.
    clock = 0.0
    done_here, seqs_here = 0, 0  # batches and sequences trained by this process (all ranks)
    overflows = 0  # fp16: optimizer steps skipped in a row for overflowing gradients
    # Where the resume checkpoint on disk stands (epoch, batch), if there is one.
    saved: list[tuple[int, int] | None] = [(p.epoch, p.batch) if p.step else None]

    def diverged(where: str, what: str) -> TrainingDiverged:
        if config.clip > 0:
            cure = f"lower --lr (now {config.lr:g}) or --clip (now {config.clip:g})"
        else:
            cure = f"lower --lr (now {config.lr:g}) or set --clip (e.g. --clip 1; now off)"
        kept = (
            f"the checkpoint in {run_dir} is kept as saved at epoch {saved[0][0] + 1}, batch "
            f"{saved[0][1]}"
            if saved[0] is not None
            else f"no checkpoint had been saved in {run_dir}"
        )
        error = TrainingDiverged(
            f"training diverged at epoch {p.epoch + 1}/{config.epochs}, {where}: {what}; "
            f"{cure} and start a new run with another --out; {kept}"
        )
        if world.distributed and not world.is_main:
            # every rank sees the same all-reduced loss and gradients, so every rank stops at
            # the same batch: rank 0 says it once
            error.shared = True  # type: ignore[attr-defined]
        return error

    def checkpoint(where: str) -> None:
        if saved[0] == (p.epoch, p.batch) and p.batch:
            return  # this very batch is on disk already
        try:
            save_state()
        except _NonFinite as e:
            raise diverged(
                where, f"the weights or optimizer state became non-finite ({e})"
            ) from None
        saved[0] = (p.epoch, p.batch)

    def stop_if_interrupted(agreed: bool | None = None) -> None:
        """Save and stop if Ctrl-C was pressed (on any rank; ``agreed``: the ranks have already
        agreed whether it was, otherwise they agree here)."""
        if agreed is None:
            agreed = world.any(ctrl_c.pending)
        if not agreed:
            return
        ctrl_c.pending = True
        checkpoint(f"batch {p.batch}")
        where = (
            f"after training ({p.stopped}), before the final evaluation"
            if p.stopped
            else f"at epoch {p.epoch + 1}/{config.epochs}, batch {p.batch}/"
            f"{len(batches_of(p.epoch))}"
        )
        raise Interrupted(
            f"interrupted {where}; saved {run_dir / STATE}; "
            f"{resume_command(cls.name, run_dir, world.size)} continues from there"
        )

    try:
        while p.epoch < config.epochs and not out_of_time:
            batches = batches_of(p.epoch)
            last_save = clock if world.distributed else time.perf_counter() - start
            model.train()
            for k in range(p.batch, len(batches)):
                if k == 0:
                    task.start_epoch()
                where = f"batch {k + 1}/{len(batches)}"
                part, real = batches[k], True
                if world.distributed:  # this rank's shard; an empty one computes with weight 0
                    part = task.shard(batches[k], world.rank, world.size)
                    if len(part) == 0:
                        part, real = batches[k][:1], False
                batch = to_device(task.collate(data["train"], part), device)
                with autocast(device, precision):
                    loss, n = task.loss(trained, batch)
                n = n if real else 0
                if world.distributed:
                    # One all-reduce: the loss summed over items and the item count of the
                    # global batch, whether Ctrl-C was pressed anywhere, and rank 0's clock.
                    here = float(loss.detach()) * n if n else 0.0
                    mine = time.perf_counter() - start if world.is_main else 0.0
                    loss_sum, count, interrupted, clock = world.sum(
                        [here, n, float(ctrl_c.pending), mine]
                    )
                    count = round(count)
                    loss_value = loss_sum / max(count, 1)
                    # DistributedDataParallel averages the ranks' gradients; weighting each
                    # rank's mean loss by its share of the items makes that average the gradient
                    # of the global batch's mean loss, as one process would compute it.
                    loss = loss * (n * world.size / max(count, 1))
                else:
                    loss_value = loss.item()
                    loss_sum, count, interrupted = loss_value * n, n, 0.0
                if not math.isfinite(loss_value):
                    raise diverged(where, f"the training loss is {loss_value}")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)  # fp16: the true gradients, for the norm and clipping
                # The norm of all gradients before clipping (max_norm = inf: none; grads * 1.0).
                norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.clip or math.inf))
                if not math.isfinite(norm):
                    if not scaler.is_enabled():
                        raise diverged(where, f"the gradient norm is {norm}")
                    # fp16: the loss scale was too high; the scaler skips this step and halves
                    # it. Only a long run of such steps is divergence.
                    overflows += 1
                    if overflows >= MAX_OVERFLOWS:
                        raise diverged(
                            where,
                            f"the gradients overflowed float16 in {overflows} steps in a row "
                            f"(loss scale now {scaler.get_scale():g}); try --precision bf16",
                        )
                else:
                    overflows = 0
                if config.lr_schedule != "plateau":
                    share = lr_factor(
                        config.lr_schedule,
                        p.step,
                        config.epochs * per_epoch,
                        p.seconds,
                        budget if config.schedule_by_time else 0.0,
                        config.decay_share,
                    )
                    for group in opt.param_groups:
                        group["lr"] = group.get("initial_lr", config.lr) * share
                try:
                    scaler.step(opt)
                except RuntimeError as e:
                    if "overflow" not in str(e):
                        raise
                    raise diverged(where, f"the optimizer step overflows ({e})") from None
                scaler.update()
                now = time.perf_counter()
                if not world.distributed:
                    clock = now - start
                p.seconds = base + clock
                p.batch, p.step = k + 1, p.step + 1
                if averaged is not None:
                    update_average(averaged, model, config.average, p.step)
                p.loss_sum += loss_sum
                p.count += count
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
                    left = _eta(bar.total - bar.n, now - start, done_here)
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
                    config.checkpoint_minutes
                    and clock - last_save >= config.checkpoint_minutes * 60
                )
                if due and p.batch < len(batches):
                    checkpoint(where)
                    last_save = clock if world.distributed else time.perf_counter() - start
                stop_if_interrupted(interrupted > 0 if world.distributed else ctrl_c.pending)

            # End of the epoch (or of the time budget): validate, keep the best weights. Ctrl-C
            # stops validation of a whole epoch at once: the checkpoint of its last batch makes a
            # resumed run validate it. (Out of time, mid-epoch, it waits for the epoch's end.)
            ctrl_c.at_once = not out_of_time and world.is_main

            def validate() -> dict[str, Any]:
                with autocast(device, precision):
                    return task.validate(kept, data["valid"])

            try:
                valid = world.on_main(validate)  # rank 0 validates; every rank reads its metrics
            except KeyboardInterrupt:
                ctrl_c.pending = True
                stop_if_interrupted()
                raise
            finally:
                ctrl_c.at_once = False
            if not math.isfinite(valid["loss"]):
                raise diverged("in validation", f"the validation loss is {valid['loss']}")
            lr = opt.param_groups[0]["lr"]  # the rate this epoch trained with
            # rank 0's clock on every rank: a schedule by time reads it at the next step
            p.seconds = world.share(base + time.perf_counter() - start)
            # keep = "last": every epoch's weights replace the previous ones (no early stopping)
            better = config.keep == "last" or _better(cls, valid[metric], valid["loss"], p)
            if better:
                best_meta = {"epoch": str(p.epoch + 1), metric: repr(valid[metric])}
                try:
                    world.on_main(
                        lambda meta=best_meta: _save_tensors(
                            run_dir / MODEL, kept.state_dict(), meta
                        )
                    )
                except _NonFinite as e:
                    raise diverged(
                        "in validation", f"the weights became non-finite ({e})"
                    ) from None
                p.best, p.best_loss, p.best_epoch, p.bad_epochs = (
                    valid[metric],
                    valid["loss"],
                    p.epoch + 1,
                    0,
                )
            else:
                p.bad_epochs += 1
                for group in opt.param_groups:  # kept in the optimiser state: resumes exactly
                    group["lr"] *= config.lr_decay
                    group["initial_lr"] = group.get("initial_lr", config.lr) * config.lr_decay
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
                f"{'' if not better else ' (kept)' if config.keep == 'last' else ' (best)'}, "
                f"{p.seconds:.0f} s"
            )
            last_valid = valid[metric]
            p.epoch, p.batch, p.loss_sum, p.count = p.epoch + 1, 0, 0.0, 0
            if out_of_time:
                p.stopped = f"time limit (max_minutes = {config.max_minutes:g})"
            elif config.patience and p.bad_epochs >= config.patience:
                p.stopped = f"no better validation {metric} in {config.patience} epochs"
            elif p.epoch >= config.epochs:
                p.stopped = f"{config.epochs} epochs"
            checkpoint("the end of the epoch")

            def plot_now(since: float = last_plot) -> float:
                if not p.stopped and time.perf_counter() - since >= PLOT_SECONDS:
                    plot_curves(p.history, metric, run_dir / CURVES)
                    return time.perf_counter()
                return since

            last_plot = world.on_main(plot_now)
            if p.stopped:
                break
            stop_if_interrupted()
        if not p.stopped:
            p.stopped = f"{config.epochs} epochs"
            checkpoint("the end")
        if p.history:
            world.on_main(lambda: plot_curves(p.history, metric, run_dir / CURVES))
        stop_if_interrupted()
    finally:
        bar.close()
    best = "none" if p.best is None else f"{p.best:.4f} at epoch {p.best_epoch}"
    kept_what = "the last epoch's" if config.keep == "last" else "best"
    say(f"stopped: {p.stopped}; {kept_what} validation {metric}: {best}")


def load_run(
    run_dir: str | Path,
    backend: str | None = None,
    device: str | torch.device = "cpu",
    precision: str | None = None,
) -> tuple[Task, nn.Module]:
    """The task (with its vocabulary) and model (best weights) saved in ``run_dir``, the model on
    ``device`` (a name as ``--device`` takes, or a torch.device). ``backend`` and ``precision``
    replace the run's (``task.config`` holds what applies)."""
    run_dir = Path(run_dir)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    task_cls, config, _ = _saved_run(run_dir)
    if backend is not None:
        config.backend = backend
    if precision is not None:
        config.precision = precision
    check_precision(dev, config.precision)
    task = task_cls(config)
    task.device = dev
    task.run_dir = run_dir  # where a task's predict may draw (e.g. sentiment's --explain)
    try:
        task.set_vocab(read_json(run_dir / VOCAB))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / VOCAB} is damaged: {e!r}") from None
    model = task.build_model()
    weights, _ = _load_tensors(run_dir / MODEL)  # CPU tensors, copied onto the model's device
    _load_weights(model, weights, run_dir / MODEL)
    model.to(dev)
    model.eval()
    return task, model


def evaluate(
    run_dir: str | Path,
    backend: str | None = None,
    device: str = "auto",
    precision: str | None = None,
) -> dict[str, Any]:
    """Recompute the validation and test metrics of the best weights in ``run_dir`` on
    ``device`` in ``precision`` (default: the run's)."""
    dev = resolve_device(device)
    task, model = load_run(run_dir, backend, dev, precision)
    splits = task.load_splits()
    with autocast(dev, task.config.precision), _flushing(dev, task.config):
        return {
            split: task.evaluate(model, task.encode(splits[split])) for split in ("valid", "test")
        }


def predict(
    run_dir: str | Path,
    inputs: list[str],
    options: dict[str, Any] | None = None,
    backend: str | None = None,
    device: str = "auto",
    precision: str | None = None,
) -> list[str] | Iterator[str]:
    """Run the model in ``run_dir`` on ``inputs`` (sentences, files or prompts, by task) on
    ``device`` in ``precision`` (default: the run's): the lines to print, or, from a task that
    streams them (speech's ``--stream``), an iterator giving each as it is ready."""
    if not inputs:
        raise RecipeError("no input given; expected at least one INPUT")
    dev = resolve_device(device)
    task_cls, _, _ = _saved_run(Path(run_dir))
    options = options or {}
    unknown = sorted(set(options) - set(task_cls.predict_options))
    if unknown:
        valid = ", ".join(flag(o) for o in task_cls.predict_options) or "none"
        raise RecipeError(
            f"option(s) {', '.join(flag(u) for u in unknown)} do not apply to a {task_cls.name} "
            f"model; its predict options: {valid}"
        )
    for name, value in options.items():
        try:
            task_cls.predict_options[name].check(name, value)
        except ValueError as e:
            raise RecipeError(str(e)) from None
    task, model = load_run(run_dir, backend, dev, precision)
    with autocast(dev, task.config.precision):
        lines = task.predict(model, inputs, options)
    if isinstance(lines, list):
        return lines

    def streamed() -> Iterator[str]:  # a task streaming its lines: each as it comes
        with autocast(dev, task.config.precision):
            yield from lines

    return streamed()
