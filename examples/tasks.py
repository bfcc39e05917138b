"""The tasks of the quick-start demo: a sync task, an async task, and one that fails."""

import asyncio

from celeriac import Celery

app = Celery("tasks")  # no broker or backend given: SQLite files in the working directory


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
async def fetch_greeting(name: str) -> str:
    await asyncio.sleep(0.1)  # stands for real I/O: an HTTP call, a database query
    return f"hello, {name}"


@app.task(bind=True)
def whoami(self) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {"id": self.request.id, "worker": self.request.hostname, "retries": self.request.retries}


@app.task
def divide(x: float, y: float) -> float:
    return x / y
