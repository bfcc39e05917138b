"""The knobs of a run, with the defaults of a full run and of ``--quick``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS = ("drain", "enqueue", "roundtrip", "io", "memory")
BROKERS = ("redis", "rabbitmq", "sqlite")


@dataclass(slots=True)
class Options:
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    brokers: list[str] = field(default_factory=lambda: list(BROKERS))
    #: Tasks of the drain and of each enqueue measurement.
    tasks: int = 5_000
    #: Timed round trips, after ``warmup`` untimed ones.
    roundtrips: int = 500
    warmup: int = 50
    #: The I/O-bound scenario: tasks, how long each sleeps, how many run at once.
    io_tasks: int = 5_000
    io_sleep: float = 0.1
    io_concurrency: int = 500
    #: Most children Celery's prefork pool gets in the I/O-bound scenario (one process per task).
    io_prefork_limit: int = 50
    #: Tasks after which a celeriac worker's RSS is compared with its idle RSS.
    memory_tasks: int = 100_000
    #: The same for Celery, whose drain is slower: fewer by default, to keep the run short.
    celery_memory_tasks: int = 10_000
    #: Times each measurement is made; the median is reported.
    repeat: int = 1
    #: Seconds a worker is left alone before its RSS is read (start-up and imports settle).
    settle: float = 1.0
    #: Seconds without progress after which a measurement is abandoned.
    stall_timeout: float = 30.0
    quick: bool = False
    json: Path | None = None

    @classmethod
    def quick_run(cls, **overrides: Any) -> Options:
        """A small run (seconds, not minutes): one Celery pool, tiny counts."""
        base: dict[str, Any] = {
            "tasks": 300,
            "roundtrips": 50,
            "warmup": 10,
            "io_tasks": 200,
            "io_concurrency": 50,
            "memory_tasks": 1_000,
            "celery_memory_tasks": 300,
            "settle": 0.3,
            "stall_timeout": 15.0,
            "quick": True,
        }
        base.update(overrides)
        return cls(**base)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
