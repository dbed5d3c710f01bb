"""Benchmark tasks: one loader protocol (`base.Task`), one module per task, a registry by name.

Tasks of this package register themselves when imported; plugins add theirs the same way (the
ShapesWorld lab's `shapes*` tasks, see `itm_engine.plugins`).
"""
from __future__ import annotations

from itm_engine.tasks.base import Crop, DataError, Example, Task

TASKS: dict[str, type[Task]] = {}


def register(task: type[Task]) -> type[Task]:
    """Class decorator: make a task available to `get_task` / `itm-eval --task` by its name."""
    TASKS[task.name] = task
    return task


def get_task(name: str, root, **options) -> Task:
    """The task `name` over the dataset folder `root`; an unknown name lists the known ones."""
    if name not in all_tasks():
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](root, **options)


def all_tasks() -> dict[str, type[Task]]:
    """Every task by name: this package's and the installed plugins'."""
    import importlib
    import pkgutil

    from itm_engine.plugins import load_plugins

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    load_plugins()
    return TASKS


__all__ = ["Crop", "DataError", "Example", "Task", "TASKS", "all_tasks", "get_task", "register"]
