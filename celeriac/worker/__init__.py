"""The asyncio worker."""

from celeriac.worker.worker import Worker

__all__ = ["Worker"]
