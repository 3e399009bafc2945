"""Errors the recipes raise for a user to read: the CLI prints the message on one line and exits
with the error's ``exit_code``: 2 when the command line, an input or a run directory is wrong
(the user changes the command), 1 when a sound command could not run to the end (the disk is full
or read-only, training diverged, the machine lacks the device asked for).

And the errors the layers and cells raise for a wrong argument, each also the exception type
torch.nn raises for the same mistake: :class:`ShapeError` (a tensor of the wrong shape),
:class:`DTypeError` (a tensor of the wrong dtype) and :class:`ArgumentTypeError` (a constructor
argument of the wrong type)."""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ArgumentTypeError",
    "CheckpointError",
    "DTypeError",
    "DataMissing",
    "DeviceError",
    "ProcessLost",
    "RecipeError",
    "ShapeError",
    "StorageError",
    "TrainingDiverged",
]


class RecipeError(Exception):
    """A problem with the user's input, data or run directory (not a bug in rnnkit)."""

    exit_code: ClassVar[int] = 2


class DataMissing(RecipeError):
    """A task's data package is not installed; the message carries the exact install command."""


class CheckpointError(RecipeError):
    """A run directory's checkpoint or config is missing, unreadable or does not match."""


class StorageError(RecipeError):
    """The run directory cannot be written: the disk is full or read-only, or permission is
    denied. The files already in the run directory are left as they were."""

    exit_code = 1


class TrainingDiverged(RecipeError):
    """The training loss or gradient norm became NaN or infinite; training stopped at that batch
    and the run directory keeps its last good checkpoint."""

    exit_code = 1


class DeviceError(RecipeError):
    """The device, precision or process group the command asks for is not available here (no
    CUDA device, cuda:3 on a machine with two GPUs, processes that cannot reach each other); the
    message says what to use instead."""

    exit_code = 1


class ProcessLost(DeviceError):
    """Another process of a multi-process run stopped or could not be reached in the middle of a
    collective (killed, out of memory, its machine gone): this one stops too, rather than
    printing the transport's traceback or waiting for the collective's timeout. The message says
    which rank, where, and how the run goes on from its last checkpoint."""


class ShapeError(ValueError, RuntimeError):
    """A tensor given to a layer or cell has the wrong shape: a wrong number of dimensions or of
    features, no time steps, an initial state that does not fit the input. A ValueError, and a
    RuntimeError as torch.nn raises for most of the same mistakes, so code written around
    torch.nn's layers catches it where it caught theirs."""


class DTypeError(TypeError, ValueError, RuntimeError):
    """A tensor given to a layer or cell has a dtype the call cannot take: integer input, or an
    input or initial state whose floating dtype differs from the weights' outside autocast. A
    TypeError, and the ValueError or RuntimeError torch.nn raises for these mistakes (which one
    depends on the mistake and the layer), so code written around torch.nn's layers catches it."""

    @classmethod
    def input_of(cls, owner: str, given: object, weights: object) -> DTypeError:
        """The error for ``owner``'s input of dtype ``given`` where its weights are ``weights``
        (torch.nn's words, and what to convert)."""
        return cls(
            f"{owner} input dtype ({given}) does not match weight dtype ({weights}). Convert "
            f"input: input.to({weights}), or convert model: model.to({given})"
        )


class ArgumentTypeError(TypeError, ValueError):
    """A layer or cell was constructed with an argument of the wrong type (a size given as a
    float): the TypeError torch.nn raises, and a ValueError like rnnkit's other checks of
    constructor arguments (a size of 0)."""
