"""Training with several processes (one machine or many), as launched by ``torchrun``.

``torchrun --nproc_per_node=N $(which rnnkit) train TASK ...`` starts N copies of the command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:meth:`World.from_env` reads them and :meth:`World.start` joins the process group (gloo on the
CPU, nccl on CUDA). Multi-node runs use torchrun's own rendezvous options (``--nnodes``,
``--node-rank``, ``--rdzv-backend``, ``--rdzv-endpoint``); nothing here reinvents them.

The rules :mod:`rnnkit.train` follows with a :class:`World`:

- rank 0 alone reads and writes the run directory; what the other ranks need from it (the config,
  the vocabulary, a checkpoint) reaches them through :meth:`World.share`;
- whatever rank 0 does alone runs through :meth:`World.on_main`, which hands its result, or the
  exception it raised, to every rank, so that an error stops all of them at the same point with
  the same message instead of leaving the others waiting;
- what every rank does on its own before training (loading the data, building the model) runs
  under :meth:`World.together`: when it fails on any rank, every rank stops there with the error
  of the first rank that failed, and rank 0 alone reports it;
- a collective that cannot reach another process (killed, out of memory, its machine gone) raises
  :class:`~rnnkit.errors.ProcessLost` on each rank still there (:meth:`World.collective`),
  rather than the transport's traceback or a wait for the collective's timeout;
- every decision that changes the control flow (stop, checkpoint, out of time) is taken from
  numbers every rank holds identically (:meth:`World.sum`), never from a clock of its own.

With one process (no torchrun) every method is the identity and nothing touches
``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import DeviceError, ProcessLost, RecipeError

__all__ = ["World"]

T = TypeVar("T")

#: How long a rank waits for the others at one collective (rank 0 validating, writing a checkpoint).
TIMEOUT = datetime.timedelta(minutes=30)


class _Failed:
    """What :meth:`World.on_main` sends in place of a result when rank 0 raised."""

    def __init__(self, error: BaseException) -> None:
        try:
            pickle.dumps(error)
            self.error: BaseException = error
        except Exception:  # an exception that does not pickle travels as its message
            self.error = RuntimeError(f"{type(error).__name__}: {error}")


@dataclass
class World:
    """This process's place among the processes that train one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    started_here: bool = False  # this object joined the process group (and leaves it at close)
    device: torch.device | None = None

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in the environment (one process when it does not)."""
        size = _env_int("WORLD_SIZE", 1)
        if size <= 1:
            return cls()
        rank, local = _env_int("RANK", -1), _env_int("LOCAL_RANK", -1)
        if not 0 <= rank < size or local < 0:
            raise DeviceError(
                f"WORLD_SIZE = {size} but RANK = {os.environ.get('RANK')!r}, LOCAL_RANK = "
                f"{os.environ.get('LOCAL_RANK')!r}; expected torchrun's environment (start the "
                "command with torchrun, or unset WORLD_SIZE)"
            )
        return cls(rank=rank, size=size, local_rank=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def start(self, device: torch.device) -> None:
        """Join the process group for ``device`` (nccl for CUDA, gloo otherwise)."""
        self.device = device
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():  # a caller's own process group: use it, leave it to the caller
            if dist.get_world_size() != self.size:
                raise DeviceError(
                    f"the process group has {dist.get_world_size()} processes but WORLD_SIZE = "
                    f"{self.size}"
                )
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(
                backend,
                rank=self.rank,
                world_size=self.size,
                timeout=TIMEOUT,
                **({"device_id": device} if device.type == "cuda" else {}),
            )
        except (RuntimeError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeviceError(
                f"rank {self.rank} of {self.size} cannot join the {backend} process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({first}); "
                "check torchrun's --rdzv-endpoint and that the machines reach each other"
            ) from None
        self.started_here = True

    def close(self) -> None:
        """Leave the process group if :meth:`start` joined it."""
        if self.started_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.started_here = False

    # -- collectives (every rank calls them at the same point) ----------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64), identically on every rank."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self.collective("an all-reduce"):
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        return self.sum([float(flag)])[0] > 0 if self.distributed else flag

    def share(self, obj: T | None) -> T:
        """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
        if not self.distributed:
            return obj  # type: ignore[return-value]
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        with self.collective("a broadcast from rank 0"):
            dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` as a list on rank 0 (None on the others)."""
        if not self.distributed:
            return [obj]
        out = self._all(obj)
        return out if self.is_main else None

    def _all(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` as a list on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        with self.collective("an all-gather"):  # (gather_object: not on every backend)
            dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 alone; its result on every rank, or its exception raised on
        every rank (a KeyboardInterrupt or SystemExit too, so that all of them stop at this point
        instead of waiting for rank 0 until the collective's timeout)."""
        if not self.distributed:
            return fn()
        result: Any = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # re-raised on every rank below
                result = _Failed(e)
        result = self.share(result)
        if isinstance(result, _Failed):
            if not self.is_main and isinstance(result.error, RecipeError):
                result.error.shared = True  # type: ignore[attr-defined]  # rank 0 reports it
            raise result.error
        return result

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block every rank runs on its own (it must hold no collective), after which the ranks
        agree on how it went: where it raised on any rank, every rank raises the error of the
        first rank that failed, rank 0 alone reporting it (prefixed with the rank that hit it
        when rank 0 did not), instead of each rank printing its own copy or going on to wait
        for a rank that has stopped."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except BaseException as e:  # re-raised below, once every rank knows
            self._agree(e)
            raise
        self._agree(None)

    def _agree(self, mine: BaseException | None) -> None:
        outcomes = self._all(None if mine is None else _Failed(mine))
        failed = next((rank for rank, o in enumerate(outcomes) if o is not None), None)
        if failed is None:
            return
        error = mine if failed == self.rank and mine is not None else outcomes[failed].error
        if isinstance(error, RecipeError):
            if not self.is_main:
                error.shared = True  # type: ignore[attr-defined]  # rank 0 reports it
            elif failed != 0:
                error.args = (f"rank {failed} of {self.size}: {error}",)
        if error is mine:
            raise error
        raise error from None

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """A block of collectives (``what`` names them for a user), whose failure to reach the
        other processes raises :class:`ProcessLost` naming this rank instead of the transport's
        own error; any other error passes through as it is."""
        try:
            yield
        except RuntimeError as e:
            if not _lost_peer(e):
                raise
            raise ProcessLost(
                f"rank {self.rank} of {self.size}: {what} failed ({_first_line(e)}): another "
                "process of this run stopped or cannot be reached (its own output says why)"
            ) from None

    def _object_device(self) -> torch.device | None:
        return self.device if self.device is not None and self.device.type == "cuda" else None


def _lost_peer(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective's transport failing (a peer gone, a connection reset or
    closed, a timeout), as gloo and nccl raise it, rather than an error in what was sent."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    marks = ("/gloo/", "Gloo", "NCCL", "Connection reset", "Connection closed")
    return any(mark in str(error) for mark in marks)


def _first_line(error: BaseException) -> str:
    """The gist of a transport's error: its first line, without the source location gloo puts
    in front of it, at most 200 characters."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(" This is typically caused", 1)[0].rstrip(". ")
    return text if len(text) <= 200 else text[:197] + "..."


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DeviceError(f"{name} = {value!r}; expected an integer (torchrun sets it)") from None
