"""celeriac: a Celery-compatible distributed task queue with an asyncio-native worker.

from celeriac import Celery
app = Celery("tasks")          # embedded SQLite broker and result store

@app.task
def add(x, y):
    return x + y
"""

from celeriac import states
from celeriac.app.base import App, Celery
from celeriac.app.canvas import Signature, maybe_signature, signature
from celeriac.app.chains import chain
from celeriac.app.context import Context
from celeriac.app.groups import group
from celeriac.app.queues import Exchange, Queue
from celeriac.app.result import AsyncResult, EagerResult, GroupResult, ResultSet
from celeriac.app.shared import current_app, shared_task
from celeriac.app.task import Task

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncResult",
    "Celery",
    "Context",
    "EagerResult",
    "Exchange",
    "GroupResult",
    "Queue",
    "ResultSet",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "current_app",
    "group",
    "maybe_signature",
    "shared_task",
    "signature",
    "states",
]
