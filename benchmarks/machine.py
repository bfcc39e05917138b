"""What the figures were measured on: CPU, memory, Python, the versions of everything involved."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from benchmarks.services import Service


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def facts(services: Iterable[Service]) -> dict[str, Any]:
    """Machine and software facts; a server that cannot be asked is recorded as None."""
    servers: dict[str, str | None] = {}
    for service in services:
        try:
            servers[service.name] = None if service.unavailable() else service.version()
        except Exception as exc:  # a version is a nicety: never fail the run for it
            servers[service.name] = f"unknown ({type(exc).__name__})"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "celeriac": _version("celeriac"),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis-py": _version("redis"),
        "aiormq": _version("aiormq"),
        "servers": servers,
    }


def summary(machine: dict[str, Any]) -> str:
    """One paragraph for the head of the printed table."""
    servers = ", ".join(
        f"{name} {version or '(not running)'}" for name, version in machine["servers"].items()
    )
    return (
        f"{machine['date']} · {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['ram_gib']} GiB · Python {machine['python']} · celeriac {machine['celeriac']}, "
        f"Celery {machine['celery']} (kombu {machine['kombu']}) · {servers}"
    )
