"""The five scenarios; each is a function ``(Context) -> list[Row]`` for one broker."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.report import Row
from benchmarks.scenarios import drain, enqueue, iobound, memory, roundtrip
from benchmarks.scenarios.common import Context

SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "drain": drain.run,
    "enqueue": enqueue.run,
    "roundtrip": roundtrip.run,
    "io": iobound.run,
    "memory": memory.run,
}
