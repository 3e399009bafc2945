"""Where the recipes run and in which precision: ``--device`` and ``--precision``.

``--device auto|cpu|cuda|cuda:N|mps`` names where a model, its batches and its optimizer state
live (``auto``: the first CUDA device when one is visible, otherwise the CPU). ``--precision
fp32|bf16|fp16`` runs forward passes under :func:`torch.autocast` in that dtype (the weights and
the optimizer stay float32); fp16 scales the loss with a gradient scaler so that small gradients do
not flush to zero. Checkpoints are always written from CPU copies and read back onto whatever
device the model is on, so a run trained on one device evaluates and resumes on another.

A device name that means nothing is a usage error (:class:`~rnnkit.errors.RecipeError`, exit 2);
a device or precision this machine does not have is a :class:`~rnnkit.errors.DeviceError`
(exit 1), each on one line that says what to use instead.
"""

from __future__ import annotations

import contextlib
import platform
import re
from collections.abc import Mapping
from typing import Any

import torch

from .errors import DeviceError, RecipeError

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "autocast",
    "check_device_name",
    "check_precision",
    "describe",
    "grad_scaler",
    "resolve_device",
    "rng_state",
    "set_rng_state",
    "to_device",
]

#: What ``--device`` accepts (N: a CUDA device index).
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
#: ``--precision`` -> the autocast dtype (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# fullmatch, ASCII digits: no name with a trailing newline (which "$" lets through) or other
# scripts' digits
_NAME = re.compile(r"(auto|cpu|mps|cuda)(?::([0-9]+))?")


def check_device_name(spec: str) -> None:
    """RecipeError (exit 2) unless ``spec`` is one of :data:`DEVICES`."""
    m = _NAME.fullmatch(spec) if isinstance(spec, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise RecipeError(
            f"--device {spec!r}; expected auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
        )


def _cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if torch.version.cuda is None and torch.version.hip is None:
        return (
            f"this torch ({torch.__version__}) was built without CUDA; install a CUDA build of "
            "torch on a machine with an NVIDIA GPU"
        )
    if not torch.cuda.is_available():
        return (
            "no CUDA device is visible (torch.cuda.is_available() is False: check the driver and "
            "CUDA_VISIBLE_DEVICES)"
        )
    return None


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The :class:`torch.device` that ``--device spec`` names on this machine.

    ``local_rank`` (set under torchrun) picks ``cuda:LOCAL_RANK`` for ``auto`` and ``cuda``, so
    that each process on a machine has its own GPU; naming one GPU (``cuda:N``) for several
    processes is refused. Raises RecipeError for a name that means nothing and DeviceError for a
    device this machine does not have.
    """
    check_device_name(spec)
    kind, _, index = spec.partition(":")
    if kind == "auto":
        kind = "cuda" if _cuda_problem() is None else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if local_rank is not None:
            raise RecipeError(
                "--device mps: several processes on one MPS device are not supported; use "
                "--device cpu under torchrun, or run one process"
            )
        if not torch.backends.mps.is_available():
            raise DeviceError(
                "--device mps: the MPS backend is not available here (it needs Apple silicon and "
                "a torch built with MPS); use --device cpu"
            )
        return torch.device("mps")
    problem = _cuda_problem()
    if problem is not None:
        raise DeviceError(f"--device {spec}: {problem}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if local_rank is not None:
        if index:
            raise RecipeError(
                f"--device {spec} names one GPU for every process; under torchrun give --device "
                "cuda (or auto): each process takes cuda:LOCAL_RANK"
            )
        if local_rank >= count:
            raise DeviceError(
                f"LOCAL_RANK {local_rank} needs cuda:{local_rank}, but {count} CUDA device(s) are "
                f"visible; run at most {count} process(es) per machine (--nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    number = int(index) if index else torch.cuda.current_device()
    if number >= count:
        raise DeviceError(
            f"--device {spec}: {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
            "check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", number)


def check_precision(device: torch.device, precision: str) -> None:
    """RecipeError for an unknown precision, DeviceError where ``device`` cannot run it."""
    if precision not in PRECISIONS:
        raise RecipeError(f"--precision {precision!r}; expected one of {list(PRECISIONS)}")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
            "use --precision fp16 (with loss scaling) or fp32"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """:func:`torch.autocast` on ``device`` in ``precision`` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (also inside dicts, lists and tuples) on ``device``."""
    if isinstance(obj, torch.Tensor):
        # Asynchronous only towards an accelerator: a copy to the CPU must be complete when read.
        return obj.to(device, non_blocking=device.type != "cpu")
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def describe(device: torch.device) -> str:
    """The device's name, for metrics.json: e.g. ``NVIDIA H100 80GB HBM3`` or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_name()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def rng_state(device: torch.device) -> torch.Tensor | None:
    """The state of ``device``'s own random generator (dropout on a GPU draws from it); None
    for the CPU, whose generator :func:`torch.get_rng_state` covers."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    """Restore what :func:`rng_state` returned (on a device of the same type)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state.cpu())
