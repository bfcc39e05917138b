"""The task registry: task name -> task, with Celery's ``NotRegistered`` for unknown names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celeriac.exceptions import NotRegistered

if TYPE_CHECKING:
    from celeriac.app.task import Task


class TaskRegistry(dict[str, "Task[Any, Any]"]):
    """``app.tasks``."""

    def __missing__(self, name: str) -> Task[Any, Any]:
        raise NotRegistered(name)

    def register(self, task: Task[Any, Any]) -> None:
        """Add ``task`` under its name (a later registration of the same name replaces it)."""
        self[task.name] = task
