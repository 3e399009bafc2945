"""Errors the recipes raise for a user to read: the CLI prints the message and exits with code 2."""

from __future__ import annotations

__all__ = ["CheckpointError", "DataMissing", "RecipeError"]


class RecipeError(Exception):
    """A problem with the user's input, data or run directory (not a bug in rnnkit)."""


class DataMissing(RecipeError):
    """A task's data package is not installed; the message carries the exact install command."""


class CheckpointError(RecipeError):
    """A run directory's checkpoint or config is missing, unreadable or does not match."""
