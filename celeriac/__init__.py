"""celeriac: a Celery-compatible distributed task queue with an asyncio-native worker."""

__version__ = "0.1.0"
