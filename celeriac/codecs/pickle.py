"""pickle, as kombu writes it: ``pickle.dumps(value, protocol=4)``.

Unpickling runs arbitrary code chosen by whoever wrote the payload, so
:func:`celeriac.codecs.loads` only ever reaches :func:`decode` when the caller put
``application/x-python-serialize`` in its accept list.
"""

from __future__ import annotations

import pickle
from typing import Any

CONTENT_TYPE = "application/x-python-serialize"
CONTENT_ENCODING = "binary"

#: kombu's default (its ``PICKLE_PROTOCOL``): readable by every Python 3 Celery still supports.
PROTOCOL = 4


def encode(value: Any) -> bytes:
    """``value`` pickled with protocol 4."""
    return pickle.dumps(value, protocol=PROTOCOL)


def decode(data: bytes) -> Any:
    """Unpickle ``data``. Only call this for payloads whose content type the caller accepted."""
    return pickle.loads(data)
