"""The task registry: every task module registers its class here by name.

Core code never imports a task by name; it asks `get_task(config)`. See `tasks.base` for what
a task provides.
"""
from __future__ import annotations

import importlib
import pkgutil

from tunelab.errors import ConfigError

_TASKS: dict[str, type] = {}
_LOADED = False


def register_task(cls):
    """Class decorator: ``@register_task`` on a `tasks.base.Task` subclass."""
    _TASKS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import tunelab.tasks as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"tunelab.tasks.{info.name}")
    _LOADED = True


def task_class(name: str) -> type:
    _load_all()
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_names() -> list[str]:
    _load_all()
    return sorted(_TASKS)


def get_task(config):
    """The task object of a resolved RunConfig."""
    return task_class(config.task.name)(config)
