"""Celery task message protocol: the typed message and its wire forms (v2 written, v1/v2 read)."""

from celeriac.protocol.message import SignatureDict, TaskMessage

__all__ = ["SignatureDict", "TaskMessage"]
