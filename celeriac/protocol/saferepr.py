"""Bounded ``repr`` for the ``argsrepr``/``kwargsrepr`` headers.

Celery puts a ``repr`` of the arguments in every message so that logs, events and monitors (Flower)
can show them without decoding the body. It must never be expensive or fail: arguments can be huge,
deeply nested, self-referencing, or have a ``__repr__`` that raises. Like Celery's
``celery.utils.saferepr`` this stops after ``maxlen`` characters (then writes ``...`` and closes the
open brackets, so the text stays balanced) and shows containers deeper than ``maxlevels`` as
``[...]``. Unlike Celery's, strings use Python's own quoting, so a newline or quote inside an
argument cannot break a log line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["saferepr"]

#: Celery's ``argsrepr_maxsize`` / ``kwargsrepr_maxsize`` and ``task_repr_maxlevels`` defaults.
DEFAULT_MAXLEN = 1024
DEFAULT_MAXLEVELS = 3

_ELLIPSIS = "..."


class _Writer:
    """Accumulates text until the length budget is spent, then refuses more (except closers)."""

    __slots__ = ("full", "left", "parts")

    def __init__(self, maxlen: int) -> None:
        self.parts: list[str] = []
        self.left = maxlen
        self.full = False

    def put(self, text: str) -> bool:
        """Append ``text`` (cut to the budget); return False once nothing more may be written."""
        if self.full:
            return False
        if self.left <= 0:
            self.parts.append(_ELLIPSIS)
            self.full = True
            return False
        if len(text) > self.left:
            text = text[: self.left] + _ELLIPSIS
            self.full = True
        self.parts.append(text)
        self.left -= len(text)
        return not self.full

    def close(self, text: str) -> None:
        """Closing brackets are always written, so truncated output stays balanced."""
        self.parts.append(text)


def _leaf(value: Any, budget: int) -> str:
    if isinstance(value, str | bytes | bytearray) and len(value) > budget:
        # Never build the repr of a huge string only to throw most of it away.
        value = value[: budget + 1]
    try:
        return repr(value)
    except Exception as exc:  # a user __repr__ may raise anything (so may int > 4300 digits)
        return f"<unrepresentable {type(value).__name__}: {exc!r}>"


def _brackets(value: Any) -> tuple[str, str] | None:
    if isinstance(value, list):
        return "[", "]"
    if isinstance(value, tuple):
        return "(", ",)" if len(value) == 1 else ")"
    if isinstance(value, dict):
        return "{", "}"
    if isinstance(value, set | frozenset):
        name = type(value).__name__
        return ("{", "}") if type(value) is set else (f"{name}({{", "})")
    return None


def _write(out: _Writer, value: Any, level: int, maxlevels: int, seen: set[int]) -> None:
    brackets = _brackets(value)
    if brackets is None:
        out.put(_leaf(value, out.left))
        return
    if isinstance(value, set | frozenset) and not value:
        out.put(f"{type(value).__name__}()")
        return
    opener, closer = brackets
    if level >= maxlevels:
        out.put(f"{opener}...{closer}")
        return
    if id(value) in seen:
        out.put(f"<Recursion on {type(value).__name__} with id={id(value)}>")
        return
    if not out.put(opener):
        return
    seen.add(id(value))
    try:
        items = value.items() if isinstance(value, dict) else value
        for index, entry in enumerate(items):
            if index and not out.put(", "):
                break
            item = entry
            if isinstance(value, dict):
                key, item = entry
                _write(out, key, level + 1, maxlevels, seen)
                if not out.put(": "):
                    break
            _write(out, item, level + 1, maxlevels, seen)
            if out.full:
                break
    finally:
        seen.discard(id(value))
    out.close(closer)


#: Types whose ``repr`` is what the general walk writes for them (exact types: a subclass may
#: have a ``__repr__`` of its own).
_PLAIN = frozenset({int, float, str, bool, type(None)})
_CONTAINERS = frozenset({tuple, list, dict})


def _flat_repr(value: Any, maxlen: int) -> str | None:
    """``repr(value)`` when the general walk would write exactly that, else None.

    The common case, every call of every task: a flat tuple, list or dict of plain values that
    fits in ``maxlen``, such as ``(2, 3)`` or ``{}``. The walk writes such a value as ``repr``
    does, and taking ``repr`` at once is several times cheaper.
    """
    kind = type(value)
    if kind is dict:
        if not all(type(k) is str and type(v) in _PLAIN for k, v in value.items()):
            return None
    elif kind is tuple or kind is list:
        if not all(type(item) in _PLAIN for item in value):
            return None
    else:
        return None
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits: the walk says so
        return None
    return text if len(text) <= maxlen else None


def saferepr(value: Any, maxlen: int = DEFAULT_MAXLEN, maxlevels: int = DEFAULT_MAXLEVELS) -> str:
    """``repr(value)`` cut to about ``maxlen`` characters and ``maxlevels`` of nesting."""
    if maxlevels > 0 and type(value) in _CONTAINERS and len(value) <= 64:
        flat = _flat_repr(value, maxlen)
        if flat is not None:
            return flat
    out = _Writer(maxlen)
    _write(out, value, 0, maxlevels, set())
    return "".join(out.parts)
