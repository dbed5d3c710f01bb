"""GDBench tasks: one loader protocol (`base.Task`), one module per task, a registry by name."""
from __future__ import annotations

from itm_engine.data.base import Crop, DataError, Example, Task

TASKS: dict[str, type[Task]] = {}


def register(task: type[Task]) -> type[Task]:
    """Class decorator: make a task available to `get_task` / `itm-eval --task` by its name."""
    TASKS[task.name] = task
    return task


def get_task(name: str, root, **options) -> Task:
    """The task `name` over the dataset folder `root`; an unknown name lists the known ones."""
    _import_all()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](root, **options)


def _import_all() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


__all__ = ["Crop", "DataError", "Example", "Task", "TASKS", "get_task", "register"]
