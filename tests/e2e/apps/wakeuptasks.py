"""A task for the wake-up tests: its worker polls the broker every 5 s at most."""

from __future__ import annotations

from celeriac import Celery

app = Celery("wakeuptasks")
app.conf.update(broker_transport_options={"polling_interval": 5.0})


@app.task
def add(x: int, y: int) -> int:
    return x + y
