"""Training tasks (``task.name``): what a run trains, on top of the one trainer.

Each task is a module of this package defining ``TASK = Task(...)`` (see ``base``); a new task is a
new file, found here by name, not an edit of the trainer (docs/architecture.md, "Where each part
lives"). ``pretrain`` is MiCo's three objectives on captions; ``qa`` fine-tunes open-ended QA
(docs/finetuning.md, "Demo: QA fine-tune").
"""

from __future__ import annotations

import importlib
import pkgutil

from mico_ds.tasks.base import SampleTask, Task

_NOT_TASKS = {"base"}
DEFAULT_TASK = "pretrain"


def names() -> list[str]:
    """The task names, sorted (module names: nothing is imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS)


def get(name: str) -> Task:
    """The task called ``name``; a ValueError lists the known ones."""
    if name not in names():
        raise ValueError(f"unknown task.name {name!r}; known: {', '.join(names())}")
    task = getattr(importlib.import_module(f"{__name__}.{name}"), "TASK", None)
    if not isinstance(task, Task):
        raise ValueError(f"mico_ds.tasks.{name} defines no TASK = Task(...)")
    return task


__all__ = ["DEFAULT_TASK", "SampleTask", "Task", "get", "names"]
