"""The recipes: one module per task, each a config dataclass plus the hooks of :class:`Task`.

``get(name)`` returns a task's class; an unknown name raises :class:`RecipeError` listing the
valid ones.
"""

from __future__ import annotations

import difflib

from ..errors import RecipeError
from .base import PredictOption, Task, TrainConfig
from .charlm import CharLMTask
from .g2p import G2PTask
from .sentiment import SentimentTask
from .speech import SpeechTask
from .translate import TranslateTask

__all__ = ["TASKS", "PredictOption", "Task", "TrainConfig", "get", "register"]

TASKS: dict[str, type[Task]] = {}


def register(task: type[Task]) -> type[Task]:
    TASKS[task.name] = task
    return task


for _task in (SentimentTask, SpeechTask, CharLMTask, G2PTask, TranslateTask):
    register(_task)


def get(name: str) -> type[Task]:
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RecipeError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(sorted(TASKS))}")
