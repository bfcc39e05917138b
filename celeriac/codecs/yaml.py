"""YAML, as kombu writes it: ``yaml.safe_dump`` out, and **safe loading only** in.

The safe loader builds plain data (dicts, lists, str, numbers, datetimes, ``!!binary`` bytes, sets)
and refuses the ``!!python/…`` tags that would construct arbitrary objects. PyYAML is an optional
dependency (extra ``yaml``).
"""

from __future__ import annotations

from typing import Any

from celeriac.exceptions import EncodeError
from celeriac.utils.optional import optional_module

CONTENT_TYPE = "application/x-yaml"
CONTENT_ENCODING = "utf-8"


def _module() -> Any:  # typed as Any: the yaml module is used through its attributes
    # Imported at use, not at import time: celeriac works without PyYAML unless it is chosen.
    return optional_module(
        "yaml", purpose="the yaml serializer", package="PyYAML", install="'celeriac[yaml]'"
    )


def encode(value: Any) -> bytes:
    """``value`` as ``yaml.safe_dump`` writes it (sorted keys, block style), UTF-8 encoded."""
    yaml = _module()
    try:
        text: str = yaml.safe_dump(value)
    except yaml.representer.RepresenterError as exc:
        # PyYAML's message is "cannot represent an object" with the object as second argument.
        offending = exc.args[1] if len(exc.args) > 1 else None
        raise EncodeError(
            f"yaml cannot encode object of type {type(offending).__qualname__}"
        ) from exc
    return text.encode("utf-8")


def decode(data: bytes) -> Any:
    """A value from YAML bytes, with the safe loader (PyYAML detects UTF-8/UTF-16 from a BOM)."""
    return _module().safe_load(bytes(data))
